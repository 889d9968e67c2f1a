"""MEMIT hyper-parameters (docs/protocol.md §4.5); per-model published defaults live in presets/<model>.yaml."""

from __future__ import annotations

from editscale.methods.solver.spread import SpreadConfig


class MemitConfig(SpreadConfig):
    # λ in Δ = R Kᵀ (λC + KKᵀ)⁻¹: how much preserving the statistics' keys weighs against the edits
    mom2_update_weight: float = 15000.0
