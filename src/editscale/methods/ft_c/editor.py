"""FT-C (docs/protocol.md §7): fine-tune one MLP-output projection, weight and bias, inside an L∞ ball.

As the reference's `execute_ft` does it: Adam on the module's parameters only; per epoch a forward
pass, a step when the loss is at least 1e-2, then an elementwise clamp into [W_start − ε, W_start + ε]
whether or not a step was taken; stop once the epoch's mean loss is below 1e-2. The loss is the
mean negative log-probability of the target tokens, all read at the last prompt position (not
teacher forced), averaged per request and then over the requests of a chunk.

The weight delta is returned in the canonical [d_model, d_mlp] orientation like every method's; the
bias delta cannot be, so `FtcResult.bias_deltas` carries it and `FtcEditor.apply` writes both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editscale.errors import EditscaleError
from editscale.methods.base import Editor, EditRequest, EditResult, register
from editscale.methods.config import MethodConfig
from editscale.methods.ft_c.config import FtcConfig
from editscale.models.adapter import ModelAdapter, split_template


@dataclass
class _Chunk:
    """One forward pass worth of requests, laid out once: the loss only needs gathers afterwards."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # positions sent through the output head: batch row ...
    cols: torch.Tensor  # ... and token position
    source: torch.Tensor  # per scored target token: which of those positions predicts it
    labels: torch.Tensor  # per scored target token: its id
    weights: torch.Tensor  # 1 / (tokens of its request * requests): the weighted sum is the mean of means
    n: int


@dataclass
class _Trained:
    layer: int
    kind: str  # "weight" or "bias"
    param: nn.Parameter


