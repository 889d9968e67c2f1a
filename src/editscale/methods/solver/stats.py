"""Second-moment statistics C = E[k kᵀ] of an MLP-output layer's keys (docs/protocol.md §2.5): compute, cache, resume.

C is the expensive, shared input of ROME, MEMIT, EMMET and AlphaEdit. It is computed once per
(base model weights, layer, corpus, sample count, dtype, length) and cached on disk. The cache key
pins the model by a fingerprint of its weights only, never by its name or path: the same model
given by another path reuses the file, and an edited or retrained model never picks up stale
statistics (the reference keys on `config._name_or_path` only: docs/protocol.md §10.3).

Accumulation runs over a fixed pseudo-random subset of the corpus's documents (seed 1, as the
reference's FixedRandomSubsetSampler), every non-padding token, uncentred. Partial sums are saved
atomically every few batches, so a killed computation resumes where it stopped. With
`n_samples="auto"` it stops as soon as C has converged (`AUTO_*` below; docs/protocol.md §2.5.1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editscale.config_files import cache_root
from editscale.data.corpora import corpus_cache_name, corpus_documents
from editscale.errors import EditscaleError
from editscale.methods.solver.progress import progress_bar
from editscale.models.adapter import ModelAdapter, tensor_value

log = logging.getLogger(__name__)

# The layout of the cache folder. 1: <model name>-<fingerprint>/<corpus>/...; 2: v2/<fingerprint>/
# <corpus>/..., keyed by weights alone and with content-hashed local corpora. A new layout lives in
# a new folder, so files of an older one are never read as this one's.
CACHE_FORMAT = 2

# `mom2_n_samples: auto` (docs/protocol.md §2.5.1; FastMEMIT, arXiv 2506.04226: a small multiple of
# the key dimension suffices). C is checked first after AUTO_MIN_KEYS_PER_DIM * d_mlp token keys,
# then each time the token count has doubled; it stops at the first check where C moved by less than
# AUTO_TOLERANCE (relative Frobenius norm) since the previous check and cond(C) <= AUTO_MAX_COND.
AUTO = "auto"
AUTO_MIN_KEYS_PER_DIM = 2
AUTO_TOLERANCE = 2e-2
AUTO_MAX_COND = 1e10


def default_cache_dir() -> Path:
    return cache_root() / "stats"


# ---------------------------------------------------------------------- cache key


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights: shapes plus a strided sample of every tensor.

    Cheap even for billions of parameters, and different for a retrained or edited model.
    """
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        if p.device.type == "meta":  # offloaded by accelerate: the value lives in its hook (docs/protocol.md §1.5)
            p = tensor_value(model, name)
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class StatsKey:
    fingerprint: str  # model_fingerprint of the unedited model
    layer: int
    corpus: str  # corpus_cache_name: a registry name with its revision, or a local corpus's content hash
    n_samples: int | str  # documents, or "auto"
    dtype: str
    max_length: int

    def path(self, root: Path) -> Path:
        return root / f"v{CACHE_FORMAT}" / self.fingerprint / self.corpus / (
            f"layer{self.layer}_{self.dtype}_n{self.n_samples}_len{self.max_length}.safetensors")


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_options(n_samples: int | str, dtype: str) -> None:
    if dtype not in _DTYPES:
        raise EditscaleError(f"statistics dtype must be one of {', '.join(_DTYPES)}, got '{dtype}'")
    if n_samples != AUTO and not (isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples > 0):
        raise EditscaleError(f"statistics sample count (mom2_n_samples) must be a positive number of documents "
                             f"or 'auto', got {n_samples!r}")


def stats_path(adapter: ModelAdapter, layer: int, *, corpus: str = "factworld", n_samples: int | str = 20000,
               dtype: str = "float64", max_length: int | None = None, cache_dir: Path | str | None = None) -> Path:
    """Where the statistics of these options are (or will be) cached."""
    _check_options(n_samples, dtype)
    max_length = int(max_length or adapter.max_positions or 1024)
    key = StatsKey(model_fingerprint(adapter.model), layer, corpus_cache_name(corpus), n_samples, dtype, max_length)
    return key.path(Path(cache_dir) if cache_dir else default_cache_dir())


