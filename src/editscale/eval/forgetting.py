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

A checkpoint costs one teacher-forced row per target per re-tested edit: each edit's rows are
tokenised once, when it is added, and scored in batches of similar length. For runs where even
that is too dear (10,000 edits checked every 10), `sample=K` re-tests a fixed seeded subset of K
of the run's planned edits plus every edit made since the last checkpoint; the percentages are
then over the subset, and the row says so (`sampled`, `sample_eligible`, `tested`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from editscale.data.records import EditRecord
from editscale.eval.knowledge import Row, prompt_target_rows, score_rows
from editscale.models.adapter import ModelAdapter


@dataclass
class ForgettingTracker:
    records: dict[int, EditRecord] = field(default_factory=dict)  # case_id -> record, edit order
    paper_ok: dict[int, bool] = field(default_factory=dict)  # succeeded at edit time (greedy)
    prob_ok: dict[int, bool] = field(default_factory=dict)  # succeeded at edit time (ES)
    paper_forgotten: dict[int, int] = field(default_factory=dict)  # case_id -> edits done when forgotten
    prob_forgotten: set[int] = field(default_factory=set)  # forgotten at the last checkpoint
    control: list[EditRecord] = field(default_factory=list)
    sample: int | None = None  # re-test this many of the planned edits (plus the last interval's); None: all
    planned: int = 0  # the run's number of edits: the subset is drawn from their indices
    seed: int = 0
    checked_upto: int = 0  # edits added before the last checkpoint
    _rows: dict[int, tuple[Row, Row]] = field(default_factory=dict, repr=False)  # case_id -> (new, true) rows
    _control_rows: list[Row] = field(default_factory=list, repr=False)

    def add(self, record: EditRecord, *, greedy_success: bool, es_success: bool) -> None:
        self.records[record.case_id] = record
        self.paper_ok[record.case_id] = bool(greedy_success)
        self.prob_ok[record.case_id] = bool(es_success)

    def _subset(self) -> set[int] | None:
        """Edit indices always re-tested under `sample` (None: every edit is)."""
        if self.sample is None:
            return None
        n = max(self.planned, len(self.records))
        return set(random.Random(self.seed).sample(range(n), min(self.sample, n)))

    def _scored(self, adapter: ModelAdapter, cases: Sequence[int], batch_size: int) -> dict[int, tuple[Any, Any]]:
        """(new-target score, true-target score) of each case's rewrite prompt; rows tokenised once."""
        todo = [c for c in cases if c not in self._rows]
        if todo:
            prompts = [self.records[c].rewrite_prompt for c in todo]
            rows = prompt_target_rows(adapter, prompts + prompts, [self.records[c].target_new for c in todo] +
                                      [self.records[c].target_true for c in todo], batch_size=batch_size)
            for k, c in enumerate(todo):
                self._rows[c] = (rows[k], rows[len(todo) + k])
        flat = [row for c in cases for row in self._rows[c]]
        scores = score_rows(adapter, flat, batch_size=batch_size)
        return {c: (scores[2 * k], scores[2 * k + 1]) for k, c in enumerate(cases)}

    def check(self, adapter: ModelAdapter, edits_done: int, *, batch_size: int = 256) -> dict[str, Any]:
        t0 = time.perf_counter()
        subset = self._subset()
        order = list(self.records)
        counted = [c for i, c in enumerate(order) if subset is None or i in subset]
        tested = set(counted) | set(order[self.checked_upto:])
        paper_test = [c for c in order if c in tested and self.paper_ok[c] and c not in self.paper_forgotten]
        prob_test = [c for c in order if c in tested and self.prob_ok[c]]
        cases = list(dict.fromkeys(paper_test + prob_test))
        scored = self._scored(adapter, cases, batch_size) if cases else {}
        newly, now_forgotten = [], set()
        for c in cases:
            s_new, s_true = scored[c]
            if c in paper_test and not s_new.greedy_match:
                self.paper_forgotten[c] = edits_done
                newly.append(c)
            if c in prob_test and not s_new.mean_nll < s_true.mean_nll:
                now_forgotten.add(c)
        came_back = sorted((self.prob_forgotten - now_forgotten) & set(prob_test))
        self.prob_forgotten = now_forgotten
        self.checked_upto = len(order)
        # the percentages are over the edits every checkpoint re-tests: all of them, or the subset
        n_paper = sum(self.paper_ok[c] for c in counted)
        n_prob = sum(self.prob_ok[c] for c in counted)
        paper_lost = sum(c in self.paper_forgotten for c in counted)
        prob_lost = sum(c in now_forgotten for c in counted)
        row: dict[str, Any] = {
            "edits_done": edits_done,
            "paper_eligible": n_paper,
            "paper_forgotten": paper_lost,
            "paper_forgotten_pct": 100.0 * paper_lost / n_paper if n_paper else 0.0,
            "paper_newly_forgotten": newly,
            "prob_eligible": n_prob,
            "prob_forgotten": prob_lost,
            "prob_forgotten_pct": 100.0 * prob_lost / n_prob if n_prob else 0.0,
            "prob_forgotten_ids": sorted(now_forgotten),
            "prob_came_back": came_back,
            "tested": len(cases),
        }
        if subset is not None:
            row.update(sampled=True, sample_size=len(counted))
        row.update(self.check_control(adapter, batch_size=batch_size))
        row["seconds"] = round(time.perf_counter() - t0, 4)
        return row

    def check_control(self, adapter: ModelAdapter, *, batch_size: int = 256) -> dict[str, Any]:
        if not self.control:
            return {}
        if len(self._control_rows) != 2 * len(self.control):
            self._control_rows = _true_new_rows(adapter, self.control, batch_size)
        known, greedy = _true_vs_new(adapter, self._control_rows, batch_size)
        n = len(self.control)
        return {"control_n": n, "control_known_pct": 100.0 * sum(known) / n,
                "control_greedy_pct": 100.0 * sum(greedy) / n}

    # ---------------------------------------------------------------- resume support

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.records), "paper_ok": {str(k): v for k, v in self.paper_ok.items()},
                "prob_ok": {str(k): v for k, v in self.prob_ok.items()},
                "paper_forgotten": {str(k): v for k, v in self.paper_forgotten.items()},
                "prob_forgotten": sorted(self.prob_forgotten), "checked_upto": self.checked_upto}

    def load_state_dict(self, state: dict[str, Any], by_case_id: dict[int, EditRecord]) -> None:
        self.records = {int(c): by_case_id[int(c)] for c in state["order"]}
        self.paper_ok = {int(k): bool(v) for k, v in state["paper_ok"].items()}
        self.prob_ok = {int(k): bool(v) for k, v in state["prob_ok"].items()}
        self.paper_forgotten = {int(k): int(v) for k, v in state["paper_forgotten"].items()}
        self.prob_forgotten = {int(c) for c in state["prob_forgotten"]}
        # checkpoints written before `checked_upto` existed: every edit had been checked
        self.checked_upto = int(state.get("checked_upto", len(self.records)))


