"""ROME (docs/protocol.md §2): a rank-one update of one MLP-output matrix that maps the subject's key to v*.

    ΔW = (v* − W k0 − b) (C⁻¹ k̄)ᵀ / ((C⁻¹ k̄)ᵀ k0)            key_mode "original" (the reference)

ΔW is [d_model, d_mlp] in the adapter's canonical orientation; the adapter stores it transposed
for GPT-2's Conv1D. Requests are edited one after another, each on the model already carrying the
previous ones, as `apply_rome_to_model` does; the model is restored before returning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from editscale.methods.base import Editor, EditRequest, EditResult, apply_deltas, register
from editscale.methods.rome.config import RomeConfig
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.keys import keys_at_subject, mean_key
from editscale.methods.solver.targets import optimize_target


@register
class RomeEditor(Editor):
    name = "rome"
    config_class = RomeConfig
    config: RomeConfig
    context: EditContext

    summary = "rank-one update of one MLP-output matrix (Meng et al. 2022), as the paper's code computes it"

    def prepare(self) -> None:
        cfg = self.config
        self.context.context_templates(self.adapter, cfg.context_template_length_params)
        if cfg.mom2_adjustment:
            for layer in cfg.layers:
                self.context.second_moment(self.adapter, layer, **cfg.stats_options())
        self.context.anchor_options(self.adapter, cfg, cfg.layers[0], "mlp")  # NAS's norm: from the base model

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        self.ensure_prepared()
        layer = self.config.layers[0]
        total = torch.zeros(self.adapter.d_model, self.adapter.d_mlp, dtype=torch.float32)
        diagnostics: dict[str, float] = {}
        timings = {"keys": 0.0, "v_star": 0.0, "update": 0.0}
        saved = self.adapter.snapshot([layer], biases=False)
        try:
            for request in requests:
                delta, diag, t = self.rank_one(request)
                apply_deltas(self.adapter, {layer: delta})  # later requests see earlier ones
                total += delta.cpu()
                for k, v in t.items():
                    timings[k] += v
                diagnostics = diag  # with several requests, the last one's diagnostics are reported
        finally:
            self.adapter.restore(saved)  # exact restore; subtracting would round
        if len(requests) > 1:
            diagnostics["update_norm"] = float(total.norm())
        return EditResult({layer: total}, diagnostics, timings)

    def rank_one(self, request: EditRequest) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        cfg, adapter, ctx = self.config, self.adapter, self.context
        layer = cfg.layers[0]
        templates = ctx.context_templates(adapter, cfg.context_template_length_params)

        t0 = time.perf_counter()
        k_bar, v_bar = mean_key(adapter, layer, templates, request.prompt, request.subject, cfg.fact_token)
        (k0,), (v_cur,) = keys_at_subject(adapter, layer, [request.prompt], request.subject, cfg.fact_token)
        direction_key = k0 if cfg.key_mode == "prompt" else k_bar
        if cfg.mom2_adjustment:
            # numerics "reference": fp32 C⁻¹ k̄, normalised in fp32, as kmeng01/rome `rome/compute_u.py`
            # (docs/protocol.md §10.15); "default": fp64 Cholesky solve
            u = ctx.solve_mom2(adapter, layer, direction_key, **cfg.stats_options(), numerics=cfg.numerics)
        else:
            u = direction_key.double()
        u = (u / u.norm()).double()
        t1 = time.perf_counter()

        target = optimize_target(adapter, layer, request.prompt, request.subject, request.target_new, templates,
                                 site="mlp", **cfg.target_options(), **ctx.anchor_options(adapter, cfg, layer, "mlp"))
        t2 = time.perf_counter()

        # the key the update is anchored on, and the value the layer currently gives it
        k_anchor, v_anchor = (k_bar, v_bar) if cfg.key_mode == "random_prefix" else (k0, v_cur)
        denom = float(u @ k_anchor.double().cpu())
        residual = target.v_star.double().cpu() - v_anchor.double().cpu()
        delta = torch.outer(residual / denom, u).float()  # [d_model, d_mlp]
        w_norm = float(adapter.get_mlp_out_weight(layer).float().norm())
        t3 = time.perf_counter()

        diag = {
            "u_dot_k": denom,
            "key_norm": float(k_bar.norm()),
            "k0_norm": float(k0.norm()),
            "mom2_cond": ctx.mom2_condition(layer) if cfg.mom2_adjustment else float("nan"),
            "v_loss_first": target.loss_first,
            "v_loss": target.loss_last,
            "v_nll": target.nll_last,
            "v_kl": target.kl_last,
            "v_steps": float(target.steps),
            "v_prob_new": target.prob_new,
            "delta_norm": float(target.delta.norm()),
            "v0_norm": float(target.v0.norm()),
            "update_norm": float(delta.norm()),
            "update_rel": float(delta.norm()) / w_norm if w_norm else float("inf"),
        }
        if cfg.mpes:
            diag["v_mpes_stop"] = float(target.stop == "mpes")
        if cfg.norm_anchor:
            diag["v_value_norm"] = target.value_norm  # before anchoring
            diag["v_anchor_dropped"] = float(target.anchor == "dropped")
        return delta.to(adapter.device), diag, {"keys": t1 - t0, "v_star": t2 - t1, "update": t3 - t2}
