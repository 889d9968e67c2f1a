"""FT-C hyper-parameters (docs/protocol.md §7); per-model published defaults live in presets/<model>.yaml.

Every reference behaviour that docs/protocol.md §10.10 lists is an explicit option here, with the reference's choice as
the default: the loss position (`teacher_forced`), the clamp anchor (`clamp_anchor`), whether the
bias is trained (`train_bias`) and the layer (`layers`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from editscale.methods.config import MethodConfig


class FtcConfig(MethodConfig):
    layers: list[int]
    num_steps: int = 25  # epochs over the edit batch; each takes at most one Adam step per chunk
    lr: float = 5e-4
    weight_decay: float = 0.0  # Adam's (L2-in-gradient) weight decay, as torch.optim.Adam applies it
    # L∞ radius ε of the clamp; None (YAML null or false, as the reference's `_unconstr` JSONs
    # write it) trains unconstrained.
    norm_constraint: float | None = None
    # "edit_start": clamp around the weights at the start of each compute() call, as the reference
    # does, so sequential edits drift without bound. "unedited": clamp around the weights seen by
    # prepare() (the base model), which bounds the cumulative drift by ε.
    clamp_anchor: Literal["edit_start", "unedited"] = "edit_start"
    # False: every target token is scored at the single last prompt position (the reference's loss,
    # not teacher forced). True: prompt + " " + target, token j scored after tokens < j.
    teacher_forced: bool = False
    train_bias: bool = True  # the reference trains every parameter of the module: weight and bias
    batch_size: int = 64  # requests per forward pass (the reference's chunk size)
    early_stop_loss: float = 1e-2  # no step for a chunk below this; stop once an epoch's mean is below

    @field_validator("norm_constraint", mode="before")
    @classmethod
    def _false_is_none(cls, v: Any) -> Any:
        # pydantic would read YAML `false` as 0.0, i.e. "never move": the reference means "no clamp".
        if v is False:
            return None
        if v is True:
            raise ValueError("norm_constraint is a radius (a float), null or false")
        return v

    @field_validator("norm_constraint")
    @classmethod
    def _non_negative(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError(f"norm_constraint must be >= 0, got {v}")
        return v

    @field_validator("layers")
    @classmethod
    def _some_layer(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"FT-C needs one or more distinct layers, got {v}")
        return v

    @field_validator("num_steps", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v
