"""A run directory read once into memory, for the analysis, the figures and the report.

Every reader of results goes through `load_run`, so a run still in progress or killed is read the
same way as a finished one (its rows so far; the summary computed from them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editscale.errors import EditscaleError
from editscale.run.config import RunConfig, load_config_and_versions
from editscale.run.store import RunStore
from editscale.run.summary import summarize


@dataclass
class RunData:
    path: Path
    config: RunConfig
    edits: list[dict[str, Any]]  # every row of edits.jsonl, non-finite ones included
    forgetting: list[dict[str, Any]]
    downstream: list[dict[str, Any]]
    health: list[dict[str, Any]]
    retest: list[dict[str, Any]]
    summary: dict[str, Any]
    finished: bool
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def ok_edits(self) -> list[dict[str, Any]]:
        return [r for r in self.edits if r.get("status") == "ok"]

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def edits_done(self) -> int:
        return (self.edits[-1]["index"] + 1) if self.edits else 0

    @property
    def label(self) -> str:
        """What tells runs apart in a legend: method, batch size, model and sample."""
        c = self.config
        batch = f" B={c.batch_size}" if c.batch_size > 1 else ""
        return f"{c.method}{batch} · {Path(c.model).name} · sample {c.sample}"

    @property
    def group(self) -> str:
        """Runs whose configs differ only in their sample (or seed) share a group: the figures draw
        their mean and spread. Any other difference (edits, intervals, hyper-parameters) keeps
        runs apart."""
        return json.dumps({k: v for k, v in self.config.identity().items() if k not in ("sample", "seed")},
                          sort_keys=True, default=str)


def load_run(path: Path | str) -> RunData:
    path = Path(path)
    if not (path / "config.yaml").exists():
        raise EditscaleError(f"{path} holds no run (no config.yaml)")
    store = RunStore(path)
    cfg, versions = load_config_and_versions(path / "config.yaml")
    summary = store.read_json("summary.json")
    finished = summary is not None
    return RunData(path=path, config=cfg, edits=store.rows("edits"), forgetting=store.rows("forgetting"),
                   downstream=store.rows("downstream"), health=store.rows("health"),
                   retest=store.rows("retest"), summary=summary or summarize(store, cfg), finished=finished,
                   versions=versions)
