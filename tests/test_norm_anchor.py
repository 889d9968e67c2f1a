"""NAS, norm-anchor scaling (docs/protocol.md §2.6): the solved value vector's MLP-output part takes the
reference norm, the reference norm is the trimmed mean NAS defines, and every locate-then-edit method
takes it as an option through the runner."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.solver.anchor import reference_norm
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.targets import optimize_target, optimize_targets
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, tiny_model

TEMPLATES = ["{}", "Paris is nice. {}"]
REQUESTS = [("{} plays the", "Danielle Darrieux", "violin"), ("The capital of {} is", "France", "Rome"),
            ("{} was born in", "Pablo", "the city of Lyon"), ("{} speaks", "Toko Yasuda", "Dutch"),
            ("The mother tongue of {} is", "Thomas", "English")]


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    tok = byte_bpe_tokenizer()
    return ModelAdapter(tiny_model("gpt2", len(tok)), tok)


def mlp_output(adapter: ModelAdapter, layer: int, prompt: str, subject: str) -> torch.Tensor:
    """The MLP output at the subject's last token of the bare prompt, read by a hook of its own."""
    ids = adapter.tokenizer(prompt.format(subject))["input_ids"]
    n_subject = len(adapter.tokenizer(prompt[:prompt.index("{}")] + subject)["input_ids"])
    out = {}
    hook = adapter.module("mlp", layer).register_forward_hook(lambda m, a, o: out.setdefault("x", o[0, n_subject - 1]))
    with torch.no_grad():
        adapter.model(input_ids=torch.tensor([ids]))
    hook.remove()
    return out["x"]


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_the_value_vector_takes_the_anchor_norm_and_an_outlier_is_dropped(adapter: ModelAdapter, site: str) -> None:
    prompt, subject, target = REQUESTS[0]
    free = optimize_target(adapter, 1, prompt, subject, target, TEMPLATES, site=site, steps=4)
    m0 = mlp_output(adapter, 1, prompt, subject)
    torch.testing.assert_close(free.mlp0, m0)
    assert free.value_norm == pytest.approx(float((m0 + free.delta).norm()), rel=1e-6)
    for anchor in (0.5 * free.value_norm, 1.7 * free.value_norm):  # down and up
        got = optimize_target(adapter, 1, prompt, subject, target, TEMPLATES, site=site, steps=4, anchor=anchor)
        assert got.anchor == "scaled" and float((m0 + got.delta).norm()) == pytest.approx(anchor, rel=1e-5)
        # the direction of the MLP output is the optimised one; z keeps the rest of the residual stream
        torch.testing.assert_close((m0 + got.delta) / anchor, (m0 + free.delta) / free.value_norm)
        torch.testing.assert_close(got.v_star, free.v0 + got.delta)
    dropped = optimize_target(adapter, 1, prompt, subject, target, TEMPLATES, site=site, steps=4,
                              anchor=free.value_norm / 3, anchor_outlier=2.0)
    assert dropped.anchor == "dropped" and torch.equal(dropped.v_star, free.v0)


def test_the_reference_norm_is_the_upper_trimmed_mean_over_a_seeded_sample(adapter: ModelAdapter) -> None:
    options = dict(steps=3, weight_decay=0.5, clamp_norm_factor=4.0)
    got = reference_norm(adapter, 1, REQUESTS, site="block", samples=4, trim=0.25, seed=3, **options)
    chosen = random.Random(3).sample(REQUESTS, 4)
    norms = sorted(optimize_target(adapter, 1, *r, ["{}"], site="block", **options).value_norm for r in chosen)
    assert got == pytest.approx(sum(norms[:3]) / 3, rel=1e-4)  # the largest quarter dropped
    with pytest.raises(EditscaleError, match="norm_anchor needs"):
        EditContext("tiny").anchor_norm(adapter, 1, site="block", samples=4, trim=0.0)
    assert optimize_targets(adapter, 1, REQUESTS[:2], TEMPLATES, site="block", steps=2, anchor=got)[1].anchor


@pytest.mark.parametrize("method", ["memit", "rome"])
def test_any_method_takes_norm_anchor_from_the_command_line(run_cli, tmp_path: Path, embedded_stats: Path,
                                                            method: str) -> None:
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        "run", "--out", str(out), "--method", method, "--edits", "2", "--eval-every", "2", "--downstream-every", "0",
        "--control", "5", "--stats-cache", str(embedded_stats), "--no-progress", "--set", "norm_anchor=true",
        "--set", "norm_anchor_samples=8", "--set", "v_num_grad_steps=3", "--set", "mom2_n_samples=300")
    assert code == 0, stderr
    config = (out / "config.yaml").read_text()
    assert "norm_anchor: true" in config and "norm_anchor_samples: 8" in config
    norms = json.loads((out / "norm_anchor.json").read_text())
    site = "mlp layer 1" if method == "rome" else "block layer 1"
    assert list(norms) == [site] and norms[site] > 0
    rows = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    assert all(r["diagnostics"]["v_anchor_dropped"] in (0.0, 1.0) and r["diagnostics"]["v_value_norm"] > 0
               for r in rows)
