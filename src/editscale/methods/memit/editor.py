"""MEMIT's per-layer update (docs/protocol.md §4.4), on the shared z / keys / residual spreading of `solver.spread`:

    Δ^l = R^l Kᵀ (λ C^l + K Kᵀ)⁻¹          in float64, as A = solve(λC + KKᵀ, K), Δ = R Aᵀ

For one request this is r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k) (Sherman-Morrison): a ROME-like step damped by λ.
"""

from __future__ import annotations

import torch

from editscale.methods.base import register
from editscale.methods.memit.config import MemitConfig
from editscale.methods.solver.spread import LayerStep, SpreadEditor


@register
class MemitEditor(SpreadEditor):
    name = "memit"
    config_class = MemitConfig
    config: MemitConfig

    summary = "least-squares update spread over several MLP layers (Meng et al. 2023), as the paper's code"

    def layer_update(self, step: LayerStep) -> torch.Tensor:
        device = step.keys.device
        c = self.mom2(step.layer).to(device, torch.float64)  # [d_mlp, d_mlp]
        k = step.keys.double()  # [d_mlp, n]
        r = step.resid.double()  # [d_model, n]
        # solve, not an explicit inverse (docs/protocol.md §10.15); the system is SPD, fp64 as the reference:
        # this is the reference's own arithmetic, so `numerics: reference` changes nothing here
        a = torch.linalg.solve(self.config.mom2_update_weight * c + k @ k.T, k)  # [d_mlp, n]
        return r @ a.T  # [d_model, d_mlp]
