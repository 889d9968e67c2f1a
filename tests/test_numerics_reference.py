"""`numerics: reference` (docs/protocol.md §10.15): ROME's u = C⁻¹k̄ by the reference's fp32 inverse of C.

A 40-edit sequential ROME run with reference numerics on a tiny GPT-2-shaped model is compared, delta by
delta, with (a) the same run whose solve is replaced here by a plain `torch.inverse(C.float()) @ k`, and
(b) the closed-form update computed here from the keys and v* the run itself used, with that fp32 inverse
for u. The default run (fp64 Cholesky solve) must differ, so the comparison can fail. C is a fixed SPD
matrix with eigenvalues from 1e-4 to 1 (condition number 1e4, as real statistics have), stored in fp32
as `mom2_dtype: float32` statistics are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.base import EditRequest, apply_deltas
from editscale.methods.memit import MemitConfig
from editscale.methods.r_rome import RRomeConfig
from editscale.methods.rome import RomeConfig, RomeEditor
from editscale.methods.rome import editor as rome_editor
from editscale.methods.solver.context import EditContext
from editscale.models.adapter import ModelAdapter
from editscale.run.config import RunConfig, dump_config, load_config, resolve_config
from tiny_models import OBJECTS, RELATIONS, SUBJECTS, byte_bpe_tokenizer, tiny_model

LAYER = 1
N_EDITS = 40
TEMPLATES = ["{}", "Paris is nice. {}", "The piano. {}"]
REQUESTS = [EditRequest(i, rel, subj, obj, "x")
            for i, (subj, rel, obj) in enumerate(itertools.islice(
                zip(itertools.cycle(SUBJECTS), itertools.cycle(RELATIONS), itertools.cycle(OBJECTS)), N_EDITS))]
# "every delta equals to 1e-6": max |ΔA − ΔB| over max |ΔB|, edit by edit
TOL = 1e-6


def ill_conditioned_mom2(n: int, cond: float = 1e4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((q * torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, n, dtype=torch.float64)) @ q.T).float()


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer()


def run_edits(tok, numerics: str, c: torch.Tensor, *, record: dict[str, list] | None = None) -> list[torch.Tensor]:
    """Edit the 40 requests one after another, each on the model carrying the ones before (as the runner
    does with --batch-size 1); the per-edit deltas."""
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    cfg = RomeConfig(layers=[LAYER], mom2_dataset="factworld", v_num_grad_steps=5, numerics=numerics)
    ctx = EditContext("tiny", templates={"rome": list(TEMPLATES)}, mom2={LAYER: c}, progress=False)
    editor = RomeEditor(adapter, cfg, ctx)
    deltas = []
    for request in REQUESTS:
        result = editor.compute([request])
        apply_deltas(adapter, result.deltas)
        deltas.append(result.deltas[LAYER].detach().cpu().clone())
    return deltas


def spy(monkeypatch, name: str, store: list) -> None:
    """Record what a function the editor calls returns (keys, v*): not the code path of u."""
    real: Callable = getattr(rome_editor, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        store.append(out)
        return out

    monkeypatch.setattr(rome_editor, name, wrapped)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_40_edit_reference_run_equals_the_fp32_inverse(tok, monkeypatch) -> None:
    d_mlp = tiny_model("gpt2", len(tok)).config.n_inner
    c = ill_conditioned_mom2(d_mlp)
    inv32 = torch.inverse(c.float())  # the reference's C⁻¹: torch.inverse of the fp32 statistics

    means, prompts, targets = [], [], []
    with monkeypatch.context() as m:
        spy(m, "mean_key", means)
        spy(m, "keys_at_subject", prompts)
        spy(m, "optimize_target", targets)
        reference = run_edits(tok, "reference", c)
    assert len(reference) == len(means) == len(prompts) == len(targets) == N_EDITS

    # (b) each delta is the closed form with u from the fp32 inverse, on the keys and v* of its own edit
    for i, delta in enumerate(reference):
        k_bar = means[i][0]
        (k0,), (v_cur,) = prompts[i]
        u = inv32 @ k_bar.float()
        u = (u / u.norm()).double()
        expected = torch.outer(targets[i].v_star.double() - v_cur.double(), u) / (u @ k0.double())
        assert rel_diff(delta, expected) < TOL, f"edit {i}"

    # (a) the same 40-edit run with the solve replaced by the plain fp32 inverse written here
    def fp32_inverse_solve(self, adapter, layer, rhs, **kwargs):
        return torch.inverse(c.float()) @ rhs.float()

    with monkeypatch.context() as m:
        m.setattr(EditContext, "solve_mom2", fp32_inverse_solve)
        by_inverse = run_edits(tok, "default", c)
    diffs = [rel_diff(a, b) for a, b in zip(reference, by_inverse, strict=True)]
    assert max(diffs) < TOL, diffs

    # and the default (fp64 Cholesky solve) is measurably another computation, from the first edit on
    default = run_edits(tok, "default", c)
    default_diffs = [rel_diff(a, b) for a, b in zip(default, reference, strict=True)]
    assert default_diffs[0] > 10 * TOL, default_diffs[0]
    assert max(default_diffs) > 100 * TOL, max(default_diffs)


def test_reference_inverse_is_computed_once_per_layer(tok, monkeypatch) -> None:
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    c = ill_conditioned_mom2(adapter.d_mlp)
    ctx = EditContext("tiny", mom2={LAYER: c}, progress=False)
    calls = []
    real = torch.inverse
    monkeypatch.setattr(torch, "inverse", lambda a: calls.append(a.dtype) or real(a))
    opts = {"corpus": "factworld", "n_samples": 1, "dtype": "float32"}
    k = torch.randn(adapter.d_mlp)
    u1 = ctx.solve_mom2(adapter, LAYER, k, **opts, numerics="reference")
    u2 = ctx.solve_mom2(adapter, LAYER, 2 * k, **opts, numerics="reference")
    assert calls == [torch.float32]  # once, on C as held (fp32)
    assert u1.dtype == torch.float32 and u1.shape == k.shape
    torch.testing.assert_close(u2, 2 * u1)
    assert ctx.mom2_condition(LAYER) == pytest.approx(1e4, rel=1e-2)
    default = ctx.solve_mom2(adapter, LAYER, k, **opts)
    assert default.dtype == torch.float64
    with pytest.raises(EditscaleError, match="unknown numerics"):
        ctx.solve_mom2(adapter, LAYER, k, **opts, numerics="fast")  # type: ignore[arg-type]


def test_numerics_is_recorded_in_the_run_config(tmp_path) -> None:
    cfg = resolve_config(RunConfig(method="rome", numerics="reference"))
    assert cfg.numerics == "reference" and cfg.method_config["numerics"] == "reference"
    assert resolve_config(cfg) == cfg  # resolving a resolved config changes nothing
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg and back.numerics == "reference" and back.method_config["numerics"] == "reference"

    plain = resolve_config(RunConfig(method="r-rome"))
    assert plain.numerics == "default" and plain.method_config["numerics"] == "default"
    # the method config's own setting shows in the run's field as well
    via_set = resolve_config(RunConfig(method="r-rome", method_config={"numerics": "reference"}))
    assert via_set.numerics == "reference"
    assert RRomeConfig.parse(via_set.method_config).numerics == "reference"
    assert resolve_config(via_set) == via_set
    # an explicit --numerics default overrides a method config file's reference
    over = resolve_config(RunConfig(method="r-rome", numerics="default", method_config={"numerics": "reference"}))
    assert over.numerics == "default" and over.method_config["numerics"] == "default"
    # MEMIT (and ENCORE, its extension) already compute as the reference: accepted, recorded
    memit = resolve_config(RunConfig(method="memit", numerics="reference"))
    assert MemitConfig.parse(memit.method_config).numerics == "reference"
    assert resolve_config(RunConfig(method="encore", numerics="reference")).numerics == "reference"


@pytest.mark.parametrize("method", ["emmet", "alphaedit", "ultraedit", "ft-c"])
def test_methods_without_reference_numerics_refuse_it(method: str) -> None:
    with pytest.raises(EditscaleError) as err:
        resolve_config(RunConfig(method=method, numerics="reference"))
    msg = str(err.value)
    assert "\n" not in msg and f"--method {method}" in msg and "rome" in msg, msg
    assert resolve_config(RunConfig(method=method)).numerics == "default"  # the default is fine everywhere
