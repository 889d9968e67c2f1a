"""The gradual and the catastrophic phase of a run, and its disabling-edit candidates (paper §3.4).

The paper finds disabling edits by eye: the edit where the distance curve jumps and forgetting
and ES collapse. Here the same reading is a rule whose thresholds are the fields of `PhaseRule`:

- a *disabling candidate* is an update at least `jump_factor` times the median size of the
  `baseline_window` updates before it (after `warmup` updates): a jump in the distance curve. A
  trailing window, not the whole history: updates that grow steadily as the layer drifts (MEMIT's
  do, by orders of magnitude) would otherwise all pass for jumps. The size is the
  editor's `update_norm` diagnostic (||ΔW||_F, over all edited layers), or the step of the
  distance curve for a method that does not report one;
- the *collapse* is the first candidate after which the model is broken: the mean ES of the
  edits of the next `window` updates is below `es_floor`, or recall of never-edited control facts
  at the next forgetting checkpoint is below `control_floor` times its first value.

Edits before the collapse form the gradual phase, the rest the catastrophic one. A batched run is
read per batch: an update is a batch, and a candidate is a batch. `analyze` adds, for every
candidate, what the paper looks at around it (docs/protocol.md §8.7), and `milestones`: when ES,
control recall, downstream F1 and the health probe's loss first fell past a floor, which dates a
decline that has no single disabling edit.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from editscale.run.summary import updates

if TYPE_CHECKING:  # the CLI builds its options from PhaseRule without loading the results store
    from editscale.analysis.rundata import RunData


class PhaseRule(BaseModel):
    """The thresholds of the phase rule; the defaults are the ones the documentation quotes."""

    model_config = ConfigDict(extra="forbid")

    jump_factor: float = Field(10.0, gt=1, description="An update is a disabling candidate when it is at least "
                                                        "this many times the median of the updates before it.")
    warmup: int = Field(10, ge=1, description="Updates (edits, or batches) seen before any can be a candidate.")
    baseline_window: int = Field(50, ge=0, description="The median is taken over this many updates before the "
                                                       "candidate (0: all of them), so steady growth is no jump.")
    window: int = Field(10, ge=1, description="Updates after a candidate whose edits' mean ES decides a collapse.")
    es_floor: float = Field(0.5, ge=0, le=1, description="Mean ES below this after a candidate: a collapse.")
    control_floor: float = Field(0.5, ge=0, le=1, description="Control-fact recall below this share of its "
                                                              "first value after a candidate: a collapse.")


@dataclass
class Phases:
    collapse_index: int | None  # first edit of the update that starts the catastrophic phase
    candidates: list[int] = field(default_factory=list)  # first edit index of every jump, collapsing or not
    gradual: tuple[int, int] = (0, 0)  # [start, end) edit indices
    catastrophic: tuple[int, int] | None = None
    reason: str = ""


def max_distance(row: dict[str, Any], key: str = "dist") -> float:
    return max(d[key] for d in row["drift"].values())


def update_sizes(units: Sequence[Sequence[dict[str, Any]]]) -> list[float]:
    sizes, prev = [], None
    for unit in units:
        d = unit[0].get("diagnostics") or {}
        fro = max_distance(unit[0], "fro")
        size = d.get("update_norm")
        if size is None:  # no diagnostic: the distance curve's own step
            size = abs(fro - prev) if prev is not None else fro
        prev = fro
        sizes.append(float(size))
    return sizes


def _before(sizes: Sequence[float], u: int, rule: PhaseRule) -> Sequence[float]:
    return sizes[max(0, u - rule.baseline_window):u] if rule.baseline_window else sizes[:u]


def find_phases(edits: Sequence[dict[str, Any]], forgetting: Sequence[dict[str, Any]] = (),
                rule: PhaseRule | None = None) -> Phases:
    units = updates(edits)
    return _phases(units, update_sizes(units), forgetting, rule or PhaseRule())


def _phases(units: Sequence[Sequence[dict[str, Any]]], sizes: Sequence[float], forgetting: Sequence[dict[str, Any]],
            rule: PhaseRule) -> Phases:
    n = (units[-1][-1]["index"] + 1) if units else 0
    cand_units = [u for u in range(rule.warmup, len(units))
                  if sizes[u] >= rule.jump_factor * statistics.median(_before(sizes, u, rule))]
    candidates = [units[u][0]["index"] for u in cand_units]
    control0 = next((f["control_known_pct"] for f in forgetting if f.get("control_known_pct") is not None), None)
    for u in cand_units:
        c = units[u][0]["index"]
        after = [r["es"] for unit in units[u + 1:u + 1 + rule.window] for r in unit]
        if after and statistics.mean(after) < rule.es_floor:
            return Phases(c, candidates, (0, c), (c, n), f"mean ES of the next {len(after)} edits "
                                                           f"{statistics.mean(after):.2f} < {rule.es_floor}")
        end = units[u][-1]["index"] + 1
        nxt = next((f for f in forgetting if f["edits_done"] >= end and f.get("control_known_pct") is not None), None)
        if control0 and nxt and nxt["control_known_pct"] < rule.control_floor * control0:
            return Phases(c, candidates, (0, c), (c, n), f"control recall {nxt['control_known_pct']:.0f}% < "
                                                           f"{rule.control_floor:.0%} of {control0:.0f}%")
    return Phases(None, candidates, (0, n), None, "no jump in the update size followed by a collapse")


def _around(rows: Sequence[dict[str, Any]], start: int, end: int) -> tuple[dict[str, Any] | None,
                                                                          dict[str, Any] | None]:
    """The last checkpoint row before the update [start, end) and the first one after it."""
    before = next((r for r in reversed(rows) if r["edits_done"] <= start), None)
    after = next((r for r in rows if r["edits_done"] >= end), None)
    return before, after


def _f1(row: dict[str, Any] | None) -> dict[str, float] | None:
    return None if row is None else {k: v["f1"] for k, v in row["tasks"].items()}


def _first(rows: Sequence[dict[str, Any]], broken: Any) -> int | None:
    return next((r["edits_done"] for r in rows if broken(r)), None)


def milestones(run: RunData, rule: PhaseRule) -> dict[str, int | None]:
    """When each measure first fell past the rule's floors, in edits done (None: never). A model
    can decline without a single jump (no collapse point), and these say how fast it went."""
    f1_0 = [statistics.mean(t["f1"] for t in r["tasks"].values()) for r in run.downstream[:1] if r["tasks"]]
    control0 = next((f["control_known_pct"] for f in run.forgetting if f.get("control_known_pct") is not None), None)
    nll0 = run.health[0]["text_nll"] if run.health else None
    es = [r for r in run.ok_edits if r.get("es_w50") is not None]
    return {
        "es_w50_below_floor": next((r["index"] + 1 for r in es if r["es_w50"] < rule.es_floor), None),
        "control_below_floor": _first(run.forgetting, lambda f: control0 and f.get("control_known_pct") is not None
                                      and f["control_known_pct"] < rule.control_floor * control0),
        "f1_below_half": _first(run.downstream, lambda d: f1_0 and f1_0[0] > 0 and d["tasks"] and statistics.mean(
            t["f1"] for t in d["tasks"].values()) < 0.5 * f1_0[0]),
        "text_nll_up_1": _first(run.health, lambda h: nll0 is not None and h["text_nll"] >= nll0 + 1.0),
    }


LASTING_ES, LASTING_CONTROL = 0.9, 90.0


def lasting_edits(run: RunData, *, es_floor: float = LASTING_ES, control_floor: float = LASTING_CONTROL
                  ) -> tuple[int, bool]:
    """How many edits a run lasted: the edits done at the last checkpoint up to which, at every
    checkpoint, the ES of the last 50 edits was at least `es_floor` and the control facts' recall at
    least `control_floor` percent (they are chosen among the facts the unedited model knows, so
    their recall starts at 100%). Returns (edits, whether a checkpoint fell short); a run that
    never fell short lasted its whole length."""
    es = [r for r in run.ok_edits if r.get("es_w50") is not None]
    lasted = 0
    for f in run.forgetting:
        done = f["edits_done"]
        before = [r["es_w50"] for r in es if r["index"] < done]
        control = f.get("control_known_pct")
        if (before and before[-1] < es_floor) or (control is not None and control < control_floor):
            return lasted, True
        lasted = done
    return max(lasted, run.edits_done), False


def analyze(run: RunData, rule: PhaseRule | None = None) -> dict[str, Any]:
    """The phases of a run and every disabling candidate with what surrounds it: its update size
    against the median before it, the distance before and after, ES of the following edits,
    control-fact recall, downstream F1 and the health probe's loss at the checkpoints around it."""
    rule = rule or PhaseRule()
    units = updates(run.edits)
    sizes = update_sizes(units)
    phases = _phases(units, sizes, run.forgetting, rule)
    first_of = {unit[0]["index"]: u for u, unit in enumerate(units)}
    cands = []
    for c in phases.candidates:
        u = first_of[c]
        unit = units[u]
        start, end = unit[0]["index"], unit[-1]["index"] + 1
        following = [r["es"] for nxt in units[u + 1:u + 1 + rule.window] for r in nxt]
        f_before, f_after = _around(run.forgetting, start, end)
        d_before, d_after = _around(run.downstream, start, end)
        h_before, h_after = _around(run.health, start, end)
        median = statistics.median(_before(sizes, u, rule))
        cands.append({
            "index": start, "batch": unit[0].get("batch"), "edits": [start, end],
            "case_ids": [r["case_id"] for r in unit], "subjects": [r["subject"] for r in unit],
            "target_new": [r["target_new"] for r in unit],
            "update_size": sizes[u], "median_before": median, "size_ratio": sizes[u] / median if median else None,
            "distance_before": max_distance(units[u - 1][-1]) if u else 0.0,
            "distance_after": max_distance(unit[-1]),
            "es": statistics.mean(r["es"] for r in unit),
            "es_following": statistics.mean(following) if following else None, "n_following": len(following),
            "control_before": f_before and f_before.get("control_known_pct"),
            "control_after": f_after and f_after.get("control_known_pct"),
            "checkpoints": {"forgetting": [f_before and f_before["edits_done"], f_after and f_after["edits_done"]],
                            "downstream": [d_before and d_before["edits_done"], d_after and d_after["edits_done"]]},
            "f1_before": _f1(d_before), "f1_after": _f1(d_after),
            "text_nll_before": h_before and h_before.get("text_nll"),
            "text_nll_after": h_after and h_after.get("text_nll"),
            "collapse": start == phases.collapse_index,
        })
    return {
        "run": str(run.path), "method": run.config.method, "model": run.config.model,
        "sample": run.config.sample, "batch_size": run.batch_size, "unit": "batch" if run.batch_size > 1 else "edit",
        "edits_done": run.edits_done, "finished": run.finished, "rule": rule.model_dump(),
        **{k: v for k, v in asdict(phases).items() if k != "candidates"},
        "candidates": cands,
        "milestones": milestones(run, rule),
    }
