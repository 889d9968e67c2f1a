"""Sweeps (run/sweep.py): the spec, cell names, the plan, and a 2x2 sweep (FT-C and ROME, two
samples) on a local Ray instance over the tiny model of tests/runner_stubs.py: four ordinary runs,
statistics computed once and shared, the report, and a crashed run continued by running the sweep
again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

import runner_stubs
from editscale.errors import EditscaleError
from editscale.run.config import dump_config
from editscale.run.runner import Runner
from editscale.run.store import RunStore
from editscale.run.sweep import SweepSpec, cell_name, plan, run_sweep
from test_runner_unit import without_timings

# ROME on the tiny model: one layer, a tiny statistics sample of the fact world's text, few steps
TINY_ROME = {"layers": [0], "mom2_dataset": "factworld", "mom2_n_samples": 50, "v_num_grad_steps": 2,
             "context_template_length_params": [[5, 1]]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    w = runner_stubs.make_world(tmp_path_factory.mktemp("world"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITSCALE_TASKS", w["tasks"])  # module-wide: the Ray workers get it when Ray starts
        yield w


def spec_dict(world: dict[str, str]) -> dict:
    base = dict(model=world["model"], dataset="counterfact", data_path=world["data"], edits=4, eval_every=2,
                checkpoint_every=2, control=3, downstream=["tiny_sentiment"], downstream_n=4, downstream_every=2)
    return {"base": base, "grid": {"method": ["ft-c", "rome"], "sample": [0, 1]},
            "per_method": {"ft-c": {"layers": [0], "num_steps": 3}, "rome": TINY_ROME}, "resources": {"cpus": 1}}


def test_cell_names_are_readable_and_stable() -> None:
    assert cell_name("rome", "embedded", 0, 1, 0) == "rome-embedded-s0-b1-seed0"
    assert cell_name("ft-c", "EleutherAI/gpt-j-6b", 3, 16, 2) == "ft-c-gpt-j-6b-s3-b16-seed2"
    assert cell_name("memit", "/data/models/tiny gpt2/", 0, 1, 0) == "memit-tiny_gpt2-s0-b1-seed0"
    a = cell_name("rome", "embedded", 0, 1, 0, {"v_lr": 0.1, "layers": [2]})
    assert a == cell_name("rome", "embedded", 0, 1, 0, {"layers": [2], "v_lr": 0.1})  # key order does not matter
    assert a.startswith("rome-embedded-s0-b1-seed0-") and len(a.rsplit("-", 1)[1]) == 8
    assert a != cell_name("rome", "embedded", 0, 1, 0, {"v_lr": 0.2, "layers": [2]})


def test_a_bad_spec_is_one_line_naming_the_field(tmp_path: Path, world) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"method": ["rome"], "lr": [0.1]}}))
    with pytest.raises(EditscaleError, match=r"grid\.lr") as err:
        SweepSpec.load(bad)
    assert "\n" not in str(err.value)
    bad.write_text(yaml.safe_dump({"base": {"method": "rome"}, "grid": {"method": ["rome"]}}))
    with pytest.raises(EditscaleError, match="'method' is set in both base and grid"):
        SweepSpec.load(bad)
    bad.write_text(yaml.safe_dump({"base": {"edits": 0}}))
    with pytest.raises(EditscaleError, match=r"base: invalid RunConfig: edits"):
        SweepSpec.load(bad)
    bad.write_text(yaml.safe_dump({"grid": {"method": ["rome"]}, "per_method": {"memit": {"v_lr": 1}}}))
    with pytest.raises(EditscaleError, match="per_method.memit: not a method of this sweep"):
        SweepSpec.load(bad)
    spec = SweepSpec.model_validate({**spec_dict(world), "per_method": {"ft-c": {"layers": [0], "nope": 1}}})
    with pytest.raises(EditscaleError, match=r"cell ft-c-tiny-gpt2-s0-b1-seed0: .*nope"):
        plan(spec, tmp_path / "sweep")
    spec = SweepSpec.model_validate({**spec_dict(world), "imports": ["editscale_no_such_plugin"]})
    with pytest.raises(EditscaleError, match="cannot import editscale_no_such_plugin"):
        plan(spec, tmp_path / "sweep")


def test_the_plan_of_a_2x2_sweep(tmp_path: Path, world) -> None:
    spec = SweepSpec.model_validate(spec_dict(world))
    result = run_sweep(spec, tmp_path / "sweep", dry_run=True)
    names = [c.name for c in result.cells]
    assert sorted(names) == sorted(f"{m}-tiny-gpt2-s{s}-b1-seed0" for m in ("ft-c", "rome") for s in (0, 1))
    assert all(c.start == "new" and c.config.stats_cache == str(tmp_path / "sweep" / "stats") for c in result.cells)
    rome = next(c for c in result.cells if c.config.method == "rome")
    assert rome.config.method_config["v_num_grad_steps"] == 2 and rome.config.method_config["kl_factor"] == 0.0625
    # one statistics task for the two ROME runs; FT-C has no statistics
    assert len(result.stats) == 1 and sorted(result.stats[0].cells) == sorted(n for n in names if "rome" in n)
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing
    over = SweepSpec.model_validate({**spec_dict(world), "grid": {"method": ["ft-c"], "method_config": [
        {}, {"lr": 1e-3}]}})
    assert len({c.name for c in plan(over, tmp_path / "o").cells}) == 2


def test_without_ray_the_sweep_says_what_to_install(tmp_path: Path, world, monkeypatch, run_cli) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec_dict(world)))
    code, _, err = run_cli("sweep", str(path), "--out", str(tmp_path / "sweep"))
    assert code == 2 and "pip install 'editscale[ray]'" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def local_ray(world):
    ray = pytest.importorskip("ray")
    from editscale.run.sweep import connect

    assert connect(num_cpus=2)  # the sweeps below use this instance
    yield ray
    ray.shutdown()


def crash_after(cfg, out: Path, rows: int, monkeypatch) -> None:
    """Run `cfg` into `out` and crash it as it writes edit row `rows`: its files are those of a
    killed run (rows fsynced, the last checkpoint before)."""
    real = RunStore.append

    def append(store, name, row):
        if name == "edits" and row["index"] == rows:
            raise RuntimeError("killed")
        real(store, name, row)

    with monkeypatch.context() as mp:
        mp.setattr(RunStore, "append", append)
        with pytest.raises(RuntimeError, match="killed"):
            Runner(cfg, out, progress=False, log=lambda s: None).run()


@pytest.mark.slow
def test_a_2x2_sweep_on_ray_then_a_crashed_run_continued(tmp_path: Path, world, local_ray, run_cli,
                                                          monkeypatch) -> None:
    path, out = tmp_path / "grid.yaml", tmp_path / "sweep"
    path.write_text(yaml.safe_dump(spec_dict(world)))
    code, stdout, stderr = run_cli("sweep", str(path), "--out", str(out))
    assert code == 0, stderr
    cells = sorted(p.name for p in out.iterdir() if (p / "config.yaml").exists())
    assert cells == sorted(f"{m}-tiny-gpt2-s{s}-b1-seed0" for m in ("ft-c", "rome") for s in (0, 1))
    for name in cells:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["edits_done"] == 4 and summary["threads_this_process"] == 1  # resources.cpus
        assert [r["index"] for r in RunStore(out / name).rows("edits")] == [0, 1, 2, 3]
    assert "done" in stdout and (out / "report" / "report.html").exists()

    # the statistics were computed once, before either ROME run started, and both read them
    stats = [p for p in (out / "stats").rglob("*.safetensors")]
    assert len(stats) == 1
    started = min((out / n / "config.yaml").stat().st_mtime for n in cells if n.startswith("rome"))
    assert stats[0].stat().st_mtime <= started
    assert "statistics ready" in (out / "logs" / "stats-0.log").read_text()

    # one run crashes after 3 of its 4 edits (its checkpoint holds 2); the sweep is run again
    killed = out / "ft-c-tiny-gpt2-s0-b1-seed0"
    reference = {n: RunStore(killed).rows(n) for n in ("edits", "forgetting", "downstream", "health")}
    cfg = next(c.config for c in plan(SweepSpec.model_validate(spec_dict(world)), out).cells
               if c.path == killed)
    for p in sorted(killed.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    crash_after(cfg, killed, 3, monkeypatch)
    assert len(RunStore(killed).rows("edits")) == 3 and not (killed / "summary.json").exists()
    others = {p: p.stat().st_mtime_ns for n in cells if out / n != killed for p in (out / n).rglob("*")}

    result = run_sweep(path, out, progress=False)
    states = {c.name: (c.start, c.state) for c in result.cells}
    assert states.pop(killed.name) == ("resume", "done")
    assert set(states.values()) == {("done", "skipped")} and result.stats == []
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the finished runs were not touched
    assert "resuming" in (out / "logs" / f"{killed.name}.log").read_text()
    for name, rows in reference.items():
        assert without_timings(RunStore(killed).rows(name)) == without_timings(rows), name


@pytest.mark.slow
def test_a_failing_run_is_one_line_and_the_others_go_on(tmp_path: Path, world, local_ray, run_cli) -> None:
    spec = spec_dict(world)
    spec["grid"] = {"method": ["ft-c"], "sample": [0, 1]}
    del spec["per_method"]["rome"]
    spec["base"]["edits"] = 2
    path, out = tmp_path / "fail.yaml", tmp_path / "sweep"
    path.write_text(yaml.safe_dump(spec))
    # the directory of one cell holds another run (as when a sweep file is changed part-way)
    bad = out / "ft-c-tiny-gpt2-s1-b1-seed0"
    cfg = next(c.config for c in plan(SweepSpec.model_validate(spec), out).cells if c.path == bad)
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text(dump_config(cfg.model_copy(update={"edits": 3})))
    # with an edit made: a directory that made none would be taken over by the new config
    (bad / "edits.jsonl").write_text('{"index": 0, "status": "ok"}\n')
    code, _, stderr = run_cli("sweep", str(path), "--out", str(out), "--max-concurrent", "1", "--no-report")
    assert code == 1, stderr
    failed = [line for line in stderr.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: {bad.name}: ") and "differs in: edits" in failed[0]
    assert (out / "ft-c-tiny-gpt2-s0-b1-seed0" / "summary.json").exists()
    assert "Traceback" in (out / "logs" / f"{bad.name}.log").read_text()
