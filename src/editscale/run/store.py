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

Integrity: a checkpoint's state.json carries checksums (sha256) of every tensor in
weights.safetensors, of the runner state beside them, and of the rows of each run file it covers
(the complete lines at the start of the file when the checkpoint was written, which are exactly the
rows a resume keeps). Loading the checkpoint verifies them, so a changed tensor, state or row fails
in one line instead of silently continuing a different run; a checkpoint from before checksums
loads unverified. A writer holds DIR/.lock (`RunStore.lock`) so two processes never write one
directory; a JSONL line that is not a JSON object is reported by file and line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editscale.errors import EditscaleError

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint"
LOCK = ".lock"
CHECKSUMS = "checksums"  # the key in state.json; not part of the runner's state
RUN_ROWS = ("edits", "forgetting", "downstream", "health")  # the row files a run's checkpoint covers
CHANGED = "the checkpoint was changed after it was written"


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


def _tensor_digest(t: torch.Tensor) -> str:
    import torch

    # dtype and shape go in too: the same bytes read as another dtype or shape are another tensor
    h = hashlib.sha256(f"{t.dtype} {list(t.shape)}\n".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _state_digest(state: dict[str, Any]) -> str:
    # through JSON first, so the digest at saving (int keys, tuples, tensors) equals the one of what loads back
    canonical = json.dumps(json.loads(json.dumps(state, default=_json_default)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _rows_digest(path: Path, limit: int | None = None) -> tuple[int, str]:
    """The number of complete lines (at most `limit`) at the start of `path` and the sha256 of their bytes."""
    h, n = hashlib.sha256(), 0
    if path.exists():
        with open(path, "rb") as f:
            for line in f:
                if n == limit or not line.endswith(b"\n"):
                    break
                h.update(line)
                n += 1
    return n, h.hexdigest()


def _parse_row(path: Path, lineno: int, line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EditscaleError(f"{path}:{lineno}: not a JSON row ({err.msg} at column {err.colno}); "
                             "the file was damaged or edited") from err
    except UnicodeDecodeError as err:
        raise EditscaleError(f"{path}:{lineno}: not UTF-8 text (byte {err.start}); "
                             "the file was damaged or edited") from err
    if not isinstance(row, dict):
        raise EditscaleError(f"{path}:{lineno}: not a JSON object but {type(row).__name__}; "
                             "the file was damaged or edited")
    return row


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
        for _, _, row in self._iter_lines(name):
            yield row

    def _iter_lines(self, name: str) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        """(line number, raw line, row) of every complete line."""
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            return
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    return  # a torn last line from a crash mid-write
                yield lineno, line, _parse_row(path, lineno, line)

    def truncate(self, name: str, keep_while: str, limit: int) -> None:
        """Keep only the rows with row[keep_while] < limit (everything after a checkpoint goes)."""
        path = self.root / f"{name}.jsonl"
        if not path.exists():
            return
        kept = []
        for lineno, line, row in self._iter_lines(name):
            if keep_while not in row:
                raise EditscaleError(f"{path}:{lineno}: the row has no '{keep_while}'; the file was damaged or edited")
            if row[keep_while] < limit:
                kept.append(line)  # the bytes as written, so the checkpoint's row checksums still hold
        write_text_atomic(path, b"".join(kept).decode())

    # ------------------------------------------------------------------ documents

    def write_json(self, name: str, obj: Any) -> None:
        write_text_atomic(self.root / name, json.dumps(obj, indent=2, default=_json_default) + "\n")

    def read_json(self, name: str) -> Any:
        path = self.root / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise EditscaleError(f"{path}: not valid JSON ({err}); the file was damaged or edited") from err

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(self.root / name, text)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    # ------------------------------------------------------------------ the writer's lock

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], None] = print) -> Iterator[None]:
        """Hold DIR/.lock (created with DIR) while the block writes the directory; a second writer fails at once.

        flock belongs to the open file, so the kernel drops it when the process ends however it ends
        (kill -9 included): a dead writer never leaves the directory locked. The file holds the
        holder's pid for the other writer's error and is never deleted, since deleting a lock file
        lets two processes lock two different files of the same name.
        """
        self.create()
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(fd, self.root, log)
            if locked:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                if locked:
                    # cleared while still held, so a later holder's pid is never confused with ours
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Replace the checkpoint atomically: write a new folder, then swap it in."""
        # imported here: reading a run's rows (analysis, report, export) needs no torch
        from safetensors.torch import save_file

        final = self.root / CHECKPOINT
        tmp = self.root / f"{CHECKPOINT}.tmp"
        old = self.root / f"{CHECKPOINT}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
            save_file(tensors, str(tmp / "weights.safetensors"))
            rows = {}
            for name in RUN_ROWS:
                n, digest = _rows_digest(self.root / f"{name}.jsonl")
                rows[name] = {"rows": n, "sha256": digest}
            checksums = {"tensors": {k: _tensor_digest(t) for k, t in tensors.items()},
                         "state": _state_digest(state), "rows": rows}
            with open(tmp / "state.json", "w") as f:
                json.dump({**state, CHECKSUMS: checksums}, f, default=_json_default)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            # nothing was swapped yet, so the last good checkpoint is intact; the partial copy only takes space
            shutil.rmtree(tmp, ignore_errors=True)
            previous = final if final.exists() else old
            kept = f"the previous checkpoint {previous} is kept" if previous.exists() else "there is no earlier one"
            raise EditscaleError(f"{self.root}: no space left on the device while writing a checkpoint "
                                 f"({err.strerror}); {kept}; free space, then `editscale resume {self.root}`") from err
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The checkpoint's tensors and runner state, verified against its checksums (see the module docstring)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for attempt in range(3):
            final = self.root / CHECKPOINT
            if not final.exists():
                # a crash between the two renames leaves the previous checkpoint in .old
                old = self.root / f"{CHECKPOINT}.old"
                if not old.exists():
                    return None
                final = old
            folder = _identity(final)
            reading = final / "weights.safetensors"
            try:
                tensors = load_file(str(reading))
                reading = final / "state.json"
                state = json.loads(reading.read_text())
                if not isinstance(state, dict):
                    raise ValueError(f"state.json holds a {type(state).__name__}, not an object")
            except (OSError, ValueError, SafetensorError) as err:
                if _identity(final) != folder and attempt < 2:
                    continue
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise EditscaleError(f"{reading}: the checkpoint is unreadable ({reason}); the file is damaged or "
                                     "truncated: put back a copy of the run directory, or start again with a new "
                                     "--out") from err
            # a reader beside a running writer may see the folder swapped between the two files: read again
            if _identity(final) == folder:
                break
        checksums = state.pop(CHECKSUMS, None)
        if checksums is None:
            logging.getLogger(__name__).info("%s: a checkpoint without checksums (from an older editscale); "
                                             "loaded unverified", final)
        else:
            try:
                self._verify(final, tensors, state, checksums)
            except (KeyError, TypeError, AttributeError) as err:
                raise EditscaleError(
                    f"{final / 'state.json'}: its checksums are malformed ({err!r}); {CHANGED}") from err
        return tensors, state

    def _verify(self, final: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                checksums: dict[str, Any]) -> None:
        weights = final / "weights.safetensors"
        expected = checksums["tensors"]
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing:
            raise EditscaleError(f"{weights}: tensor {missing[0]} is missing; {CHANGED}")
        if extra:
            raise EditscaleError(
                f"{weights}: tensor {extra[0]} was not in the checkpoint when it was written; {CHANGED}")
        for key in sorted(tensors):
            if _tensor_digest(tensors[key]) != expected[key]:
                raise EditscaleError(f"{weights}: tensor {key} does not match its checksum; {CHANGED}")
        if _state_digest(state) != checksums["state"]:
            raise EditscaleError(f"{final / 'state.json'}: the runner state does not match its checksum; {CHANGED}")
        for name, covered in checksums["rows"].items():
            path = self.root / f"{name}.jsonl"
            n, digest = _rows_digest(path, covered["rows"])
            if n < covered["rows"]:
                raise EditscaleError(f"{path}: holds {n} complete rows where the checkpoint covers {covered['rows']}; "
                                     "rows were removed after the checkpoint was written")
            if digest != covered["sha256"]:
                raise EditscaleError(f"{path}: the first {n} rows, which the checkpoint covers, do not match "
                                     "their checksum; a row was changed after the checkpoint was written")


def _flock(fd: int, root: Path, log: Callable[[str], None]) -> bool:
    """Lock `fd` for `root`'s writer: True when locked, False where the system or file system has no locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        log(f"{root}: this system has no flock; the run directory is not locked against a second writer")
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise EditscaleError(f"{root} is being written by {who}; wait for it or stop it") from None
    except OSError as err:
        # some network file systems refuse flock: running unlocked beats not running at all
        if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        log(f"{root}: the file system refuses locks ({err.strerror}); "
            "the run directory is not locked against a second writer")
        return False
    return True


def _identity(path: Path) -> tuple[int, int] | None:
    """Which checkpoint folder `path` is now: each one swapped in is a new directory."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns  # ctime too: a deleted folder's inode number may come back
