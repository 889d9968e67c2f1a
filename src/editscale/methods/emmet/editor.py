"""EMMET's per-layer update (docs/protocol.md §5), on the shared z / keys / residual spreading of `solver.spread`:

    C̃ = λ C (+ update_norm_lambda · I)
    D = Kᵀ C̃⁻¹ K (+ emmet_lambda · I when n > 1)                      [n, n]
    Δ = R D⁻¹ Kᵀ C̃⁻¹                                                 [d_model, d_mlp], float64

the minimum-C-norm change that makes Ŵ K = V hold exactly (up to the ridge). For one request on one
layer it is r kᵀC⁻¹ / (kᵀC⁻¹k): ROME with a consistent key, λ cancelling.

The reference (scalable-model-editing/unified-model-editing: emmet/emmet_main.py) inverts C̃ and D with
torch.inverse; here C̃⁻¹K and D⁻¹ come from solves (docs/protocol.md §10.15), with the reference's fallback
to the pseudo-inverse when D is singular.
"""

from __future__ import annotations

import torch

from editscale.methods.base import register
from editscale.methods.emmet.config import EmmetConfig
from editscale.methods.solver.spread import LayerStep, SpreadEditor


@register
class EmmetEditor(SpreadEditor):
    name = "emmet"
    config_class = EmmetConfig
    config: EmmetConfig

    summary = "equality-constrained batched update spread over MLP layers (Gupta et al. 2024), as UME computes it"

    def c_tilde_solve(self, layer: int, rhs: torch.Tensor) -> torch.Tensor:
        """C̃⁻¹ rhs in float64 on CPU, rhs [d_mlp, n]."""
        cfg = self.config
        if cfg.update_norm_lambda == 0:
            # (λC)⁻¹ = C⁻¹/λ: reuse the context's cached Cholesky factor of C
            return self.context.solve_mom2(self.adapter, layer, rhs, **cfg.stats_options()) / cfg.mom2_update_weight
        c = self.mom2(layer).double()
        c_tilde = cfg.mom2_update_weight * c + cfg.update_norm_lambda * torch.eye(c.shape[0], dtype=c.dtype)
        return torch.linalg.solve(c_tilde, rhs.double().cpu())

    def layer_update(self, step: LayerStep) -> torch.Tensor:
        k = step.keys.double().cpu()  # [d_mlp, n]
        r = step.resid.double().cpu()  # [d_model, n]
        c_inv_k = self.c_tilde_solve(step.layer, k)  # C̃⁻¹K [d_mlp, n]
        d = k.T @ c_inv_k  # [n, n]
        if d.shape[0] > 1:
            d = d + self.config.emmet_lambda * torch.eye(d.shape[0], dtype=d.dtype)
        try:
            adj = torch.linalg.solve(d, c_inv_k.T)  # D⁻¹ Kᵀ C̃⁻¹ [n, d_mlp] (C̃ is symmetric)
            step.diagnostics["pseudo_inverse"] = 0.0
        except torch.linalg.LinAlgError:
            adj = torch.linalg.pinv(d) @ c_inv_k.T
            step.diagnostics["pseudo_inverse"] = 1.0
        return r @ adj  # [d_model, d_mlp]
