"""Tables of a run directory for the terminal: the decline at intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
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
                    "model": Path(cfg.model).name or cfg.model, "model_path": cfg.model, "sample": cfg.sample,
                    "edits": summary.get("edits_done"), "finished": store.exists("summary.json"),
                    "mean_es": summary.get("mean_es"), "mean_gen_es": summary.get("mean_gen_es"),
                    "mean_ps": summary.get("mean_ps"), "mean_ns": summary.get("mean_ns"),
                    "forgotten_paper": summary.get("paper_forgotten_pct_final"),
                    "forgotten_prob": summary.get("prob_forgotten_pct_final"),
                    "f1": summary.get("downstream_final_f1") or {}, "max_drift": summary.get("max_drift"),
                    "collapse": phases.collapse_index})
    return out


COMPARISON_COLUMNS = ("run", "method", "B", "model", "sample", "edits", "ES", "ES gen", "PS", "NS", "forgot paper",
                      "forgot prob")
# the compact form's headers, for terminals too narrow for the full one (two-line headers are narrower)
COMPACT_COLUMNS = ("run", "method", "B", "model", "smp", "edits", "ES", "ES\ngen", "PS", "NS", "forgot\np/pr")


def _fmt(x: Any, fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def _short(x: Any) -> str:
    """0.93 -> .93: four F1 figures side by side in one column."""
    return _fmt(x, ".2f").removeprefix("0")


def _initials(tasks: list[str]) -> list[str]:
    """Two letters per task, distinct: `sentiment` -> `se`; `tiny_sentiment` -> `se` when every task is `tiny_*`."""
    for short in (lambda x: x[:2], lambda x: x.rsplit("_", 1)[-1][:2], lambda x: x.rsplit("_", 1)[-1][:4]):
        names = [short(x) for x in tasks]
        if len(set(names)) == len(names):
            return names
    return [str(i + 1) for i in range(len(tasks))]  # the caption names them


def comparison_cells(rows: list[dict[str, Any]], compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the comparison, shared by the terminal table and Markdown.
    `compact`: one F1 column (task initials), short two-line headers, `*` marks an unfinished run."""
    tasks = sorted({t for r in rows for t in r["f1"]})
    f = _fmt
    if compact:
        header = [*COMPACT_COLUMNS, *(["F1\n" + "/".join(_initials(tasks))] if tasks else []), "max\ndrift",
                  "collapse\nat"]
        cells = [[Path(r["run"]).name, r["method"], str(r["batch"]), r["model"], str(r["sample"]),
                  f(r["edits"], "d") + ("" if r["finished"] else "*"), _short(r["mean_es"]), _short(r["mean_gen_es"]),
                  _short(r["mean_ps"]), _short(r["mean_ns"]),
                  f"{f(r['forgotten_paper'], '.0f')}/{f(r['forgotten_prob'], '.0f')}%",
                  *(["/".join(_short(r["f1"].get(x)) for x in tasks)] if tasks else []),
                  f(r["max_drift"], ".1e"), "none" if r["collapse"] is None else str(r["collapse"])]
                 for r in rows]
        return header, cells
    header = [*COMPARISON_COLUMNS, *[f"F1 {x}" for x in tasks], "max drift", "collapse at"]
    cells = [[Path(r["run"]).name, r["method"], str(r["batch"]), r["model"], str(r["sample"]),
              f(r["edits"], "d") + ("" if r["finished"] else " (running)"), f(r["mean_es"], ".2f"),
              f(r["mean_gen_es"], ".2f"),
              f(r["mean_ps"], ".2f"), f(r["mean_ns"], ".2f"), f(r["forgotten_paper"], ".0f") + "%",
              f(r["forgotten_prob"], ".0f") + "%", *[f(r["f1"].get(x), ".2f") for x in tasks],
              f(r["max_drift"], ".2e"), "none" if r["collapse"] is None else str(r["collapse"])]
             for r in rows]
    return header, cells


class ComparisonTable:
    """The comparison for a terminal: one column per figure when that fits the console's width,
    else the compact form (the F1 columns folded into one, short headers, a caption for them)."""

    def __init__(self, rows: list[dict[str, Any]], title: str = "Runs compared") -> None:
        self.rows = rows
        self.title = title

    def table(self, compact: bool) -> Table:
        header, cells = comparison_cells(self.rows, compact=compact)
        caption = None
        if compact:
            tasks = sorted({t for r in self.rows for t in r["f1"]})
            notes = ["smp: sample", "ES gen: the new object generated (docs/protocol.md §8.8)",
                     "forgot p/pr: % of edits forgotten (paper / prob criterion)"]
            if tasks:
                notes.append(f"F1 {'/'.join(_initials(tasks))}: {', '.join(tasks)}")
            if not all(r["finished"] for r in self.rows):
                notes.append("*: unfinished (still running or killed)")
            caption = "; ".join(notes)
        # compact: one space between columns and a rule under the header, no frame
        t = Table(title=self.title, caption=caption, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
                  padding=(0, 0) if compact else (0, 1), show_edge=not compact)
        for col in header:
            # names fold (never an ellipsis) when even the compact form is too wide
            t.add_column(col, justify="left" if col in ("run", "method", "model") else "right",
                         overflow="fold")
        for row in cells:
            t.add_row(*row)
        return t

    def _pick(self, console: Console, options: ConsoleOptions) -> Table:
        wide = self.table(compact=False)
        natural = wide.__rich_measure__(console, options.update_width(10_000)).maximum
        return wide if natural <= options.max_width else self.table(compact=True)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._pick(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self._pick(console, options))


def comparison_table(dirs: list[Path | str]) -> ComparisonTable:
    """The comparison as a rich renderable that fits the console it is printed on."""
    return ComparisonTable(comparison_rows(dirs))


def comparison_markdown(dirs: list[Path | str]) -> str:
    """The comparison as a Markdown table: for notes, issues and READMEs, at any terminal width."""
    header, cells = comparison_cells(comparison_rows(dirs))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
