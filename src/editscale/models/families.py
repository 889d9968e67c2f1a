"""One role table per architecture family: where the blocks, MLPs and norms live in a HF model.

Editors never spell module paths themselves; they ask the adapter for a role ("mlp_out", layer 17)
and the family says where that is. Paths were checked against transformers 5.24 models built from
tiny configs (see tests/test_families.py), and `legacy_paths` keeps names older releases used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from editscale.errors import UnknownNameError

# Roles whose path holds a "{}" for the block index.
LAYER_ROLES = ("block", "mlp", "mlp_in", "mlp_gate", "mlp_out", "attn")
# Roles that exist once per model.
MODEL_ROLES = ("layers", "final_norm", "embed", "unembed")
ROLES = LAYER_ROLES + MODEL_ROLES

# How a target string becomes token ids (docs/protocol.md §1.3, §10.8).
SPACING_PREPEND_SPACE = "prepend_space"  # byte-level BPE: tok(" " + target.strip()), no special tokens
SPACING_OFFSETS = "offsets"  # SentencePiece-like: read the target's tokens off a full-string tokenisation


@dataclass(frozen=True)
class Family:
    """Module paths and storage facts of one architecture family.

    Layer roles are templates with one "{}" for the 0-based block index (as in the reference
    hparams JSONs, docs/protocol.md §1.1). `mlp_out` is the matrix that ROME/MEMIT rewrite; its input is the
    key k (post-activation, size d_mlp) and its output the value v (size d_model).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    block: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    final_norm: str
    embed: str
    unembed: str
    # Only gated MLPs (Llama: down(act(gate(x)) * up(x))) have one.
    mlp_gate: str | None = None
    # GPT-2's Conv1D stores `.weight` as [in, out] and computes x @ W; nn.Linear stores [out, in].
    # The reference picked the orientation by comparing shapes, which is ambiguous for square
    # matrices (docs/protocol.md §10.14), so the family states it.
    conv1d_weights: bool = False
    tied_unembed: bool = False
    unembed_has_bias: bool = False
    # Whether the family's usual tokenizer prepends BOS. The adapter checks the live tokenizer
    # anyway (a Qwen2 tokenizer adds none although Qwen2 shares the Llama role table).
    adds_bos: bool = False
    target_spacing: str = SPACING_PREPEND_SPACE
    # (role, path) pairs tried when the main path is missing, for older transformers releases.
    legacy_paths: tuple[tuple[str, str], ...] = ()

    def path(self, role: str) -> str | None:
        """The path template of a role (None for a role the family lacks, e.g. mlp_gate on GPT-2)."""
        if role not in ROLES:
            raise UnknownNameError(f"unknown module role '{role}'; known roles: {', '.join(ROLES)}")
        return getattr(self, role)

    def candidate_paths(self, role: str) -> list[str]:
        """The main path of a role followed by its legacy names."""
        main = self.path(role)
        paths = [main] if main is not None else []
        return paths + [p for r, p in self.legacy_paths if r == role]


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    block="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    mlp_in="transformer.h.{}.mlp.c_fc",
    mlp_out="transformer.h.{}.mlp.c_proj",
    attn="transformer.h.{}.attn",
    final_norm="transformer.ln_f",
    embed="transformer.wte",
    unembed="lm_head",
    conv1d_weights=True,
    tied_unembed=True,
    adds_bos=False,
    target_spacing=SPACING_PREPEND_SPACE,
)

GPTJ = Family(
    name="gptj",
    model_types=("gptj",),
    layers="transformer.h",
    block="transformer.h.{}",
    mlp="transformer.h.{}.mlp",
    mlp_in="transformer.h.{}.mlp.fc_in",
    mlp_out="transformer.h.{}.mlp.fc_out",
    attn="transformer.h.{}.attn",
    final_norm="transformer.ln_f",
    embed="transformer.wte",
    unembed="lm_head",
    unembed_has_bias=True,
    adds_bos=False,
    target_spacing=SPACING_PREPEND_SPACE,
)

GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    block="gpt_neox.layers.{}",
    mlp="gpt_neox.layers.{}.mlp",
    mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
    mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
    attn="gpt_neox.layers.{}.attention",
    final_norm="gpt_neox.final_layer_norm",
    embed="gpt_neox.embed_in",
    # transformers 5 renamed the head to lm_head; 4.x (and the reference hparams) call it embed_out.
    unembed="lm_head",
    legacy_paths=(("unembed", "embed_out"),),
    adds_bos=False,
    target_spacing=SPACING_PREPEND_SPACE,
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers",
    block="model.layers.{}",
    mlp="model.layers.{}.mlp",
    mlp_in="model.layers.{}.mlp.up_proj",
    mlp_gate="model.layers.{}.mlp.gate_proj",
    mlp_out="model.layers.{}.mlp.down_proj",
    attn="model.layers.{}.self_attn",
    final_norm="model.norm",
    embed="model.embed_tokens",
    unembed="lm_head",
    adds_bos=True,
    target_spacing=SPACING_OFFSETS,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, GPTJ, GPT_NEOX, LLAMA)}


def get_family(name: str) -> Family:
    """A family by its own name ("gpt2", "gptj", "gpt_neox", "llama")."""
    if name in FAMILIES:
        return FAMILIES[name]
    raise UnknownNameError(f"unknown model family '{name}'; known families: {', '.join(sorted(FAMILIES))}")


def family_for_model_type(model_type: str) -> Family:
    """The family serving an HF `config.model_type` (e.g. "mistral" -> llama)."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise UnknownNameError(f"no model family for model_type '{model_type}'; known families: {known}")


def family_for(model_or_config: Any) -> Family:
    """The family of a HF model or config, read from `config.model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise UnknownNameError(
            f"cannot tell the model family of {type(model_or_config).__name__}: it has no config.model_type; "
            f"known families: {', '.join(sorted(FAMILIES))}"
        )
    return family_for_model_type(model_type)

