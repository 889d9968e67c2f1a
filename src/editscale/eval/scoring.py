"""Batched scoring primitives shared by every evaluator.

Two operations cover all of editscale's metrics: the log-likelihood of a multi-token continuation
(teacher-forced, one forward pass for a whole batch of prompt+target rows) and short greedy
decoding. Both work on token ids, so each model family's tokenisation rule lives in one place
(the adapter), not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
                        *, pad_id: int, batch_size: int = 64) -> list[ContinuationScore]:
    """Score each ``(prefix_ids, target_ids)`` row; right padding, so positions need no shifting."""
    device = next(model.parameters()).device
    out: list[ContinuationScore] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = _pad_right([list(p) + list(t) for p, t in chunk], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        # Gather every scored position of the chunk first and normalise only those: the softmax
        # over the vocabulary at all other positions, and a Python loop of small ops per row,
        # would cost more than the forward pass.
        row_idx = [i for i, (_, t) in enumerate(chunk) for _ in t]
        pos_idx = [len(p) - 1 + j for p, t in chunk for j in range(len(t))]
        tgt = torch.as_tensor([x for _, t in chunk for x in t], dtype=torch.long, device=device)
        picked = logits[torch.as_tensor(row_idx, device=device), torch.as_tensor(pos_idx, device=device)].float()
        token_lp = torch.log_softmax(picked, dim=-1).gather(1, tgt[:, None]).squeeze(1).tolist()
        argmax = picked.argmax(dim=-1).tolist()
        targets = tgt.tolist()
        k = 0
        for _, target in chunk:
            n = len(target)
            lp, am = token_lp[k:k + n], argmax[k:k + n]
            out.append(ContinuationScore(mean_nll=-sum(lp) / n, sum_nll=-sum(lp), greedy_match=am == targets[k:k + n],
                                         argmax_ids=tuple(am)))
            k += n
    return out


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], n_new: int, *, pad_id: int,
                    batch_size: int = 32) -> list[list[int]]:
    """Greedy decoding of ``n_new`` tokens per prompt, batched.

    Rows are right-padded and each new token is written right after that row's last real token,
    so every row keeps contiguous positions and the padding never enters its attention.
    """
    device = next(model.parameters()).device
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
            logits = model(input_ids=ids[:, : int(cur.max())], attention_mask=mask[:, : int(cur.max())]).logits
            nxt = logits[rows, cur - 1].argmax(dim=-1)
            ids[rows, cur] = nxt
            mask[rows, cur] = 1
            new.append(nxt)
        results.extend(torch.stack(new, dim=1).tolist())
    return results
