"""Editing proficiency: ES, PS and NS of an edit, right after it (docs/protocol.md §8.1-8.3).

All prompts of all given records are scored in one batched pass (new and true target each), so a
batch of edits costs one or two forward passes, not one per prompt or per target token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from editscale.data.records import EditRecord
from editscale.eval.knowledge import score_prompt_targets
from editscale.models.adapter import ModelAdapter


@dataclass
class EditScores:
    es: float  # rewrite prompt: NLL(new) < NLL(true)
    ps: float  # fraction of paraphrase prompts with NLL(new) < NLL(true)
    ns: float  # fraction of neighborhood prompts with NLL(new) > NLL(true) (strict, as the reference)
    rewrite_correct: bool  # greedy exact match of every token of target_new on the rewrite prompt
    nll_new: float  # rewrite prompt, mean per-token NLL
    nll_true: float

    def as_row(self) -> dict[str, float | bool]:
        return {"es": self.es, "ps": self.ps, "ns": self.ns, "rewrite_correct": self.rewrite_correct,
                "nll_new": round(self.nll_new, 5), "nll_true": round(self.nll_true, 5)}


def _mean(xs: Sequence[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def edit_scores(adapter: ModelAdapter, records: Sequence[EditRecord], *, batch_size: int = 128) -> list[EditScores]:
    prompts, groups, owner = [], [], []
    for i, r in enumerate(records):
        for group, ps in (("rewrite", [r.rewrite_prompt]), ("paraphrase", r.paraphrase_prompts),
                          ("neighborhood", r.neighborhood_prompts)):
            prompts.extend(ps)
            groups.extend([group] * len(ps))
            owner.extend([i] * len(ps))
    news = [records[i].target_new for i in owner]
    trues = [records[i].target_true for i in owner]
    n = len(prompts)
    scores = score_prompt_targets(adapter, [*prompts, *prompts], [*news, *trues], batch_size=batch_size)
    per: list[dict[str, list[bool]]] = [{"rewrite": [], "paraphrase": [], "neighborhood": []} for _ in records]
    out_rewrite: dict[int, tuple[bool, float, float]] = {}
    for k in range(n):
        s_new, s_true = scores[k], scores[n + k]
        i, group = owner[k], groups[k]
        if group == "neighborhood":
            per[i][group].append(s_new.mean_nll > s_true.mean_nll)
        else:
            per[i][group].append(s_new.mean_nll < s_true.mean_nll)
        if group == "rewrite":
            out_rewrite[i] = (s_new.greedy_match, s_new.mean_nll, s_true.mean_nll)
    return [EditScores(es=_mean(p["rewrite"]), ps=_mean(p["paraphrase"]), ns=_mean(p["neighborhood"]),
                       rewrite_correct=out_rewrite[i][0], nll_new=out_rewrite[i][1], nll_true=out_rewrite[i][2])
            for i, p in enumerate(per)]


def window_means(values: Sequence[float], window: int) -> float:
    """Mean of the last `window` values (fewer at the start of a run)."""
    tail = [v for v in values[-window:] if v == v]  # NaN-safe: records without paraphrases
    return sum(tail) / len(tail) if tail else float("nan")


def paper_blocks(values: Sequence[float], bucket: int = 5, window: int = 10) -> tuple[list[float], list[float]]:
    """The paper's curves (docs/protocol.md §8.3): 100·mean over non-overlapping blocks of 5 edits (a trailing
    partial block dropped), and their trailing moving average over 10 blocks (about 50 edits)."""
    blocks = [100.0 * sum(values[b * bucket:(b + 1) * bucket]) / bucket for b in range(len(values) // bucket)]
    smooth = [sum(blocks[max(0, b - window + 1):b + 1]) / len(blocks[max(0, b - window + 1):b + 1])
              for b in range(len(blocks))]
    return blocks, smooth
