"""The gradual and the catastrophic phase of a run, and the disabling edits (paper §3.4).

The paper finds disabling edits by eye: the edit where the distance curve jumps and forgetting
and ES collapse. Here the same reading is a rule with its thresholds as parameters:

- a *disabling candidate* is an edit whose single update is at least `jump_factor` times the
  median size of the updates before it (after `warmup` edits), i.e. a jump in the drift curve;
- the *collapse* is the first candidate after which the model is broken: the mean ES of the next
  `window` edits is below `es_floor`, or recall of never-edited control facts at the next
  forgetting checkpoint has fallen below `control_floor` times its first value.

Edits before the collapse form the gradual phase, the rest the catastrophic one.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Phases:
    collapse_index: int | None  # edit index of the disabling edit that starts the catastrophic phase
    candidates: list[int] = field(default_factory=list)  # every drift jump, collapsing or not
    gradual: tuple[int, int] = (0, 0)  # [start, end) edit indices
    catastrophic: tuple[int, int] | None = None
    reason: str = ""


def _update_size(row: dict[str, Any]) -> float | None:
    d = row.get("diagnostics") or {}
    v = d.get("update_norm")
    if v is None:
        # methods without an update_norm diagnostic: the drift curve's own step
        return None
    return float(v)


def find_phases(edits: Sequence[dict[str, Any]], forgetting: Sequence[dict[str, Any]] = (), *,
                jump_factor: float = 10.0, warmup: int = 10, window: int = 10, es_floor: float = 0.5,
                control_floor: float = 0.5) -> Phases:
    rows = [r for r in edits if r.get("status") == "ok"]
    n = (rows[-1]["index"] + 1) if rows else 0
    sizes: list[float] = []
    prev_fro: float | None = None
    candidates = []
    for r in rows:
        size = _update_size(r)
        fro = max(d["fro"] for d in r["drift"].values())
        if size is None:
            size = abs(fro - prev_fro) if prev_fro is not None else fro
        prev_fro = fro
        if len(sizes) >= warmup and size >= jump_factor * statistics.median(sizes):
            candidates.append(r["index"])
        sizes.append(size)
    control0 = next((f["control_known_pct"] for f in forgetting if f.get("control_known_pct") is not None), None)
    by_index = {r["index"]: r for r in rows}
    for c in candidates:
        after = [by_index[i]["es"] for i in range(c + 1, c + 1 + window) if i in by_index]
        if after and statistics.mean(after) < es_floor:
            return Phases(c, candidates, (0, c), (c, n), f"mean ES of the next {len(after)} edits "
                                                           f"{statistics.mean(after):.2f} < {es_floor}")
        nxt = next((f for f in forgetting if f["edits_done"] > c and f.get("control_known_pct") is not None), None)
        if control0 and nxt and nxt["control_known_pct"] < control_floor * control0:
            return Phases(c, candidates, (0, c), (c, n), f"control recall {nxt['control_known_pct']:.0f}% < "
                                                           f"{control_floor:.0%} of {control0:.0f}%")
    return Phases(None, candidates, (0, n), None, "no drift jump followed by a collapse")
