"""ENCORE hyper-parameters (docs/protocol.md §4.6); per-model published defaults live in presets/<model>.yaml."""

from __future__ import annotations

from pydantic import Field

from editscale.methods.memit.config import MemitConfig


class EncoreConfig(MemitConfig):
    # λ_F in Δ = R Kᵀ (λ_C C + λ_F I + Σ_prev K Kᵀ + K Kᵀ)⁻¹: the Frobenius norm of each batch's update
    update_norm_lambda: float = Field(default=10.0, ge=0)
    # add the keys of every earlier batch to the preserved ones (the reference's add_prev_edits)
    add_prev_edits: bool = True
    mpes: int = Field(default=4, ge=0)  # ENCORE's gpt2-xl value; see TargetConfig
