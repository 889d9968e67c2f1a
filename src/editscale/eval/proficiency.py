"""Editing proficiency: ES, PS and NS of an edit, right after it (docs/protocol.md §8.1-8.3).

All prompts of all given records are scored in one batched pass (new and true target each), so a
batch of edits costs one or two forward passes, not one per prompt or per target token.

Locality of a zsRE record (``extra["ns"] == "agreement"``) is scored as the field scores it
(MEND, EasyEdit): the neighbourhood prompt is an unrelated question whose answer is the model's own,
so NS is the share of the answer's tokens whose teacher-forced argmax is the same after the edit
as before it (docs/protocol.md §8.2). The tokens before the edit come from `locality_answers`,
called on the model before the update is applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from editscale.data.records import NS_AGREEMENT, EditRecord
from editscale.eval.knowledge import score_prompt_targets
from editscale.models.adapter import ModelAdapter

# case_id -> the argmax tokens of the locality answer after each neighbourhood prompt
LocalityAnswers = Mapping[int, Sequence[Sequence[int]]]


@dataclass
class EditScores:
    es: float  # rewrite prompt: NLL(new) < NLL(true)
    ps: float  # fraction of paraphrase prompts with NLL(new) < NLL(true)
    ns: float  # neighbourhood prompts with NLL(new) > NLL(true) (strict, as the reference); zsRE: token agreement
    rewrite_correct: bool  # greedy exact match of every token of target_new on the rewrite prompt
    nll_new: float  # rewrite prompt, mean per-token NLL
    nll_true: float

    def as_row(self) -> dict[str, float | bool]:
        return {"es": self.es, "ps": self.ps, "ns": self.ns, "rewrite_correct": self.rewrite_correct,
                "nll_new": round(self.nll_new, 5), "nll_true": round(self.nll_true, 5)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def by_agreement(record: EditRecord) -> bool:
    return record.extra.get("ns") == NS_AGREEMENT and bool(record.extra.get("neighborhood_target"))


def _locality_rows(records: Sequence[EditRecord]) -> tuple[list[str], list[str], list[int]]:
    prompts, targets, owner = [], [], []
    for i, r in enumerate(records):
        if by_agreement(r):
            prompts.extend(r.neighborhood_prompts)
            targets.extend([r.extra["neighborhood_target"]] * len(r.neighborhood_prompts))
            owner.extend([i] * len(r.neighborhood_prompts))
    return prompts, targets, owner


def locality_answers(adapter: ModelAdapter, records: Sequence[EditRecord], *, batch_size: int = 128
                     ) -> dict[int, list[tuple[int, ...]]]:
    """The model's answer tokens on the locality prompts of the records scored by agreement (none
    for CounterFact-style records): call it before the edit and give the result to `edit_scores`."""
    prompts, targets, owner = _locality_rows(records)
    out: dict[int, list[tuple[int, ...]]] = {}
    if prompts:
        for i, s in zip(owner, score_prompt_targets(adapter, prompts, targets, batch_size=batch_size)):
            out.setdefault(records[i].case_id, []).append(s.argmax_ids)
    return out


def edit_scores(adapter: ModelAdapter, records: Sequence[EditRecord], *, batch_size: int = 128,
                before: LocalityAnswers | None = None) -> list[EditScores]:
    """ES, PS and NS of each record on the model as it is. `before`: `locality_answers` of the
    records taken before the edit, needed when a record's NS is scored by agreement."""
    prompts, groups, owner = [], [], []
    for i, r in enumerate(records):
        neighbours = () if by_agreement(r) else r.neighborhood_prompts
        for group, ps in (("rewrite", [r.rewrite_prompt]), ("paraphrase", r.paraphrase_prompts),
                          ("neighborhood", neighbours)):
            prompts.extend(ps)
            groups.extend([group] * len(ps))
            owner.extend([i] * len(ps))
    loc_prompts, loc_targets, loc_owner = _locality_rows(records)
    missing = sorted({records[i].case_id for i in loc_owner} - set(before or {}))
    if missing:
        raise ValueError(f"records {missing[:5]} score NS by agreement with the answer before the edit: "
                         "pass before=locality_answers(...) taken before the edit")
    news = [records[i].target_new for i in owner]
    trues = [records[i].target_true for i in owner]
    n = len(prompts)
    scores = score_prompt_targets(adapter, [*prompts, *prompts, *loc_prompts], [*news, *trues, *loc_targets],
                                  batch_size=batch_size)
    per: list[dict[str, list[float]]] = [{"rewrite": [], "paraphrase": [], "neighborhood": []} for _ in records]
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
    seen: dict[int, int] = {}
    for i, s in zip(loc_owner, scores[2 * n:]):
        j = seen[i] = seen.get(i, -1) + 1
        ref = before[records[i].case_id][j]  # type: ignore[index]
        per[i]["neighborhood"].append(_mean([float(a == b) for a, b in zip(s.argmax_ids, ref, strict=True)]))
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
