from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from editscale.errors import EditscaleError, UnknownNameError
from editscale.models.adapter import ModelAdapter, reference_subject_index
from tiny_models import byte_bpe_tokenizer, gpt2_tokenizer, sentencepiece_tokenizer, tiny_model

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama"]
TEXTS = ["The mother tongue of Danielle Darrieux is", "Paris is located in"]


@pytest.fixture(scope="module")
def tokenizers():
    return {"byte_bpe": byte_bpe_tokenizer(), "sentencepiece": sentencepiece_tokenizer()}


def make_adapter(model_type: str, tokenizers, **kwargs) -> ModelAdapter:
    tok = tokenizers["sentencepiece"] if model_type == "llama" else tokenizers["byte_bpe"]
    return ModelAdapter(tiny_model(model_type, len(tok), **kwargs), tok)


def mlp_inputs(adapter: ModelAdapter, layer: int, batch) -> torch.Tensor:
    """The MLP block's input [batch, seq, d_model], read with a pre-hook."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0] if args else next(iter(kwargs.values()))

    handle = adapter.module("mlp", layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        adapter.logits(batch)
    finally:
        handle.remove()
    return seen["x"].float()


def hand_key(adapter: ModelAdapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The post-activation MLP hidden, computed from the MLP input with plain tensor maths."""
    name = adapter.family.name
    mlp_in = adapter.module("mlp_in", layer)
    if name == "gpt2":  # Conv1D: x @ W + b, gelu_new
        return F.gelu(x @ mlp_in.weight + mlp_in.bias, approximate="tanh")
    if name == "gptj":  # gelu_new
        return F.gelu(x @ mlp_in.weight.T + mlp_in.bias, approximate="tanh")
    if name == "gpt_neox":  # exact gelu
        return F.gelu(x @ mlp_in.weight.T + mlp_in.bias)
    gate = adapter.module("mlp_gate", layer)
    return F.silu(x @ gate.weight.T) * (x @ mlp_in.weight.T)


def mlp_out_bias(adapter: ModelAdapter, layer: int) -> torch.Tensor:
    bias = adapter.module("mlp_out", layer).bias
    return torch.zeros(adapter.d_model) if bias is None else bias.float()


# ---------------------------------------------------------------------- shapes and modules


@pytest.mark.parametrize("model_type", FAMILIES)
def test_shapes_and_module_lookup(model_type, tokenizers):
    adapter = make_adapter(model_type, tokenizers)
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp) == (2, 32, 64)
    assert adapter.device == torch.device("cpu") and adapter.dtype == torch.float32
    assert adapter.module("mlp_out", 1) is adapter.model.get_submodule(adapter.family.mlp_out.format(1))
    params = dict(adapter.model.named_parameters())
    assert params[adapter.mlp_out_weight_name(1)] is adapter.module("mlp_out", 1).weight
    with pytest.raises(EditscaleError, match="needs a layer"):
        adapter.module("mlp_out")
    with pytest.raises(EditscaleError, match="out of range"):
        adapter.module("block", 2)
    with pytest.raises(UnknownNameError):
        adapter.module("ffn", 0)


# ---------------------------------------------------------------------- keys and values


@pytest.mark.parametrize("model_type", FAMILIES)
def test_captured_key_and_value_match_hand_computation(model_type, tokenizers):
    adapter = make_adapter(model_type, tokenizers)
    batch = adapter.encode(TEXTS)
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] != lengths[1]  # a padded row is part of the test
    positions = [3, int(lengths[1]) - 1]
    layer = 1
    keys, values = adapter.capture_mlp_io(batch, positions, layer)
    assert keys.dtype == torch.float32
    assert keys.shape == (2, adapter.d_mlp) and values.shape == (2, adapter.d_model)

    x = mlp_inputs(adapter, layer, batch)
    rows = torch.arange(2)
    expected_keys = hand_key(adapter, layer, x)[rows, torch.tensor(positions)]
    torch.testing.assert_close(keys, expected_keys, atol=1e-5, rtol=1e-4)
    # v = W k + b with W in the canonical [d_model, d_mlp] orientation.
    weight = adapter.get_mlp_out_weight(layer)
    assert weight.shape == (adapter.d_model, adapter.d_mlp)
    torch.testing.assert_close(values, keys @ weight.T + mlp_out_bias(adapter, layer), atol=1e-5, rtol=1e-4)

    # Stopping the pass early changes nothing; -1 means each row's last real token, not padding.
    keys_full, values_full = adapter.capture_mlp_io(TEXTS, [3, -1], layer, stop_early=False)
    torch.testing.assert_close(keys_full, keys)
    torch.testing.assert_close(values_full, values)
    all_keys = adapter.capture_mlp_keys(batch, layer)
    torch.testing.assert_close(all_keys[rows, torch.tensor(positions)], keys)


