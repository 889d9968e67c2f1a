"""FT-C (docs/protocol.md §7) on tiny random models: the L∞ clamp, the loss definitions, restoration, presets."""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.base import EditRequest, EditResult, apply_result, get_method, list_methods
from editscale.methods.ft_c import FtcConfig, FtcEditor
from editscale.methods.solver.context import EditContext
from editscale.models.adapter import ModelAdapter
from tiny_models import byte_bpe_tokenizer, tiny_model

LAYER = 1
REQUEST = EditRequest(case_id=0, prompt="{} plays the", subject="Danielle Darrieux", target_new="city",
                      target_true="piano")
SECOND = EditRequest(case_id=1, prompt="The mother tongue of {} is", subject="Toko Yasuda", target_new="Dutch",
                     target_true="English")


def _mlp_out(model: torch.nn.Module, model_type: str, layer: int) -> torch.nn.Module:
    # written out by hand, independent of the family tables under test
    return model.transformer.h[layer].mlp.c_proj if model_type == "gpt2" else model.transformer.h[layer].mlp.fc_out


def _setup(model_type: str, **overrides):
    tok = byte_bpe_tokenizer()
    model = tiny_model(model_type, len(tok))
    adapter = ModelAdapter(model, tok)
    cfg = FtcConfig(**{"layers": [LAYER], **overrides})
    editor = FtcEditor(adapter, cfg, EditContext("tiny", progress=False))
    return tok, model, adapter, editor


def _last_position_loss(model, tok, request: EditRequest) -> float:
    """The reference FT-C loss (docs/protocol.md §7) for one request: every target token's log-prob at the
    single last prompt position."""
    ids = tok(request.prompt.format(request.subject))["input_ids"]
    target = tok(" " + request.target_new)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)
    return -float(sum(lp[t] for t in target) / len(target))


