"""Runs as flat tables (Parquet or CSV) for pandas, R, DuckDB or a spreadsheet.

    OUT/runs.<ext>         one row per run: its resolved config, package versions and summary
    OUT/edits.<ext>        every row of every run's edits.jsonl
    OUT/forgetting.<ext>   forgetting checkpoints
    OUT/downstream.<ext>   downstream evaluations
    OUT/health.<ext>       health probes
    OUT/retest.<ext>       re-tested edits (only when a run has them)

Every row starts with the run's columns (RUN_COLUMNS), so the tables of many runs stack and group.
Nested fields become dotted columns (`drift.<layer>.dist`, `diagnostics.<key>`, `timings.<key>`,
`tasks.<task>.f1`, `method_config.<key>`); runs with other layers or tasks give a union of columns,
empty where a run has no such value. Lists (`paper_newly_forgotten`, `prob_forgotten_ids`,
`generations`, ...) are one column of JSON text: `json.loads` gives them back, from Parquet and CSV alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editscale.analysis.rundata import RunData, load_run
from editscale.errors import EditscaleError

FORMATS = ("parquet", "csv")
RUN_COLUMNS = ("run", "path", "method", "model", "sample", "batch_size", "dataset", "seed")
ROW_TABLES = ("edits", "forgetting", "downstream", "health", "retest")
OPTIONAL_TABLES = ("retest",)  # written only when some run has rows of it


def run_columns(run: RunData) -> dict[str, Any]:
    c = run.config
    return {"run": run.path.name, "path": str(run.path.resolve()), "method": c.method, "model": c.model,
            "sample": c.sample, "batch_size": c.batch_size, "dataset": c.dataset, "seed": c.seed}


def _flat(rows: list[dict[str, Any]]) -> Any:
    """Rows with nested mappings flattened into dotted columns; lists stay as they are (see _jsonify)."""
    import pandas as pd

    return pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()


def _jsonify(df: Any) -> Any:
    """Columns holding lists or mappings become JSON text (null stays null), so Parquet and CSV agree."""
    for col in df.columns:
        if df[col].dtype != object:
            continue
        values = df[col].dropna()
        if values.map(lambda v: isinstance(v, list | tuple | dict)).any():
            df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, list | tuple | dict) else v)
        elif len(kinds := set(values.map(type))) > 1 and not kinds <= {int, float}:
            # mixed text and numbers in one column: text, or Parquet refuses the column
            df[col] = df[col].map(lambda v: None if v is None or v != v else str(v))
    return df


def _with_run(run: RunData, rows: list[dict[str, Any]], table: str) -> Any:
    import pandas as pd

    df = _flat(rows)
    # a row field named like a run column (none today) keeps its value under `<table>.<name>`
    df = df.rename(columns={c: f"{table}.{c}" for c in df.columns if c in RUN_COLUMNS})
    head = pd.DataFrame([run_columns(run)] * len(df), index=df.index, columns=list(RUN_COLUMNS))
    return pd.concat([head, df], axis=1)


def run_record(run: RunData) -> dict[str, Any]:
    """One run as one flat mapping: run columns, config fields, versions, `finished`, summary."""
    cfg = run.config.model_dump(mode="json")
    rec: dict[str, Any] = run_columns(run)
    rec.update({k: v for k, v in cfg.items() if k not in rec and k != "method_config"})
    rec["method_config"] = cfg.get("method_config") or {}
    rec["versions"] = run.versions
    rec["finished"] = run.finished
    for k, v in run.summary.items():
        rec[k if k not in rec else f"summary.{k}"] = v
    return rec


def tables(runs: Sequence[RunData]) -> dict[str, Any]:
    """The export's tables as pandas DataFrames, by name (`runs` first)."""
    import pandas as pd

    out = {"runs": _jsonify(_flat([run_record(r) for r in runs]))}
    for name in ROW_TABLES:
        frames = [_with_run(r, getattr(r, name), name) for r in runs if getattr(r, name)]
        if not frames:
            if name in OPTIONAL_TABLES:
                continue
            out[name] = pd.DataFrame(columns=list(RUN_COLUMNS))
            continue
        out[name] = _jsonify(pd.concat(frames, ignore_index=True, sort=False))
    return out


@dataclass(frozen=True)
class Written:
    path: Path
    rows: int
    columns: int


def write_export(dirs: Sequence[Path | str], out_dir: Path | str, fmt: str = "parquet") -> dict[str, Written]:
    """`export_runs`, with each file's row and column counts."""
    if fmt not in FORMATS:
        raise EditscaleError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    if not dirs:
        raise EditscaleError("no run directories to export")
    runs = [load_run(d) for d in dirs]  # every directory checked before anything is written
    frames = tables(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Written] = {}
    for name, df in frames.items():
        path = out / f"{name}.{fmt}"
        tmp = path.with_name(path.name + ".tmp")
        if fmt == "parquet":
            df.to_parquet(tmp, engine="pyarrow", index=False)
        else:
            df.to_csv(tmp, index=False)
        tmp.replace(path)
        written[name] = Written(path, len(df), len(df.columns))
    for name in OPTIONAL_TABLES:
        if name not in written:
            # a table of an earlier export to the same folder would pass for this one's
            (out / f"{name}.{fmt}").unlink(missing_ok=True)
    return written


def export_runs(dirs: Sequence[Path | str], out_dir: Path | str, fmt: str = "parquet") -> dict[str, Path]:
    """Write one table per row kind (and `runs`) over all `dirs` to `<out_dir>/<table>.<fmt>`;
    returns the files written by table name. Runs still in progress are exported as they are."""
    return {name: w.path for name, w in write_export(dirs, out_dir, fmt).items()}
