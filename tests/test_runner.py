"""The sequential runner on the embedded model: files, resume after SIGKILL, the NaN guard, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from editscale.errors import EditscaleError
from editscale.run.config import RunConfig
from editscale.run.runner import Runner
from editscale.run.store import RunStore

pytestmark = pytest.mark.skipif(
    not (Path(__file__).parents[1] / "src/editscale/data/factworld/checkpoint/model.safetensors").exists(),
    reason="the embedded checkpoint is not installed")

# A small, fast configuration: few templates and Adam steps, a small statistics sample.
FAST_METHOD = {"v_num_grad_steps": 6, "context_template_length_params": [[5, 3]], "mom2_n_samples": 300}


def fast_config(**kw) -> RunConfig:
    from editscale.run.runner import resolve_method_config

    cfg = RunConfig(edits=kw.pop("edits", 8), eval_every=kw.pop("eval_every", 2),
                    checkpoint_every=kw.pop("checkpoint_every", 3), control=kw.pop("control", 10),
                    downstream=kw.pop("downstream", ["sentiment", "acceptability"]), downstream_n=10,
                    downstream_every=kw.pop("downstream_every", 4), **kw)
    return resolve_method_config(cfg, "embedded", overrides=FAST_METHOD)


def _without_timings(rows):
    if isinstance(rows, list):
        return [_without_timings(r) for r in rows]
    if isinstance(rows, dict):
        return {k: _without_timings(v) for k, v in rows.items() if k not in ("timings", "seconds")}
    return rows


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stats")


def test_run_writes_its_files(tmp_path: Path, stats_cache: Path) -> None:
    out = tmp_path / "run"
    cfg = fast_config(stats_cache=str(stats_cache))
    summary = Runner(cfg, out, progress=False, log=lambda s: None).run()
    store = RunStore(out)
    edits = store.rows("edits")
    assert [r["index"] for r in edits] == list(range(8))
    assert len({r["case_id"] for r in edits}) == 8
    row = edits[-1]
    for key in ("es", "ps", "ns", "es_w5", "ns_w50", "rewrite_correct", "drift", "diagnostics", "timings"):
        assert key in row
    assert set(row["drift"]["1"]) == {"dist", "fro", "rel"}
    assert row["diagnostics"]["mom2_cond"] > 1 and "update_rel" in row["diagnostics"]
    forgetting = store.rows("forgetting")
    assert [r["edits_done"] for r in forgetting] == [2, 4, 6, 8]
    assert forgetting[-1]["control_n"] == 10
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["run"]["method_config"]["layers"] == [1] and doc["versions"]["torch"]
    assert len(json.loads((out / "templates.json").read_text())["rome"]) == 4
    for key in ("edits_done", "mean_es", "mean_ps", "mean_ns", "forgotten_pct_final", "max_drift",
                "seconds_per_edit"):
        assert key in summary
    assert summary == json.loads((out / "summary.json").read_text())
    downstream = store.rows("downstream")
    assert [r["edits_done"] for r in downstream] == [0, 4, 8]
    assert set(downstream[0]["tasks"]) == {"sentiment", "acceptability"}
    assert downstream[0]["tasks"]["sentiment"]["total"] == 10
    assert set(summary["downstream_initial_f1"]) == {"sentiment", "acceptability"}
    assert summary["downstream_final_at"] == 8
    assert 0.5 <= summary["mean_es"] <= 1.0
    # drift grows as edits accumulate
    dists = [r["drift"]["1"]["fro"] for r in edits]
    assert dists[-1] > dists[0]


def test_kill_and_resume_gives_identical_results(tmp_path: Path, stats_cache: Path) -> None:
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    cfg = fast_config(edits=10, stats_cache=str(stats_cache))
    Runner(cfg, ref_dir, progress=False, log=lambda s: None).run()

    script = (
        "import sys; from editscale.run.config import RunConfig; from editscale.run.runner import Runner;"
        f"cfg = RunConfig.model_validate_json({cfg.model_dump_json()!r});"
        f"Runner(cfg, {str(killed_dir)!r}, progress=False, log=lambda s: None).run()"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    edits_file = killed_dir / "edits.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill after the first checkpoint (3 edits)
        if edits_file.exists() and len(edits_file.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "summary.json").exists()
    from editscale.report.tables import comparison_rows

    (row,) = comparison_rows([killed_dir])  # an unfinished run is summarised from its rows so far
    assert row["finished"] is False and row["edits"] >= 3 and row["mean_es"] == row["mean_es"]

    Runner.resume(killed_dir, progress=False, log=lambda s: None).run()
    a, b = RunStore(ref_dir), RunStore(killed_dir)
    assert _without_timings(a.rows("edits")) == _without_timings(b.rows("edits"))
    assert _without_timings(a.rows("forgetting")) == _without_timings(b.rows("forgetting"))
    assert _without_timings(a.rows("downstream")) == _without_timings(b.rows("downstream"))
    assert len(a.rows("downstream")) == 4  # edits 0, 4, 8, 10
    wa = load_file(str(ref_dir / "checkpoint/weights.safetensors"))
    wb = load_file(str(killed_dir / "checkpoint/weights.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_batches_of_facts(tmp_path: Path, stats_cache: Path) -> None:
    cfg = fast_config(edits=8, batch_size=3, stats_cache=str(stats_cache))
    summary = Runner(cfg, tmp_path / "b", progress=False, log=lambda s: None).run()
    store = RunStore(tmp_path / "b")
    rows = store.rows("edits")
    assert [r["index"] for r in rows] == list(range(8))
    assert [r["batch"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert rows[0]["drift"] == rows[2]["drift"] and rows[0]["timings"]["batch_size"] == 3
    # checkpoints fire when a batch crosses a multiple of the interval
    assert [r["edits_done"] for r in store.rows("forgetting")] == [3, 6, 8]
    assert [r["edits_done"] for r in store.rows("downstream")] == [0, 6, 8]
    assert summary["edits_done"] == 8 and summary["mean_es"] > 0.3


def test_nan_update_is_caught(tmp_path: Path, stats_cache: Path, monkeypatch) -> None:
    from editscale.methods.rome.editor import RomeEditor

    real = RomeEditor.compute
    calls = {"n": 0}

    def poisoned(self, requests):
        result = real(self, requests)
        calls["n"] += 1
        if calls["n"] == 3:
            for d in result.deltas.values():
                d[0, 0] = float("nan")
        return result

    monkeypatch.setattr(RomeEditor, "compute", poisoned)
    cfg = fast_config(edits=5, on_nonfinite="skip", stats_cache=str(stats_cache))
    summary = Runner(cfg, tmp_path / "skip", progress=False, log=lambda s: None).run()
    rows = RunStore(tmp_path / "skip").rows("edits")
    assert [r["status"] for r in rows] == ["ok", "ok", "nonfinite", "ok", "ok"]
    assert summary["nonfinite_edits"] == [2]
    assert all(torch.isfinite(torch.tensor(r["drift"]["1"]["fro"])) for r in rows if r["status"] == "ok")

    calls["n"] = 0
    cfg = fast_config(edits=5, on_nonfinite="stop", stats_cache=str(stats_cache))
    summary = Runner(cfg, tmp_path / "stop", progress=False, log=lambda s: None).run()
    assert summary["edits_done"] == 2
    assert RunStore(tmp_path / "stop").rows("edits")[-1]["status"] == "nonfinite"


def test_bad_inputs_get_clear_errors(tmp_path: Path, stats_cache: Path) -> None:
    with pytest.raises(EditscaleError, match="unknown method 'rime'"):
        Runner(RunConfig(method="rime"), tmp_path / "a", progress=False).run()
    with pytest.raises(EditscaleError, match="unknown dataset"):
        Runner(fast_config(dataset="wiki"), tmp_path / "b", progress=False).run()
    with pytest.raises(EditscaleError, match="more than sample 0 holds"):
        Runner(fast_config(edits=5000), tmp_path / "c", progress=False).run()
    out = tmp_path / "d"
    Runner(fast_config(edits=2, stats_cache=str(stats_cache)), out, progress=False, log=lambda s: None).run()
    with pytest.raises(EditscaleError, match="holds another run .*edits"):
        Runner(fast_config(edits=3, stats_cache=str(stats_cache)), out, progress=False).run()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(EditscaleError, match="not an editscale run directory"):
        Runner(fast_config(edits=2), tmp_path / "e", progress=False).run()
    with pytest.raises(EditscaleError, match="holds no run"):
        Runner.resume(tmp_path / "nothing")


@pytest.mark.parametrize("method, batch, overrides", [
    ("r-rome", 1, {"v_num_grad_steps": 4, "context_template_length_params": [[5, 2]], "mom2_n_samples": 300}),
    ("memit", 2, {"v_num_grad_steps": 4, "mom2_n_samples": 300}),
    ("emmet", 2, {"v_num_grad_steps": 4, "mom2_n_samples": 300}),
    ("alphaedit", 2, {"v_num_grad_steps": 4, "mom2_n_samples": 300}),
    ("ft-c", 2, {"num_steps": 3}),
])
def test_every_method_runs_in_the_runner(tmp_path: Path, stats_cache: Path, method: str, batch: int,
                                          overrides: dict) -> None:
    from editscale.run.runner import resolve_method_config

    cfg = RunConfig(method=method, edits=4, batch_size=batch, eval_every=2, checkpoint_every=2, control=5,
                    downstream=[], stats_cache=str(stats_cache))
    cfg = resolve_method_config(cfg, "embedded", overrides=overrides)
    summary = Runner(cfg, tmp_path / method, progress=False, log=lambda s: None).run()
    rows = RunStore(tmp_path / method).rows("edits")
    assert [r["status"] for r in rows] == ["ok"] * 4 and summary["edits_done"] == 4
    weights = load_file(str(tmp_path / method / "checkpoint/weights.safetensors"))
    if method == "ft-c":  # FT-C trains the bias too, and the checkpoint keeps it
        from editscale.models.loading import load_model

        layer = cfg.method_config["layers"][0]
        base = load_model("embedded").adapter.module("mlp_out", layer).bias
        assert not torch.equal(weights[f"bias{layer}"], base.detach())
    if method == "alphaedit":  # the preserved keys travel with the checkpoint
        assert any(k.startswith("editor.cache_c") for k in weights)
