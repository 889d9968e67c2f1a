"""r-ROME (docs/protocol.md §3) is ROME with another key mode: its registration, defaults and presets.

The maths (u·k̄ > 0, ΔW k̄ = v* − v̄) is checked on RomeEditor in test_rome.py.
"""

from __future__ import annotations

import pytest
import torch

from editscale.errors import EditscaleError
from editscale.methods.base import get_method
from editscale.methods.r_rome import RRomeConfig, RRomeEditor
from editscale.methods.rome import RomeConfig, RomeEditor
from editscale.methods.solver.context import EditContext
from editscale.models.adapter import ModelAdapter
from test_rome import REQUEST, TEMPLATES
from tiny_models import byte_bpe_tokenizer, random_spd, tiny_model


def test_default_key_mode_is_random_prefix() -> None:
    assert RRomeConfig(layers=[1]).key_mode == "random_prefix"
    assert RRomeConfig(layers=[1], key_mode="prompt").key_mode == "prompt"
    with pytest.raises(EditscaleError, match="key_mode"):
        RRomeConfig.parse({"layers": [1], "key_mode": "original"})  # that is plain ROME


def test_registry_and_presets_match_rome_but_for_the_key_mode() -> None:
    assert get_method("r-rome") is RRomeEditor and get_method("rome") is RomeEditor
    assert RRomeEditor.presets_dir != RomeEditor.presets_dir
    names = sorted(p.stem for p in RomeEditor.presets_dir.glob("*.yaml"))
    assert names == sorted(p.stem for p in RRomeEditor.presets_dir.glob("*.yaml"))
    for name in names:
        ours, rome = RRomeEditor.default_config(name), RomeEditor.default_config(name)
        assert isinstance(ours, RRomeConfig) and ours.key_mode == "random_prefix" and rome.key_mode == "original"
        assert ours.model_dump(exclude={"key_mode"}) == rome.model_dump(exclude={"key_mode"}), name
    assert RRomeEditor.default_config("gpt2-xl").layers == [17]


def test_same_update_as_rome_in_random_prefix_mode() -> None:
    tok = byte_bpe_tokenizer()
    adapter = ModelAdapter(tiny_model("gpt2", len(tok)), tok)
    deltas = []
    for cls, cfg_cls in ((RRomeEditor, RRomeConfig), (RomeEditor, RomeConfig)):
        cfg = cfg_cls(layers=[1], mom2_dataset="factworld", key_mode="random_prefix", v_num_grad_steps=4)
        ctx = EditContext("tiny", templates={"rome": list(TEMPLATES)}, mom2={1: random_spd(adapter.d_mlp)},
                          progress=False)
        result = cls(adapter, cfg, ctx).compute([REQUEST])
        assert result.diagnostics["u_dot_k"] > 0
        deltas.append(result.deltas[1])
    torch.testing.assert_close(deltas[0], deltas[1], rtol=0, atol=0)


def test_a_preset_extends_another_methods_preset(tmp_path) -> None:
    from editscale.errors import EditscaleError
    from editscale.methods.base import preset_mapping

    assert "extends: rome" in (RRomeEditor.presets_dir / "gpt2-xl.yaml").read_text()
    (tmp_path / "gpt2-xl.yaml").write_text("extends: rome\nclamp_norm_factor: 2\n")
    (tmp_path / "opt-125m.yaml").write_text("extends: rome\n")

    class Child(RRomeEditor):
        presets_dir = tmp_path

    child = preset_mapping(Child, "gpt2-xl")
    assert child == {**preset_mapping(RomeEditor, "gpt2-xl"), "clamp_norm_factor": 2}
    with pytest.raises(EditscaleError, match="extends the rome preset for 'opt-125m', which does not exist"):
        preset_mapping(Child, "opt-125m")
