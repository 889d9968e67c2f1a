"""A progress bar with ETA for long work inside a method (statistics, training an editor network)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(enabled: bool, label: str, total: int, start: int, unit: str) -> Callable[[int | None], Any]:
    """`update(n)` moves the bar to n done; `update(None)` closes it. A no-op when not enabled."""
    if not enabled:
        return lambda n: None

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn(),
                   transient=True)
    task = bar.add_task(label, total=total, completed=start)
    bar.start()

    def update(n: int | None) -> None:
        if n is None:
            bar.stop()
        else:
            bar.update(task, completed=n)

    return update
