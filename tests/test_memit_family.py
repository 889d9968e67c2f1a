"""MEMIT, EMMET and AlphaEdit checked against their equations (docs/protocol.md §4-6), computed independently here.

Keys and hidden states are read with hooks written in this file on tiny random models of both weight
storages (GPT-2 Conv1D, GPT-J Linear); the statistics C are explicit SPD matrices.
"""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.alphaedit import AlphaEditConfig, AlphaEditEditor
from editscale.methods.base import EditRequest, apply_deltas, get_method, list_methods
from editscale.methods.emmet import EmmetConfig, EmmetEditor
from editscale.methods.encore import EncoreConfig, EncoreEditor
from editscale.methods.memit import MemitConfig, MemitEditor
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.spread import LayerStep, compute_targets
from editscale.methods.solver.templates import generate_memit_templates, memit_template_groups
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, random_spd, reference_subject_last, tiny_model

# "{}" is a group of its own, the two prefixed templates the other: keys weigh the bare prompt 1/2
TEMPLATES = ["{}", "Paris is nice. {}", "The piano. {}"]
REQUESTS = [
    EditRequest(0, "{} plays the", "Danielle Darrieux", "violin", "piano"),
    EditRequest(1, "{} was born in", "Toko Yasuda", "London", "Paris"),
    EditRequest(2, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "English", "Dutch"),
]
STEPS = 6  # Adam steps for z: enough to move it, few enough to keep the tests fast


# ---------------------------------------------------------------------- independent readers


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h  # gpt2 and gptj alike


def _mlp_out(model: torch.nn.Module, model_type: str, layer: int) -> torch.nn.Module:
    mlp = _blocks(model)[layer].mlp
    return mlp.c_proj if model_type == "gpt2" else mlp.fc_out



def _read(model: torch.nn.Module, tok, module: torch.nn.Module, template: str, subject: str, *, what: str):
    """Input ("in") or output ("out", first element of a tuple) of a module at the subject-last token."""
    pos = reference_subject_last(tok, template, subject)
    out = {}

    def hook(mod, args, output):
        value = args[0] if what == "in" else (output[0] if isinstance(output, tuple) else output)
        out["x"] = value[0, pos].double()

    h = module.register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=torch.tensor([tok(template.format(subject))["input_ids"]]))
    h.remove()
    return out["x"]


def _key(model, tok, model_type: str, layer: int, request: EditRequest) -> torch.Tensor:
    """MEMIT's key: ½ k(bare prompt) + ½ mean of the prefixed templates' keys (docs/protocol.md §4.3). [d_mlp] fp64."""
    module = _mlp_out(model, model_type, layer)
    keys = [_read(model, tok, module, t.replace("{}", request.prompt), request.subject, what="in")
            for t in TEMPLATES]
    return 0.5 * keys[0] + 0.5 * torch.stack(keys[1:]).mean(0)


def _hidden(model, tok, layer: int, request: EditRequest) -> torch.Tensor:
    """Block output (residual stream) at the subject-last token of the bare prompt. [d_model] fp64."""
    return _read(model, tok, _blocks(model)[layer], request.prompt, request.subject, what="out")



def _setup(model_type: str, layers: list[int], mom2: dict[int, torch.Tensor] | None = None):
    tok = byte_bpe_tokenizer()
    model = tiny_model(model_type, len(tok))
    adapter = ModelAdapter(model, tok)
    if mom2 is None:
        mom2 = {layer: random_spd(adapter.d_mlp, seed=layer) for layer in layers}
    ctx = EditContext("tiny", templates={"memit": list(TEMPLATES)}, mom2=mom2, progress=False)
    return tok, model, adapter, ctx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _z(adapter, cfg, requests) -> torch.Tensor:
    z, _ = compute_targets(adapter, cfg, requests, TEMPLATES)
    return z.double()  # [d_model, n]


