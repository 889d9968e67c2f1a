"""The runner on a tiny random GPT-2 with a stub editor: files, batches, schedules, the NaN guard,
resume after SIGKILL, the checkpoint format and config errors. No trained checkpoint is needed;
tests/test_runner.py runs the real methods on the embedded model."""

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

import runner_stubs  # noqa: F401 - registers the stub method the runs use
from editscale.errors import EditscaleError
from editscale.models.loading import load_model
from editscale.run.checkpoint import load_checkpoint, load_run_model
from editscale.run.config import RunConfig, resolve_config
from editscale.run.runner import Runner
from editscale.run.store import RunStore
from editscale.run.summary import summarize

TESTS_DIR = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("tiny_tasks")


def config(world: dict[str, str], **kw) -> RunConfig:
    method = {"layers": [0, 1], **kw.pop("method_config", {})}
    base = dict(model=world["model"], method="stub", dataset="counterfact", data_path=world["data"], edits=8,
                eval_every=2, checkpoint_every=3, control=5, downstream=["tiny_sentiment"], downstream_n=4,
                downstream_every=4, method_config=method)
    return RunConfig(**{**base, **kw})


def quiet(cfg: RunConfig, out: Path) -> Runner:
    return Runner(cfg, out, progress=False, log=lambda s: None)


def without_timings(rows):
    if isinstance(rows, list):
        return [without_timings(r) for r in rows]
    if isinstance(rows, dict):
        return {k: without_timings(v) for k, v in rows.items() if k not in ("timings", "seconds")}
    return rows


