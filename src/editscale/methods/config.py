"""Typed method hyper-parameters: the base class, and the groups of fields several methods share.

A method's config class is a `MethodConfig` subclass; methods that optimise a target value (ROME's
v*, MEMIT's z) mix in `TargetConfig`, methods that use second-moment statistics mix in
`StatsConfig`. The fields keep the reference code's flat names (`v_lr`, `mom2_dataset`, ...) so
that a preset YAML reads like the reference's hparams JSON.

A preset file (`methods/<name>/presets/<model>.yaml`) may start with `extends: <method>`: it then
holds only what differs from that method's preset for the same model (r-ROME extends ROME's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from editscale.config_files import read_yaml_mapping, validate
from editscale.errors import EditscaleError
from editscale.models.families import Family, family_for_model_type, get_family

log = logging.getLogger(__name__)

FactToken = Literal["subject_last", "subject_first", "subject_first_after_last", "last"]
# How a method's linear algebra is done (docs/protocol.md §10.15): "default" is editscale's (solves,
# fp64), "reference" the reference code's own, where it differs (ROME's fp32 inverse of C).
Numerics = Literal["default", "reference"]


class MethodConfig(BaseModel):
    """Typed hyper-parameters. Unknown keys are an error, so a typo in a YAML file is caught."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int]

    @classmethod
    def from_yaml(cls: type[C], path: Path | str) -> C:
        return cls.parse(read_yaml_mapping(path, "method config"), source=str(path))

    @classmethod
    def parse(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
        return validate(cls, data, source=source)


C = TypeVar("C", bound=MethodConfig)


# ---------------------------------------------------------------------- the reference's hparams JSON

# The paper's hyper-parameter files (hparams/<METHOD>/<model>.json of the reference code,
# docs/protocol.md §1.1, §2.8, §4.5) load as method configs (`editscale run --method-config
# hparams/ROME/gpt2-xl.json`). What becomes of each of their keys:
#
#   reference key                  editscale
#   layers, fact_token, v_num_grad_steps, v_lr, v_loss_layer, v_weight_decay, clamp_norm_factor,
#   kl_factor, context_template_length_params, mom2_adjustment (ROME), mom2_update_weight (MEMIT,
#   EMMET), mom2_dataset, mom2_n_samples, mom2_dtype, emmet_lambda, update_norm_lambda,
#   nullspace_threshold, L2, num_steps, lr, weight_decay, norm_constraint
#                                  the field of the same name (any key the method's config has is kept)
#   REFERENCE_RENAMES              the field it names
#   REFERENCE_MODULE_KEYS          checked against the role of the model's family (models/families.py)
#                                  that it must name, then dropped: editscale asks the family for modules
#   REFERENCE_UNUSED_KEYS          dropped: no meaning in editscale (for a method whose config lacks them)
#
# Any other key is an error naming it. The dropped keys are named in one logged note.
REFERENCE_RENAMES: dict[str, str] = {}
REFERENCE_MODULE_KEYS: dict[str, str] = {
    "rewrite_module_tmp": "mlp_out",
    "layer_module_tmp": "block",
    "mlp_module_tmp": "mlp",
    "attn_module_tmp": "attn",
    "ln_f_module": "final_norm",
    "lm_head_module": "unembed",
}
# key -> (why it has no editscale meaning, the values that may be dropped; None: any). A value outside
# them asks for behaviour editscale does not have, so it is an error rather than silently dropped.
REFERENCE_UNUSED_KEYS: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    "layer_selection": ("MEMIT's layer choice, which its code never reads", None),
    "mom2_adjustment": ("only ROME reads it; the MEMIT family always uses the statistics", None),
    "mom2_update_weight": ("this method's solve has no weight on the statistics (AlphaEdit's ignores it)", None),
    "calculate_objective_value": ("EMMET's diagnostic of its objective, not computed here", None),
    "emmet_lambda": ("EMMET's ridge, which other methods do not read", None),
    "update_norm_lambda": ("a ridge on the statistics, which this method does not have", (0, 0.0)),
    "bias_update": ("the reference's option to edit the bias too, which editscale does not offer", (False,)),
    "dynamic": ("the reference's option to sample statistics until a key budget, not offered", (False,)),
    "dynamic_multiplier": ("read by the reference only with dynamic: true", None),
    "stats_dir": ("where the reference caches statistics (--stats-cache here)", None),
}


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # False is not 0 here


def is_reference_hparams(data: Mapping[str, Any], cls: type[MethodConfig]) -> bool:
    """Whether a mapping holds keys only the reference's hparams JSON has (module paths, unused keys)."""
    return any(k in REFERENCE_MODULE_KEYS or (k in REFERENCE_UNUSED_KEYS and k not in cls.model_fields)
               for k in data)