# ---------------------------------------------------------------------- MEMIT


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])  # Conv1D storage and Linear storage
def test_memit_single_edit_is_sherman_morrison(model_type: str) -> None:
    layer, lam = 1, 3.0
    tok, model, adapter, ctx = _setup(model_type, [layer])
    cfg = MemitConfig(layers=[layer], mom2_update_weight=lam, mom2_dataset="factworld", v_num_grad_steps=STEPS)
    editor = MemitEditor(adapter, cfg, ctx)
    c = ctx.mom2[layer]
    w_before = adapter.get_mlp_out_weight(layer).clone()
    result = editor.compute(REQUESTS[:1])
    assert torch.equal(adapter.get_mlp_out_weight(layer), w_before), "compute() must leave the model unchanged"

    k = _key(model, tok, model_type, layer, REQUESTS[0])
    r = _z(adapter, cfg, REQUESTS[:1])[:, 0] - _hidden(model, tok, layer, REQUESTS[0])  # L = 1: no split
    c_inv_k = torch.linalg.solve(c, k)
    sherman_morrison = torch.outer(r, c_inv_k) / (lam + k @ c_inv_k)

    # docs/protocol.md §4.4: the solve form equals Sherman-Morrison to 1e-6 in fp64, for the same k and r
    exact = editor.layer_update(LayerStep(0, layer, 1, k.unsqueeze(1), r.unsqueeze(1)))
    assert exact.dtype == torch.float64
    assert _rel(exact, sherman_morrison) < 1e-6
    # and the editor's own keys, z and residual give the same update (fp32 activations)
    delta = result.deltas[layer]
    assert delta.shape == (adapter.d_model, adapter.d_mlp) and delta.dtype == torch.float32
    assert _rel(delta, sherman_morrison) < 1e-4
    assert torch.linalg.matrix_rank(delta).item() == 1


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_memit_spreads_the_residual_over_layers(model_type: str) -> None:
    layers, lam = [0, 1], 2.0
    tok, model, adapter, ctx = _setup(model_type, layers)
    cfg = MemitConfig(layers=layers, mom2_update_weight=lam, mom2_dataset="factworld", v_num_grad_steps=STEPS)
    saved = {layer: adapter.get_mlp_out_weight(layer).clone() for layer in layers}
    result = MemitEditor(adapter, cfg, ctx).compute(REQUESTS)
    for layer in layers:
        assert torch.equal(adapter.get_mlp_out_weight(layer), saved[layer])

    # the loop of docs/protocol.md §4.4, written out: keys and cur_Z on the model carrying the earlier layers' updates
    z = _z(adapter, cfg, REQUESTS)  # Z is computed once, on the unedited model
    z_layer = layers[-1]
    expected = {}
    modules = {layer: _mlp_out(model, model_type, layer) for layer in layers}
    originals = {layer: modules[layer].weight.detach().clone() for layer in layers}
    try:
        for i, layer in enumerate(layers):
            keys = torch.stack([_key(model, tok, model_type, layer, q) for q in REQUESTS], dim=1)  # [m, n]
            cur = torch.stack([_hidden(model, tok, z_layer, q) for q in REQUESTS], dim=1)  # [d, n]
            resid = (z - cur) / (len(layers) - i)
            c = ctx.mom2[layer]
            delta = resid @ keys.T @ torch.linalg.inv(lam * c + keys @ keys.T)  # [d, m]
            expected[layer] = delta
            stored = delta.T if model_type == "gpt2" else delta  # Conv1D holds [m, d]
            with torch.no_grad():
                modules[layer].weight.copy_(originals[layer] + stored.float())
    finally:
        with torch.no_grad():
            for layer in layers:
                modules[layer].weight.copy_(originals[layer])

    assert set(result.deltas) == set(layers)
    for layer in layers:
        assert _rel(result.deltas[layer], expected[layer]) < 1e-4, layer
    assert result.diagnostics["z_error_after"] < result.diagnostics["z_error"]


def test_statistics_are_read_before_any_layer_is_written(tmp_path) -> None:
    # An editor nobody prepared must not compute layer 1's C after layer 0 got its temporary update.
    layers = [0, 1]
    tok, model, adapter, _ = _setup("gpt2", layers)
    cfg = MemitConfig(layers=layers, mom2_update_weight=2.0, mom2_dataset="factworld", mom2_n_samples=20,
                      v_num_grad_steps=STEPS)

    def fresh(name: str) -> EditContext:
        return EditContext("tiny", templates={"memit": list(TEMPLATES)}, stats_cache_dir=tmp_path / name,
                           progress=False)

    prepared = MemitEditor(adapter, cfg, fresh("a"))
    prepared.prepare()
    expected = prepared.compute(REQUESTS)
    lazy_ctx = fresh("b")
    got = MemitEditor(adapter, cfg, lazy_ctx).compute(REQUESTS)
    assert torch.equal(lazy_ctx.mom2[1], prepared.context.mom2[1])
    for layer in layers:
        assert torch.equal(got.deltas[layer], expected.deltas[layer])