def test_positions_outside_the_row_are_refused(tokenizers):
    adapter = make_adapter("gpt2", tokenizers)
    lengths = adapter.encode(TEXTS)["attention_mask"].sum(1)
    with pytest.raises(EditscaleError, match="outside"):
        adapter.capture_mlp_io(TEXTS, [0, int(lengths[1])], 0)  # row 1's first pad token
    with pytest.raises(EditscaleError, match="positions given"):
        adapter.capture_mlp_io(TEXTS, [0, 1, 2], 0)


# ---------------------------------------------------------------------- writing the weight


@pytest.mark.parametrize("model_type", FAMILIES)
def test_weight_update_changes_the_output_by_delta_times_key(model_type, tokenizers):
    adapter = make_adapter(model_type, tokenizers)
    layer = 0
    original = adapter.module("mlp_out", layer).weight.detach().clone()
    w0 = adapter.get_mlp_out_weight(layer)
    keys0, values0 = adapter.capture_mlp_io(TEXTS, [2, 4], layer)
    torch.manual_seed(1)
    delta = 0.1 * torch.randn(adapter.d_model, adapter.d_mlp)

    adapter.add_to_mlp_out_weight(layer, delta)
    keys1, values1 = adapter.capture_mlp_io(TEXTS, [2, 4], layer)
    torch.testing.assert_close(keys1, keys0)  # the key is the rewritten matrix's input
    torch.testing.assert_close(values1 - values0, keys0 @ delta.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.get_mlp_out_weight(layer), w0 + delta)

    adapter.set_mlp_out_weight(layer, w0)
    assert torch.equal(adapter.module("mlp_out", layer).weight, original)
    with pytest.raises(EditscaleError, match=r"\[d_model, d_mlp\]"):
        adapter.add_to_mlp_out_weight(layer, delta.T)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_square_mlp_keeps_the_family_orientation(model_type, tokenizers):
    # With d_mlp == d_model a shape test cannot tell W from W^T; the family flag must.
    adapter = make_adapter(model_type, tokenizers, square=True)
    layer = 1
    assert adapter.d_mlp == adapter.d_model
    param = adapter.module("mlp_out", layer).weight
    stored = param.detach().clone()
    expected_canonical = stored.T if adapter.family.conv1d_weights else stored
    assert torch.equal(adapter.get_mlp_out_weight(layer), expected_canonical)

    keys0, values0 = adapter.capture_mlp_io(TEXTS, [1, 2], layer)
    delta = torch.zeros(adapter.d_model, adapter.d_mlp)
    delta[0, 5] = 1.0  # not symmetric: output unit 0 reads key unit 5
    adapter.add_to_mlp_out_weight(layer, delta)
    _, values1 = adapter.capture_mlp_io(TEXTS, [1, 2], layer)
    change = values1 - values0
    torch.testing.assert_close(change, keys0 @ delta.T, atol=1e-5, rtol=1e-4)
    assert (change - keys0 @ delta).abs().max() > 1e-3  # the transposed update would differ
    torch.testing.assert_close(change[:, 0], keys0[:, 5], atol=1e-5, rtol=1e-4)


def test_half_precision_model_sums_updates_in_fp32(tokenizers):
    adapter = make_adapter("gpt2", tokenizers, dtype=torch.bfloat16)
    layer = 0
    assert adapter.dtype == torch.bfloat16
    w0 = adapter.get_mlp_out_weight(layer)
    assert w0.dtype == torch.float32
    keys, values = adapter.capture_mlp_io(TEXTS, [1, 1], layer)
    assert keys.dtype == values.dtype == torch.float32
    delta = torch.full((adapter.d_model, adapter.d_mlp), 0.25)
    adapter.add_to_mlp_out_weight(layer, delta)
    param = adapter.module("mlp_out", layer).weight
    assert param.dtype == torch.bfloat16
    torch.testing.assert_close(adapter.get_mlp_out_weight(layer), (w0 + delta).bfloat16().float())


