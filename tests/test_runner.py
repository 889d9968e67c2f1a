"""The runner with the real methods on the embedded model (tests/test_runner_unit.py covers the
runner's own logic on a tiny model with a stub editor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editscale.embedded import checkpoint_dir
from editscale.models.loading import load_model
from editscale.run.checkpoint import load_checkpoint
from editscale.run.config import RunConfig
from editscale.run.runner import Runner
from editscale.run.store import RunStore

pytestmark = pytest.mark.skipif(not (checkpoint_dir() / "model.safetensors").exists(),
                                reason="the embedded checkpoint is not installed")

# A small, fast configuration: few templates and Adam steps, a small statistics sample.
FAST_ROME = {"v_num_grad_steps": 6, "context_template_length_params": [[5, 3]], "mom2_n_samples": 300}


@pytest.fixture(scope="module")
def stats_cache(embedded_stats) -> Path:
    return embedded_stats


@pytest.fixture(scope="module")
def rome_run(tmp_path_factory, stats_cache: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rome") / "run"
    cfg = RunConfig(edits=6, eval_every=3, checkpoint_every=3, control=10, downstream=["sentiment"], downstream_n=10,
                    downstream_every=3, stats_cache=str(stats_cache), method_config=FAST_ROME)
    return out, Runner(cfg, out, progress=False, log=lambda s: None).run()


def test_a_rome_run_on_the_embedded_model(rome_run) -> None:
    out, summary = rome_run
    rows = RunStore(out).rows("edits")
    assert [r["status"] for r in rows] == ["ok"] * 6
    assert rows[-1]["diagnostics"]["mom2_cond"] > 1 and "update_rel" in rows[-1]["diagnostics"]
    assert set(rows[-1]["drift"]) == {"1"}  # ROME's embedded preset edits block 1
    assert len(json.loads((out / "templates.json").read_text())["rome"]) == 4
    assert 0.5 <= summary["mean_es"] <= 1.0
    assert [r["edits_done"] for r in RunStore(out).rows("downstream")] == [0, 3, 6]


@pytest.mark.slow
@pytest.mark.parametrize("method, batch, overrides", [
    ("r-rome", 1, {"v_num_grad_steps": 4, "context_template_length_params": [[5, 2]], "mom2_n_samples": 300}),
    ("memit", 2, {"v_num_grad_steps": 4, "mom2_n_samples": 300}),
    ("emmet", 2, {"v_num_grad_steps": 4, "mom2_n_samples": 300}),
    ("alphaedit", 2, {"v_num_grad_steps": 4, "mom2_n_samples": 300}),
    ("ft-c", 2, {"num_steps": 3}),
    ("ultraedit", 2, {"warm_start": 4}),
])
def test_every_method_runs_in_the_runner(tmp_path: Path, stats_cache: Path, method: str, batch: int,
                                          overrides: dict) -> None:
    cfg = RunConfig(method=method, edits=4, batch_size=batch, eval_every=2, checkpoint_every=2, control=5,
                    downstream=[], stats_cache=str(stats_cache), method_config=overrides)
    runner = Runner(cfg, tmp_path / method, progress=False, log=lambda s: None)
    summary = runner.run()
    rows = RunStore(tmp_path / method).rows("edits")
    assert [r["status"] for r in rows] == ["ok"] * 4 and summary["edits_done"] == 4
    ckpt = load_checkpoint(RunStore(tmp_path / method))
    if method == "ft-c":  # FT-C trains the bias too, and the checkpoint keeps it
        layer = runner.cfg.method_config["layers"][0]
        base = load_model("embedded").adapter.get_mlp_out_bias(layer)
        assert not torch.equal(ckpt.params.biases[layer], base)
    if method == "alphaedit":  # the preserved keys travel with the checkpoint
        assert any(k.startswith("cache_c") for k in ckpt.editor_state)
    if method == "ultraedit":  # so do the normaliser's statistics: 4 warm-start requests and 4 edits
        assert float(ckpt.editor_state["normaliser.n"]) > 8
