"""Tables of a run directory for the terminal: the decline at intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from editscale.run.store import RunStore


def interval_rows(out: Path | str, n_rows: int = 12) -> list[dict[str, Any]]:
    """About `n_rows` forgetting checkpoints, evenly spaced, each joined with the edit row it follows."""
    store = RunStore(out)
    edits = {r["index"]: r for r in store.iter_rows("edits") if r["status"] == "ok"}
    checks = store.rows("forgetting")
    if not checks:
        return []
    step = max(1, len(checks) // n_rows)
    picked = checks[step - 1::step]
    if picked[-1] is not checks[-1]:
        picked.append(checks[-1])
    out_rows = []
    for c in picked:
        e = edits.get(c["edits_done"] - 1)
        if e is None:
            continue
        out_rows.append({"edits": c["edits_done"], "es_w50": e["es_w50"], "ps_w50": e["ps_w50"],
                         "ns_w50": e["ns_w50"], "paper_forgotten_pct": c["paper_forgotten_pct"],
                         "prob_forgotten_pct": c["prob_forgotten_pct"],
                         "control_known_pct": c.get("control_known_pct"),
                         "drift": max(d["dist"] for d in e["drift"].values()),
                         "drift_rel": max(d["rel"] for d in e["drift"].values())})
    return out_rows


def run_table(out: Path | str, n_rows: int = 12) -> Table:
    t = Table(title=f"{out}: ES/PS/NS over the last 50 edits, forgetting, drift")
    # forgot: % of successful earlier edits lost (paper: greedy, sticky; prob: ES re-tested);
    # control: never-edited facts still known; drift: ||dW||/numel; rel: ||dW||/||W0||
    for col in ("edits", "ES", "PS", "NS", "forgot paper", "forgot prob", "control", "drift", "rel"):
        t.add_column(col, justify="right")
    for r in interval_rows(out, n_rows):
        control = "-" if r["control_known_pct"] is None else f"{r['control_known_pct']:.0f}%"
        t.add_row(str(r["edits"]), f"{r['es_w50']:.2f}", f"{r['ps_w50']:.2f}", f"{r['ns_w50']:.2f}",
                  f"{r['paper_forgotten_pct']:.0f}%", f"{r['prob_forgotten_pct']:.0f}%", control,
                  f"{r['drift']:.2e}", f"{r['drift_rel']:.2f}")
    return t
