"""The report of a sweep (`editscale sweep`, run/sweep.py): one HTML report over all its runs,
written to `<sweep dir>/report/` (report/html.py)."""

from __future__ import annotations

from pathlib import Path

from editscale.errors import EditscaleError
from editscale.report.html import ReportFiles, build_report


def sweep_runs(sweep_dir: Path | str) -> list[Path]:
    """The run directories of a sweep that have edited (finished, killed or failed part-way)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return []
    edits = [p / "edits.jsonl" for p in root.iterdir() if (p / "config.yaml").exists()]
    return sorted(e.parent for e in edits if e.exists() and e.stat().st_size)


def sweep_report(sweep_dir: Path | str, out: Path | str | None = None, *, title: str | None = None) -> ReportFiles:
    root = Path(sweep_dir)
    runs = sweep_runs(root)
    if not runs:
        raise EditscaleError(f"{root} holds no run with edits to report on")
    return build_report(runs, out or root / "report", title=title or f"editscale sweep {root.name}: {len(runs)} runs")
