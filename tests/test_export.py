"""`editscale export` (runs as flat Parquet/CSV tables) and the comparison table's fit to a terminal,
on three small stub-editor runs of a tiny model (no trained checkpoint needed)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

import runner_stubs
from editscale.errors import EditscaleError
from editscale.report.export import RUN_COLUMNS, export_runs
from editscale.report.tables import comparison_rows, comparison_table
from editscale.run.config import RunConfig
from editscale.run.runner import Runner
from editscale.run.store import RunStore

TASKS = ["tiny_sentiment", "tiny_paraphrase", "tiny_acceptability", "tiny_entailment"]
ROW_TABLES = ("edits", "forgetting", "downstream", "health")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three finished runs of 4 edits, 4 downstream tasks each: `a` edits layers 0 and 1 (sample 0),
    `b` layer 1 only (sample 1), `c` in batches of 2."""
    root = tmp_path_factory.mktemp("export")
    world = runner_stubs.make_world(root / "world")
    tasks = Path(world["tasks"])
    for name in TASKS[1:]:  # the same tiny examples under other names: four columns of F1
        text = (tasks / "tiny_sentiment.yaml").read_text()
        (tasks / f"{name}.yaml").write_text(text.replace("name: tiny_sentiment", f"name: {name}"))
    # downstream before the first edit and after the last: the few-shot evaluations are most of the time
    base = dict(model=world["model"], method="stub", dataset="counterfact", data_path=world["data"], edits=4,
                eval_every=2, checkpoint_every=4, control=5, downstream=TASKS, downstream_n=2, downstream_every=4)
    plans = {"stub-a": dict(sample=0, method_config={"layers": [0, 1]}),
             "stub-b": dict(sample=1, method_config={"layers": [1]}),
             "stub-batch2": dict(sample=0, batch_size=2, control=0, health=False, method_config={"layers": [1]})}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITSCALE_TASKS", world["tasks"])
        for name, kw in plans.items():
            out[name] = root / name
            Runner(RunConfig(**{**base, **kw}), out[name], progress=False, log=lambda s: None).run()
    out["model"] = Path(world["model"])
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, dict[str, pd.DataFrame]]:
    """Runs a and b exported to both formats and read back with pandas."""
    dest = tmp_path_factory.mktemp("tables")
    back = {}
    for fmt in ("parquet", "csv"):
        written = export_runs([runs["stub-a"], runs["stub-b"]], dest / fmt, fmt=fmt)
        assert set(written) == {"runs", *ROW_TABLES}  # no retest rows: no retest table
        assert all(p == dest / fmt / f"{name}.{fmt}" and p.exists() for name, p in written.items())
        read = pd.read_parquet if fmt == "parquet" else pd.read_csv
        back[fmt] = {name: read(p) for name, p in written.items()}
    return back


def test_every_row_of_every_run_is_exported_with_its_run_columns(runs, exported) -> None:
    tables = exported["parquet"]
    for name in ROW_TABLES:
        df = tables[name]
        assert list(df.columns[:len(RUN_COLUMNS)]) == list(RUN_COLUMNS)
        for run, sample in (("stub-a", 0), ("stub-b", 1)):
            mine = df[df["run"] == run]
            assert len(mine) == len(RunStore(runs[run]).rows(name)) > 0, (name, run)
            assert set(mine["path"]) == {str(runs[run].resolve())}
            assert set(mine["sample"]) == {sample} and set(mine["method"]) == {"stub"}
            assert set(mine["model"]) == {str(runs["model"])} and set(mine["dataset"]) == {"counterfact"}
            assert set(mine["batch_size"]) == {1} and set(mine["seed"]) == {0}


def test_nested_fields_become_dotted_columns(runs, exported) -> None:
    edits = exported["parquet"]["edits"]
    rows = RunStore(runs["stub-a"]).rows("edits")
    a = edits[edits["run"] == "stub-a"]
    assert list(a["drift.1.dist"]) == [r["drift"]["1"]["dist"] for r in rows]
    assert list(a["drift.0.rel"]) == [r["drift"]["0"]["rel"] for r in rows]
    assert list(a["diagnostics.applied_before"]) == [r["diagnostics"]["applied_before"] for r in rows]
    assert list(a["timings.total"]) == [r["timings"]["total"] for r in rows]
    # b edits layer 1 only: the union of columns, empty where b has no value
    assert edits.loc[edits["run"] == "stub-b", "drift.0.dist"].isna().all()
    assert edits.loc[edits["run"] == "stub-b", "drift.1.dist"].notna().all()
    down = exported["parquet"]["downstream"]
    first = RunStore(runs["stub-b"]).rows("downstream")[0]
    got = down[down["run"] == "stub-b"].iloc[0]
    for task in TASKS:
        for metric in ("f1", "accuracy", "mcc", "invalid", "total"):
            assert got[f"tasks.{task}.{metric}"] == first["tasks"][task][metric]
    assert not any(c == "tasks" or c.startswith("tasks.") and c.count(".") != 2 for c in down.columns)


def test_list_columns_are_json_text(runs, exported) -> None:
    for fmt in ("parquet", "csv"):
        health = exported[fmt]["health"]
        rows = RunStore(runs["stub-a"]).rows("health")
        assert [json.loads(g) for g in health.loc[health["run"] == "stub-a", "generations"]] == \
            [r["generations"] for r in rows]
        forgetting = exported[fmt]["forgetting"]
        rows = RunStore(runs["stub-b"]).rows("forgetting")
        b = forgetting[forgetting["run"] == "stub-b"]
        for col in ("paper_newly_forgotten", "prob_forgotten_ids", "prob_came_back"):
            assert [json.loads(x) for x in b[col]] == [r[col] for r in rows], (fmt, col)


