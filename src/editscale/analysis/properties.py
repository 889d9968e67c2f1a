"""The paper's tables from runs: Table 2 (distance of disabling vs normal edits, from `retest`),
Table 3 (the properties of each method at scale) and Table 8 (what the model says before, around
and after the collapse).

Table 3 in the paper is qualitative ("High", "Long"); here every cell is the number it summarises,
computed from the runs given and averaged over the runs of one method, model and batch size:

- efficacy until the collapse: mean ES of the edits of the gradual phase;
- locality: mean NS of the edits of the gradual phase;
- edits before the collapse: the collapse point (none: the run's length, marked as not observed);
- edits it lasts: while ES over the last 50 edits stays at least 0.9 and the control facts' recall at
  least 90% (`analysis.phases.lasting_edits`);
- downstream loss: mean over tasks of initial F1 minus the last F1 measured;
- facts forgotten: share of successful edits forgotten at the last checkpoint (both criteria);
- single disabling edit: whether `retest` found an update that disables the unedited model by
  itself (not tested: no retest rows for the method).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from editscale.analysis.phases import lasting_edits
from editscale.analysis.rundata import RunData
from editscale.errors import EditscaleError
from editscale.methods.base import resolve_method_config
from editscale.models.loading import model_key


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and x == x]
    return statistics.mean(vals) if vals else None


def distance_table(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Table 2 per run and method: mean single-edit distance of the re-tested candidates that
    disabled the model, of those that did not, and of the normal (baseline) updates."""
    out = []
    for run in runs:
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in run.retest:
            if r["kind"] != "unedited" and r.get("status") == "ok":
                by_method[r["method"]].append(r)
        for method, rows in by_method.items():
            disabling = [r["distance_max"] for r in rows if r["kind"] == "candidate" and r["disabling"]]
            other = [r["distance_max"] for r in rows if r["kind"] == "candidate" and not r["disabling"]]
            normal = [r["distance_max"] for r in rows if r["kind"] == "baseline"]
            cands, norm = _mean(disabling + other), _mean(normal)
            out.append({"run": run.path.name, "run_method": run.config.method, "method": method,
                        "candidates": sum(r["kind"] == "candidate" for r in rows),
                        "disabling": len(disabling), "distance_disabling": _mean(disabling),
                        "distance_candidates_not_disabling": _mean(other),
                        "baseline": len(normal), "distance_normal": _mean(normal),
                        # how many times a re-tested candidate moves the layer further than a normal edit
                        "ratio": cands / norm if cands is not None and norm else None})
    return out


def run_properties(run: RunData, analysis: dict[str, Any]) -> dict[str, Any]:
    """Table 3's figures for one run."""
    end = analysis["collapse_index"] if analysis["collapse_index"] is not None else run.edits_done
    gradual = [r for r in run.ok_edits if r["index"] < end]
    down = run.downstream
    loss = None
    if len(down) >= 2:
        first, last = down[0]["tasks"], down[-1]["tasks"]
        loss = _mean([first[t]["f1"] - last[t]["f1"] for t in first if t in last])
    last_f = run.forgetting[-1] if run.forgetting else {}
    tested = [r for r in run.retest if r["kind"] == "candidate" and r.get("method") == run.config.method]
    lasted, fell_short = lasting_edits(run)
    return {"run": run.path.name, "method": run.config.method, "model": run.config.model,
            "batch_size": run.batch_size, "sample": run.config.sample, "edits_done": run.edits_done,
            "efficacy_gradual": _mean([r["es"] for r in gradual]),
            "locality_gradual": _mean([r["ns"] for r in gradual]),
            "edits_lasting": lasted, "fell_short": fell_short,
            "edits_before_collapse": analysis["collapse_index"], "collapse_observed": analysis["collapse_index"]
            is not None, "downstream_f1_loss": loss,
            "forgotten_paper_pct": last_f.get("paper_forgotten_pct"),
            "forgotten_prob_pct": last_f.get("prob_forgotten_pct"),
            "single_disabling_edit": any(r["disabling"] for r in tested) if tested else None}


def variant(run: RunData) -> str:
    """The hyper-parameters in which a run departs from its method's preset for its model ("" when
    none, or when the model has no preset): MEMIT with norm_anchor=True is another row of Table 3."""
    cfg = run.config
    try:
        preset = resolve_method_config(cfg.method, model_key(cfg.model)).model_dump(mode="json")
    except EditscaleError:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(cfg.method_config.items()) if k in preset and preset[k] != v)


def method_properties(runs: Sequence[RunData], analyses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 3: one row per (method and its departures from the preset, model, batch size), averaged
    over its runs (samples)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run, a in zip(runs, analyses):
        groups[(run.config.method, variant(run), run.config.model, run.batch_size)].append(run_properties(run, a))
    out = []
    for (method, changed, model, batch), props in groups.items():
        collapses = [p["edits_before_collapse"] for p in props if p["collapse_observed"]]
        tested = [p["single_disabling_edit"] for p in props if p["single_disabling_edit"] is not None]
        out.append({"method": method, "variant": changed, "model": model, "batch_size": batch, "runs": len(props),
                    "edits": max(p["edits_done"] for p in props),
                    "efficacy_gradual": _mean([p["efficacy_gradual"] for p in props]),
                    "locality_gradual": _mean([p["locality_gradual"] for p in props]),
                    "collapses": len(collapses), "edits_before_collapse": _mean(collapses),
                    "edits_lasting": _mean([p["edits_lasting"] for p in props]),
                    "lasting_all_runs": not any(p["fell_short"] for p in props),
                    "downstream_f1_loss": _mean([p["downstream_f1_loss"] for p in props]),
                    "forgotten_paper_pct": _mean([p["forgotten_paper_pct"] for p in props]),
                    "forgotten_prob_pct": _mean([p["forgotten_prob_pct"] for p in props]),
                    "single_disabling_edit": any(tested) if tested else None})
    return out


def generation_examples(run: RunData, analysis: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 8: the health probe's continuations at the unedited model, the last checkpoint before
    the collapse, the first after it and the last one (without a collapse: start, middle, end)."""
    rows = run.health
    if not rows:
        return []
    c = analysis["collapse_index"]
    if c is None:
        picks = [(rows[0], "unedited"), (rows[len(rows) // 2], "mid-run"), (rows[-1], "last")]
    else:
        before = next((r for r in reversed(rows) if r["edits_done"] <= c), rows[0])
        after = next((r for r in rows if r["edits_done"] > c), rows[-1])
        picks = [(rows[0], "unedited"), (before, "before the collapse"), (after, "after the collapse"),
                 (rows[-1], "last")]
    seen, out = set(), []
    for r, when in picks:
        if r["edits_done"] in seen:
            continue
        seen.add(r["edits_done"])
        out.append({"edits_done": r["edits_done"], "when": when, "text_nll": r.get("text_nll"),
                    "generations": r.get("generations", [])})
    return out
