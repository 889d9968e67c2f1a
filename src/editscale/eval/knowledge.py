"""Does the model know a record's fact? The probability test of docs/protocol.md §8.2, before any edit.

A prompt counts as known when the true object is likelier than the counterfactual new one under
the mean per-token NLL of docs/protocol.md §8.1 (the same comparison ES/PS/NS use after an edit).
"""

from __future__ import annotations

from collections.abc import Sequence

from editscale.data.records import EditRecord
from editscale.eval.scoring import ContinuationScore, score_continuations
from editscale.models.adapter import ModelAdapter

# prompt groups of a record, in the order they are reported
GROUPS = ("rewrite", "paraphrase", "neighborhood", "unseen")


def record_prompts(r: EditRecord) -> dict[str, list[str]]:
    return {"rewrite": [r.rewrite_prompt], "paraphrase": list(r.paraphrase_prompts),
            "neighborhood": list(r.neighborhood_prompts),
            "unseen": list(r.extra.get("unseen_prompts", []))}


Row = tuple[list[int], list[int]]  # (prefix ids, target ids)


def prompt_target_rows(adapter: ModelAdapter, prompts: Sequence[str], targets: Sequence[str], *,
                       batch_size: int = 128) -> list[Row]:
    """Token ids of `prompt + " " + target` rows, split into prefix and target (the adapter's rule)."""
    rows: list[Row] = []
    for start in range(0, len(prompts), batch_size):
        batch = adapter.prompt_target_batch(prompts[start:start + batch_size], targets[start:start + batch_size])
        ids = batch.input_ids.tolist()
        rows.extend((ids[i][: batch.prefix_lens[i]], list(batch.target_ids[i])) for i in range(len(batch.prefix_lens)))
    return rows


def score_rows(adapter: ModelAdapter, rows: Sequence[Row], *, batch_size: int = 128,
               in_order: bool = False) -> list[ContinuationScore]:
    """Score token rows (see `score_continuations` for the batching and `in_order`)."""
    return score_continuations(adapter.model, rows, pad_id=adapter.pad_token_id, batch_size=batch_size,
                               in_order=in_order)


def score_prompt_targets(adapter: ModelAdapter, prompts: Sequence[str], targets: Sequence[str], *,
                         batch_size: int = 128, in_order: bool = False) -> list[ContinuationScore]:
    """Score `target` after each prompt (docs/protocol.md §8.1): mean NLL and teacher-forced greedy match."""
    return score_rows(adapter, prompt_target_rows(adapter, prompts, targets, batch_size=batch_size),
                      batch_size=batch_size, in_order=in_order)


def score_prompt_pairs(adapter: ModelAdapter, prompts: Sequence[str], targets_a: Sequence[str],
                       targets_b: Sequence[str], *, batch_size: int = 128, in_order: bool = False
                       ) -> list[tuple[float, float]]:
    """Mean per-token NLL of target a and of target b after each prompt, batched."""
    n = len(prompts)
    scores = score_prompt_targets(adapter, [*prompts, *prompts], [*targets_a, *targets_b], batch_size=batch_size,
                                  in_order=in_order)
    return [(scores[i].mean_nll, scores[n + i].mean_nll) for i in range(n)]


def knowledge_scores(adapter: ModelAdapter, records: Sequence[EditRecord], *, batch_size: int = 128
                     ) -> dict[str, float]:
    """Fraction of prompts, per group, on which the true object beats the record's new object."""
    groups, prompts, trues, news = [], [], [], []
    for r in records:
        for g, ps in record_prompts(r).items():
            for p in ps:
                groups.append(g)
                prompts.append(p)
                trues.append(r.target_true)
                news.append(r.target_new)
    pairs = score_prompt_pairs(adapter, prompts, trues, news, batch_size=batch_size)
    hits: dict[str, list[bool]] = {g: [] for g in GROUPS}
    for g, (nll_true, nll_new) in zip(groups, pairs):
        hits[g].append(nll_true < nll_new)
    out: dict[str, float] = {"n_records": float(len(records))}
    for g in GROUPS:
        if hits[g]:
            out[f"known_{g}"] = sum(hits[g]) / len(hits[g])
            out[f"n_{g}_prompts"] = float(len(hits[g]))
    return out
