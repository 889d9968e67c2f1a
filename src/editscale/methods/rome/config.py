"""ROME hyper-parameters (docs/protocol.md §2.8); per-model published defaults live in presets/<model>.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from editscale.methods.config import NumericsConfig, StatsConfig, TargetConfig

# How k and v enter the update (docs/protocol.md §3). "original" is the reference ROME: direction from the
# template-averaged key k̄, denominator and residual from the bare-prompt key k0 — the mismatch the
# r-ROME paper blames for disabling edits. "random_prefix" is r-ROME's default fix (k̄ everywhere);
# "prompt" uses k0 everywhere.
KeyMode = Literal["original", "random_prefix", "prompt"]


class RomeConfig(TargetConfig, StatsConfig, NumericsConfig):
    layers: list[int]
    # numerics "reference": u = C⁻¹k̄ by the reference's fp32 inverse of C, not the fp64 Cholesky solve
    # (docs/protocol.md §2.4, §10.15); the rest of the update is the same in both.
    mom2_adjustment: bool = True  # False: u is the key itself, C is not used
    context_template_length_params: list[tuple[int, int]] = [(5, 10), (10, 10)]
    key_mode: KeyMode = "original"
    norm_anchor_outlier: float = Field(default=5.0, gt=0)  # NAS's ROME drops δ past 5x the reference, not 2x

    @field_validator("layers")
    @classmethod
    def _one_layer(cls, v: list[int]) -> list[int]:
        if len(v) != 1:
            raise ValueError(f"ROME edits exactly one layer, got {v}")
        return v
