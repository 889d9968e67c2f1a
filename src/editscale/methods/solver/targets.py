"""The target value v* (ROME, docs/protocol.md §2.6) or z (MEMIT, §4.2 there): the hidden vector at the subject token
that makes the model say the new target, found by gradient descent on an added vector delta.

One function serves both: ROME adds delta to the MLP output (site "mlp"), MEMIT to the block
output (site "block"). Everything the reference does is kept, including its quirks, because the
paper's numbers depend on them: the weight decay is ||delta|| / ||v0||^2 (not squared), the KL
term sits at the subject token of "{} is a", the loop stops when the loss is below 0.05 and never
steps on its last iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DynamicCache

from editscale.errors import EditscaleError
from editscale.methods.solver.keys import fill
from editscale.models.adapter import ModelAdapter
from editscale.models.cache import KV, cache_arg, cache_from, cache_kv

KL_PROMPT = "{} is a"
EARLY_STOP_LOSS = 5e-2


@dataclass
class TargetValue:
    v_star: torch.Tensor  # [d_model] fp32: v0 + delta
    v0: torch.Tensor  # [d_model] the unmodified output at the subject token of the bare row
    mlp0: torch.Tensor  # [d_model] the MLP output there (v0 itself for site "mlp")
    delta: torch.Tensor  # [d_model]
    loss_first: float
    loss_last: float
    nll_last: float
    kl_last: float
    steps: int  # Adam steps taken
    prob_new: float  # mean per-token probability of the target on the rewriting rows, last pass
    stop: str = "steps"  # why it stopped: "loss" (below EARLY_STOP_LOSS), "mpes", or "steps" (the last iteration)
    value_norm: float = float("nan")  # ‖m0 + δ‖ as optimised, m0 the MLP output at the subject token (NAS)
    anchor: str = ""  # NAS: "scaled" to the reference norm, "dropped" (an outlier: δ = 0), or "" (off)


def optimize_target(adapter: ModelAdapter, layer: int, prompt: str, subject: str, target: str,
                    templates: Sequence[str], **options: Any) -> TargetValue:
    """The target value for one request (`optimize_targets` with one request; the same options)."""
    return optimize_targets(adapter, layer, [(prompt, subject, target)], templates, **options)[0]


def optimize_targets(adapter: ModelAdapter, layer: int, requests: Sequence[tuple[str, str, str]],
                     templates: Sequence[str], *, site: str = "mlp", steps: int = 20, lr: float = 0.5,
                     weight_decay: float = 0.5, clamp_norm_factor: float = 4.0, kl_factor: float = 0.0625,
                     fact_token: str = "subject_last", loss_layer: int | None = None, mpes: int = 0,
                     anchor: float | None = None, anchor_outlier: float = 2.0,
                     full_logits: bool = False) -> list[TargetValue]:
    """The target value of each `(prompt, subject, target)` request, each optimised alone.

    The requests share forward passes (their rows sit in one batch, each with its own delta) but
    nothing else: a request's loss reads only its own rows, its Adam state is its own, and it stops
    at its own iteration, after which its delta is frozen. The values are those of one request at a
    time up to float rounding; the cost of a step is paid once for all of them.

    `loss_layer` is the block whose output (through the final norm and the unembedding) the loss is
    read from, None or the last block for the model's logits. `mpes` > 0 is ENCORE's most-probable
    early stopping (docs/protocol.md §2.6): a request also stops, before stepping, on the `mpes`-th
    iteration (counted over the whole loop, not in a row) on which its new target is the argmax at
    every target token of every prefixed rewriting row (the bare "{}" row is not checked, as in
    ENCORE's compute_z).

    `anchor` is NAS's norm anchor (docs/protocol.md §2.6): the MLP-output part of the target,
    m = m0 + δ (m0 the MLP output at the subject token of the bare row; for site "mlp" that is v0),
    is rescaled to the norm `anchor`, or δ is dropped when ‖m‖ > `anchor_outlier` · `anchor`.

    `full_logits` computes the same values as the reference's compute_v does (ROME `compute_v.py`):
    the model's logits at every position, log-softmaxed everywhere, then the scored cells read. It
    costs a vocabulary projection per position and exists so benchmarks can time the reference's
    way (`benchmarks/protocol_speed.py`)."""
    if full_logits and loss_layer not in (None, adapter.n_layers - 1):
        raise EditscaleError("full_logits reads the model's own logits: it takes no v_loss_layer")
    if loss_layer is not None:
        if not layer <= loss_layer < adapter.n_layers:
            raise EditscaleError(f"v_loss_layer {loss_layer} must lie between the edited layer {layer} and the "
                                 f"last block {adapter.n_layers - 1}: the loss must see the edit")
        if loss_layer == adapter.n_layers - 1:
            loss_layer = None  # the same values as the model's own final hidden states, one hook fewer
    if not requests:
        return []
    rows: list[list[int]] = []
    lookup: list[int] = []
    cells: list[tuple[int, int]] = []
    parts: list[_Request] = []
    for prompt, subject, target in requests:
        target_ids = adapter.target_ids(target)
        n_target = len(target_ids)
        all_prompts = [fill(t, prompt) for t in templates] + [KL_PROMPT]
        n_rw = len(all_prompts) - 1
        # Rows are the prompt's tokens followed by all target tokens but the last; ids are appended
        # rather than re-tokenising prompt + decode(target[:-1]), which is the same for GPT-2 BPE and
        # stays right for tokenizers that would merge across the boundary.
        encoded = adapter.tokenizer([p.format(subject) for p in all_prompts], add_special_tokens=True)["input_ids"]
        mine = [list(r) + (target_ids[:-1] if i < n_rw else []) for i, r in enumerate(encoded)]
        at = adapter.subject_token_indices(all_prompts, [subject] * len(all_prompts), fact_token)
        first_row, first_cell = len(rows), len(cells)
        # the scored cells: the first target token is predicted at the last prompt token; the KL term last
        cells += [(first_row + i, len(mine[i]) - n_target + j) for i in range(n_rw) for j in range(n_target)]
        cells.append((first_row + n_rw, at[n_rw]))
        parts.append(_Request(rows=slice(first_row, first_row + n_rw + 1),
                              cells=slice(first_cell, first_cell + n_rw * n_target), kl_cell=len(cells) - 1,
                              labels=torch.tensor(target_ids * n_rw, device=adapter.device), n_rw=n_rw,
                              n_target=n_target,
                              checked=torch.tensor([t.strip() != "{}" for t in templates], device=adapter.device)))
        rows += mine
        lookup += at

    with adapter.frozen():  # gradients flow to the deltas only
        passes = _FullRows(adapter, rows, lookup, cells) if full_logits else _SuffixRows(adapter, rows, lookup, cells)
        found = _optimize(adapter, layer, site, passes, parts, loss_layer=loss_layer, steps=steps, lr=lr,
                          weight_decay=weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor,
                          mpes=mpes, full_logits=full_logits)
    if anchor is not None:
        found = [_anchored(t, anchor, anchor_outlier) for t in found]
    return found


@dataclass(frozen=True)
class _Request:
    """Where one request's rows and scored cells sit in the shared batch."""
    rows: slice  # its rewriting rows, then its KL row
    cells: slice  # its target cells, row-major (n_rw x n_target)
    kl_cell: int
    labels: torch.Tensor  # [n_rw * n_target] target ids
    n_rw: int
    n_target: int
    checked: torch.Tensor  # [n_rw] bool: the rewriting rows MPES checks


def _anchored(target: TargetValue, anchor: float, outlier: float) -> TargetValue:
    """NAS: the target with its MLP-output part m0 + δ rescaled to norm `anchor` (δ dropped for an outlier)."""
    m0 = target.mlp0
    value = m0 + target.delta
    if target.value_norm > outlier * anchor:
        delta, how = torch.zeros_like(target.delta), "dropped"
    else:
        delta, how = value * (anchor / max(target.value_norm, 1e-10)) - m0, "scaled"
    return replace(target, v_star=target.v0 + delta, delta=delta, anchor=how)


class _FullRows:
    """Every pass runs the whole padded rows, as the reference's compute_v does."""

    def __init__(self, adapter: ModelAdapter, rows: list[list[int]], lookup: list[int],
                 cells: list[tuple[int, int]]) -> None:
        self.batch = adapter.pad(rows)
        self.lookup = lookup
        self.rows = torch.tensor([r for r, _ in cells], device=adapter.device)
        self.cols = torch.tensor([c for _, c in cells], device=adapter.device)

    def forward_kwargs(self, keep: torch.Tensor) -> dict[str, Any]:
        """The forward pass over the rows `keep` (indices, in order)."""
        return {"input_ids": self.batch["input_ids"][keep], "attention_mask": self.batch["attention_mask"][keep],
                "use_cache": False}


class _SuffixRows:
    """Every pass runs only each row's tokens from the subject token on, over a cache of the rest.

    delta enters at the subject token (the lookup), and attention is causal, so no position before
    it ever changes: those positions run once, without gradients, and each optimisation step runs
    the few columns from the lookup to the row's end against their keys and values. The values are
    those of the whole rows up to float rounding; the step costs the suffix's share of the tokens.

    Layout: prefix row i is its first lookup_i tokens, right-padded to P and run unmasked (padding
    sits after every real token, so causality hides it from them, and no query is ever fully
    masked); suffix row i is the rest, right-padded to S, its cache columns [0, lookup_i) and its
    real tokens unmasked, every token at its true position.
    """

    def __init__(self, adapter: ModelAdapter, rows: list[list[int]], lookup: list[int],
                 cells: list[tuple[int, int]]) -> None:
        device, pad_id, b = adapter.device, adapter.pad_token_id, len(rows)
        width_p = max(lookup)
        width_s = max(len(r) - k for r, k in zip(rows, lookup, strict=True))
        self.cache_arg = cache_arg(adapter.model)
        self.kv: KV = []
        if width_p:
            prefix = torch.full((b, width_p), pad_id, dtype=torch.long)
            for i, (r, k) in enumerate(zip(rows, lookup, strict=True)):
                prefix[i, :k] = torch.tensor(r[:k], dtype=torch.long)
            cache, prefix = DynamicCache(), prefix.to(device)
            with torch.no_grad():
                adapter.hidden_before_head(input_ids=prefix, attention_mask=torch.ones_like(prefix),
                                           **{self.cache_arg: cache, "use_cache": True})
            self.kv = cache_kv(cache)
        ids = torch.full((b, width_s), pad_id, dtype=torch.long)
        mask = torch.zeros((b, width_p + width_s), dtype=torch.long)
        positions = torch.zeros((b, width_s), dtype=torch.long)
        for i, (r, k) in enumerate(zip(rows, lookup, strict=True)):
            n = len(r) - k
            ids[i, :n] = torch.tensor(r[k:], dtype=torch.long)
            mask[i, :k] = 1
            mask[i, width_p:width_p + n] = 1
            # padding repeats the last real position, so no position exceeds the row's own length
            positions[i] = k + torch.arange(width_s).clamp(max=n - 1)
        self.ids, self.mask, self.positions = ids.to(device), mask.to(device), positions.to(device)
        self.lookup = [0] * b
        self.rows = torch.tensor([r for r, _ in cells], device=device)
        self.cols = torch.tensor([c - lookup[r] for r, c in cells], device=device)

    def forward_kwargs(self, keep: torch.Tensor) -> dict[str, Any]:
        """The forward pass over the rows `keep` (indices, in order), on a fresh copy of their cache."""
        kwargs: dict[str, Any] = {"input_ids": self.ids[keep], "attention_mask": self.mask[keep],
                                  "position_ids": self.positions[keep], "use_cache": True}
        if self.kv:
            kv = self.kv if len(keep) == len(self.lookup) else [(k[keep], v[keep]) for k, v in self.kv]
            kwargs[self.cache_arg] = cache_from(kv, len(keep))
        return kwargs


def _optimize(adapter: ModelAdapter, layer: int, site: str, passes: _FullRows | _SuffixRows,
              parts: Sequence[_Request], *, loss_layer: int | None, steps: int, lr: float, weight_decay: float,
              clamp_norm_factor: float, kl_factor: float, mpes: int = 0,
              full_logits: bool = False) -> list[TargetValue]:
    n = len(parts)
    delta = torch.zeros(n, adapter.d_model, dtype=torch.float32, device=adapter.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)  # elementwise: one Adam per request's row of delta
    row_owner = torch.tensor([k for k, p in enumerate(parts) for _ in range(p.rows.start, p.rows.stop)],
                             device=adapter.device)
    bare_rows = torch.tensor([p.rows.start for p in parts], device=adapter.device)
    kl_init: list[torch.Tensor] = []
    v0: torch.Tensor | None = None
    found: list[TargetValue | None] = [None] * n
    loss_first = [float("nan")] * n
    n_steps = [0] * n
    most_probable = [0] * n  # MPES: iterations on which the target was the argmax everywhere checked
    for it in range(steps):
        # A finished request's rows leave the batch: the pass and the head run the others' only.
        going = [k for k in range(n) if found[k] is None]
        keep = torch.cat([torch.arange(parts[k].rows.start, parts[k].rows.stop) for k in going]).to(adapter.device)
        place = torch.full((len(row_owner),), -1, dtype=torch.long, device=adapter.device)
        place[keep] = torch.arange(len(keep), device=adapter.device)
        cells, at = [], {}
        for k in going:  # each request's target cells, then its KL cell, in the pass's own rows
            at[k] = len(cells)
            cells += [*range(parts[k].cells.start, parts[k].cells.stop), parts[k].kl_cell]
        cells_t = torch.tensor(cells, device=adapter.device)
        lookup = [passes.lookup[i] for i in keep.tolist()]
        kwargs = passes.forward_kwargs(keep)
        with (adapter.record(site, layer, lookup) as rec, adapter.record("mlp", layer, lookup) as mlp,
              adapter.intervene(site, layer, lookup, delta[row_owner[keep]])):
            if full_logits:
                every = torch.log_softmax(adapter.model(**kwargs).logits.float(), dim=-1)
            elif loss_layer is None:
                hidden = adapter.hidden_before_head(**kwargs)
            else:
                hidden = adapter.block_hidden(None, loss_layer, **kwargs)
        if v0 is None:
            v0 = rec.last[bare_rows].detach().clone()  # each request's bare-template row (all rows run first)
            mlp0 = mlp.last[bare_rows].detach().clone()
        rows_t, cols_t = place[passes.rows[cells_t]], passes.cols[cells_t]
        if full_logits:
            log_probs = every[rows_t, cols_t]
        else:
            # only the scored cells go through the output head: the target positions, then the KL one
            log_probs = torch.log_softmax(adapter.unembed(hidden[rows_t, cols_t]).float(), dim=-1)
        active: list[torch.Tensor] = []
        for k in going:
            p = parts[k]
            n_cells = p.cells.stop - p.cells.start
            cell_lp = log_probs[at[k]:at[k] + n_cells]
            token_lp = cell_lp[torch.arange(len(p.labels), device=cell_lp.device), p.labels].view(p.n_rw, p.n_target)
            nll = -(token_lp.mean(dim=1)).mean()
            kl_lp = log_probs[at[k] + n_cells]
            if it == 0:
                kl_init.append(kl_lp.detach().clone())
            # KL(P_delta || P_init), as kl_div(init, current, log_target=True) in the reference
            kl = kl_factor * torch.sum(kl_lp.exp() * (kl_lp - kl_init[k]))
            wd = weight_decay * delta[k].norm() / (v0[k].norm() ** 2)
            loss = nll + kl + wd
            loss_val = loss.item()
            if it == 0:
                loss_first[k] = loss_val
            stop = "loss" if loss_val < EARLY_STOP_LOSS else "steps" if it == steps - 1 else None
            if mpes:
                hits = cell_lp.argmax(dim=-1).view(p.n_rw, p.n_target) == p.labels.view(p.n_rw, p.n_target)
                most_probable[k] += int(bool(hits[p.checked].all()))
                if most_probable[k] >= mpes:
                    stop = "mpes"
            if stop is not None:
                d = delta[k].detach().clone()
                found[k] = TargetValue(v_star=v0[k] + d, v0=v0[k], mlp0=mlp0[k], delta=d, loss_first=loss_first[k],
                                       loss_last=loss_val, nll_last=nll.item(), kl_last=kl.item(), steps=n_steps[k],
                                       prob_new=token_lp.detach().exp().mean().item(), stop=stop,
                                       value_norm=float((mlp0[k] + d).norm()))
            else:
                active.append(loss)
        if not active:
            break
        stepping = torch.tensor([f is None for f in found], device=adapter.device)
        opt.zero_grad()
        torch.stack(active).sum().backward()  # each delta's gradient is its own request's
        kept = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[~stepping] = kept[~stepping]  # finished requests take no step
            max_norm = clamp_norm_factor * v0.norm(dim=1)
            norm = delta.norm(dim=1)
            over = stepping & (norm > max_norm)
            delta[over] *= (max_norm[over] / norm[over])[:, None]
        for k in range(n):
            n_steps[k] += int(found[k] is None)
    assert all(f is not None for f in found)
    return found  # type: ignore[return-value]  # every request ends by the last iteration
