from __future__ import annotations

import pytest
from torch import nn
from transformers import OPTConfig
from transformers.pytorch_utils import Conv1D

from editscale.errors import UnknownNameError
from editscale.models.families import (
    FAMILIES,
    LAYER_ROLES,
    MODEL_ROLES,
    family_for,
    family_for_model_type,
    get_family,
)
from tiny_models import tiny_config, tiny_model

MODEL_TYPES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"]
EXPECTED_FAMILY = {"gpt2": "gpt2", "gptj": "gptj", "gpt_neox": "gpt_neox", "llama": "llama",
                   "mistral": "llama", "qwen2": "llama"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_role_path_exists_in_the_real_transformers_class(model_type):
    model = tiny_model(model_type, vocab_size=64)
    family = family_for(model)
    assert family.name == EXPECTED_FAMILY[model_type]
    names = dict(model.named_modules())
    n_layers = len(model.get_submodule(family.layers))
    assert n_layers == 2
    for role in MODEL_ROLES:
        assert family.path(role) in names, (model_type, role)
    for role in LAYER_ROLES:
        template = family.path(role)
        if template is None:
            assert role == "mlp_gate" and family.name != "llama"
            continue
        for layer in range(n_layers):
            assert template.format(layer) in names, (model_type, role, layer)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_storage_flags_match_the_modules(model_type):
    model = tiny_model(model_type, vocab_size=64)
    family = family_for(model)
    mlp_out = model.get_submodule(family.mlp_out.format(0))
    if family.conv1d_weights:
        assert isinstance(mlp_out, Conv1D)
        assert tuple(mlp_out.weight.shape) == (64, 32)  # [in = d_mlp, out = d_model]
    else:
        assert type(mlp_out) is nn.Linear
        assert tuple(mlp_out.weight.shape) == (32, 64)  # [out = d_model, in = d_mlp]
    unembed = model.get_submodule(family.unembed)
    embed = model.get_submodule(family.embed)
    assert (unembed.weight is embed.weight) == family.tied_unembed
    assert (getattr(unembed, "bias", None) is not None) == family.unembed_has_bias


def test_lookup_by_model_type_and_name():
    assert family_for_model_type("gpt2") is FAMILIES["gpt2"]
    assert family_for_model_type("mistral") is FAMILIES["llama"]
    assert get_family("gpt_neox").mlp_out == "gpt_neox.layers.{}.mlp.dense_4h_to_h"
    assert family_for(tiny_config("qwen2", 64)).name == "llama"  # a config works as well as a model
    assert FAMILIES["gpt_neox"].candidate_paths("unembed") == ["lm_head", "embed_out"]


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as info:
        family_for(OPTConfig())
    message = str(info.value)
    assert "opt" in message
    for name in ("gpt2", "gptj", "gpt_neox", "llama"):
        assert name in message
    with pytest.raises(UnknownNameError, match="known families"):
        get_family("bert")
    with pytest.raises(UnknownNameError, match="known roles"):
        FAMILIES["gpt2"].path("lm_head")
    with pytest.raises(UnknownNameError):
        family_for(object())
