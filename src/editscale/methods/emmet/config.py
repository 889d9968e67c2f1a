"""EMMET hyper-parameters (docs/protocol.md §5); per-model published defaults live in presets/<model>.yaml."""

from __future__ import annotations

from editscale.methods.solver.spread import SpreadConfig


class EmmetConfig(SpreadConfig):
    mom2_update_weight: float = 1.0  # C̃ = λ C: cancels for one edit on one layer
    emmet_lambda: float = 0.1  # ridge on D = Kᵀ C̃⁻¹ K, only when the batch has more than one edit
    update_norm_lambda: float = 0.0  # C̃ += this · I when non-zero
