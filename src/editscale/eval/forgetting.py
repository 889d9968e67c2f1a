"""Forgetting of earlier edits, checked inline every k edits (no model checkpoints; docs/protocol.md §8.4).

Every check re-tests every earlier edit on its rewrite prompt (one teacher-forced scoring pass, and
one batched greedy generation when `generate` is set) and reads off its current status under each
criterion. The headline percentages keep these criteria side by side:

- paper: eligible facts are those whose edit succeeded by greedy exact match of target_new on the
  rewrite prompt; a fact counts as forgotten at the first checkpoint where that match fails, and
  stays forgotten (sticky), exactly as `evaluate_history.py` + `fact_forgetting.py`. The reported
  percentage at n edits is 100·#forgotten / #successful edits among the first n.
- probability: eligible facts are those with ES = 1 right after their edit, counted as forgotten
  while NLL_new >= NLL_true, so facts that come back are seen.
- generation (with `generate`): eligible facts are those whose generated answer matched right
  after their edit (eval/generation.py), counted as forgotten while it no longer does.

Each row also carries every earlier edit's current status as one character per edit, by edit index
(`status_greedy`, `status_prob`, `status_gen`): "y" holds, "n" fails, "." not re-tested at this check
(outside the `sample` subset), "_" never applied (its update was non-finite and skipped). The
reference code (`evaluate_history.py`) re-evaluates every edited record, failed edits included, so
its measure (share of earlier edits that fail now) is computable beside the paper text's (share of
successful edits forgotten): `analysis/retention.py`. A character per edit keeps a row of a
10,000-edit run at about 30 kB.

A control set of facts the model knew before the run and that are never edited is scored at the
same checkpoints: knowledge nobody touched, which the paper's per-edit NS does not follow.

Each edit's rows are tokenised once, when it is first checked, and scored in batches of similar
length. For runs where even that is too dear (10,000 edits checked every 10), `sample=K` re-tests a
fixed seeded subset of K of the run's planned edits plus every edit made since the last checkpoint;
the percentages are then over the subset, and the row says so (`sampled`, `sample_size`, `tested`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from editscale.data.records import EditRecord
from editscale.eval.generation import generate_answers, judge, prompt_ids
from editscale.eval.knowledge import Row, prompt_target_rows, score_rows
from editscale.models.adapter import ModelAdapter

# Characters of the status strings. Letters, not 1/0: a string of digits is read back as a number
# from a CSV export or by a spreadsheet.
HOLDS, FAILS, UNTESTED, NOT_APPLIED = "y", "n", ".", "_"


@dataclass
class ForgettingTracker:
    records: dict[int, EditRecord] = field(default_factory=dict)  # case_id -> record, edit order
    paper_ok: dict[int, bool] = field(default_factory=dict)  # succeeded at edit time (greedy)
    prob_ok: dict[int, bool] = field(default_factory=dict)  # succeeded at edit time (ES)
    gen_ok: dict[int, bool] = field(default_factory=dict)  # answer generated at edit time (when measured)
    paper_forgotten: dict[int, int] = field(default_factory=dict)  # case_id -> edits done when forgotten
    prob_forgotten: set[int] = field(default_factory=set)  # forgotten at the last checkpoint
    control: list[EditRecord] = field(default_factory=list)
    sample: int | None = None  # re-test this many of the planned edits (plus the last interval's); None: all
    planned: int = 0  # the run's number of edits: the subset is drawn from their indices
    seed: int = 0
    generate: bool = False  # also generate each re-tested edit's answer (eval/generation.py)
    checked_upto: int = 0  # edits added before the last checkpoint
    _rows: dict[int, tuple[Row, Row]] = field(default_factory=dict, repr=False)  # case_id -> (new, true) rows
    _prompt_ids: dict[int, list[int]] = field(default_factory=dict, repr=False)  # case_id -> rewrite prompt ids
    _control_rows: list[Row] = field(default_factory=list, repr=False)

    def add(self, record: EditRecord, *, greedy_success: bool, es_success: bool,
            gen_success: bool | None = None) -> None:
        self.records[record.case_id] = record
        self.paper_ok[record.case_id] = bool(greedy_success)
        self.prob_ok[record.case_id] = bool(es_success)
        if gen_success is not None:
            self.gen_ok[record.case_id] = bool(gen_success)

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

    def _generated(self, adapter: ModelAdapter, cases: Sequence[int]) -> dict[int, bool]:
        """Whether each case's rewrite prompt still generates its new object (normalised match)."""
        todo = [c for c in cases if c not in self._prompt_ids]
        for c, ids in zip(todo, prompt_ids(adapter, [self.records[c].rewrite_prompt for c in todo]), strict=True):
            self._prompt_ids[c] = ids
        answers = generate_answers(adapter, [self._prompt_ids[c] for c in cases])
        return {c: judge(a, self.records[c].target_new)[1] for c, a in zip(cases, answers, strict=True)}

    def check(self, adapter: ModelAdapter, edits_done: int, *, batch_size: int = 256,
              skipped: Sequence[int] = ()) -> dict[str, Any]:
        """One checkpoint's row. `skipped`: the run's edit indices whose update was never applied, so
        that the status strings are indexed by edit index."""
        t0 = time.perf_counter()
        subset = self._subset()
        order = list(self.records)
        counted = [c for i, c in enumerate(order) if subset is None or i in subset]
        tested_set = set(counted) | set(order[self.checked_upto:])
        tested = [c for c in order if c in tested_set]
        scored = self._scored(adapter, tested, batch_size) if tested else {}
        greedy = {c: bool(scored[c][0].greedy_match) for c in tested}
        prob = {c: scored[c][0].mean_nll < scored[c][1].mean_nll for c in tested}
        gen = self._generated(adapter, tested) if self.generate and tested else None
        newly = []
        for c in tested:
            if self.paper_ok[c] and c not in self.paper_forgotten and not greedy[c]:
                self.paper_forgotten[c] = edits_done
                newly.append(c)
        prob_test = {c for c in tested if self.prob_ok[c]}
        now_forgotten = {c for c in prob_test if not prob[c]}
        came_back = sorted((self.prob_forgotten - now_forgotten) & prob_test)
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
            "tested": len(tested),
        }
        if gen is not None:
            gen_eligible = [c for c in counted if self.gen_ok.get(c)]
            gen_lost = sum(not gen[c] for c in gen_eligible)
            row.update(gen_eligible=len(gen_eligible), gen_forgotten=gen_lost,
                       gen_forgotten_pct=100.0 * gen_lost / len(gen_eligible) if gen_eligible else 0.0,
                       gen_correct_pct=100.0 * sum(gen[c] for c in counted) / len(counted) if counted else 0.0)
        if subset is not None:
            row.update(sampled=True, sample_size=len(counted))
        row["status_greedy"] = _status(order, greedy, skipped)
        row["status_prob"] = _status(order, prob, skipped)
        if gen is not None:
            row["status_gen"] = _status(order, gen, skipped)
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
                "gen_ok": {str(k): v for k, v in self.gen_ok.items()},
                "paper_forgotten": {str(k): v for k, v in self.paper_forgotten.items()},
                "prob_forgotten": sorted(self.prob_forgotten), "checked_upto": self.checked_upto}

    def load_state_dict(self, state: dict[str, Any], by_case_id: dict[int, EditRecord]) -> None:
        self.records = {int(c): by_case_id[int(c)] for c in state["order"]}
        self.paper_ok = {int(k): bool(v) for k, v in state["paper_ok"].items()}
        self.prob_ok = {int(k): bool(v) for k, v in state["prob_ok"].items()}
        self.gen_ok = {int(k): bool(v) for k, v in state.get("gen_ok", {}).items()}
        self.paper_forgotten = {int(k): int(v) for k, v in state["paper_forgotten"].items()}
        self.prob_forgotten = {int(c) for c in state["prob_forgotten"]}
        # checkpoints written before `checked_upto` existed: every edit had been checked
        self.checked_upto = int(state.get("checked_upto", len(self.records)))


def _status(order: Sequence[int], now: dict[int, bool], skipped: Sequence[int]) -> str:
    """One character per edit in edit order (the tracker's `order` with the `skipped` edit indices
    put back as NOT_APPLIED): HOLDS / FAILS where re-tested now, UNTESTED elsewhere."""
    chars = [UNTESTED if c not in now else HOLDS if now[c] else FAILS for c in order]
    for i in sorted(skipped):
        if i <= len(chars):
            chars.insert(i, NOT_APPLIED)
    return "".join(chars)


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