def test_a_run_writes_its_files(world, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = quiet(config(world), out).run()
    store = RunStore(out)
    edits = store.rows("edits")
    assert [r["index"] for r in edits] == list(range(8)) and len({r["case_id"] for r in edits}) == 8
    row = edits[-1]
    for key in ("es", "ps", "ns", "es_w5", "ns_w50", "rewrite_correct", "drift", "diagnostics", "timings"):
        assert key in row
    assert set(row["drift"]) == {"0", "1"} and set(row["drift"]["1"]) == {"dist", "fro", "rel"}
    assert [r["diagnostics"]["applied_before"] for r in edits] == list(range(8))  # after_apply ran after each
    assert [r["edits_done"] for r in store.rows("forgetting")] == [2, 4, 6, 8]
    assert store.rows("forgetting")[-1]["control_n"] == 5
    assert [r["edits_done"] for r in store.rows("downstream")] == [0, 4, 8]
    assert store.rows("downstream")[0]["tasks"]["tiny_sentiment"]["total"] == 4
    counts = store.rows("downstream")[0]["tasks"]["tiny_sentiment"]
    assert counts["correct"] + counts["incorrect"] + counts["invalid"] == 4
    health = store.rows("health")
    assert [r["edits_done"] for r in health] == [0, 2, 4, 6, 8]  # the unedited model, then every check
    assert len(health[0]["generations"]) == 4 and health[0]["text_nll"] > 0
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["run"]["method_config"] == {"layers": [0, 1], "scale": 0.02, "nan_case_ids": [], "bias": False,
                                           "sleep": 0.0}
    assert doc["run"]["seed"] == 0 and doc["versions"]["torch"]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["edits_done"] == 8 and summary["downstream_final_at"] == 8
    assert {k: v for k, v in summarize(store, quiet(config(world), out).cfg).items() if k != "nonfinite_edits"} \
        .items() <= summary.items()
    dists = [r["drift"]["1"]["fro"] for r in edits]
    assert dists == sorted(dists) and dists[-1] > dists[0]  # the layer moves further with every edit


def test_batches_fire_the_schedules_when_they_cross_an_interval(world, tmp_path: Path) -> None:
    summary = quiet(config(world, batch_size=3), tmp_path / "b").run()
    store = RunStore(tmp_path / "b")
    rows = store.rows("edits")
    assert [r["batch"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert rows[0]["drift"] == rows[2]["drift"] and rows[0]["timings"]["batch_size"] == 3
    assert [r["diagnostics"]["applied_before"] for r in rows] == [0] * 3 + [3] * 3 + [6] * 2
    assert [r["edits_done"] for r in store.rows("forgetting")] == [3, 6, 8]
    assert [r["edits_done"] for r in store.rows("downstream")] == [0, 6, 8]
    assert summary["edits_done"] == 8


def test_a_sampled_forgetting_run_says_so_in_its_rows(world, tmp_path: Path) -> None:
    quiet(config(world, forgetting_sample=3, control=0, downstream_every=0, health=False), tmp_path / "s").run()
    rows = RunStore(tmp_path / "s").rows("forgetting")
    assert [r["edits_done"] for r in rows] == [2, 4, 6, 8]
    assert all(r["sampled"] and r["sample_size"] <= 3 for r in rows)
    assert rows[-1]["sample_size"] == 3  # the subset is drawn from the run's 8 planned edits
    assert all(r["tested"] <= 3 + 2 for r in rows)  # the subset and the 2 edits since the last check


def test_a_nonfinite_update_is_skipped_or_stops_the_run(world, tmp_path: Path) -> None:
    first = quiet(config(world, edits=3, downstream=[]), tmp_path / "probe").run()
    third = RunStore(tmp_path / "probe").rows("edits")[2]["case_id"]
    assert first["edits_done"] == 3
    skip = config(world, edits=5, downstream=[], on_nonfinite="skip", method_config={"nan_case_ids": [third]})
    summary = quiet(skip, tmp_path / "skip").run()
    rows = RunStore(tmp_path / "skip").rows("edits")
    assert [r["status"] for r in rows] == ["ok", "ok", "nonfinite", "ok", "ok"]
    assert rows[2]["bad_layers"] == ["0", "1"] and summary["nonfinite_edits"] == [2]
    assert rows[3]["diagnostics"]["applied_before"] == 2  # after_apply is not called for a skipped update
    stop = skip.model_copy(update={"on_nonfinite": "stop"})
    summary = quiet(stop, tmp_path / "stop").run()
    assert summary["edits_done"] == 2 and RunStore(tmp_path / "stop").rows("edits")[-1]["status"] == "nonfinite"


def test_the_checkpoint_holds_the_edited_layers_biases_and_editor_state(world, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    quiet(config(world, edits=6, downstream=[], method_config={"bias": True}), out).run()
    ckpt = load_checkpoint(RunStore(out))
    assert ckpt is not None and ckpt.edits_done == 6
    assert set(ckpt.params.weights) == set(ckpt.params.biases) == {0, 1}
    assert float(ckpt.editor_state["applied"]) == 6
    assert set(ckpt.state) == {"edits_done", "history", "skipped", "tracker"}
    base = load_model(world["model"]).adapter
    edited, label = load_run_model(out)
    assert label.endswith("after 6 edits")
    for layer in (0, 1):
        assert torch.equal(edited.adapter.get_mlp_out_weight(layer), ckpt.params.weights[layer])
        assert torch.equal(edited.adapter.get_mlp_out_bias(layer), ckpt.params.biases[layer])
        assert not torch.equal(base.get_mlp_out_bias(layer), ckpt.params.biases[layer])


@pytest.mark.slow
def test_kill_and_resume_gives_identical_results(world, tmp_path: Path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    cfg = config(world, edits=10, method_config={"sleep": 0.15})
    quiet(cfg, ref).run()
    script = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import runner_stubs;"
              "from editscale.run.config import RunConfig; from editscale.run.runner import Runner;"
              f"cfg = RunConfig.model_validate_json({cfg.model_dump_json()!r});"
              f"Runner(cfg, {str(killed)!r}, progress=False, log=lambda s: None).run()")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    edits_file = killed / "edits.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill after the first checkpoint (3 edits)
        if edits_file.exists() and len(edits_file.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    Runner.resume(killed, progress=False, log=lambda s: None).run()
    a, b = RunStore(ref), RunStore(killed)
    for name in ("edits", "forgetting", "downstream", "health"):
        assert without_timings(a.rows(name)) == without_timings(b.rows(name)), name
    wa, wb = load_checkpoint(a), load_checkpoint(b)
    for layer, w in wa.params.weights.items():
        torch.testing.assert_close(w, wb.params.weights[layer], rtol=0, atol=1e-6)
    assert torch.equal(wa.editor_state["applied"], wb.editor_state["applied"])


def test_bad_runs_get_clear_errors(world, tmp_path: Path) -> None:
    with pytest.raises(EditscaleError, match="unknown method 'rime'"):
        quiet(RunConfig(method="rime"), tmp_path / "a")
    with pytest.raises(EditscaleError, match="unknown dataset"):
        quiet(config(world, dataset="wiki"), tmp_path / "b").run()
    with pytest.raises(EditscaleError, match="more than sample 0 holds"):
        quiet(config(world, edits=500), tmp_path / "c").run()
    with pytest.raises(EditscaleError, match="no stub hyper-parameters for model .* presets: "):
        quiet(RunConfig(model=world["model"], method="stub"), tmp_path / "c")
    out = tmp_path / "d"
    quiet(config(world, edits=2, downstream=[]), out).run()
    with pytest.raises(EditscaleError, match="holds another run .*edits"):
        quiet(config(world, edits=3, downstream=[]), out).run()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(EditscaleError, match="not an editscale run directory"):
        quiet(config(world, edits=2), tmp_path / "e").run()
    with pytest.raises(EditscaleError, match="holds no run"):
        Runner.resume(tmp_path / "nothing")


def test_the_config_is_resolved_once_over_the_preset() -> None:
    cfg = resolve_config(RunConfig(method="r-rome", method_config={"clamp_norm_factor": 2.0}))
    assert cfg.method_config["clamp_norm_factor"] == 2.0 and cfg.method_config["key_mode"] == "random_prefix"
    assert cfg.method_config["layers"] == [1]  # from ROME's embedded preset, which r-ROME's extends
    assert resolve_config(cfg) == cfg
    with pytest.raises(EditscaleError, match="clamp_norm_factr"):
        resolve_config(RunConfig(method_config={"clamp_norm_factr": 2}))
