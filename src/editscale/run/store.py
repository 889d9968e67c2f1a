"""The results store of one run directory: durable JSONL rows, edited-layer checkpoints, resume.

    DIR/config.yaml        the full resolved run config, seed and package versions
    DIR/templates.json     the context templates the editor used (generated once, from the base model)
    DIR/edits.jsonl        one row per edit
    DIR/forgetting.jsonl   one row per forgetting checkpoint
    DIR/downstream.jsonl   one row per downstream evaluation (edits_done 0: the unedited model)
    DIR/health.jsonl       loss on a fixed text and greedy continuations, at forgetting checkpoints
    DIR/checkpoint/        edited layers' weights (safetensors) + runner state, every C edits
    DIR/summary.json       written at the end

Rows are flushed and fsynced as they are written, so a crash loses at most the row being written
(a torn last line is dropped on resume). Checkpoints hold only the edited layers, never the whole
model, and are replaced atomically. Resume truncates every JSONL file back to the checkpoint, so a
resumed run writes exactly the rows an uninterrupted run would have written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editscale.errors import EditscaleError

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # a tensor or an array
        return obj.tolist()
    if isinstance(obj, set):
        return sorted(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a results row")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class RunStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ rows

    def append(self, name: str, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=_json_default, allow_nan=True)
        with open(self.root / f"{name}.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self, name: str) -> list[dict[str, Any]]:
        return list(self.iter_rows(name))

    def iter_rows(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            return
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    return  # a torn last line from a crash mid-write
                yield json.loads(line)

    def truncate(self, name: str, keep_while: str, limit: int) -> None:
        """Keep only the rows with row[keep_while] < limit (everything after a checkpoint goes)."""
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            return
        kept = [r for r in self.iter_rows(name) if r[keep_while] < limit]
        write_text_atomic(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in kept))

    # ------------------------------------------------------------------ documents

    def write_json(self, name: str, obj: Any) -> None:
        write_text_atomic(self.root / name, json.dumps(obj, indent=2, default=_json_default) + "\n")

    def read_json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(self.root / name, text)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Replace the checkpoint atomically: write a new folder, then swap it in."""
        # imported here: reading a run's rows (analysis, report, export) needs no torch
        from safetensors.torch import save_file

        final = self.root / CHECKPOINT
        tmp = self.root / f"{CHECKPOINT}.tmp"
        old = self.root / f"{CHECKPOINT}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from safetensors.torch import load_file

        final = self.root / CHECKPOINT
        if not final.exists():
            # a crash between the two renames leaves the previous checkpoint in .old
            old = self.root / f"{CHECKPOINT}.old"
            if not old.exists():
                return None
            final = old
        try:
            return load_file(str(final / "weights.safetensors")), json.loads((final / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EditscaleError(f"{final}: the checkpoint is unreadable ({err})") from err
