"""ENCORE's per-layer update (docs/protocol.md §4.6), on the shared z / keys / residual spreading of `solver.spread`:

    Δ^l = R^l Kᵀ (λ_C C^l + λ_F I + P^l + K Kᵀ)⁻¹        in float64, as MEMIT's
    P^l = Σ K_b K_bᵀ over the batches applied before       (add_prev_edits)

It minimises λ_C‖Δ K_C‖² + Σ_b ‖Δ K_b‖² + ‖(W + Δ) K − V‖² + λ_F ‖Δ‖²_F: the λ_F term bounds the norm
of each batch's update (not the drift from the original weights), the P term keeps the earlier
edits' keys where they are. z stops by MPES (`mpes`, solver.targets) as well as by the loss.

The keys added to P are the ones the layer loop solved with (on the model carrying the batch's
updates of the layers below), as the reference's SEQ_CACHE holds them; they join P only once the
runner has applied the batch (`after_apply`), so a batch that is computed but not applied leaves
no trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from editscale.methods.base import EditRequest, EditResult, register
from editscale.methods.config import MethodConfig
from editscale.methods.encore.config import EncoreConfig
from editscale.methods.solver.spread import KeyCovariance, LayerStep, SpreadEditor
from editscale.models.adapter import ModelAdapter


@register
class EncoreEditor(SpreadEditor):
    name = "encore"
    config_class = EncoreConfig
    config: EncoreConfig

    summary = "MEMIT with most-probable early stopping and a norm-constrained update (Gupta et al. 2025)"

    def __init__(self, adapter: ModelAdapter, config: MethodConfig, context: Any) -> None:
        super().__init__(adapter, config, context)
        self.previous = KeyCovariance(self.name, "previous_keys", self.config.layers, self.adapter.d_mlp,
                                      torch.float64)
        self._pending: dict[int, torch.Tensor] = {}  # layer -> the keys of the batch last computed

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        self._pending = {}
        return super().compute(requests)

    def layer_update(self, step: LayerStep) -> torch.Tensor:
        cfg, device = self.config, step.keys.device
        c = self.mom2(step.layer).to(device, torch.float64)  # [d_mlp, d_mlp]
        k = step.keys.double()  # [d_mlp, n]
        r = step.resid.double()  # [d_model, n]
        lhs = cfg.mom2_update_weight * c + cfg.update_norm_lambda * torch.eye(k.shape[0], dtype=torch.float64,
                                                                              device=device)
        if cfg.add_prev_edits:
            lhs = lhs + self.previous.sums[step.layer].to(device)
            self._pending[step.layer] = step.keys.detach().cpu()
        a = torch.linalg.solve(lhs + k @ k.T, k)  # [d_mlp, n]; SPD, solved as MEMIT's
        return r @ a.T  # [d_model, d_mlp]

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        for layer, keys in self._pending.items():
            self.previous.add(layer, keys)
        self._pending = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.previous.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.previous.load_state_dict(state)