def stats_metadata(path: Path | str) -> dict[str, str]:
    """What a statistics file records besides C: its key, the tokens and documents it was computed
    over (for `auto`, the count it stopped at and why), the seconds it took."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


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


def second_moment(adapter: ModelAdapter, layer: int, *, model_name: str = "", corpus: str = "factworld",
                  n_samples: int | str = 20000, dtype: str = "float64", max_length: int | None = None,
                  cache_dir: Path | str | None = None, token_budget: int = 8192, save_every: int = 20,
                  progress: bool = True) -> torch.Tensor:
    """C = (1/N) Σ k kᵀ over every non-padding token of the corpus subset, [d_mlp, d_mlp] on CPU.

    `n_samples` is a number of documents, or "auto" (stop when C has converged). `model_name` only
    names the model in the file's metadata and the log: the cache is keyed by the weights.
    """
    path = stats_path(adapter, layer, corpus=corpus, n_samples=n_samples, dtype=dtype, max_length=max_length,
                      cache_dir=cache_dir)
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
        max_length = int(max_length or adapter.max_positions or 1024)
        return _accumulate(adapter, layer, path, model_name=model_name, corpus=corpus, n_samples=n_samples,
                           dtype=dtype, max_length=max_length, token_budget=token_budget, save_every=save_every,
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


def _accumulate(adapter: ModelAdapter, layer: int, path: Path, *, model_name: str, corpus: str,
                n_samples: int | str, dtype: str, max_length: int, token_budget: int, save_every: int,
                progress: bool) -> torch.Tensor:
    """The accumulation itself, under the lock: resumed from the partial sums of a killed run."""
    auto = n_samples == AUTO
    partial = path.with_suffix(".partial.safetensors")
    tdtype = _DTYPES[dtype]
    total = torch.zeros(adapter.d_mlp, adapter.d_mlp, dtype=tdtype)
    count, done = 0, 0
    # auto: the sums at the previous convergence check (none yet: count 0)
    prev_total, prev_count = torch.zeros_like(total), 0
    if partial.exists():
        state = load_file(partial)
        total, count, done = state["sum"], int(state["count"].item()), int(state["docs_done"].item())
        if "prev_sum" in state:
            prev_total, prev_count = state["prev_sum"], int(state["prev_count"].item())
    next_check = max(AUTO_MIN_KEYS_PER_DIM * adapter.d_mlp, 2 * prev_count)

    docs = corpus_documents(corpus, None if auto else int(n_samples))
    bar = progress_bar(progress, f"C layer {layer} ({corpus}{', auto' if auto else ''})", len(docs), done, "docs")
    t0 = time.time()
    outcome = {"stopped": "all documents"}
    done_now = done
    for n_batch, (_first, end, batch) in enumerate(_batches(adapter, docs[done:], max_length, token_budget)):
        keys = adapter.capture_mlp_keys(batch, layer)  # [b, s, d_mlp]
        mask = batch["attention_mask"].bool().to(keys.device)
        k = keys[mask].to("cpu", tdtype)
        total += k.T @ k
        count += k.shape[0]
        done_now = done + end
        bar(done_now)
        if auto and count >= next_check:
            verdict = _converged(total, count, prev_total, prev_count)
            if verdict is not None:
                outcome = verdict
                break
            prev_total, prev_count, next_check = total.clone(), count, 2 * count
        if (n_batch + 1) % save_every == 0:
            state = {"sum": total, "count": torch.tensor(count), "docs_done": torch.tensor(done_now)}
            if auto:
                state |= {"prev_sum": prev_total, "prev_count": torch.tensor(prev_count)}
            _save_atomic(partial, state)
    bar(None)
    if count == 0:
        raise EditscaleError(f"statistics corpus '{corpus}' gave no tokens")
    mom2 = total / count
    seconds = time.time() - t0
    key = {"model": model_name, "layer": layer, "corpus": corpus, "n_samples": n_samples, "dtype": dtype,
           "max_length": max_length, "cache": str(path.relative_to(path.parents[3]))}
    meta = {"key": json.dumps(key), "tokens": str(count), "docs": str(done_now), "seconds": f"{seconds:.1f}"}
    if auto:
        meta |= {"auto_" + k: v for k, v in outcome.items()}
    _save_atomic(path, {"mom2": mom2}, meta)
    partial.unlink(missing_ok=True)
    how = f"auto: {outcome['stopped']}" if auto else f"{n_samples} requested"
    log.info("statistics C of %s layer %d on %s: %d tokens from %d documents (%s), %.1f s",
             model_name or "the model", layer, corpus, count, done_now, how, seconds)
    return mom2


def _converged(total: torch.Tensor, count: int, prev_total: torch.Tensor, prev_count: int) -> dict[str, str] | None:
    """The auto rule's verdict at one check (docs/protocol.md §2.5.1): None to go on, else why it stops."""
    if prev_count == 0:
        return None
    c = total.double() / count
    change = float(torch.linalg.matrix_norm(c - prev_total.double() / prev_count) / torch.linalg.matrix_norm(c))
    if not change < AUTO_TOLERANCE:
        return None
    cond = condition_number(c)
    if not (math.isfinite(cond) and cond <= AUTO_MAX_COND):
        return None
    return {"stopped": "converged", "change": f"{change:.3g}", "cond": f"{cond:.3g}"}


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    # one temporary file per process: runs that share a cache may write the same statistics at once
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def condition_number(mom2: torch.Tensor) -> float:
    """cond(C) = λmax / λmin, from the symmetric eigenvalues in fp64."""
    ev = torch.linalg.eigvalsh(mom2.double())
    return float(ev[-1] / ev[0]) if ev[0] > 0 else float("inf")