@register
class FtcEditor(Editor):
    name = "ft-c"
    config_class = FtcConfig
    config: FtcConfig

    summary = "constrained fine-tuning of one MLP-output projection, weight and bias in an L∞ ball (FT-C baseline)"
    supports_batch = True

    def __init__(self, adapter: ModelAdapter, config: MethodConfig, context: Any) -> None:
        super().__init__(adapter, config, context)
        self._unedited: dict[tuple[int, str], torch.Tensor] | None = None

    def prepare(self) -> None:
        # FT-C trains the module's own parameters: an offloaded layer's live on `meta` (docs/protocol.md §1.5)
        offloaded = [layer for layer in self.config.layers if self.adapter.mlp_out_offloaded(layer)]
        if offloaded:
            raise EditscaleError(f"ft-c trains layers {offloaded} in place, but --device-map offloaded them; "
                                 "give them a device (--max-memory) or use a method that edits through the adapter")
        # The "unedited" clamp anchor must come from the base model, which prepare() is guaranteed to see.
        if self.config.clamp_anchor == "unedited":
            self._unedited = {(t.layer, t.kind): t.param.detach().clone() for t in self._trained()}

    def _trained(self) -> list[_Trained]:
        """The reference trains every parameter whose name contains the module's path: weight and bias."""
        out = []
        for layer in self.config.layers:
            module = self.adapter.module("mlp_out", layer)
            out.append(_Trained(layer, "weight", module.weight))
            if self.config.train_bias and getattr(module, "bias", None) is not None:
                out.append(_Trained(layer, "bias", module.bias))
        return out

    def _layout(self, requests: Sequence[EditRequest]) -> _Chunk:
        prompts = []
        for r in requests:
            prefix, suffix = split_template(r.prompt)
            prompts.append(prefix + r.subject + suffix)
        # One tokenisation of prompt + " " + target serves both losses: logits at the last prompt
        # position do not depend on the target tokens after it (causal), and for GPT-2 BPE the
        # prefix is exactly tok(prompt) and the target tok(" " + target), as in the reference.
        batch = self.adapter.prompt_target_batch(prompts, [r.target_new for r in requests])
        rows: list[int] = []
        cols: list[int] = []
        source: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        n = len(requests)
        for i, (prefix_len, ids) in enumerate(zip(batch.prefix_lens, batch.target_ids, strict=True)):
            if prefix_len < 1:
                raise EditscaleError(f"prompt {prompts[i]!r} has no token to predict the target from")
            if self.config.teacher_forced:
                for j in range(len(ids)):
                    source.append(len(rows))
                    rows.append(i)
                    cols.append(prefix_len + j - 1)
            else:
                source.extend([len(rows)] * len(ids))
                rows.append(i)
                cols.append(prefix_len - 1)
            labels.extend(ids)
            weights.extend([1.0 / (len(ids) * n)] * len(ids))
        device = self.adapter.device
        return _Chunk(inputs=batch.inputs(), rows=torch.tensor(rows, device=device),
                      cols=torch.tensor(cols, device=device), source=torch.tensor(source, device=device),
                      labels=torch.tensor(labels, device=device),
                      weights=torch.tensor(weights, dtype=torch.float32, device=device), n=n)

    def _loss(self, chunk: _Chunk) -> torch.Tensor:
        hidden = self.adapter.final_hidden(chunk.inputs)
        # only the scored positions go through the output head (most of a small model's cost); indices
        # follow the tensors because a model split over devices ends on another device than it starts
        picked = hidden[chunk.rows.to(hidden.device), chunk.cols.to(hidden.device)]
        log_probs = torch.log_softmax(self.adapter.unembed(picked).float(), dim=-1)
        dev = log_probs.device
        token_lp = log_probs[chunk.source.to(dev), chunk.labels.to(dev)]
        return -(token_lp * chunk.weights.to(dev)).sum()

    def loss(self, requests: Sequence[EditRequest]) -> float:
        """The training loss of the requests on the live model (mean over chunks, weighted by size)."""
        chunks = [self._layout(requests[i:i + self.config.batch_size])
                  for i in range(0, len(requests), self.config.batch_size)]
        with torch.no_grad():
            return sum(float(self._loss(c)) * c.n for c in chunks) / sum(c.n for c in chunks)

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        cfg, adapter = self.config, self.adapter
        self.check_batch(requests)
        if not requests:
            raise EditscaleError("ft-c: no requests to edit")
        self.ensure_prepared()
        t0 = time.perf_counter()
        chunks = [self._layout(requests[i:i + cfg.batch_size]) for i in range(0, len(requests), cfg.batch_size)]
        trained = self._trained()
        start = [t.param.detach().clone() for t in trained]  # in storage layout: the clamp's anchors
        saved = adapter.snapshot(cfg.layers)  # canonical fp32 copies: the deltas' base and the exact restore
        w_start = saved.weights
        bounds = self._bounds(trained, start)
        flags = [(p, p.requires_grad) for p in adapter.model.parameters()]
        t1 = time.perf_counter()

        losses: list[float] = []
        opt_steps = 0
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for t in trained:
                t.param.requires_grad_(True)
            opt = torch.optim.Adam([t.param for t in trained], lr=cfg.lr, weight_decay=cfg.weight_decay)
            with torch.enable_grad():
                for _ in range(cfg.num_steps):
                    total = 0.0
                    for chunk in chunks:
                        opt.zero_grad()
                        loss = self._loss(chunk)
                        value = float(loss.detach())
                        total += value * chunk.n
                        if value >= cfg.early_stop_loss:
                            loss.backward()
                            opt.step()
                            opt_steps += 1
                        if bounds is not None:  # clamped whether or not a step was taken, as the reference
                            with torch.no_grad():
                                for t, (lo, hi) in zip(trained, bounds, strict=True):
                                    t.param.copy_(torch.clamp(t.param, min=lo, max=hi))
                    losses.append(total / len(requests))
                    if losses[-1] < cfg.early_stop_loss:
                        break
            opt.zero_grad(set_to_none=True)
            loss_after = self.loss(requests)
            deltas = {layer: adapter.get_mlp_out_weight(layer) - w_start[layer] for layer in cfg.layers}
            bias_deltas = {t.layer: (t.param.detach().float() - s.float()).cpu()
                           for t, s in zip(trained, start, strict=True) if t.kind == "bias"}
        finally:
            adapter.restore(saved)  # exact restore; subtracting the delta would round
            for t in trained:
                t.param.grad = None
            for p, flag in flags:
                p.requires_grad_(flag)
        t2 = time.perf_counter()

        w_norm = sum(float(w.norm()) ** 2 for w in w_start.values()) ** 0.5
        update_norm = sum(float(d.norm()) ** 2 for d in deltas.values()) ** 0.5
        diagnostics = {
            "loss_first": losses[0],
            "loss": losses[-1],  # the last epoch's loss, measured before its step (as the reference logs it)
            "loss_after": loss_after,
            "epochs": float(len(losses)),
            "opt_steps": float(opt_steps),
            "update_norm": update_norm,
            "update_rel": update_norm / w_norm if w_norm else float("inf"),
            "update_linf": max(float(d.abs().max()) for d in deltas.values()),
        }
        if bias_deltas:
            diagnostics["bias_update_norm"] = sum(float(d.norm()) ** 2 for d in bias_deltas.values()) ** 0.5
            diagnostics["bias_update_linf"] = max(float(d.abs().max()) for d in bias_deltas.values())
        return EditResult({layer: d.cpu() for layer, d in deltas.items()}, diagnostics,
                         {"layout": t1 - t0, "train": t2 - t1}, bias_deltas=bias_deltas)

    def _bounds(self, trained: list[_Trained],
                start: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        eps = self.config.norm_constraint
        if eps is None:
            return None
        if self.config.clamp_anchor == "edit_start":
            anchors = start
        else:
            assert self._unedited is not None  # compute() prepared the editor
            anchors = [self._unedited[(t.layer, t.kind)] for t in trained]
        return [(a - eps, a + eps) for a in anchors]
