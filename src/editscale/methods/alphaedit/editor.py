"""AlphaEdit's per-layer update (docs/protocol.md §6), on the shared z / keys / residual spreading of `solver.spread`:

    P     = Û Ûᵀ, Û = eigenvectors of the unscaled C with eigenvalue < nullspace_threshold   [d_mlp, d_mlp]
    Δᵀ    = solve(P (K Kᵀ + cache_c) + L2 · I, P K Rᵀ)                                        [d_mlp, d_model]

The solution satisfies Δᵀ = P Δᵀ, so Δ k = 0 for every key k in the span of C's large-eigenvalue
directions: the outputs of the preserved knowledge stay put. cache_c accumulates K Kᵀ of the applied
batches (keys recomputed on the edited model, in `after_apply`), so later edits also avoid disturbing
earlier ones. P comes from the base model in
`prepare()`; cache_c is the method's state and goes through `state_dict()` into the run's checkpoint.

The reference takes P from `svd(C)`; C is symmetric positive semi-definite, so its singular vectors
are its eigenvectors and `eigh` (faster, symmetric by construction) gives the same subspace.
Unlike the reference, which adds each layer's update in place for good, compute() restores the
weights at the end like MEMIT; the runner applies the deltas and then calls after_apply, which is
the same sequence of models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from editscale.methods.alphaedit.config import AlphaEditConfig
from editscale.methods.base import EditRequest, EditResult, register
from editscale.methods.config import MethodConfig
from editscale.methods.solver.spread import KeyCovariance, LayerStep, SpreadEditor, layer_keys
from editscale.models.adapter import ModelAdapter

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def null_space_projector(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(P [m, m] float64, rank of P): projector onto the eigen-directions of C below `threshold`."""
    values, vectors = torch.linalg.eigh(mom2.double())
    # singular values of a PSD matrix are |eigenvalues|; abs() keeps round-off negatives in
    chosen = vectors[:, values.abs() < threshold]
    return chosen @ chosen.T, chosen.shape[1]


@register
class AlphaEditEditor(SpreadEditor):
    name = "alphaedit"
    config_class = AlphaEditConfig
    config: AlphaEditConfig

    summary = "MEMIT-style update projected onto the null space of preserved keys (Fang et al. 2025)"

    def __init__(self, adapter: ModelAdapter, config: MethodConfig, context: Any) -> None:
        super().__init__(adapter, config, context)
        dtype = _DTYPES[self.config.solve_dtype]
        m = self.adapter.d_mlp
        self.projectors: dict[int, torch.Tensor] = {}  # layer -> P [m, m], from the base model
        self.null_dims: dict[int, int] = {}
        self.cache_c = KeyCovariance(self.name, "cache_c", self.config.layers, m, dtype)

    def prepare(self) -> None:
        super().prepare()
        self.projectors_ready()

    def projectors_ready(self) -> dict[int, torch.Tensor]:
        dtype = _DTYPES[self.config.solve_dtype]
        for layer in self.config.layers:
            if layer not in self.projectors:
                p, dim = null_space_projector(self.mom2(layer), self.config.nullspace_threshold)
                self.projectors[layer], self.null_dims[layer] = p.to(dtype), dim
        return self.projectors

    def layer_update(self, step: LayerStep) -> torch.Tensor:
        cfg = self.config
        dtype, device = _DTYPES[cfg.solve_dtype], step.keys.device
        p = self.projectors_ready()[step.layer].to(device, dtype)  # [m, m]
        cache = self.cache_c.sums[step.layer].to(device, dtype)  # [m, m]
        k, r = step.keys.to(dtype), step.resid.to(dtype)  # [m, n], [d_model, n]
        lhs = p @ (k @ k.T + cache) + cfg.L2 * torch.eye(k.shape[0], dtype=dtype, device=device)
        upd_t = torch.linalg.solve(lhs, p @ k @ r.T)  # Δᵀ [m, d_model]
        step.diagnostics["null_dim"] = float(self.null_dims[step.layer])
        return upd_t.T  # [d_model, m]

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        # keys of this batch on the model that now carries its edit, at every layer (docs/protocol.md §6)
        templates = self.templates()
        for layer in self.cache_c.sums:
            self.cache_c.add(layer, layer_keys(self.adapter, layer, requests, templates, self.config.fact_token))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.cache_c.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.cache_c.load_state_dict(state)