def _family_of(model: str) -> Family | None:
    """The architecture family of a model, without loading weights (a preset's table, else config.json)."""
    from editscale.models.loading import EMBEDDED, embedded_checkpoint_dir, model_depth

    if model == EMBEDDED:
        try:
            model_type = json.loads((embedded_checkpoint_dir() / "config.json").read_text())["model_type"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return family_for_model_type(str(model_type))
    name = model_depth(model).get("family")
    return get_family(name) if name else None


def _family_paths(family: Family, role: str) -> list[str]:
    paths = family.candidate_paths(role)
    if role == "unembed" and family.tied_unembed:
        paths.append(family.embed)  # GPT-2's head is the embedding matrix; the reference names it so
    return paths


def from_reference_hparams(data: Mapping[str, Any], cls: type[MethodConfig], model: str | Family, *,
                           source: str = "method config") -> dict[str, Any]:
    """The fields of ``cls`` a reference hparams mapping sets (the table above); a mapping without any
    reference-only key is returned as it is.

    Each module-path key must be where the model's family keeps that role (``transformer.h.{}.mlp.c_proj``
    is GPT-2's MLP output); a mismatch, or a key neither ``cls`` nor the table knows, is an error naming the
    key. ``model`` is a model name (its family read from a preset or its config.json) or the family."""
    if not is_reference_hparams(data, cls):
        return dict(data)
    fields = cls.model_fields
    out: dict[str, Any] = {}
    modules: dict[str, Any] = {}
    unused: list[str] = []
    for key, value in data.items():
        name = REFERENCE_RENAMES.get(key, key)
        if name in fields:
            out[name] = value
        elif key in REFERENCE_MODULE_KEYS:
            modules[key] = value
        elif key in REFERENCE_UNUSED_KEYS:
            why, droppable = REFERENCE_UNUSED_KEYS[key]
            if droppable is not None and not any(_same(value, v) for v in droppable):
                raise EditscaleError(f"{source}: {key} = {value!r} is not supported by {cls.__name__} ({why}); "
                                     f"remove it or set it to {' or '.join(json.dumps(v) for v in droppable)}")
            unused.append(key)
        else:
            raise EditscaleError(f"{source}: unknown key {key!r}: not a hyper-parameter of {cls.__name__} nor a "
                                 "known key of the reference's hparams files")
    if modules:
        family = model if isinstance(model, Family) else _family_of(model)
        if family is None:
            raise EditscaleError(f"{source}: cannot check {', '.join(modules)} against the model's module paths: "
                                 f"the architecture family of {model} is unknown (its config.json cannot be read)")
        for key, value in modules.items():
            role = REFERENCE_MODULE_KEYS[key]
            paths = _family_paths(family, role)
            if value not in paths:
                raise EditscaleError(f"{source}: {key} = {value!r} is not where the {family.name} family keeps its "
                                     f"{role} module ({' or '.join(paths) or 'it has none'}); is the file for "
                                     "another model?")
    parts = ([f"the module paths {', '.join(modules)} (they match the {family.name} family's)"] if modules else [])
    parts += [f"{', '.join(unused)} (no meaning in editscale)"] if unused else []
    log.info(f"{source}: the reference's hparams file; dropped {' and '.join(parts)}")
    return out


class TargetConfig(MethodConfig):
    """The optimisation of the target value at the subject token (ROME's v*, MEMIT's z);
    docs/protocol.md §2.6 and §4.2."""

    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    # The block whose output the target's loss is read from, through the final norm and the
    # unembedding (MEMIT's compute_z). None or the last block: the model's own logits.
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    # ENCORE's most-probable early stopping (§2.6 there): stop on the N-th iteration on which the new
    # target is the argmax at every target token of every prefixed rewriting row; 0: off.
    mpes: int = Field(default=0, ge=0)
    # NAS (§2.6 there): rescale every solved value vector's MLP-output part to a reference norm taken
    # from the unedited model over `norm_anchor_samples` of the run's records (upper-trimmed mean,
    # the largest `norm_anchor_trim` share dropped); drop the edit's δ when its norm is over
    # `norm_anchor_outlier` times the reference.
    norm_anchor: bool = False
    norm_anchor_samples: int = Field(default=1000, ge=1)
    norm_anchor_trim: float = Field(default=0.05, ge=0, lt=1)
    norm_anchor_outlier: float = Field(default=2.0, gt=0)

    def target_options(self) -> dict[str, Any]:
        """The keyword arguments of `solver.targets.optimize_target` that this config sets."""
        return {"steps": self.v_num_grad_steps, "lr": self.v_lr, "weight_decay": self.v_weight_decay,
                "clamp_norm_factor": self.clamp_norm_factor, "kl_factor": self.kl_factor,
                "fact_token": self.fact_token, "loss_layer": self.v_loss_layer, "mpes": self.mpes}

    def anchor_options(self) -> dict[str, Any]:
        """The keyword arguments of `solver.anchor.reference_norm` that this config sets."""
        return {"samples": self.norm_anchor_samples, "trim": self.norm_anchor_trim}


class StatsConfig(MethodConfig):
    """Which second-moment statistics C of the keys a method uses; docs/protocol.md §2.5."""

    mom2_dataset: str = "wikipedia"  # a corpus name, or a local text file or folder (data/corpora.py)
    mom2_n_samples: int | Literal["auto"] = 100000  # documents; "auto": until C converges (§2.5.1)
    mom2_dtype: Literal["float32", "float64"] = "float32"

    def stats_options(self) -> dict[str, Any]:
        """The statistics keyword arguments of `EditContext.second_moment` and `solve_mom2`."""
        return {"corpus": self.mom2_dataset, "n_samples": self.mom2_n_samples, "dtype": self.mom2_dtype}


class NumericsConfig(MethodConfig):
    """Methods that can compute as the reference code does (docs/protocol.md §10.15). Only their
    config classes have `numerics`, so a run that asks any other method for reference numerics is
    refused rather than silently given editscale's."""

    numerics: Numerics = "default"