@pytest.mark.parametrize("model_type, dtype", [("gpt2", torch.bfloat16), ("gptj", torch.float32),
                                               ("llama", torch.float16)])
def test_snapshot_and_restore_are_exact(model_type, dtype, tokenizers):
    adapter = make_adapter(model_type, tokenizers, dtype=dtype)
    state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    snap = adapter.snapshot([0, 1])
    has_bias = adapter.module("mlp_out", 0).bias is not None  # GPT-2 and GPT-J have one, Llama not
    assert set(snap.weights) == {0, 1} and set(snap.biases) == ({0, 1} if has_bias else set())
    assert all(w.dtype == torch.float32 and w.shape == (adapter.d_model, adapter.d_mlp) for w in snap.weights.values())
    adapter.add_to_mlp_out_weight(1, torch.full((adapter.d_model, adapter.d_mlp), 0.1))
    if has_bias:
        adapter.add_to_mlp_out_bias(0, torch.full((adapter.d_model,), 0.1))
        assert not torch.equal(adapter.get_mlp_out_bias(0), snap.biases[0])
    else:
        assert adapter.get_mlp_out_bias(0) is None
        with pytest.raises(EditscaleError, match="has no bias"):
            adapter.add_to_mlp_out_bias(0, torch.zeros(adapter.d_model))
    adapter.restore(snap)
    assert all(torch.equal(v, state[k]) for k, v in adapter.model.state_dict().items())


# ---------------------------------------------------------------------- interventions


def module_outputs(adapter: ModelAdapter, site: str, layer: int, batch):
    seen = {}

    def hook(module, args, output):
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = adapter.module(site, layer).register_forward_hook(hook)
    try:
        logits = adapter.logits(batch)
    finally:
        handle.remove()
    return seen["out"], logits


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("site", ["mlp", "block"])
def test_intervene_adds_delta_only_at_the_positions(model_type, site, tokenizers):
    adapter = make_adapter(model_type, tokenizers)
    layer = 0
    batch = adapter.encode(TEXTS)
    positions = [1, 3]
    base_out, base_logits = module_outputs(adapter, site, layer, batch)
    torch.manual_seed(2)
    delta = torch.randn(adapter.d_model)
    with adapter.intervene(site, layer, positions, delta):
        out, logits = module_outputs(adapter, site, layer, batch)
    expected = base_out.clone()
    expected[0, 1] += delta
    expected[1, 3] += delta
    torch.testing.assert_close(out, expected)
    # Causal: nothing before the shifted token moves; the shifted token's prediction does.
    torch.testing.assert_close(logits[0, :1], base_logits[0, :1])
    torch.testing.assert_close(logits[1, :3], base_logits[1, :3])
    assert (logits[1, 3] - base_logits[1, 3]).abs().max() > 1e-4
    # The hook is gone afterwards.
    torch.testing.assert_close(module_outputs(adapter, site, layer, batch)[0], base_out)


@pytest.mark.parametrize("site", ["mlp", "block"])
def test_gradients_reach_delta(site, tokenizers):
    adapter = make_adapter("gpt2", tokenizers)
    batch = adapter.encode(TEXTS)
    delta = torch.zeros(2, adapter.d_model, requires_grad=True)  # one row each
    with adapter.intervene(site, 0, [2, 4], delta):
        logits = adapter.forward(batch)
    loss = -torch.log_softmax(logits[:, -1].float(), dim=-1)[:, 7].sum() - logits[1, 4, 3]
    loss.backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()
    assert delta.grad[0].abs().sum() > 0 and delta.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in adapter.model.parameters())

    # The gradient is the real one: compare with a finite difference along a random direction.
    direction = torch.randn(2, adapter.d_model)
    eps = 1e-3

    def loss_at(d):
        with adapter.intervene(site, 0, [2, 4], d):
            lg = adapter.logits(batch)
        return (-torch.log_softmax(lg[:, -1], dim=-1)[:, 7].sum() - lg[1, 4, 3]).item()

    numeric = (loss_at(eps * direction) - loss_at(-eps * direction)) / (2 * eps)
    analytic = (delta.grad * direction).sum().item()
    assert math.isclose(numeric, analytic, rel_tol=2e-2, abs_tol=1e-3)


