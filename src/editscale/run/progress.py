"""The progress bar of an editing run: edits/s, ETA, and the live ES / NS over the last 50 edits,
the largest drift and the latest downstream F1s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

Update = Callable[[int, dict[str, Any]], None]


class ProgressBar:
    """A context manager yielding `update(edits_done, last_row)`; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self.f1 = ""  # the latest downstream F1s, shown until the next evaluation

    def __enter__(self) -> Update:
        if not self.enabled:
            return lambda n, row: None

        self.bar = Progress(TextColumn("editing"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"))
        task = self.bar.add_task("edit", total=self.total, completed=self.done, rate="", live="")
        self.bar.start()
        t0, n0 = time.perf_counter(), self.done

        def update(n: int, row: dict[str, Any]) -> None:
            rate = (n - n0) / max(1e-9, time.perf_counter() - t0)
            live = ""
            if row.get("status") == "ok":
                drift = max(d["dist"] for d in row["drift"].values())
                live = f"ES50 {row['es_w50']:.2f} NS50 {row['ns_w50']:.2f} drift {drift:.2e}"
                if "downstream" in row:
                    self.f1 = " F1 " + " ".join(f"{k[:4]} {v['f1']:.2f}" for k, v in row["downstream"]["tasks"].items())
                live += self.f1
            self.bar.update(task, completed=n, rate=f"{rate:.2f} edits/s", live=live)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.stop()