def _teacher_forced_loss(model, tok, request: EditRequest) -> float:
    prompt = tok(request.prompt.format(request.subject))["input_ids"]
    target = tok(" " + request.target_new)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return -float(sum(lp[len(prompt) + j - 1, t] for j, t in enumerate(target)) / len(target))


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])  # Conv1D storage and Linear storage
def test_linf_constraint_holds_for_weight_and_bias(model_type: str) -> None:
    eps = 1e-3
    tok, model, adapter, editor = _setup(model_type, norm_constraint=eps, lr=1e-2, num_steps=5)
    result = editor.compute([REQUEST, SECOND])
    assert isinstance(result, EditResult) and result.bias_deltas
    weight, bias = result.deltas[LAYER], result.bias_deltas[LAYER]
    assert weight.shape == (adapter.d_model, adapter.d_mlp) and bias.shape == (adapter.d_model,)
    for delta in (weight, bias):
        assert float(delta.abs().max()) <= eps * (1 + 1e-5)
        # lr 10x the radius: the clamp must actually have bound, or the check above proves nothing
        assert float(delta.abs().max()) > 0.99 * eps
    assert result.diagnostics["opt_steps"] == 5


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_unconstrained_edit_lowers_the_loss(model_type: str) -> None:
    tok, model, adapter, editor = _setup(model_type, norm_constraint=100.0, lr=1e-2, num_steps=40)
    before = _last_position_loss(model, tok, REQUEST)
    result = editor.compute([REQUEST])
    apply_result(adapter, result)
    after = _last_position_loss(model, tok, REQUEST)
    # A random 2-block model's logits are bounded (final LayerNorm, 0.02-scale tied embeddings), so the
    # loss of a 2-token target over 300 tokens cannot fall far below log(300) ≈ 5.7; 0.25 nats is clear.
    assert after < before - 0.25
    assert result.diagnostics["loss_after"] == pytest.approx(after, rel=1e-4)
    apply_result(adapter, result, sign=-1.0)
    assert _last_position_loss(model, tok, REQUEST) == pytest.approx(before, rel=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_loss_is_the_last_prompt_position_or_teacher_forced(model_type: str) -> None:
    tok, model, adapter, editor = _setup(model_type, norm_constraint=1e-3)
    assert len(tok(" " + REQUEST.target_new)["input_ids"]) == 2  # the case the two definitions differ on
    last = _last_position_loss(model, tok, REQUEST)
    forced = _teacher_forced_loss(model, tok, REQUEST)
    assert last != pytest.approx(forced, rel=1e-3)
    assert editor.loss([REQUEST]) == pytest.approx(last, rel=1e-5)
    # the first epoch's loss is measured before any step: it is the same definition the optimiser sees
    assert editor.compute([REQUEST]).diagnostics["loss_first"] == pytest.approx(last, rel=1e-5)
    # a batch of requests of different lengths (right padding) averages the per-request means
    both = (last + _last_position_loss(model, tok, SECOND)) / 2
    assert editor.loss([REQUEST, SECOND]) == pytest.approx(both, rel=1e-5)

    _, _, _, forced_editor = _setup(model_type, norm_constraint=1e-3, teacher_forced=True)
    assert forced_editor.loss([REQUEST]) == pytest.approx(forced, rel=1e-5)
    both = (forced + _teacher_forced_loss(model, tok, SECOND)) / 2
    assert forced_editor.loss([REQUEST, SECOND]) == pytest.approx(both, rel=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_model_unchanged_and_only_the_layer_moves(model_type: str) -> None:
    tok, model, adapter, editor = _setup(model_type, norm_constraint=1e-2, lr=1e-2, num_steps=3)
    model.transformer.wte.weight.requires_grad_(True)  # a mixed set of flags must come back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = editor.compute([REQUEST])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "compute() changed the model"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert set(result.deltas) == {LAYER} and set(result.bias_deltas) == {LAYER}

    apply_result(adapter, result)
    module = _mlp_out(model, model_type, LAYER)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    prefix = f"transformer.h.{LAYER}.mlp.{'c_proj' if model_type == 'gpt2' else 'fc_out'}"
    assert changed == {f"{prefix}.weight", f"{prefix}.bias"}
    stored = module.weight.detach() - state[f"{prefix}.weight"]
    canonical = stored.t() if model_type == "gpt2" else stored  # Conv1D stores [d_mlp, d_model]
    torch.testing.assert_close(canonical, result.deltas[LAYER], rtol=0, atol=1e-7)
    torch.testing.assert_close(module.bias.detach() - state[f"{prefix}.bias"], result.bias_deltas[LAYER],
                               rtol=0, atol=1e-7)


def test_train_bias_off_and_clamp_anchor_unedited() -> None:
    tok, model, adapter, editor = _setup("gpt2", norm_constraint=1e-3, lr=1e-2, num_steps=3, train_bias=False)
    assert editor.compute([REQUEST]).bias_deltas == {}

    # "edit_start" (the reference) bounds each edit, so two edits may drift 2ε; "unedited" bounds the total
    drift = {}
    for anchor in ("edit_start", "unedited"):
        tok, model, adapter, editor = _setup("gpt2", norm_constraint=1e-3, lr=1e-2, num_steps=3,
                                             clamp_anchor=anchor)
        w0 = adapter.get_mlp_out_weight(LAYER)
        editor.prepare()
        for request in (REQUEST, SECOND):
            apply_result(adapter, editor.compute([request]))
        drift[anchor] = float((adapter.get_mlp_out_weight(LAYER) - w0).abs().max())
    assert drift["unedited"] <= 1e-3 * (1 + 1e-5) < drift["edit_start"]
    # an editor nobody prepared prepares itself on the model its first compute() sees
    _, _, _, prepared = _setup("gpt2", norm_constraint=1e-3, clamp_anchor="unedited")
    prepared.prepare()
    _, _, _, unprepared = _setup("gpt2", norm_constraint=1e-3, clamp_anchor="unedited")
    assert torch.equal(unprepared.compute([REQUEST]).deltas[LAYER], prepared.compute([REQUEST]).deltas[LAYER])


def test_config_reads_false_as_unconstrained() -> None:
    assert FtcConfig.parse({"layers": [0], "norm_constraint": False}).norm_constraint is None
    assert FtcConfig.parse({"layers": [0], "norm_constraint": None}).norm_constraint is None
    assert FtcConfig.parse({"layers": [0], "norm_constraint": 5e-4}).norm_constraint == 5e-4
    for bad in ({"norm_constraint": True}, {"norm_constraint": -1.0}, {"layers": []}, {"num_steps": 0},
                {"kl_factor": 0.0625}):
        with pytest.raises(EditscaleError):
            FtcConfig.parse({"layers": [0], **bad})


def test_registry_and_presets() -> None:
    assert {"ft-c", "r-rome", "rome"} <= set(list_methods())
    assert get_method("FT-C") is FtcEditor
    xl = FtcEditor.default_config("gpt2-xl")
    assert xl.layers == [0] and xl.norm_constraint == 5e-4 and xl.lr == 5e-4 and xl.num_steps == 25
    assert xl.weight_decay == 0 and not xl.teacher_forced and xl.train_bias and xl.clamp_anchor == "edit_start"
    assert FtcEditor.default_config("EleutherAI/gpt-j-6B").norm_constraint == 5e-5
    assert FtcEditor.default_config("gpt2-large").norm_constraint == 1e-3
    assert FtcEditor.default_config("gpt2-medium").norm_constraint == 2e-3
    assert FtcEditor.default_config("embedded").layers == [1]
    with pytest.raises(EditscaleError, match="no ft-c hyper-parameters"):
        FtcEditor.default_config("gpt-neox-20b")
