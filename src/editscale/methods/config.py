"""Typed method hyper-parameters: the base class, and the groups of fields several methods share.

A method's config class is a `MethodConfig` subclass; methods that optimise a target value (ROME's
v*, MEMIT's z) mix in `TargetConfig`, methods that use second-moment statistics mix in
`StatsConfig`. The fields keep the reference code's flat names (`v_lr`, `mom2_dataset`, ...) so
that a preset YAML reads like the reference's hparams JSON.

A preset file (`methods/<name>/presets/<model>.yaml`) may start with `extends: <method>`: it then
holds only what differs from that method's preset for the same model (r-ROME extends ROME's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from editscale.config_files import read_yaml_mapping, validate

FactToken = Literal["subject_last", "subject_first", "subject_first_after_last", "last"]


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