def test_record_sees_outputs_before_or_after_an_intervention(tokenizers):
    adapter = make_adapter("llama", tokenizers)
    batch = adapter.encode(TEXTS)
    delta = torch.randn(adapter.d_model)
    with adapter.record("mlp", 1, [2, 5]) as before, adapter.intervene("mlp", 1, [2, 5], delta), \
            adapter.record("mlp", 1, [2, 5]) as after:
        adapter.logits(batch)
        adapter.logits(batch)
    assert len(before.outputs) == len(after.outputs) == 2
    torch.testing.assert_close(after.last - before.last, delta.expand(2, -1))
    _, values = adapter.capture_mlp_io(batch, [2, 5], 1)
    torch.testing.assert_close(before.last, values)  # mlp output == mlp_out output (no dropout in eval)
    with pytest.raises(EditscaleError, match="refused"), adapter.intervene("mlp", 0, -1, delta):
        adapter.logits(batch)
    with pytest.raises(UnknownNameError):
        adapter.record("residual", 0, 0).__enter__()


# ---------------------------------------------------------------------- tokenisation


def reference_rule(tok, template: str, subject: str, mode: str) -> int:
    """The reference rule of docs/protocol.md §2.3 written out independently: pieces tokenised separately, no BOS."""
    cut = template.index("{}")
    prefix, suffix = template[:cut], template[cut + 2:]
    word = subject
    if prefix:
        assert prefix[-1] == " "
        prefix, word = prefix[:-1], " " + subject.strip()
    n_prefix, n_word, n_suffix = (len(tok(s, add_special_tokens=False)["input_ids"]) if s else 0
                                  for s in (prefix, word, suffix))
    return {"subject_last": n_prefix + n_word - 1, "subject_first": n_prefix,
            "subject_first_after_last": n_prefix + n_word - (1 if n_suffix == 0 else 0),
            "last": n_prefix + n_word + n_suffix - 1}[mode]


TEMPLATES = ["{} is located in the country of", "The mother tongue of {} is", "The mother tongue of {}",
             "{}", "{}, which is a twin city of", "Toko Yasuda. {} plays the", "In {}"]
SUBJECTS = ["Danielle Darrieux", "Paris", "Autonomous University of Madrid", "Apple A5"]
MODES = ["subject_last", "subject_first", "subject_first_after_last", "last"]


@pytest.mark.parametrize("which", ["gpt2", "byte_bpe"])
def test_subject_index_equals_the_reference_rule_for_byte_level_bpe(which, tokenizers):
    tok = gpt2_tokenizer() if which == "gpt2" else tokenizers["byte_bpe"]
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    pairs = [(t, s) for t in TEMPLATES for s in SUBJECTS]
    for mode in MODES:
        expected = [reference_rule(tok, t, s, mode) for t, s in pairs]
        assert adapter.subject_token_indices([t for t, _ in pairs], [s for _, s in pairs], mode) == expected
        assert [reference_subject_index(tok, t, s, mode) for t, s in pairs] == expected
    assert adapter.subject_token_index("The mother tongue of {} is", "Paris") == \
        reference_rule(tok, "The mother tongue of {} is", "Paris", "subject_last")
    with pytest.raises(EditscaleError, match="exactly one"):
        adapter.subject_token_index("{} and {}", "Paris")
    with pytest.raises(UnknownNameError):
        adapter.subject_token_index("{} is", "Paris", mode="middle")