# ---------------------------------------------------------------------- statistics given to a run


def given_second_moments(path: Path | str, adapter: ModelAdapter, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """C of each edited layer from `--stats PATH`: a file when one layer is edited, else a folder.

    A file is this cache's `.safetensors` (key `mom2`, already divided by the token count) or the
    reference's `layer_stats` `.npz` (kmeng01/rome `rome/layer_stats.py`: `mom2.mom2` summed over
    `mom2.count` tokens). In a folder, a layer's file is found by name: this cache's `layer<L>_...`
    or the reference's `<module path of layer L's MLP output>_<dtype>_mom2_<n>.npz`, whose module
    path must be the model's (its role table), so statistics of another architecture are refused.
    """
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"--stats {path} does not exist")
    layers = list(layers)
    if path.is_file():
        if len(layers) != 1:
            raise EditscaleError(f"--stats {path} is one file, but the method edits layers {layers}: pass a folder "
                                 "holding one statistics file per layer")
        return {layers[0]: _checked(read_second_moment(path), path, adapter, layers[0])}
    return {layer: _checked(read_second_moment(_layer_file(path, adapter, layer)), path, adapter, layer)
            for layer in layers}


def _layer_file(folder: Path, adapter: ModelAdapter, layer: int) -> Path:
    module = adapter.family.path("mlp_out").format(layer)  # type: ignore[union-attr]
    found = sorted(folder.glob(f"layer{layer}_*.safetensors")) + sorted(folder.glob(f"{module}_*mom2*.npz"))
    if not found:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".npz", ".safetensors"))[:4]
        raise EditscaleError(f"--stats {folder} holds no statistics of layer {layer} (looked for layer{layer}_*."
                             f"safetensors and {module}_*mom2*.npz; found {others or 'no statistics files'})")
    if len(found) > 1:
        raise EditscaleError(f"--stats {folder} holds {len(found)} statistics files of layer {layer} "
                             f"({', '.join(p.name for p in found)}); keep one or pass the file")
    return found[0]


def read_second_moment(path: Path) -> torch.Tensor:
    """C from one statistics file (see `given_second_moments`)."""
    import numpy as np

    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            if "mom2" not in tensors:
                raise EditscaleError(f"--stats {path}: no 'mom2' tensor (it holds {sorted(tensors)})")
            return tensors["mom2"]
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if "mom2.mom2" not in f or "mom2.count" not in f:
                    raise EditscaleError(f"--stats {path}: not the reference's layer statistics (no 'mom2.mom2' and "
                                         f"'mom2.count'; it holds {sorted(f.files)})")
                count = float(f["mom2.count"])
                if not count > 0:
                    raise EditscaleError(f"--stats {path}: mom2.count is {count}, not a positive number of tokens")
                return torch.from_numpy(np.array(f["mom2.mom2"])) / count
    except EditscaleError:
        raise
    except Exception as err:  # a damaged file: numpy, zipfile and safetensors each raise their own kind
        raise EditscaleError(f"--stats {path}: cannot read it ({type(err).__name__}: {err})") from None
    raise EditscaleError(f"--stats {path}: expected a .safetensors or .npz statistics file")


def _checked(c: torch.Tensor, path: Path, adapter: ModelAdapter, layer: int) -> torch.Tensor:
    d = adapter.get_mlp_out_weight(layer).shape[1]
    if tuple(c.shape) != (d, d):
        raise EditscaleError(f"--stats {path}: C has shape {tuple(c.shape)}, but layer {layer}'s MLP output map "
                             f"takes {d} inputs (statistics of another model?)")
    if not torch.isfinite(c).all():
        raise EditscaleError(f"--stats {path}: C of layer {layer} holds non-finite values")
    return c


def file_digest(path: Path | str) -> str:
    """sha256 of a file (a folder: of its files' names and contents), for a run's record of its inputs."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
