"""What MEMIT, EMMET and AlphaEdit share (docs/protocol.md §4.1-4.4, §5, §6): targets z at the last edited
layer, keys per layer, and the layer loop that spreads the remaining residual over the layers.

    Z        = [z_1 … z_n]                        block output at z_layer = layers[-1], optimised (§4.2 there)
    for i, l in enumerate(layers), ascending:
      K^l    = keys on the current model           mean of group means over MEMIT's templates (§4.3 there)
      cur_Z  = block output at z_layer, bare prompt, current model
      R^l    = (Z − cur_Z) / (L − i)
      Δ^l    = the method's update equation (K^l, R^l)
      W^l    = W^l_orig + Δ^l, temporarily, so later layers see it

All touched weights are restored at the end and the Δ^l are returned (the runner applies them).
A method is a `SpreadEditor` subclass that supplies only `layer_update`.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import field_validator

from editscale.errors import EditscaleError
from editscale.methods.base import Editor, EditRequest, EditResult
from editscale.methods.config import StatsConfig, TargetConfig
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.keys import fill, keys_at_subjects
from editscale.methods.solver.targets import TargetValue, optimize_targets
from editscale.methods.solver.templates import generate_memit_templates, memit_template_groups
from editscale.models.adapter import ModelAdapter

TEMPLATE_KIND = "memit"  # all three methods use MEMIT's templates (docs/protocol.md §4.1)


class SpreadConfig(TargetConfig, StatsConfig):
    """Hyper-parameters common to the MEMIT family (docs/protocol.md §4.5); defaults are MEMIT's."""

    layers: list[int]
    clamp_norm_factor: float = 0.75

    @field_validator("layers")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        # The reference sorts hparams.layers in place (docs/protocol.md §10.16); the config does it once here.
        if not v:
            raise ValueError("at least one layer is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"layers repeat: {v}")
        return sorted(v)


# ---------------------------------------------------------------------- the shared pieces

# Requests whose z share one forward pass: enough rows (7 each) to amortise a pass's fixed cost on a
# small model, few enough that a large edit batch does not become one huge pass.
TARGETS_PER_PASS = 16


def compute_targets(adapter: ModelAdapter, cfg: SpreadConfig, requests: Sequence[EditRequest],
                    templates: Sequence[str], **anchor: Any) -> tuple[torch.Tensor, list[TargetValue]]:
    """Z [d_model, n]: z = h0 + δ per request, δ added to the block output at z_layer (docs/protocol.md §4.2).

    Each z is optimised on the model as it is now, alone (requests do not see each other), over the
    flat list of templates (6 rewriting rows) plus the KL row. Up to `TARGETS_PER_PASS` requests
    share each forward pass (`optimize_targets`). `anchor`: NAS's options (`EditContext.anchor_options`).
    """
    z_layer = cfg.layers[-1]
    found: list[TargetValue] = []
    for i in range(0, len(requests), TARGETS_PER_PASS):
        chunk = [(r.prompt, r.subject, r.target_new) for r in requests[i:i + TARGETS_PER_PASS]]
        found += optimize_targets(adapter, z_layer, chunk, templates, site="block", **cfg.target_options(), **anchor)
    return torch.stack([t.v_star for t in found], dim=1), found


def layer_keys(adapter: ModelAdapter, layer: int, requests: Sequence[EditRequest], templates: Sequence[str],
               fact_token: str = "subject_last") -> torch.Tensor:
    """K [d_mlp, n] fp32: per request, the mean over template groups of the group's mean key (docs/protocol.md §4.3)."""
    groups = memit_template_groups(templates)
    flat = [t for g in groups for t in g]
    prompts = [fill(t, r.prompt) for r in requests for t in flat]
    subjects = [r.subject for r in requests for _ in flat]
    keys, _ = keys_at_subjects(adapter, layer, prompts, subjects, fact_token)  # [n * T, d_mlp]
    keys = keys.view(len(requests), len(flat), -1)
    bounds, start = [], 0
    for g in groups:
        bounds.append((start, start + len(g)))
        start += len(g)
    group_means = torch.stack([keys[:, a:b].mean(dim=1) for a, b in bounds], dim=1)  # [n, groups, d_mlp]
    return group_means.mean(dim=1).T.contiguous()


@torch.no_grad()
def hidden_at_subject(adapter: ModelAdapter, layer: int, requests: Sequence[EditRequest],
                      fact_token: str = "subject_last", *, batch_size: int = 128) -> torch.Tensor:
    """[d_model, n]: block `layer`'s output (the residual stream) at the fact token of each bare prompt."""
    out = []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        prompts, subjects = [r.prompt for r in chunk], [r.subject for r in chunk]
        positions = adapter.subject_token_indices(prompts, subjects, fact_token)
        batch = adapter.encode([p.format(s) for p, s in zip(prompts, subjects, strict=True)])
        with adapter.record("block", layer, positions) as rec:
            adapter.final_hidden(batch)
        out.append(rec.last)
    return torch.cat(out).T.contiguous()


@dataclass
class LayerStep:
    """What a method's update equation gets for one layer of the loop."""

    index: int  # i: position in the ascending layer list
    layer: int
    n_layers: int  # L
    keys: torch.Tensor  # K [d_mlp, n] fp32, on the model's device
    resid: torch.Tensor  # R = (Z − cur_Z) / (L − i), [d_model, n] fp32
    diagnostics: dict[str, float] = field(default_factory=dict)  # the update may report here


class KeyCovariance:
    """Σ K Kᵀ of the keys of applied batches, per layer [d_mlp, d_mlp]: a method's state between
    batches (AlphaEdit's cache_c, ENCORE's earlier edits), saved with the run's checkpoint under
    `<name>.layer<l>`."""

    def __init__(self, method: str, name: str, layers: Sequence[int], size: int, dtype: torch.dtype) -> None:
        self.method, self.name = method, name
        self.sums = {layer: torch.zeros(size, size, dtype=dtype) for layer in layers}

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Add K Kᵀ of keys [d_mlp, n]."""
        k = keys.to("cpu", self.sums[layer].dtype)
        self.sums[layer] += k @ k.T

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}.layer{layer}": c.clone() for layer, c in self.sums.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise EditscaleError(f"{self.method} state must hold {sorted(expected)}, got {sorted(state)}")
        for layer, total in self.sums.items():
            saved = state[f"{self.name}.layer{layer}"]
            if saved.shape != total.shape:
                raise EditscaleError(f"{self.method} {self.name} for layer {layer} has shape {list(saved.shape)}, "
                                     f"expected {list(total.shape)}")
            total.copy_(saved.to(total.dtype))


class SpreadEditor(Editor):
    """MEMIT-family editor: z, keys and residual spreading here; the update equation in subclasses."""

    config: SpreadConfig
    context: EditContext

    def prepare(self) -> None:
        self.templates()
        for layer in self.config.layers:
            self.mom2(layer)
        self.anchor()  # NAS's reference norm: from the base model

    def anchor(self) -> dict[str, Any]:
        """NAS's options for z (none unless `norm_anchor`): the MLP output of the z layer is anchored."""
        return self.context.anchor_options(self.adapter, self.config, self.config.layers[-1], "block")

    def templates(self) -> list[str]:
        """MEMIT's 6 templates, generated once (seeded) from the model `prepare()` sees: the base model."""
        return self.context.template_set(TEMPLATE_KIND, lambda: generate_memit_templates(self.adapter,
                                                                                         seed=self.context.seed))

    def mom2(self, layer: int) -> torch.Tensor:
        """C of the original model for this layer, [d_mlp, d_mlp] on CPU.

        Never updated by edits (docs/protocol.md §4.4)."""
        cfg = self.config
        return self.context.second_moment(self.adapter, layer, **cfg.stats_options())

    @abstractmethod
    def layer_update(self, step: LayerStep) -> torch.Tensor:
        """Δ [d_model, d_mlp] (any float dtype) for one layer of the loop."""

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        if not requests:
            raise EditscaleError(f"{self.name}: no requests to edit")
        self.check_batch(requests)
        self.ensure_prepared()  # later layers' statistics must not be read while earlier ones are written
        cfg, adapter = self.config, self.adapter
        layers, z_layer = cfg.layers, cfg.layers[-1]
        templates = self.templates()
        timings = {"v_star": 0.0, "keys": 0.0, "update": 0.0}

        t0 = time.perf_counter()
        z, found = compute_targets(adapter, cfg, requests, templates, **self.anchor())  # [d_model, n]
        timings["v_star"] = time.perf_counter() - t0

        saved = adapter.snapshot(layers, biases=False)  # fp32 copies
        deltas: dict[int, torch.Tensor] = {}
        diagnostics: dict[str, float] = {}
        try:
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                keys = layer_keys(adapter, layer, requests, templates, cfg.fact_token)  # [d_mlp, n]
                cur_z = hidden_at_subject(adapter, z_layer, requests, cfg.fact_token)  # [d_model, n]
                t1 = time.perf_counter()
                targets = z.to(cur_z.device) - cur_z
                if i == 0:
                    diagnostics["z_error"] = float(targets.norm(dim=0).mean())
                step = LayerStep(i, layer, len(layers), keys, targets / (len(layers) - i))
                delta = self.layer_update(step).float().cpu()  # [d_model, d_mlp]
                if not torch.isfinite(delta).all():
                    # nothing more to learn from later layers; the runner sees the non-finite update
                    deltas[layer] = delta
                    break
                # W = W_orig + Δ (as the reference writes it), so the next layers' keys see the edit
                adapter.set_mlp_out_weight(layer, saved.weights[layer] + delta)
                deltas[layer] = delta
                w_norm = float(saved.weights[layer].norm())
                diagnostics[f"update_norm_l{layer}"] = float(delta.norm())
                diagnostics[f"update_rel_l{layer}"] = float(delta.norm()) / w_norm if w_norm else float("inf")
                diagnostics[f"key_norm_l{layer}"] = float(keys.norm(dim=0).mean())
                for k, v in step.diagnostics.items():
                    diagnostics[f"{k}_l{layer}"] = v
                timings["keys"] += t1 - t0
                timings["update"] += time.perf_counter() - t1
            if len(deltas) == len(layers):
                # how much of Z the written layers reach (0 would be a perfect fit)
                diagnostics["z_error_after"] = float(
                    (z.to(adapter.device) - hidden_at_subject(adapter, z_layer, requests, cfg.fact_token))
                    .norm(dim=0).mean())
        finally:
            adapter.restore(saved)  # exact restore; subtracting would round

        n = len(found)
        diagnostics.update({
            "v_loss_first": sum(t.loss_first for t in found) / n,
            "v_loss": sum(t.loss_last for t in found) / n,
            "v_nll": sum(t.nll_last for t in found) / n,
            "v_kl": sum(t.kl_last for t in found) / n,
            "v_steps": sum(t.steps for t in found) / n,
            "v_prob_new": sum(t.prob_new for t in found) / n,
            "delta_norm": sum(float(t.delta.norm()) for t in found) / n,
            "v0_norm": sum(float(t.v0.norm()) for t in found) / n,
            "update_norm": float(torch.stack([d.norm() for d in deltas.values()]).norm()),
            "update_rel": max(diagnostics.get(f"update_rel_l{layer}", float("inf")) for layer in layers),
        })
        if cfg.mpes:
            diagnostics["v_mpes_stop"] = sum(t.stop == "mpes" for t in found) / n  # the share MPES stopped
        if cfg.norm_anchor:
            diagnostics["v_value_norm"] = sum(t.value_norm for t in found) / n  # before anchoring
            diagnostics["v_anchor_dropped"] = sum(t.anchor == "dropped" for t in found) / n
        return EditResult(deltas, diagnostics, timings)
