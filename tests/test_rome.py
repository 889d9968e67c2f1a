"""ROME's update checked against the closed-form equation, computed independently here (docs/protocol.md §2.7)."""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError, UnknownNameError
from editscale.methods.base import EditRequest, apply_deltas, get_method, list_methods
from editscale.methods.rome import RomeConfig, RomeEditor
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.targets import optimize_target
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, random_spd, reference_subject_last, tiny_model

TEMPLATES = ["{}", "Paris is nice. {}", "The piano. {}"]
REQUEST = EditRequest(case_id=0, prompt="{} plays the", subject="Danielle Darrieux", target_new="violin",
                      target_true="piano")


def _mlp_out_module(model: torch.nn.Module, model_type: str, layer: int) -> torch.nn.Module:
    # Module paths written out by hand, independent of the family tables under test.
    if model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj
    return model.transformer.h[layer].mlp.fc_out  # gptj


def _key_value(model: torch.nn.Module, tok, model_type: str, layer: int, text: str, pos: int):
    out = {}

    def hook(module, args, output):
        out["k"], out["v"] = args[0][0, pos].double(), output[0, pos].double()

    h = _mlp_out_module(model, model_type, layer).register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    h.remove()
    return out["k"], out["v"]




def _setup(model_type: str, key_mode: str = "original"):
    tok = byte_bpe_tokenizer()
    model = tiny_model(model_type, len(tok))
    adapter = ModelAdapter(model, tok)
    layer = 1
    cfg = RomeConfig(layers=[layer], mom2_dataset="factworld", key_mode=key_mode, v_num_grad_steps=8)
    c = random_spd(adapter.d_mlp)
    ctx = EditContext("tiny", templates={"rome": list(TEMPLATES)}, mom2={layer: c}, progress=False)
    return tok, model, adapter, layer, cfg, c, ctx


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])  # Conv1D storage and Linear storage
def test_rome_update_matches_closed_form(model_type: str) -> None:
    tok, model, adapter, layer, cfg, c, ctx = _setup(model_type)
    w_before = adapter.get_mlp_out_weight(layer).clone()
    result = RomeEditor(adapter, cfg, ctx).compute([REQUEST])
    assert torch.equal(adapter.get_mlp_out_weight(layer), w_before), "compute() must leave the model unchanged"

    keys = []
    for t in TEMPLATES:
        prompt = t.replace("{}", REQUEST.prompt)
        keys.append(_key_value(model, tok, model_type, layer, prompt.format(REQUEST.subject),
                               reference_subject_last(tok, prompt, REQUEST.subject))[0])
    k_bar = torch.stack(keys).mean(0)
    k0, v_cur = _key_value(model, tok, model_type, layer, REQUEST.prompt.format(REQUEST.subject),
                           reference_subject_last(tok, REQUEST.prompt, REQUEST.subject))
    u = torch.linalg.solve(c, k_bar)
    u = u / u.norm()
    target = optimize_target(adapter, layer, REQUEST.prompt, REQUEST.subject, REQUEST.target_new, TEMPLATES,
                             steps=cfg.v_num_grad_steps, lr=cfg.v_lr, weight_decay=cfg.v_weight_decay,
                             clamp_norm_factor=cfg.clamp_norm_factor, kl_factor=cfg.kl_factor)
    v_star = target.v_star.double()
    expected = torch.outer(v_star - v_cur, u) / (u @ k0)

    delta = result.deltas[layer].double()
    assert delta.shape == (adapter.d_model, adapter.d_mlp)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)
    assert torch.linalg.matrix_rank(delta.float()).item() == 1

    # written through the adapter, the layer now maps the bare prompt's key to v* (both storages)
    apply_deltas(adapter, result.deltas)
    k0_after, v_after = _key_value(model, tok, model_type, layer, REQUEST.prompt.format(REQUEST.subject),
                                   reference_subject_last(tok, REQUEST.prompt, REQUEST.subject))
    torch.testing.assert_close(k0_after, k0)
    torch.testing.assert_close(v_after, v_star, rtol=1e-4, atol=1e-4)
    assert result.diagnostics["u_dot_k"] == pytest.approx(float(u @ k0), rel=1e-5)


def test_r_rome_anchors_on_the_mean_key() -> None:
    tok, model, adapter, layer, cfg, c, ctx = _setup("gpt2", key_mode="random_prefix")
    result = RomeEditor(adapter, cfg, ctx).compute([REQUEST])
    assert result.diagnostics["u_dot_k"] > 0  # k̄ᵀC⁻¹k̄ > 0 for SPD C: no exploding denominator
    keys, values = [], []
    for t in TEMPLATES:
        prompt = t.replace("{}", REQUEST.prompt)
        k, v = _key_value(model, tok, "gpt2", layer, prompt.format(REQUEST.subject),
                          reference_subject_last(tok, prompt, REQUEST.subject))
        keys.append(k)
        values.append(v)
    k_bar, v_bar = torch.stack(keys).mean(0), torch.stack(values).mean(0)
    target = optimize_target(adapter, layer, REQUEST.prompt, REQUEST.subject, REQUEST.target_new, TEMPLATES,
                             steps=cfg.v_num_grad_steps)
    torch.testing.assert_close(result.deltas[layer].double() @ k_bar, target.v_star.double() - v_bar,
                               rtol=1e-4, atol=1e-4)


def test_sequential_requests_sum_rank_one_updates() -> None:
    tok, model, adapter, layer, cfg, c, ctx = _setup("gpt2")
    second = EditRequest(1, "{} was born in", "Toko Yasuda", "London", "Paris")
    editor = RomeEditor(adapter, cfg, ctx)
    both = editor.compute([REQUEST, second])
    first = editor.compute([REQUEST])
    apply_deltas(adapter, first.deltas)
    then = editor.compute([second])  # on the model carrying the first edit, as the reference does
    torch.testing.assert_close(both.deltas[layer], first.deltas[layer] + then.deltas[layer], rtol=1e-4, atol=1e-5)


def test_registry_and_presets() -> None:
    assert "rome" in list_methods()
    assert get_method("ROME") is RomeEditor
    with pytest.raises(UnknownNameError, match="known methods: .*rome"):
        get_method("rime")
    xl = RomeEditor.default_config("gpt2-xl")
    assert xl.layers == [17] and xl.clamp_norm_factor == 4 and xl.mom2_n_samples == 100000
    assert RomeEditor.default_config("gpt2-medium").clamp_norm_factor == 3
    assert RomeEditor.default_config("EleutherAI/gpt-j-6b").layers == [5]
    with pytest.raises(EditscaleError, match="no rome hyper-parameters"):
        RomeEditor.default_config("opt-125m")


def test_config_errors_are_clear(tmp_path) -> None:
    bad = tmp_path / "rome.yaml"
    bad.write_text("layers: [1, 2]\nv_lr: fast\nclamp: 3\n")
    with pytest.raises(EditscaleError) as err:
        RomeConfig.from_yaml(bad)
    msg = str(err.value)
    assert "rome.yaml" in msg and "layers" in msg and "v_lr" in msg and "clamp" in msg
    tok = byte_bpe_tokenizer()
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    with pytest.raises(EditscaleError, match="layer 7 is outside"):
        RomeEditor(adapter, RomeConfig(layers=[7]), EditContext("tiny"))
