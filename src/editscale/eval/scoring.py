"""Batched scoring primitives shared by every evaluator.

Two operations cover all of editscale's metrics: the log-likelihood of a multi-token continuation
(teacher-forced, one forward pass for a whole batch of prompt+target rows) and short greedy
decoding. Both work on token ids, so each model family's tokenisation rule lives in one place
(the adapter), not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from editscale.errors import UnknownNameError
from editscale.models.adapter import ModelAdapter, input_device
from editscale.models.cache import cache_arg


class HeadRows:
    """A causal LM's forward pass with its output head applied only at the positions that are read.

    Scoring reads a few positions of each row, and a full vocabulary projection at every position
    costs more than the transformer body of a small model. The body runs once; the hidden states of
    the read positions are gathered and only they go through the head (`ModelAdapter.unembed`).
    A model of no known family gets its full logits, read at the same positions.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        try:
            self.adapter: ModelAdapter | None = ModelAdapter(model, tokenizer=None)
        except UnknownNameError:
            self.adapter = None

    def __call__(self, rows: torch.Tensor, positions: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        """Logits [n, vocab] at (rows[i], positions[i]) of one forward pass with `forward_kwargs`."""
        if self.adapter is None:
            logits = self.model(**forward_kwargs).logits
            return logits[rows.to(logits.device), positions.to(logits.device)]
        hidden = self.adapter.hidden_before_head(**forward_kwargs)
        return self.adapter.unembed(hidden[rows.to(hidden.device), positions.to(hidden.device)])

    def run(self, **forward_kwargs: Any) -> None:
        """A forward pass whose logits are never read (it fills a cache passed in `forward_kwargs`)."""
        if self.adapter is None:
            self.model(**forward_kwargs)
        else:
            self.adapter.hidden_before_head(**forward_kwargs)


@dataclass(frozen=True)
class ContinuationScore:
    mean_nll: float  # mean per-token negative log-likelihood of the target (docs/protocol.md §8.1: lower = likelier)
    sum_nll: float
    greedy_match: bool  # argmax equals the target at every position, teacher-forced
    argmax_ids: tuple[int, ...]


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_continuations(model: torch.nn.Module, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                        *, pad_id: int, batch_size: int = 64, in_order: bool = False) -> list[ContinuationScore]:
    """Score each ``(prefix_ids, target_ids)`` row; right padding, so positions need no shifting.

    A row feeds its prefix and every target token but the last (the last is predicted, never read).
    Attention is causal, so a row whose fed tokens begin another row's is read off that longer row:
    a prompt scored against two targets runs once, and a one-token target costs no row of its own.
    Each distinct (row, position) goes through the head once, however many targets read it. Rows run
    longest first, in batches of similar length (`length_batches`); the scores come back in the
    given order. `in_order`: every row runs as given, `batch_size` at a time, for a caller whose
    hooks address the rows of a batch by their place in it (`eval/locate.py`)."""
    device = input_device(model)
    head = HeadRows(model)
    fed = [tuple(p) + tuple(t[:-1]) for p, t in rows]
    if in_order:
        carriers, carrier_of = fed, list(range(len(rows)))
        batches = [(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    else:
        carriers, carrier_of = _carrier_rows(fed)
        order = sorted(range(len(carriers)), key=lambda c: -len(carriers[c]))
        rank = {c: k for k, c in enumerate(order)}
        carriers, carrier_of = [carriers[c] for c in order], [rank[c] for c in carrier_of]
        batches = length_batches([len(c) for c in carriers], batch_size)
    readers: list[list[int]] = [[] for _ in carriers]  # the rows each carrier serves
    for r, c in enumerate(carrier_of):
        readers[c].append(r)
    out: list[ContinuationScore | None] = [None] * len(rows)
    for start, stop in batches:
        ids, mask = _pad_right(carriers[start:stop], pad_id, device)
        # Only the read cells go through the head and the softmax: the vocabulary projection at all
        # other positions, and a Python loop of small ops per row, would cost more than the body.
        cell: dict[tuple[int, int], int] = {}  # (row in batch, position) -> index of its head row
        wanted: list[tuple[int, int, int]] = []  # (scored row, cell index, target token)
        for b in range(stop - start):
            for r in readers[start + b]:
                prefix, target = rows[r]
                for j, token in enumerate(target):
                    key = (b, len(prefix) - 1 + j)
                    wanted.append((r, cell.setdefault(key, len(cell)), token))
        keys = list(cell)
        picked = head(torch.as_tensor([b for b, _ in keys], dtype=torch.long),
                      torch.as_tensor([q for _, q in keys], dtype=torch.long),
                      input_ids=ids, attention_mask=mask, use_cache=False).float()
        log_probs = torch.log_softmax(picked, dim=-1)
        at = torch.as_tensor([k for _, k, _ in wanted], dtype=torch.long, device=picked.device)
        tokens = torch.as_tensor([t for _, _, t in wanted], dtype=torch.long, device=picked.device)
        token_lp = log_probs[at, tokens].tolist()
        argmax = picked.argmax(dim=-1)[at].tolist()
        k = 0
        while k < len(wanted):
            r = wanted[k][0]
            n = len(rows[r][1])
            lp, am = token_lp[k:k + n], argmax[k:k + n]
            out[r] = ContinuationScore(mean_nll=-sum(lp) / n, sum_nll=-sum(lp), greedy_match=am == list(rows[r][1]),
                                       argmax_ids=tuple(am))
            k += n
    return out  # type: ignore[return-value]  # every slot filled


def _carrier_rows(fed: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The rows to run, none a prefix of another, and for each fed row the index of the one that holds it.

    In sorted order a sequence that begins another also begins the one right after it, so one
    backward sweep maps every sequence to the longest one it begins.
    """
    unique = sorted(set(fed))
    holder = list(range(len(unique)))
    for i in range(len(unique) - 2, -1, -1):
        nxt = unique[i + 1]
        if nxt[:len(unique[i])] == unique[i]:
            holder[i] = holder[i + 1]
    kept = sorted(set(holder))
    place = {h: k for k, h in enumerate(kept)}
    index = {u: place[h] for u, h in zip(unique, holder, strict=True)}
    return [unique[h] for h in kept], [index[f] for f in fed]


# A forward call's fixed cost in padded token positions, against which `length_batches` weighs the
# padding a longer batch would carry.
_CALL_COST = 64


def length_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """Split rows sorted by decreasing length into batches of at most `batch_size` that minimise the
    padded positions run plus `_CALL_COST` per call (dynamic programming over the cut points).

    Right padding costs a full forward pass per padded position: one long paraphrase prompt would
    otherwise make every short neighborhood prompt of its batch as long as itself.
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + _CALL_COST + lengths[i] * (j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    spans, j = [], n
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    return spans[::-1]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_new: int, *, pad_id: int,
                    batch_size: int = 32) -> list[list[int]]:
    """Greedy decoding of ``n_new`` tokens per prompt, batched.

    Rows are right-padded and each new token is written right after that row's last real token,
    so every row keeps contiguous positions and the padding never enters its attention.
    """
    device = input_device(model)
    head = HeadRows(model)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        lengths = torch.tensor([len(p) for p in chunk], device=device)
        ids, mask = _pad_right([p + [pad_id] * n_new for p in chunk], pad_id, device)
        mask.zero_()
        for i, n in enumerate(lengths.tolist()):
            mask[i, :n] = 1
        rows = torch.arange(len(chunk), device=device)
        new = []
        for step in range(n_new):
            cur = lengths + step
            width = int(cur.max())
            nxt = head(rows, cur - 1, input_ids=ids[:, :width], attention_mask=mask[:, :width],
                       use_cache=False).argmax(dim=-1).to(device)
            ids[rows, cur] = nxt
            mask[rows, cur] = 1
            new.append(nxt)
        results.extend(torch.stack(new, dim=1).tolist())
    return results


@torch.no_grad()
def greedy_generate_until(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new: int, *,
                          pad_id: int, stop: torch.Tensor, batch_size: int = 64) -> list[list[int]]:
    """Greedy decoding of at most ``max_new`` tokens per prompt, each row ending with the first token
    that the boolean vocabulary mask ``stop`` marks (that token is kept), batched.

    Unlike `greedy_generate`, the rows share a key/value cache: the prompts run once, right-padded,
    then each step feeds one token per row at that row's own next position, the padding columns of
    the cache masked (the layout of `methods/solver/targets.py`), so a row sees exactly its own
    tokens. A batch ends when all its rows have stopped. Rows run longest first in batches of similar
    length (`length_batches`); the outputs come back in the given order.
    """
    device = input_device(model)
    head = HeadRows(model)
    arg = cache_arg(model)
    stop = stop.to(device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start, end in length_batches([len(prompts[i]) for i in order], batch_size):
        chunk = [list(prompts[i]) for i in order[start:end]]
        ids, mask = _pad_right(chunk, pad_id, device)
        lengths = mask.sum(dim=1)
        rows = torch.arange(len(chunk), device=device)
        cache = DynamicCache()
        logits = head(rows, lengths - 1, input_ids=ids, attention_mask=mask, use_cache=True, **{arg: cache})
        new, done = [], torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for step in range(max_new):
            nxt = logits.argmax(dim=-1).to(device)
            new.append(nxt)
            done |= stop[nxt]
            if step + 1 == max_new or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = head(rows, torch.zeros_like(rows), input_ids=nxt[:, None], attention_mask=mask,
                          position_ids=(lengths + step)[:, None], use_cache=True, **{arg: cache})
        tokens = torch.stack(new, dim=1).tolist()
        ends = stop[torch.stack(new, dim=1)].tolist()
        for k, (row, hit) in enumerate(zip(tokens, ends, strict=True)):
            n = hit.index(True) + 1 if True in hit else len(row)
            out[order[start + k]] = row[:n]
    return out
