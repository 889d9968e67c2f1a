"""The summary of a run, computed from its files: summary.json of a finished run, or the figures
of a running or killed one so far."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from editscale.run.config import RunConfig
from editscale.run.store import RunStore


def updates(edits: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows of a run's successful edits grouped by update: one edit each, or one batch each."""
    out: list[list[dict[str, Any]]] = []
    for r in edits:
        if r.get("status") != "ok":
            continue
        if out and r.get("batch", r["index"]) == out[-1][0].get("batch", out[-1][0]["index"]):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def summarize(store: RunStore, cfg: RunConfig) -> dict[str, Any]:
    """Means of ES/PS/NS, the last forgetting and downstream figures, drift and speed of a run."""
    rows = [r for r in store.iter_rows("edits") if r["status"] == "ok"]
    forget = store.rows("forgetting")
    last = forget[-1] if forget else {}
    mode = cfg.forgetting
    max_drift = max((d["dist"] for r in rows for d in r["drift"].values()), default=0.0)
    # a batch's timings are on each of its rows: count each batch once
    batch_times = {r.get("batch", r["index"]): r["timings"]["total"] for r in rows}

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]
        return sum(vals) / len(vals) if vals else float("nan")

    downstream = store.rows("downstream")
    return {
        "edits_done": (rows[-1]["index"] + 1) if rows else 0,
        "edits_planned": cfg.edits,
        "nonfinite_edits": [r["index"] for r in store.iter_rows("edits") if r["status"] != "ok"],
        "mean_es": mean("es"), "mean_ps": mean("ps"), "mean_ns": mean("ns"),
        # generated answers (docs/protocol.md §8.8); NaN for a run without them
        "mean_gen_es": mean("gen_es"), "mean_gen_ps": mean("gen_ps"),
        "forgetting_mode": mode,
        "forgotten_pct_final": last.get(f"{'paper' if mode == 'paper' else 'prob'}_forgotten_pct", 0.0),
        "paper_forgotten_pct_final": last.get("paper_forgotten_pct", 0.0),
        "prob_forgotten_pct_final": last.get("prob_forgotten_pct", 0.0),
        "control_known_pct_final": last.get("control_known_pct"),
        "downstream_initial_f1": {k: v["f1"] for k, v in downstream[0]["tasks"].items()} if downstream else {},
        "downstream_final_f1": {k: v["f1"] for k, v in downstream[-1]["tasks"].items()} if downstream else {},
        "downstream_final_at": downstream[-1]["edits_done"] if downstream else None,
        "max_drift": max_drift,
        "final_drift": rows[-1]["drift"] if rows else {},
        "seconds_per_edit": sum(batch_times.values()) / len(rows) if rows else float("nan"),
    }
