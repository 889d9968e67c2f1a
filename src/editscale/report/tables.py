"""Tables of a run directory for the terminal: the decline at intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from editscale.analysis.phases import find_phases
from editscale.run.config import load_config
from editscale.run.store import RunStore
from editscale.run.summary import summarize


def interval_rows(out: Path | str, n_rows: int = 12) -> list[dict[str, Any]]:
    """About `n_rows` forgetting checkpoints, evenly spaced, each joined with the edit row it follows."""
    store = RunStore(out)
    edits = {r["index"]: r for r in store.iter_rows("edits") if r["status"] == "ok"}
    checks = store.rows("forgetting")
    downstream = store.rows("downstream")
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
        latest = [d for d in downstream if d["edits_done"] <= c["edits_done"]]
        f1 = {k: v["f1"] for k, v in latest[-1]["tasks"].items()} if latest else {}
        out_rows.append({"edits": c["edits_done"], "f1": f1, "es_w50": e["es_w50"], "ps_w50": e["ps_w50"],
                         "ns_w50": e["ns_w50"], "paper_forgotten_pct": c["paper_forgotten_pct"],
                         "prob_forgotten_pct": c["prob_forgotten_pct"],
                         "control_known_pct": c.get("control_known_pct"),
                         "drift": max(d["dist"] for d in e["drift"].values()),
                         "drift_rel": max(d["rel"] for d in e["drift"].values())})
    return out_rows


def run_table(out: Path | str, n_rows: int = 12) -> Table:
    """Narrow enough for an 80-column terminal; every figure is also in the run's files."""
    t = Table(title=f"{out}: ES/PS/NS over the last 50 edits, forgetting, drift, skills",
              caption="forgot: % of successful edits lost (paper: greedy, sticky / prob: ES re-tested); "
                      "ctrl: never-edited facts still known; drift: ||dW||/numel of the edited layer")
    rows = interval_rows(out, n_rows)
    tasks = list(rows[-1]["f1"]) if rows and rows[-1]["f1"] else []
    for col in ("edits", "ES", "PS", "NS", "forgot p/pr", "ctrl", "drift"):
        t.add_column(col, justify="right")
    if tasks:
        t.add_column("F1 " + "/".join(x[:2] for x in tasks), justify="right")

    def short(x: float) -> str:
        return f"{x:.2f}".removeprefix("0") if x == x else "-"

    for r in rows:
        control = "-" if r["control_known_pct"] is None else f"{r['control_known_pct']:.0f}%"
        t.add_row(str(r["edits"]), f"{r['es_w50']:.2f}", f"{r['ps_w50']:.2f}", f"{r['ns_w50']:.2f}",
                  f"{r['paper_forgotten_pct']:.0f}/{r['prob_forgotten_pct']:.0f}%", control, f"{r['drift']:.1e}",
                  *(["/".join(short(r["f1"].get(x, float("nan"))) for x in tasks)] if tasks else []))
    return t


def comparison_rows(dirs: list[Path | str]) -> list[dict[str, Any]]:
    """One row per run directory: what the runs did, side by side (methods, samples, models)."""

    out = []
    for d in dirs:
        store = RunStore(d)
        cfg = load_config(Path(d) / "config.yaml")
        # an unfinished run (still going, or killed) is summarised from its rows so far
        summary = store.read_json("summary.json") or summarize(store, cfg)
        phases = find_phases(store.rows("edits"), store.rows("forgetting"))
        out.append({"run": str(d), "method": cfg.method, "batch": cfg.batch_size,
                    "edits": summary.get("edits_done"), "finished": store.exists("summary.json"),
                    "mean_es": summary.get("mean_es"),
                    "mean_ps": summary.get("mean_ps"), "mean_ns": summary.get("mean_ns"),
                    "forgotten_paper": summary.get("paper_forgotten_pct_final"),
                    "forgotten_prob": summary.get("prob_forgotten_pct_final"),
                    "f1": summary.get("downstream_final_f1") or {}, "max_drift": summary.get("max_drift"),
                    "collapse": phases.collapse_index})
    return out


COMPARISON_COLUMNS = ("run", "method", "B", "edits", "ES", "PS", "NS", "forgot paper", "forgot prob")


def comparison_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison, shared by the terminal table and Markdown."""
    tasks = sorted({t for r in rows for t in r["f1"]})
    header = [*COMPARISON_COLUMNS, *[f"F1 {x}" for x in tasks], "max drift", "collapse at"]

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    cells = [[Path(r["run"]).name, r["method"], str(r["batch"]),
              f(r["edits"], "d") + ("" if r["finished"] else " (running)"), f(r["mean_es"], ".2f"),
              f(r["mean_ps"], ".2f"), f(r["mean_ns"], ".2f"), f(r["forgotten_paper"], ".0f") + "%",
              f(r["forgotten_prob"], ".0f") + "%", *[f(r["f1"].get(x), ".2f") for x in tasks],
              f(r["max_drift"], ".2e"), "none" if r["collapse"] is None else str(r["collapse"])]
             for r in rows]
    return header, cells


def comparison_table(dirs: list[Path | str]) -> Table:
    header, cells = comparison_cells(comparison_rows(dirs))
    t = Table(title="Runs compared")
    for col in header:
        t.add_column(col, justify="right")
    for row in cells:
        t.add_row(*row)
    return t


def comparison_markdown(dirs: list[Path | str]) -> str:
    """The comparison as a Markdown table: for notes, issues and READMEs, at any terminal width."""
    header, cells = comparison_cells(comparison_rows(dirs))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