def _true_new_rows(adapter: ModelAdapter, records: Sequence[EditRecord], batch_size: int) -> list[Row]:
    """Each record's rewrite prompt with its true object, then each with its new object."""
    prompts = [r.rewrite_prompt for r in records]
    return prompt_target_rows(adapter, prompts + prompts, [r.target_true for r in records] +
                              [r.target_new for r in records], batch_size=batch_size)


def _true_vs_new(adapter: ModelAdapter, rows: Sequence[Row], batch_size: int) -> tuple[list[bool], list[bool]]:
    """Per record (rows of `_true_new_rows`): is the true object likelier than the new one, and is
    it the greedy output."""
    scores = score_rows(adapter, rows, batch_size=batch_size)
    n = len(rows) // 2
    return ([scores[i].mean_nll < scores[n + i].mean_nll for i in range(n)],
            [scores[i].greedy_match for i in range(n)])


def select_control(adapter: ModelAdapter, candidates: Sequence[EditRecord], n: int, *,
                   batch_size: int = 256) -> list[EditRecord]:
    """The first `n` candidates whose true object the unedited model prefers on the rewrite prompt."""
    out: list[EditRecord] = []
    pool = list(candidates)
    while len(out) < n and pool:
        chunk, pool = pool[: 2 * (n - len(out))], pool[2 * (n - len(out)):]
        known, _ = _true_vs_new(adapter, _true_new_rows(adapter, chunk, batch_size), batch_size)
        out.extend(r for r, k in zip(chunk, known) if k)
    return out[:n]
