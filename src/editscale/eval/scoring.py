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

from editscale.errors import UnknownNameError
from editscale.models.adapter import ModelAdapter, input_device


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

    Rows are run longest first, in batches of similar length (`_length_batches`); the scores come
    back in the given order. `in_order`: run them as given, `batch_size` at a time, for a caller
    whose hooks address the rows of a batch by their place in it (`eval/locate.py`)."""
    device = input_device(model)
    head = HeadRows(model)
    if in_order:
        order = list(range(len(rows)))
        batches = [(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    else:
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        batches = _length_batches([len(rows[i][0]) + len(rows[i][1]) for i in order], batch_size)
    scored: list[ContinuationScore] = []
    for start, stop in batches:
        chunk = [rows[i] for i in order[start:stop]]
        ids, mask = _pad_right([list(p) + list(t) for p, t in chunk], pad_id, device)
        # Only the scored positions go through the head and the softmax: the vocabulary projection
        # at all other positions, and a Python loop of small ops per row, would cost more than the body.
        row_idx = torch.as_tensor([i for i, (_, t) in enumerate(chunk) for _ in t], dtype=torch.long)
        pos_idx = torch.as_tensor([len(p) - 1 + j for p, t in chunk for j in range(len(t))], dtype=torch.long)
        tgt = torch.as_tensor([x for _, t in chunk for x in t], dtype=torch.long)
        picked = head(row_idx, pos_idx, input_ids=ids, attention_mask=mask, use_cache=False).float()
        tgt = tgt.to(picked.device)
        token_lp = torch.log_softmax(picked, dim=-1).gather(1, tgt[:, None]).squeeze(1).tolist()
        argmax = picked.argmax(dim=-1).tolist()
        targets = tgt.tolist()
        k = 0
        for _, target in chunk:
            n = len(target)
            lp, am = token_lp[k:k + n], argmax[k:k + n]
            scored.append(ContinuationScore(mean_nll=-sum(lp) / n, sum_nll=-sum(lp),
                                            greedy_match=am == targets[k:k + n], argmax_ids=tuple(am)))
            k += n
    out: list[ContinuationScore | None] = [None] * len(rows)
    for i, score in zip(order, scored):
        out[i] = score
    return out  # type: ignore[return-value]  # every slot filled


# A forward call's fixed cost in padded token positions, against which `_length_batches` weighs the
# padding a longer batch would carry.
_CALL_COST = 64


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
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