# ---------------------------------------------------------------------- EMMET


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_emmet_single_edit_is_consistent_key_rome(model_type: str) -> None:
    layer = 1
    tok, model, adapter, ctx = _setup(model_type, [layer])
    # λ = 1000 as gpt2-xl's preset: it must cancel for one edit
    cfg = EmmetConfig(layers=[layer], mom2_update_weight=1000.0, mom2_dataset="factworld", v_num_grad_steps=STEPS)
    editor = EmmetEditor(adapter, cfg, ctx)
    result = editor.compute(REQUESTS[:1])

    c = ctx.mom2[layer]
    k = _key(model, tok, model_type, layer, REQUESTS[0])
    r = _z(adapter, cfg, REQUESTS[:1])[:, 0] - _hidden(model, tok, layer, REQUESTS[0])
    c_inv_k = torch.linalg.solve(c, k)
    rome = torch.outer(r, c_inv_k) / (k @ c_inv_k)  # r kᵀC⁻¹ / (kᵀC⁻¹k)

    # docs/protocol.md §5: one edit on one layer is ROME with a consistent key, for the same k and r
    exact = editor.layer_update(LayerStep(0, layer, 1, k.unsqueeze(1), r.unsqueeze(1)))
    assert _rel(exact, rome) < 1e-8
    torch.testing.assert_close(exact @ k, r)  # the edit holds with equality
    assert _rel(result.deltas[layer], rome) < 1e-4


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_emmet_batch_formula_and_equality(ridge: float) -> None:
    layer, lam, n = 1, 7.0, 4
    tok, model, adapter, ctx = _setup("gpt2", [layer])
    cfg = EmmetConfig(layers=[layer], mom2_update_weight=lam, emmet_lambda=ridge, mom2_dataset="factworld")
    editor = EmmetEditor(adapter, cfg, ctx)
    g = torch.Generator().manual_seed(3)
    keys = torch.rand(adapter.d_mlp, n, generator=g, dtype=torch.float64)  # [m, n]
    resid = torch.randn(adapter.d_model, n, generator=g, dtype=torch.float64)  # [d, n]
    step = LayerStep(0, layer, 1, keys, resid)
    delta = editor.layer_update(step)

    c_tilde_inv = torch.linalg.inv(lam * ctx.mom2[layer])
    d = keys.T @ c_tilde_inv @ keys + ridge * torch.eye(n, dtype=torch.float64)
    expected = resid @ torch.linalg.inv(d) @ keys.T @ c_tilde_inv
    assert _rel(delta, expected) < 1e-8
    assert step.diagnostics["pseudo_inverse"] == 0.0
    # Δ K = R − ridge · R D⁻¹: exact equality without the ridge, approximate with it
    torch.testing.assert_close(delta @ keys, resid - ridge * resid @ torch.linalg.inv(d))
    if ridge == 0:
        torch.testing.assert_close(delta @ keys, resid)
    else:
        assert _rel(delta @ keys, resid) < 0.1


def test_emmet_update_norm_lambda_adds_identity() -> None:
    layer, lam, mu = 1, 2.0, 0.5
    tok, model, adapter, ctx = _setup("gptj", [layer])
    cfg = EmmetConfig(layers=[layer], mom2_update_weight=lam, update_norm_lambda=mu, mom2_dataset="factworld")
    g = torch.Generator().manual_seed(4)
    keys = torch.rand(adapter.d_mlp, 2, generator=g, dtype=torch.float64)
    resid = torch.randn(adapter.d_model, 2, generator=g, dtype=torch.float64)
    delta = EmmetEditor(adapter, cfg, ctx).layer_update(LayerStep(0, layer, 1, keys, resid))
    c_tilde_inv = torch.linalg.inv(lam * ctx.mom2[layer] + mu * torch.eye(adapter.d_mlp, dtype=torch.float64))
    d = keys.T @ c_tilde_inv @ keys + 0.1 * torch.eye(2, dtype=torch.float64)
    assert _rel(delta, resid @ torch.linalg.inv(d) @ keys.T @ c_tilde_inv) < 1e-8


# ---------------------------------------------------------------------- AlphaEdit