def test_subject_index_with_bos_and_sentencepiece_spacing(tokenizers):
    tok = tokenizers["sentencepiece"]
    adapter = ModelAdapter(tiny_model("llama", len(tok)), tok)
    assert adapter.adds_bos
    for template in TEMPLATES:
        for subject in SUBJECTS:
            text = template.replace("{}", subject)
            ids = adapter.encode([text])["input_ids"][0].tolist()
            pieces = tok.convert_ids_to_tokens(ids)
            assert ids[0] == tok.bos_token_id
            first = adapter.subject_token_index(template, subject, "subject_first")
            last = adapter.subject_token_index(template, subject, "subject_last")
            after = adapter.subject_token_index(template, subject, "subject_first_after_last")
            assert 1 <= first <= last
            assert "".join(pieces[first:last + 1]).replace("▁", " ").strip() == subject, (template, subject)
            assert pieces[first].startswith("▁")  # the space before the subject goes with it
            suffix = template.split("{}")[1]
            if suffix:
                assert after == last + 1
                assert "".join(pieces[after:]).replace("▁", " ").strip() == suffix.strip()
            else:
                assert after == last == len(ids) - 1
            assert adapter.subject_token_index(template, subject, "last") == len(ids) - 1
    # The separate-pieces rule ignores BOS and is off by one here; the adapter is not.
    assert adapter.subject_token_index("{} is", "Paris") == \
        reference_rule(tok, "{} is", "Paris", "subject_last") + 1


PROMPTS = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the", "Paris is located in"]
TARGETS = ["English", "piano", " Spain"]


@pytest.mark.parametrize("which", ["gpt2", "byte_bpe"])
def test_prompt_target_layout_matches_the_reference_for_gpt2(which, tokenizers):
    tok = gpt2_tokenizer() if which == "gpt2" else tokenizers["byte_bpe"]
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    layout = adapter.prompt_target_batch(PROMPTS, TARGETS)
    assert layout.texts[2] == "Paris is located in Spain"
    for i, (prompt, target) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        assert layout.prefix_lens[i] == len(tok(prompt)["input_ids"])
        assert layout.target_ids[i] == tok(" " + target.strip())["input_ids"]
        assert layout.target_ids[i] == adapter.target_ids(target)
        n = layout.prefix_lens[i] + len(layout.target_ids[i])
        assert layout.input_ids[i, :n].tolist() == tok(layout.texts[i])["input_ids"]
        assert layout.attention_mask[i].sum() == n


def test_prompt_target_layout_with_bos(tokenizers):
    tok = tokenizers["sentencepiece"]
    adapter = ModelAdapter(tiny_model("llama", len(tok)), tok)
    layout = adapter.prompt_target_batch(PROMPTS, TARGETS)
    for i, target in enumerate(TARGETS):
        ids = layout.input_ids[i].tolist()
        assert ids[0] == tok.bos_token_id
        prompt_ids = tok(PROMPTS[i])["input_ids"]  # with BOS
        assert layout.prefix_lens[i] == len(prompt_ids)
        assert ids[:layout.prefix_lens[i]] == prompt_ids
        assert tok.decode(layout.target_ids[i]).strip() == target.strip()
        assert adapter.target_ids(target) == layout.target_ids[i]
    # A naive tok(" " + target) would give SentencePiece an extra "▁" token.
    assert tok(" English", add_special_tokens=False)["input_ids"] != adapter.target_ids("English")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_scoring_position_predicts_the_first_target_token(model_type, tokenizers):
    # logits[prefix_len - 1] of "prompt target" must be the next-token distribution of the prompt.
    adapter = make_adapter(model_type, tokenizers)
    layout = adapter.prompt_target_batch(PROMPTS, TARGETS)
    logits = adapter.logits(layout.inputs())
    rows = torch.arange(len(PROMPTS))
    from_layout = torch.log_softmax(logits[rows, torch.tensor(layout.prefix_lens) - 1], dim=-1)
    torch.testing.assert_close(from_layout, adapter.next_token_logprobs(PROMPTS), atol=1e-5, rtol=1e-4)


def test_encode_pads_right_with_eos_without_touching_the_tokenizer(tokenizers):
    tok = byte_bpe_tokenizer()
    tok.padding_side = "left"
    assert tok.pad_token is None
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    batch = adapter.encode(["Paris is located in the country of", "Paris"])
    short = len(tok("Paris")["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["input_ids"][1, short:] == tok.eos_token_id).all()
    assert tok.pad_token is None and tok.padding_side == "left"
    with pytest.raises(EditscaleError, match="no tokens"):
        adapter.encode(["Paris", ""])
