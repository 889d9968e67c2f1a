from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import OPTConfig

from editscale.errors import EditscaleError, UnknownNameError
from editscale.models import loading
from editscale.models.loading import PRESETS, find_preset, list_presets, load_model
from tiny_models import tiny_model, tokenizer_for


def save_tiny(path, model_type: str = "gpt2"):
    tok = tokenizer_for(model_type)
    model = tiny_model(model_type, len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_load_from_a_local_safetensors_directory(tmp_path, model_type):
    original, tok = save_tiny(tmp_path, model_type)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_model(tmp_path)
    assert loaded.family.name == model_type
    assert loaded.adapter.family is loaded.family
    assert loaded.preset is None and loaded.name == str(tmp_path) == loaded.adapter.name
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.padding_side == "right"
    ids = loaded.adapter.encode(["The mother tongue of Paris is"])
    with torch.no_grad():
        expected = original(**ids).logits
    torch.testing.assert_close(loaded.adapter.logits(ids), expected)
    assert loaded.adapter.adds_bos == (model_type == "llama")


def test_dtype_is_applied(tmp_path):
    save_tiny(tmp_path)
    loaded = load_model(tmp_path, dtype="bfloat16")
    assert loaded.adapter.dtype == torch.bfloat16
    assert loaded.adapter.get_mlp_out_weight(0).dtype == torch.float32
    with pytest.raises(EditscaleError, match="unknown dtype"):
        load_model(tmp_path, dtype="float8")


def test_embedded_resolves_to_the_shipped_checkpoint_dir(tmp_path, monkeypatch):
    save_tiny(tmp_path, "gpt_neox")
    monkeypatch.setattr(loading, "embedded_checkpoint_dir", lambda: tmp_path)
    loaded = load_model("embedded")
    assert loaded.name == "embedded" and loaded.adapter.name == "embedded"
    assert loaded.family.name == "gpt_neox" and loaded.preset is PRESETS["embedded"]
    assert loaded.source == str(tmp_path)


def test_embedded_checkpoint_directory_must_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "embedded_checkpoint_dir", lambda: tmp_path / "missing")
    with pytest.raises(EditscaleError, match="embedded model checkpoint is missing"):
        load_model("embedded")


def test_the_embedded_package_points_at_the_same_checkpoint():
    from editscale.embedded import checkpoint_dir

    assert checkpoint_dir() == loading.embedded_checkpoint_dir()
    assert checkpoint_dir().parent.name == "embedded"


def test_unknown_family_fails_before_loading_weights(tmp_path):
    OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2,
              word_embed_proj_dim=16, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnknownNameError, match="known families"):
        load_model(tmp_path)


def test_unreachable_hub_name_is_an_editscale_error(monkeypatch):
    import huggingface_hub.constants

    # The hub reads the variable at import time, so set the parsed constant as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EditscaleError, match="no-such-org/no-such-model") as info:
        load_model("no-such-org/no-such-model")
    assert "\n" not in str(info.value)
    with pytest.raises(EditscaleError, match="gpt2-xl"):
        load_model("gpt2-xl", local_files_only=True)


def test_device_map_needs_accelerate(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(EditscaleError, match="accelerate"):
        load_model(tmp_path, device_map="auto")


def test_presets_hold_the_paper_layers():
    layers = {p.name: p.rome_layer for p in list_presets()}
    assert layers == {"gpt2-medium": 8, "gpt2-large": 12, "gpt2-xl": 17, "EleutherAI/gpt-j-6b": 5,
                      "EleutherAI/gpt-neox-20b": 15, "meta-llama/Llama-2-7b-hf": 5, "embedded": None}
    assert find_preset("EleutherAI/gpt-j-6B") is PRESETS["EleutherAI/gpt-j-6b"]
    assert find_preset("openai-community/gpt2-xl") is PRESETS["gpt2-xl"]
    assert find_preset("nope") is None
    gpt2_xl = PRESETS["gpt2-xl"]
    assert (gpt2_xl.family, gpt2_xl.n_layers, gpt2_xl.d_model, gpt2_xl.d_mlp) == ("gpt2", 48, 1600, 6400)
    assert PRESETS["EleutherAI/gpt-neox-20b"].n_layers == 44


def test_a_preset_that_does_not_match_the_model_is_refused(tmp_path, monkeypatch):
    save_tiny(tmp_path)
    monkeypatch.setitem(PRESETS, "tiny", loading.Preset("tiny", str(tmp_path), "gpt2", 12, 32, 64, 3))
    with pytest.raises(EditscaleError, match="n_layers=2 \\(expected 12\\)"):
        load_model("tiny")


def test_pickle_only_directory_still_loads(tmp_path):
    from safetensors.torch import load_file

    original, _ = save_tiny(tmp_path)
    weights = tmp_path / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "pytorch_model.bin")
    weights.unlink()
    loaded = load_model(tmp_path)
    torch.testing.assert_close(loaded.adapter.get_mlp_out_weight(1),
                               original.transformer.h[1].mlp.c_proj.weight.T.float())