def _split_spectrum(m: int, n_small: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C = Q diag(s) Qᵀ with `n_small` eigenvalues below the 2e-2 threshold; (C, Q_large, Q_small)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    large = 0.5 + torch.rand(m - n_small, generator=g, dtype=torch.float64)
    small = 1e-3 * (1 + torch.rand(n_small, generator=g, dtype=torch.float64))
    s = torch.cat([large, small])
    return q @ torch.diag(s) @ q.T, q[:, : m - n_small], q[:, m - n_small:]


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_alphaedit_leaves_preserved_keys_alone(model_type: str) -> None:
    layers = [0, 1]
    tok = byte_bpe_tokenizer()
    m = tiny_model(model_type, len(tok)).config.n_inner
    spectra = {layer: _split_spectrum(m, n_small=m // 2, seed=layer) for layer in layers}
    tok, model, adapter, ctx = _setup(model_type, layers, mom2={layer: s[0] for layer, s in spectra.items()})
    cfg = AlphaEditConfig(layers=layers, mom2_dataset="factworld", v_num_grad_steps=STEPS, solve_dtype="float64")
    editor = AlphaEditEditor(adapter, cfg, ctx)
    editor.prepare()
    assert editor.null_dims == {0: m // 2, 1: m // 2}
    for layer in layers:
        q_small = spectra[layer][2]
        torch.testing.assert_close(editor.projectors[layer], q_small @ q_small.T)

    first = editor.compute(REQUESTS[:2])
    for layer in layers:
        delta, q_large = first.deltas[layer].double(), spectra[layer][1]
        assert delta.norm() > 0
        # Δ k = 0 for every key in the span C preserves (its large-eigenvalue directions)
        assert float((delta @ q_large).norm() / delta.norm()) < 1e-5

    # the update equation, with the independent projector and this batch's keys and residuals
    step_keys = torch.stack([_key(model, tok, model_type, 0, q) for q in REQUESTS[:2]], dim=1)
    z = _z(adapter, cfg, REQUESTS[:2])
    resid = (z - torch.stack([_hidden(model, tok, 1, q) for q in REQUESTS[:2]], dim=1)) / 2
    p = spectra[0][2] @ spectra[0][2].T
    lhs = p @ (step_keys @ step_keys.T) + 10.0 * torch.eye(m, dtype=torch.float64)
    expected = torch.linalg.solve(lhs, p @ step_keys @ resid.T).T
    assert _rel(first.deltas[0], expected) < 1e-4

    # after the runner applies a batch, its keys (on the edited model) join cache_c
    assert all(float(c.abs().max()) == 0 for c in editor.cache_c.sums.values())
    apply_deltas(adapter, first.deltas)
    editor.after_apply(REQUESTS[:2], first)
    for layer in layers:
        keys_after = torch.stack([_key(model, tok, model_type, layer, q) for q in REQUESTS[:2]], dim=1)
        torch.testing.assert_close(editor.cache_c.sums[layer], keys_after @ keys_after.T, rtol=1e-5, atol=1e-6)

    # the cache survives a resume, and the next batch's update is still in the null space
    state = editor.state_dict()
    resumed = AlphaEditEditor(adapter, cfg, ctx)
    resumed.prepare()
    resumed.load_state_dict(state)
    for layer in layers:
        torch.testing.assert_close(resumed.cache_c.sums[layer], editor.cache_c.sums[layer], rtol=0, atol=0)
    second = resumed.compute(REQUESTS[2:])
    for layer in layers:
        delta = second.deltas[layer].double()
        assert float((delta @ spectra[layer][1]).norm() / delta.norm()) < 1e-5
    with pytest.raises(EditscaleError, match="alphaedit state must hold"):
        resumed.load_state_dict({"cache_c.layer0": state["cache_c.layer0"]})


# ---------------------------------------------------------------------- ENCORE


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_encore_solves_its_norm_constrained_objective_and_keeps_earlier_keys(model_type: str) -> None:
    layer, lam_c, lam_f = 1, 3.0, 0.7
    tok, model, adapter, ctx = _setup(model_type, [layer])
    cfg = EncoreConfig(layers=[layer], mom2_update_weight=lam_c, update_norm_lambda=lam_f, mpes=0,
                       mom2_dataset="factworld", v_num_grad_steps=STEPS)
    editor = EncoreEditor(adapter, cfg, ctx)
    c, m = ctx.mom2[layer], adapter.d_mlp

    def expected(requests, previous: torch.Tensor) -> torch.Tensor:
        # the minimiser of λ_C‖ΔK_C‖² + ‖ΔK_prev‖² + ‖ΔK − R‖² + λ_F‖Δ‖², by its normal equations:
        # Δ (λ_C C + K_prev K_prevᵀ + K Kᵀ + λ_F I) = R Kᵀ, with K and R read off the model independently
        k = torch.stack([_key(model, tok, model_type, layer, q) for q in requests], dim=1)
        r = _z(adapter, cfg, requests) - torch.stack([_hidden(model, tok, layer, q) for q in requests], dim=1)
        gram = lam_c * c + previous + k @ k.T + lam_f * torch.eye(m, dtype=torch.float64)
        return torch.linalg.solve(gram, k @ r.T).T, k

    first = editor.compute(REQUESTS[:2])
    want, k_first = expected(REQUESTS[:2], torch.zeros(m, m, dtype=torch.float64))
    assert _rel(first.deltas[layer], want) < 1e-4
    # a computed but unapplied batch leaves no trace; an applied one's keys join the earlier edits'
    editor.compute(REQUESTS[2:])
    assert float(editor.previous.sums[layer].abs().max()) == 0
    editor.compute(REQUESTS[:2])
    apply_deltas(adapter, first.deltas)
    editor.after_apply(REQUESTS[:2], first)
    torch.testing.assert_close(editor.previous.sums[layer], k_first @ k_first.T, rtol=1e-5, atol=1e-8)

    second = editor.compute(REQUESTS[2:])
    want, _ = expected(REQUESTS[2:], k_first @ k_first.T)
    assert _rel(second.deltas[layer], want) < 1e-4
    resumed = EncoreEditor(adapter, cfg, ctx)
    resumed.load_state_dict(editor.state_dict())
    assert torch.equal(resumed.previous.sums[layer], editor.previous.sums[layer])
    with pytest.raises(EditscaleError, match="encore state must hold"):
        resumed.load_state_dict({})


# ---------------------------------------------------------------------- templates, registry, configs


def test_memit_templates_start_from_the_seed_prompts() -> None:
    tok = byte_bpe_tokenizer()
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    templates = generate_memit_templates(adapter, seed=3)
    assert len(templates) == 6 and templates[0] == "{}"
    for seed_prompt, t in zip(["The", "Therefore", "Because", "I", "You"], templates[1:], strict=True):
        assert t.startswith(seed_prompt) and t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1
    assert generate_memit_templates(adapter, seed=3) == templates
    assert memit_template_groups(templates) == [["{}"], templates[1:]]


def test_registry_presets_and_configs() -> None:
    assert {"memit", "emmet", "alphaedit"} <= set(list_methods())
    assert get_method("MEMIT") is MemitEditor
    assert get_method("emmet") is EmmetEditor
    assert get_method("alphaedit") is AlphaEditEditor
    xl = MemitEditor.default_config("gpt2-xl")
    assert xl.layers == [13, 14, 15, 16, 17] and xl.mom2_update_weight == 20000 and xl.clamp_norm_factor == 0.75
    gptj = MemitEditor.default_config("EleutherAI/gpt-j-6b")
    assert gptj.layers == [3, 4, 5, 6, 7, 8] and gptj.mom2_update_weight == 15000 and gptj.v_num_grad_steps == 25
    assert EmmetEditor.default_config("gpt2-xl").mom2_update_weight == 1000
    assert EmmetEditor.default_config("EleutherAI/gpt-j-6b").layers == [5]
    llama = EmmetEditor.default_config("meta-llama/Llama-2-7b-hf")
    assert llama.clamp_norm_factor == 4 and llama.v_weight_decay == 1e-3
    ae = AlphaEditEditor.default_config("gpt2-xl")
    assert ae.nullspace_threshold == 0.02 and ae.L2 == 10 and ae.layers == [13, 14, 15, 16, 17]
    assert AlphaEditEditor.default_config("EleutherAI/gpt-j-6b").v_num_grad_steps == 25
    for cls in (MemitEditor, EmmetEditor, AlphaEditEditor):
        assert cls.default_config("embedded").mom2_dataset == "factworld"
        with pytest.raises(EditscaleError, match=f"no {cls.name} hyper-parameters"):
            cls.default_config("opt-125m")
    assert MemitConfig(layers=[2, 0, 1]).layers == [0, 1, 2]  # processed ascending, z at the last
    with pytest.raises(EditscaleError, match="layers repeat"):
        MemitConfig.parse({"layers": [1, 1]})
    with pytest.raises(EditscaleError, match="mom2_update_weight"):
        AlphaEditConfig.parse({"layers": [1], "mom2_update_weight": 1})  # ignored by AlphaEdit: refused


def test_stateless_methods_refuse_state() -> None:
    tok, model, adapter, ctx = _setup("gpt2", [1])
    editor = MemitEditor(adapter, MemitConfig(layers=[1]), ctx)
    assert editor.state_dict() == {}
    editor.load_state_dict({})
    with pytest.raises(EditscaleError, match="keeps no state"):
        editor.load_state_dict({"x": torch.zeros(1)})