def test_the_runs_table_holds_config_and_summary(runs, exported) -> None:
    df = exported["parquet"]["runs"].set_index("run")
    for run, layers in (("stub-a", [0, 1]), ("stub-b", [1])):
        summary = json.loads((runs[run] / "summary.json").read_text())
        assert json.loads(df.loc[run, "method_config.layers"]) == layers
        assert df.loc[run, "method_config.scale"] == 0.02
        assert df.loc[run, "edits"] == 4 and df.loc[run, "downstream_every"] == 4
        assert json.loads(df.loc[run, "downstream"]) == TASKS
        assert bool(df.loc[run, "finished"])
        for key in ("mean_es", "mean_ps", "mean_ns", "max_drift", "edits_done", "paper_forgotten_pct_final"):
            assert df.loc[run, key] == summary[key], key
        for task in TASKS:
            assert df.loc[run, f"downstream_final_f1.{task}"] == summary["downstream_final_f1"][task]
        assert df.loc[run, "final_drift.1.dist"] == summary["final_drift"]["1"]["dist"]
        assert df.loc[run, "versions.python"]
    assert np.isnan(df.loc["stub-b", "final_drift.0.dist"])


def test_csv_and_parquet_agree(exported) -> None:
    def plain(df: pd.DataFrame) -> pd.DataFrame:  # one kind of empty cell, whichever the reader chose
        return df.astype(object).where(df.notna(), None)

    for name, df in exported["parquet"].items():
        other = exported["csv"][name]
        assert list(df.columns) == list(other.columns), name
        pd.testing.assert_frame_equal(plain(df), plain(other), check_dtype=False, obj=name)


def test_a_run_in_progress_and_a_non_run(runs, tmp_path: Path) -> None:
    running = tmp_path / "running"
    shutil.copytree(runs["stub-b"], running)
    (running / "summary.json").unlink()
    with RunStore(running).root.joinpath("edits.jsonl").open("a") as f:
        f.write('{"index": 4, "torn')  # a row half written when the export read the file: dropped
    written = export_runs([running], tmp_path / "out", fmt="csv")
    runs_df = pd.read_csv(written["runs"])
    assert not runs_df.loc[0, "finished"] and runs_df.loc[0, "edits_done"] == 4
    assert len(pd.read_csv(written["edits"])) == 4
    with pytest.raises(EditscaleError, match="holds no run"):
        export_runs([running, tmp_path / "out"], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # nothing written when a directory is not a run
    with pytest.raises(EditscaleError, match="xlsx"):
        export_runs([running], tmp_path / "out3", fmt="xlsx")


def test_the_export_command(run_cli, runs, tmp_path: Path) -> None:
    dest = tmp_path / "tables"
    code, out, err = run_cli("export", str(runs["stub-a"]), str(runs["stub-b"]), "--format", "csv", "--out",
                             str(dest))
    assert code == 0, err
    for name in ("runs", *ROW_TABLES):
        df = pd.read_csv(dest / f"{name}.csv")
        assert f"{dest / name}.csv  {len(df)} rows, {len(df.columns)} columns" in out
    code, out, err = run_cli("export", str(runs["stub-a"]), "--format", "xlsx", "--out", str(dest))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "xlsx" in err and "--format" in err and "Traceback" not in err
    code, out, err = run_cli("export", str(tmp_path), "--out", str(dest))
    assert code == 2 and "holds no run (no config.yaml)" in err and len(err.strip().splitlines()) == 1


def test_compare_fits_a_100_column_terminal(runs) -> None:
    dirs = [runs["stub-a"], runs["stub-b"], runs["stub-batch2"]]
    rows = comparison_rows(dirs)
    assert [(r["model"], r["sample"], r["batch"]) for r in rows] == [("tiny-gpt2", 0, 1), ("tiny-gpt2", 1, 1),
                                                                     ("tiny-gpt2", 0, 2)]

    def render(width: int) -> str:
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(comparison_table(dirs))
        return console.export_text()

    text = render(100)
    assert max(len(line) for line in text.splitlines()) <= 100 and "…" not in text
    header = " ".join(text.splitlines()[:5])
    for col in ("run", "method", "B", "model", "smp", "edits", "ES", "PS", "NS", "forgot", "p/pr", "F1",
                "ac/en/pa/se", "drift", "collapse"):
        assert col in header, col
    assert "F1 ac/en/pa/se: " + ", ".join(sorted(TASKS)) in " ".join(text.split())  # the caption
    for r, d in zip(rows, dirs):
        line = next(line for line in text.splitlines() if line.startswith(d.name + " "))
        f1 = "/".join(f"{r['f1'][t]:.2f}".removeprefix("0") for t in sorted(TASKS))
        for cell in (r["method"], "tiny-gpt2", str(r["sample"]), str(r["batch"]), str(r["edits"]),
                     f"{r['mean_es']:.2f}".removeprefix("0"), f1, f"{r['max_drift']:.1e}"):
            assert f" {cell} " in f" {line} ", (cell, line)
    wide = render(250)  # room for every column: one per task, full headers
    assert "F1 tiny_entailment" in wide and "sample" in wide and "max drift" in wide and "…" not in wide
