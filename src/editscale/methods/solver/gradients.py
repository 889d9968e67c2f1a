"""The inputs and output gradients of edited linear maps under the edit loss: what UltraEdit and
MEND turn into weight updates (a linear map's weight gradient is Σ_t g_t k_tᵀ over the positions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editscale.methods.base import EditRequest
from editscale.models.adapter import ModelAdapter

Site = tuple[str, int]  # (role, layer): ("mlp_out", 17)


@dataclass
class Trace:
    """One forward and backward pass of a batch of requests: per site the map's inputs [B, T, d_in]
    and the gradients at its outputs [B, T, d_out] (fp32, CPU), and the answer positions."""

    inputs: dict[Site, torch.Tensor]
    grads: dict[Site, torch.Tensor]
    rows: torch.Tensor  # per answer token: its batch row ...
    cols: torch.Tensor  # ... and the position that predicts it
    mask: torch.Tensor  # [B, T] real (not padding) tokens

    def at_answers(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and gradients at the positions predicting a target token, [N, d]."""
        return self.inputs[site][self.rows, self.cols], self.grads[site][self.rows, self.cols]

    def nonzero(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and gradients at every real position whose input and gradient are both non-zero
        (MEND's `nz_mask`: positions after the last answer token get no gradient)."""
        x, g = self.inputs[site][self.mask], self.grads[site][self.mask]
        keep = (x != 0).any(dim=-1) & (g != 0).any(dim=-1)
        return x[keep], g[keep]


def _keep_io(seen: dict[Site, tuple[torch.Tensor, torch.Tensor]], site: Site) -> Any:
    """A forward hook keeping a module's input and its output, whose gradient the backward pass keeps."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:
            output.requires_grad_(True)  # a leaf: nothing before it needs a gradient
        output.retain_grad()
        seen[site] = (args[0].detach(), output)

    return hook


@dataclass
class AnswerLoss:
    """The negative log-probabilities of the target tokens of `prompt + " " + target` rows."""

    token_nll: torch.Tensor  # per target token
    rows: torch.Tensor  # its batch row
    cols: torch.Tensor  # the position predicting it
    mask: torch.Tensor  # [B, T] real tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.token_nll.mean()

    def per_row(self, n_rows: int) -> torch.Tensor:
        """Mean over each row's target tokens."""
        dev = self.token_nll.device
        total = torch.zeros(n_rows, device=dev).index_add(0, self.rows.to(dev), self.token_nll)
        count = torch.zeros(n_rows, device=dev).index_add(0, self.rows.to(dev), torch.ones_like(self.token_nll))
        return total / count


def answer_loss(adapter: ModelAdapter, prompts: Sequence[str], targets: Sequence[str]) -> AnswerLoss:
    """One forward pass of `prompt + " " + target` rows on the live model (gradients flow); only
    the positions predicting a target token go through the output head."""
    batch = adapter.prompt_target_batch(prompts, targets)
    rows = torch.tensor([i for i, t in enumerate(batch.target_ids) for _ in t])
    cols = torch.tensor([batch.prefix_lens[i] - 1 + j for i, t in enumerate(batch.target_ids) for j in range(len(t))])
    labels = torch.tensor([tok for t in batch.target_ids for tok in t])
    hidden = adapter.hidden_before_head(input_ids=batch.input_ids.to(adapter.device),
                                        attention_mask=batch.attention_mask.to(adapter.device), use_cache=False)
    logits = adapter.unembed(hidden[rows.to(hidden.device), cols.to(hidden.device)]).float()
    nll = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="none")
    return AnswerLoss(nll, rows, cols, batch.attention_mask.bool().cpu())


def trace_edit_loss(adapter: ModelAdapter, sites: Sequence[Site], requests: Sequence[EditRequest]) -> Trace:
    """Run `prompt + " " + target_new` of every request, the loss being the mean negative
    log-probability of the target tokens (teacher forced), and keep each site's inputs and output
    gradients. No model parameter receives a gradient."""
    seen: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [adapter.module(role, layer).register_forward_hook(_keep_io(seen, (role, layer)))
               for role, layer in sites]
    try:
        with adapter.frozen(), torch.enable_grad():
            loss = answer_loss(adapter, [r.prompt.format(r.subject) for r in requests],
                               [r.target_new for r in requests])
            loss.mean.backward()
    finally:
        for h in handles:
            h.remove()
    inputs, grads = {}, {}
    for site, (x, output) in seen.items():
        assert output.grad is not None
        inputs[site], grads[site] = x.float().cpu(), output.grad.float().cpu()
    return Trace(inputs, grads, loss.rows, loss.cols, loss.mask)
