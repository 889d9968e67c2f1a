"""ROME hyper-parameters (spec §2.8); per-model published defaults live in presets/<model>.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from editscale.methods.base import MethodConfig

# How k and v enter the update (spec §3). "original" is the reference ROME: direction from the
# template-averaged key k̄, denominator and residual from the bare-prompt key k0 — the mismatch the
# r-ROME paper blames for disabling edits. "random_prefix" is r-ROME's default fix (k̄ everywhere);
# "prompt" uses k0 everywhere.
KeyMode = Literal["original", "random_prefix", "prompt"]


class RomeConfig(MethodConfig):
    layers: list[int]
    fact_token: Literal["subject_last", "subject_first", "subject_first_after_last", "last"] = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None  # traced but unused by the reference; kept for config parity
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    context_template_length_params: list[tuple[int, int]] = [(5, 10), (10, 10)]
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: Literal["float32", "float64"] = "float32"
    key_mode: KeyMode = "original"

    @field_validator("layers")
    @classmethod
    def _one_layer(cls, v: list[int]) -> list[int]:
        if len(v) != 1:
            raise ValueError(f"ROME edits exactly one layer, got {v}")
        return v
