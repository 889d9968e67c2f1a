"""Second-moment statistics C = E[k kᵀ] of an MLP-output layer's keys (docs/protocol.md §2.5): compute, cache, resume.

C is the expensive, shared input of ROME, MEMIT, EMMET and AlphaEdit. It is computed once per
(base model, layer, corpus, sample count, dtype) and cached on disk. The cache key pins the *base*
model by name and by a fingerprint of its weights, so an edited or retrained model never picks up
stale statistics (the reference keys on `config._name_or_path` only: docs/protocol.md §10.3).

Accumulation runs over a fixed pseudo-random subset of the corpus's documents (seed 1, as the
reference's FixedRandomSubsetSampler), every non-padding token, uncentred. Partial sums are saved
atomically every few batches, so a killed computation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from editscale.data.corpora import CORPUS_REVISIONS, corpus_documents
from editscale.errors import EditscaleError
from editscale.models.adapter import ModelAdapter


def default_cache_dir() -> Path:
    root = os.environ.get("EDITSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "editscale")
    return Path(root) / "stats"


# ---------------------------------------------------------------------- cache key


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights: shapes plus a strided sample of every tensor.

    Cheap even for billions of parameters, and different for a retrained or edited model.
    """
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class StatsKey:
    model_name: str
    fingerprint: str
    layer: int
    corpus: str
    n_samples: int
    dtype: str
    max_length: int

    def path(self, root: Path) -> Path:
        model = self.model_name.replace("/", "_")
        corpus = self.corpus + (f"-r{CORPUS_REVISIONS[self.corpus]}" if self.corpus in CORPUS_REVISIONS else "")
        return root / f"{model}-{self.fingerprint}" / corpus / (
            f"layer{self.layer}_{self.dtype}_n{self.n_samples}_len{self.max_length}.safetensors")


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------- accumulation


def _batches(adapter: ModelAdapter, docs: Sequence[str], max_length: int, token_budget: int
             ) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(first doc, end doc, padded batch) with at most `token_budget` padded tokens per batch."""
    i, carried = 0, None  # the document that overflowed a batch starts the next one, tokenised once
    while i < len(docs):
        j, rows, longest = i, [], 0
        while j < len(docs):
            ids = carried if carried is not None else adapter.tokenizer(
                docs[j], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            carried = None
            if rows and max(longest, len(ids)) * (len(rows) + 1) > token_budget:
                carried = ids
                break
            rows.append(ids)
            longest = max(longest, len(ids))
            j += 1
        yield i, j, adapter.pad(rows)
        i = j


def second_moment(adapter: ModelAdapter, layer: int, *, model_name: str, corpus: str = "factworld",
                  n_samples: int = 20000, dtype: str = "float64", max_length: int | None = None,
                  cache_dir: Path | str | None = None, token_budget: int = 8192, save_every: int = 20,
                  progress: bool = True) -> torch.Tensor:
    """C = (1/N) Σ k kᵀ over every non-padding token of the corpus subset, [d_mlp, d_mlp] on CPU."""
    if dtype not in _DTYPES:
        raise EditscaleError(f"statistics dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    max_length = int(max_length or adapter.max_positions or 1024)
    key = StatsKey(model_name, model_fingerprint(adapter.model), layer, corpus, n_samples, dtype, max_length)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = key.path(root)
    if path.exists():
        return load_file(path)["mom2"]
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    while not _claim(lock):  # another process computes these statistics: wait for them
        if path.exists():
            return load_file(path)["mom2"]
        time.sleep(LOCK_POLL_SECONDS)
    try:
        if path.exists():  # written while we waited
            return load_file(path)["mom2"]
        return _accumulate(adapter, layer, key, path, token_budget=token_budget, save_every=save_every,
                           progress=progress)
    finally:
        lock.unlink(missing_ok=True)


LOCK_POLL_SECONDS = 0.5


def _claim(lock: Path) -> bool:
    """Take the lock of a statistics file: False while another live process on this machine holds it.

    Runs that share a cache (a sweep, two test workers) then compute each covariance once. A lock
    left by a killed process is taken over, and its partial sums are resumed.
    """
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = lock.read_text().strip()
        except OSError:
            return False  # released between our two calls: try again on the next poll
        if not owner or _alive(int(owner)):
            return False  # being written (no pid yet), or held
        lock.unlink(missing_ok=True)  # its process is gone
        return _claim(lock)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _accumulate(adapter: ModelAdapter, layer: int, key: StatsKey, path: Path, *, token_budget: int,
                save_every: int, progress: bool) -> torch.Tensor:
    """The accumulation itself, under the lock: resumed from the partial sums of a killed run."""
    corpus, n_samples, dtype, max_length = key.corpus, key.n_samples, key.dtype, key.max_length
    partial = path.with_suffix(".partial.safetensors")
    tdtype = _DTYPES[dtype]
    total = torch.zeros(adapter.d_mlp, adapter.d_mlp, dtype=tdtype)
    count, done = 0, 0
    if partial.exists():
        state = load_file(partial)
        total, count, done = state["sum"], int(state["count"].item()), int(state["docs_done"].item())

    docs = corpus_documents(corpus, n_samples)
    bar = _progress(progress, f"C layer {layer} ({corpus})", len(docs), done)
    t0 = time.time()
    for n_batch, (_first, end, batch) in enumerate(_batches(adapter, docs[done:], max_length, token_budget)):
        keys = adapter.capture_mlp_keys(batch, layer)  # [b, s, d_mlp]
        mask = batch["attention_mask"].bool().to(keys.device)
        k = keys[mask].to("cpu", tdtype)
        total += k.T @ k
        count += k.shape[0]
        done_now = done + end
        bar(done_now)
        if (n_batch + 1) % save_every == 0:
            _save_atomic(partial, {"sum": total, "count": torch.tensor(count), "docs_done": torch.tensor(done_now)})
    bar(None)
    if count == 0:
        raise EditscaleError(f"statistics corpus '{corpus}' gave no tokens")
    mom2 = total / count
    meta = {"key": json.dumps(key.__dict__), "tokens": str(count), "seconds": f"{time.time() - t0:.1f}"}
    _save_atomic(path, {"mom2": mom2}, meta)
    partial.unlink(missing_ok=True)
    return mom2


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    # one temporary file per process: runs that share a cache may write the same statistics at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _progress(enabled: bool, label: str, total: int, start: int) -> Callable[[int | None], Any]:
    if not enabled:
        return lambda n: None

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("docs"), TimeRemainingColumn(),
                   transient=True)
    task = bar.add_task(label, total=total, completed=start)
    bar.start()

    def update(n: int | None) -> None:
        if n is None:
            bar.stop()
        else:
            bar.update(task, completed=n)

    return update


def condition_number(mom2: torch.Tensor) -> float:
    """cond(C) = λmax / λmin, from the symmetric eigenvalues in fp64."""
    ev = torch.linalg.eigvalsh(mom2.double())
    return float(ev[-1] / ev[0]) if ev[0] > 0 else float("inf")
