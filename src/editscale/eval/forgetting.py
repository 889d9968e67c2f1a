"""Forgetting of earlier edits, checked inline every k edits (no model checkpoints; docs/protocol.md §8.4).

Two criteria are tracked side by side from the same scoring pass:

- paper: eligible facts are those whose edit succeeded by greedy exact match of target_new on the
  rewrite prompt; a fact counts as forgotten at the first checkpoint where that match fails, and is
  never re-tested (sticky), exactly as `evaluate_history.py` + `fact_forgetting.py`. The reported
  percentage at n edits is 100·#forgotten / #successful edits among the first n.
- probability: eligible facts are those with ES = 1 right after their edit; every checkpoint
  re-tests all of them (NLL_new < NLL_true), so facts that come back are seen.

A control set of facts the model knew before the run and that are never edited is scored at the
same checkpoints: knowledge nobody touched, which the paper's per-edit NS does not follow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from editscale.data.records import EditRecord
from editscale.eval.knowledge import score_prompt_targets
from editscale.models.adapter import ModelAdapter


@dataclass
class ForgettingTracker:
    records: dict[int, EditRecord] = field(default_factory=dict)  # case_id -> record, edit order
    paper_ok: dict[int, bool] = field(default_factory=dict)  # succeeded at edit time (greedy)
    prob_ok: dict[int, bool] = field(default_factory=dict)  # succeeded at edit time (ES)
    paper_forgotten: dict[int, int] = field(default_factory=dict)  # case_id -> edits done when forgotten
    prob_forgotten: set[int] = field(default_factory=set)  # forgotten at the last checkpoint
    control: list[EditRecord] = field(default_factory=list)

    def add(self, record: EditRecord, *, greedy_success: bool, es_success: bool) -> None:
        self.records[record.case_id] = record
        self.paper_ok[record.case_id] = bool(greedy_success)
        self.prob_ok[record.case_id] = bool(es_success)

    def check(self, adapter: ModelAdapter, edits_done: int, *, batch_size: int = 256) -> dict[str, Any]:
        t0 = time.perf_counter()
        paper_test = [c for c, ok in self.paper_ok.items() if ok and c not in self.paper_forgotten]
        prob_test = [c for c, ok in self.prob_ok.items() if ok]
        testing = set(paper_test) | set(prob_test)
        recs = [r for c, r in self.records.items() if c in testing]  # in edit order
        new_scores = true_scores = []
        if recs:
            prompts = [r.rewrite_prompt for r in recs]
            scores = score_prompt_targets(adapter, prompts + prompts, [r.target_new for r in recs] +
                                          [r.target_true for r in recs], batch_size=batch_size)
            new_scores, true_scores = scores[: len(recs)], scores[len(recs):]
        newly, now_forgotten = [], set()
        for r, s_new, s_true in zip(recs, new_scores, true_scores):
            if r.case_id in paper_test and not s_new.greedy_match:
                self.paper_forgotten[r.case_id] = edits_done
                newly.append(r.case_id)
            if r.case_id in prob_test and not s_new.mean_nll < s_true.mean_nll:
                now_forgotten.add(r.case_id)
        came_back = sorted(self.prob_forgotten - now_forgotten)
        self.prob_forgotten = now_forgotten
        n_paper = sum(self.paper_ok.values())
        n_prob = sum(self.prob_ok.values())
        row: dict[str, Any] = {
            "edits_done": edits_done,
            "paper_eligible": n_paper,
            "paper_forgotten": len(self.paper_forgotten),
            "paper_forgotten_pct": 100.0 * len(self.paper_forgotten) / n_paper if n_paper else 0.0,
            "paper_newly_forgotten": newly,
            "prob_eligible": n_prob,
            "prob_forgotten": len(now_forgotten),
            "prob_forgotten_pct": 100.0 * len(now_forgotten) / n_prob if n_prob else 0.0,
            "prob_forgotten_ids": sorted(now_forgotten),
            "prob_came_back": came_back,
        }
        row.update(self.check_control(adapter, batch_size=batch_size))
        row["seconds"] = round(time.perf_counter() - t0, 4)
        return row

    def check_control(self, adapter: ModelAdapter, *, batch_size: int = 256) -> dict[str, Any]:
        if not self.control:
            return {}
        known, greedy = _true_vs_new(adapter, self.control, batch_size)
        n = len(self.control)
        return {"control_n": n, "control_known_pct": 100.0 * sum(known) / n,
                "control_greedy_pct": 100.0 * sum(greedy) / n}

    # ---------------------------------------------------------------- resume support

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.records), "paper_ok": {str(k): v for k, v in self.paper_ok.items()},
                "prob_ok": {str(k): v for k, v in self.prob_ok.items()},
                "paper_forgotten": {str(k): v for k, v in self.paper_forgotten.items()},
                "prob_forgotten": sorted(self.prob_forgotten)}

    def load_state_dict(self, state: dict[str, Any], by_case_id: dict[int, EditRecord]) -> None:
        self.records = {int(c): by_case_id[int(c)] for c in state["order"]}
        self.paper_ok = {int(k): bool(v) for k, v in state["paper_ok"].items()}
        self.prob_ok = {int(k): bool(v) for k, v in state["prob_ok"].items()}
        self.paper_forgotten = {int(k): int(v) for k, v in state["paper_forgotten"].items()}
        self.prob_forgotten = {int(c) for c in state["prob_forgotten"]}


def _true_vs_new(adapter: ModelAdapter, records: Sequence[EditRecord], batch_size: int
                 ) -> tuple[list[bool], list[bool]]:
    """Per record's rewrite prompt: is the true object likelier than the new one, and is it the greedy output."""
    prompts = [r.rewrite_prompt for r in records]
    scores = score_prompt_targets(adapter, prompts + prompts, [r.target_true for r in records] +
                                  [r.target_new for r in records], batch_size=batch_size)
    n = len(records)
    return ([scores[i].mean_nll < scores[n + i].mean_nll for i in range(n)],
            [scores[i].greedy_match for i in range(n)])


def select_control(adapter: ModelAdapter, candidates: Sequence[EditRecord], n: int, *,
                   batch_size: int = 256) -> list[EditRecord]:
    """The first `n` candidates whose true object the unedited model prefers on the rewrite prompt."""
    out: list[EditRecord] = []
    pool = list(candidates)
    while len(out) < n and pool:
        chunk, pool = pool[: 2 * (n - len(out))], pool[2 * (n - len(out)):]
        known, _ = _true_vs_new(adapter, chunk, batch_size)
        out.extend(r for r, k in zip(chunk, known) if k)
    return out[:n]
