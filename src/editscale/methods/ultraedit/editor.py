"""UltraEdit's update (docs/protocol.md §6.1): for each edited module, from one forward and backward pass
of the batch's answer tokens on the current model,

    K = the module's inputs, G = the gradients at its outputs, one row per answer position
    [k̂ ‖ ĝ] = ([k ‖ g] − μ) / (σ + ε)           lifelong normalisation: μ, σ over every row seen so far
    v_i = −η ‖k̂_i‖² ĝ_i                         the output change of a gradient step at k̂_i
    ΔWᵀ = (KᵀK + ridge · I)⁻¹ Kᵀ V               ridge regression of V on the raw keys

The normaliser (count, mean and sum of squared deviations, float64) is merged with the batch's rows
before it is applied, and is shared by every edited module (they have one shape), as the
reference's one normaliser per weight shape. It is the method's state: the merged statistics are
kept only once the runner has applied the batch (`after_apply`) and go into the run's checkpoint,
so a resumed run continues them exactly. Reference: `XiaojieGu/UltraEdit: editor/ultraedit.py`,
`nets.py` (RunningMeanStd).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from editscale.errors import EditscaleError
from editscale.methods.base import Editor, EditRequest, EditResult, register
from editscale.methods.config import MethodConfig
from editscale.methods.solver.gradients import trace_edit_loss
from editscale.methods.solver.moments import RunningMoments
from editscale.methods.ultraedit.config import UltraEditConfig
from editscale.models.adapter import ModelAdapter

EPS = float(torch.finfo(torch.float32).eps)  # the reference's ε in (x − μ) / (σ + ε)


@register
class UltraEditEditor(Editor):
    name = "ultraedit"
    config_class = UltraEditConfig
    config: UltraEditConfig

    summary = "closed-form lifelong update from module inputs and output gradients, normalised (Gu et al. 2025)"

    def __init__(self, adapter: ModelAdapter, config: MethodConfig, context: Any) -> None:
        super().__init__(adapter, config, context)
        self.moments = RunningMoments(self.adapter.d_mlp + self.adapter.d_model)
        self._pending: RunningMoments | None = None

    def prepare(self) -> None:
        cfg = self.config
        if cfg.warm_start and float(self.moments.n) == 0:
            requests = self.context.sample_requests
            if requests is None:
                raise EditscaleError("ultraedit's warm_start needs records: give the EditContext sample_requests "
                                     "(a run passes its dataset's)")
            pool = [EditRequest(-1, p, s, t, "") for p, s, t in requests()]
            chosen = random.Random(self.context.seed).sample(pool, min(cfg.warm_start, len(pool)))
            keys, grads = self.features(chosen)
            self.moments = self.moments.merged(torch.cat([torch.cat([keys[layer], grads[layer]], dim=1)
                                                          for layer in cfg.layers]))

    def features(self, requests: Sequence[EditRequest]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per edited layer: the MLP output projection's inputs [N, d_mlp] and output gradients [N, d_model]
        at the answer positions (those predicting a target token), fp32 on CPU; one forward and backward
        pass of the mean next-token loss over each chunk's answer tokens."""
        cfg = self.config
        keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
        grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
        for start in range(0, len(requests), cfg.chunk):
            trace = trace_edit_loss(self.adapter, [("mlp_out", layer) for layer in cfg.layers],
                                    requests[start:start + cfg.chunk])
            for layer in cfg.layers:
                k, g = trace.at_answers(("mlp_out", layer))
                keys[layer].append(k)
                grads[layer].append(g)
        return ({layer: torch.cat(v) for layer, v in keys.items()}, {layer: torch.cat(v) for layer, v in grads.items()})

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        if not requests:
            raise EditscaleError(f"{self.name}: no requests to edit")
        self.ensure_prepared()
        cfg, d_mlp = self.config, self.adapter.d_mlp
        t0 = time.perf_counter()
        keys, grads = self.features(requests)
        t1 = time.perf_counter()
        moments = self.moments.merged(torch.cat([torch.cat([keys[layer], grads[layer]], dim=1)
                                                 for layer in cfg.layers]))
        deltas: dict[int, torch.Tensor] = {}
        diagnostics: dict[str, float] = {"rows": float(keys[cfg.layers[0]].shape[0]), "norm_count": float(moments.n)}
        for layer in cfg.layers:
            k = keys[layer].double()  # [N, d_mlp], raw
            z = moments.standardise(torch.cat([keys[layer], grads[layer]], dim=1), EPS)
            k_hat, g_hat = z[:, :d_mlp], z[:, d_mlp:]
            v = -cfg.lr * (k_hat**2).sum(dim=1, keepdim=True) * g_hat  # [N, d_model]
            lhs = k.T @ k + cfg.ridge * torch.eye(d_mlp, dtype=torch.float64)
            delta_t = torch.linalg.solve(lhs, k.T @ v)  # ΔWᵀ [d_mlp, d_model]
            deltas[layer] = delta_t.T.float()
            diagnostics[f"update_norm_l{layer}"] = float(delta_t.norm())
        self._pending = moments
        return EditResult(deltas, diagnostics, {"keys": t1 - t0, "update": time.perf_counter() - t1})

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        if self._pending is not None:
            self.moments, self._pending = self._pending, None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.moments.state_dict("normaliser")

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise EditscaleError(f"{self.name} state must hold {sorted(expected)}, got {sorted(state)}")
        self.moments.load(state, "normaliser")
