"""MEMIT hyper-parameters (docs/protocol.md §4.5); per-model published defaults live in presets/<model>.yaml."""

from __future__ import annotations

from editscale.methods.config import NumericsConfig
from editscale.methods.solver.spread import SpreadConfig


class MemitConfig(SpreadConfig, NumericsConfig):
    # numerics: both settings compute the same thing, because MEMIT's update is already the reference's
    # own (fp64 `torch.linalg.solve` of λC + KKᵀ, kmeng01/memit `memit/memit_main.py`); so is ENCORE's,
    # which extends this config (docs/protocol.md §10.15)
    # λ in Δ = R Kᵀ (λC + KKᵀ)⁻¹: how much preserving the statistics' keys weighs against the edits
    mom2_update_weight: float = 15000.0
