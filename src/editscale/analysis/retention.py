"""Forgetting read from the status strings of the forgetting rows (docs/protocol.md §8.4).

The paper's text reports the share of *successful* edits forgotten, a fact staying forgotten once
its greedy match failed (the `paper_forgotten_pct` of the rows). Its code
(`experiments/evaluate_history.py`) re-evaluates every earlier edit at each checkpoint, failed edits
included. Each forgetting row holds every earlier edit's current status under each criterion, so
both readings come from the same rows:

- `<criterion>_failing_pct`: share of the earlier edits re-tested at the checkpoint that fail now
  (every earlier edit, as the code evaluates them);
- `<criterion>_forgotten_pct`: share of the earlier edits that succeeded right after their edit and
  fail now (re-tested, not sticky: an edit that comes back counts as held);
- `text_pct`: the paper text's measure, as the row reports it.

Criteria: `greedy` (greedy exact match of target_new on the rewrite prompt, the paper's), `prob`
(NLL_new < NLL_true, ES), `gen` (the generated answer matches, eval/generation.py; only in runs
that generated). "Succeeded right after the edit" is the edit row's `rewrite_correct`, `es == 1`
and `gen_es == 1`. Under `--forgetting-sample` the counts are over the edits re-tested at that
checkpoint: the subset and the last interval's edits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

CRITERIA = {"greedy": "status_greedy", "prob": "status_prob", "gen": "status_gen"}
HOLDS, FAILS = "y", "n"  # eval/forgetting.py's characters; imported from there, this module would load torch


def _at_edit(row: dict[str, Any], criterion: str) -> bool | None:
    if row.get("status") != "ok":
        return None
    if criterion == "greedy":
        return bool(row.get("rewrite_correct"))
    value = row.get("es" if criterion == "prob" else "gen_es")
    return None if value is None else value == 1.0


def _pct(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def forgetting_measures(forgetting: Iterable[dict[str, Any]], edits: Sequence[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """One dict per forgetting row that has status strings (rows of older runs have none): its
    `edits_done`, `text_pct` and, per criterion in the row, `<c>_tested`, `<c>_failing_pct` and
    `<c>_forgotten_pct` (None when nothing was counted). Position i of a status string is edit i."""
    by_index = {int(r["index"]): r for r in edits}
    out = []
    for f in forgetting:
        if not any(key in f for key in CRITERIA.values()):
            continue
        m: dict[str, Any] = {"edits_done": f["edits_done"], "text_pct": f.get("paper_forgotten_pct")}
        for criterion, key in CRITERIA.items():
            status = f.get(key)
            if status is None:
                continue
            tested = failing = ok_then = lost = 0
            for i, ch in enumerate(status):
                if ch not in (HOLDS, FAILS):
                    continue
                tested += 1
                failing += ch == FAILS
                edit = by_index.get(i)
                if edit is not None and _at_edit(edit, criterion):
                    ok_then += 1
                    lost += ch == FAILS
            m[f"{criterion}_tested"] = tested
            m[f"{criterion}_failing_pct"] = _pct(failing, tested)
            m[f"{criterion}_forgotten_pct"] = _pct(lost, ok_then)
        out.append(m)
    return out


def last_measures(forgetting: Sequence[dict[str, Any]], edits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`forgetting_measures` of the last forgetting row (empty when it has no status strings)."""
    measures = forgetting_measures(forgetting[-1:], edits)
    return measures[0] if measures else {}
