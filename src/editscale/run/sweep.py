"""Sweeps: a grid of runs on Ray, each an ordinary run directory, resumable by running it again.

A sweep file (YAML) holds a `SweepSpec`: `base`, RunConfig fields every run shares; `grid`, lists
over method, model, sample, batch_size, seed and method_config overrides, whose product are the
runs (the cells); `per_method`, hyper-parameters for the cells of one method; `resources`, what one
run asks Ray for. Each cell is the run directory `<sweep dir>/<cell name>`, written by the ordinary
`Runner`, so every command that reads a run reads a cell.

    base: {model: embedded, edits: 1000, downstream_every: 50}
    grid: {method: [rome, memit], sample: [0, 1, 2], method_config: [{}, {v_lr: 0.1}]}
    per_method: {memit: {mom2_n_samples: 2000}}
    resources: {cpus: 2, gpus: 0}

Ray packs the runs by their declared CPUs, GPUs and memory; a run uses as many torch threads as
CPUs it asked for. The covariance statistics the grid needs are computed first, once per (model,
layers, statistics settings), into one cache shared by every run (`<sweep dir>/stats` unless the
base sets `stats_cache`); the runs that need them start when they are there. Running the sweep
again skips the cells with a summary.json, continues those with a config.yaml from their
checkpoint and starts the rest; a run whose worker process dies (killed, out of memory) is
retried by Ray (its default, 3 times), continuing from its checkpoint too. Each run's log (its
error's traceback too) is `<sweep dir>/logs/<cell name>.log`. On a cluster (`address`), the sweep
directory, the model and the data must be reachable at the same paths from every node.

Ray is an optional dependency (`pip install 'editscale[ray]'`); planning (`dry_run`) needs none.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import math
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from editscale.config_files import read_yaml_mapping, validate
from editscale.errors import EditscaleError
from editscale.run.config import RunConfig, resolve_config, usable_cpus

RAY_MISSING = "editscale sweep needs Ray: pip install 'editscale[ray]'"
REFRESH_SECONDS = 2.0
GRID_AXES = ("model", "method", "sample", "batch_size", "seed", "method_config")


class Grid(BaseModel):
    """The values each axis takes; the sweep's runs are the product of the axes given."""

    model_config = ConfigDict(extra="forbid")

    method: list[str] | None = Field(None, min_length=1, description="Editing methods.")
    model: list[str] | None = Field(None, min_length=1, description="Models (preset, hub name or directory).")
    sample: list[int] | None = Field(None, min_length=1, description="Samples of the dataset's unique subjects.")
    batch_size: list[int] | None = Field(None, min_length=1, description="Facts per edit call.")
    seed: list[int] | None = Field(None, min_length=1, description="Seeds of the context templates.")
    method_config: list[dict[str, Any]] | None = Field(
        None, min_length=1, description="Method hyper-parameter overrides, one mapping per value ({} = none).")


class Resources(BaseModel):
    """What one run (and one statistics task) asks Ray for."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1, gt=0, description="CPUs per run; the run uses this many torch threads (at least 1).")
    gpus: float = Field(0, ge=0, description="GPUs per run (Ray sets CUDA_VISIBLE_DEVICES; use device cuda:0).")
    memory_gb: float | None = Field(None, gt=0, description="Memory per run in GiB, for Ray's packing.")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields every run shares.")
    grid: Grid = Field(default_factory=Grid, description="Lists of values; every combination is one run.")
    per_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Method hyper-parameters for the runs of one method, over the base's "
                                          "method_config and under the grid's overrides.")
    resources: Resources = Field(default_factory=Resources, description="What one run asks Ray for.")
    imports: list[str] = Field(default_factory=list, description="Modules every Ray worker imports first: editing "
                                                                 "methods registered outside editscale.")

    @classmethod
    def load(cls, path: Path | str) -> SweepSpec:
        spec = validate(cls, read_yaml_mapping(path, "sweep file"), source=str(path))
        spec.check(str(path))
        return spec

    def check(self, source: str = "sweep") -> None:
        """Errors a field's type cannot catch, each naming the field."""
        RunConfig.parse(self.base, source=f"{source}: base")
        for axis in GRID_AXES:
            if getattr(self.grid, axis) is not None and axis in self.base:
                raise EditscaleError(f"{source}: '{axis}' is set in both base and grid; keep one")
        if "threads" in self.base:
            raise EditscaleError(f"{source}: base.threads is set by resources.cpus in a sweep; remove it")
        methods = self.grid.method or [self.base.get("method", RunConfig.model_fields["method"].default)]
        for name in self.per_method:
            if name not in methods:
                raise EditscaleError(f"{source}: per_method.{name}: not a method of this sweep "
                                     f"({', '.join(methods)})")


def cell_name(method: str, model: str, sample: int, batch_size: int, seed: int,
              overrides: dict[str, Any] | None = None) -> str:
    """A cell's directory name, e.g. `rome-embedded-s0-b1-seed0`, with a short hash of its
    method_config overrides when it has any; the same cell always gets the same name."""
    model_part = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name) or "model"
    name = f"{method}-{model_part}-s{sample}-b{batch_size}-seed{seed}"
    if overrides:
        text = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str)
        name += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name


# ---------------------------------------------------------------------- the plan


@dataclass
class Cell:
    name: str
    path: Path
    config: RunConfig  # resolved (method presets filled in)
    overrides: dict[str, Any]
    start: Literal["done", "resume", "new"]  # what the directory held when the sweep started
    stats_key: str | None = None
    state: str = "queued"  # queued, stats, running, done, failed; skipped: done before
    error: str | None = None
    launched: float | None = None
    rate_from: tuple[float, int] | None = None  # (time, edits done) when first seen running


@dataclass
class StatsTask:
    key: str
    config: RunConfig  # the first cell that needs these statistics: its editor computes them
    label: str
    cells: list[str] = field(default_factory=list)
    state: str = "pending"  # pending, done, failed
    error: str | None = None
    seconds: float | None = None


@dataclass
class SweepResult:
    out: Path
    cells: list[Cell]
    stats: list[StatsTask]

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.state == "failed"]

    def run_dirs(self) -> list[Path]:
        """Cells that hold a run (finished or not)."""
        return [c.path for c in self.cells if (c.path / "config.yaml").exists()]


def plan(spec: SweepSpec, out: Path, *, source: str = "sweep") -> SweepResult:
    """The cells of the sweep with their resolved configs and starting states, and the statistics
    tasks the unfinished cells need."""
    _import_modules(spec.imports)
    g, defaults = spec.grid, RunConfig.model_fields
    axes = {axis: getattr(g, axis) or [spec.base.get(axis, defaults[axis].get_default(call_default_factory=True))]
            for axis in GRID_AXES if axis != "method_config"}
    overrides = g.method_config or [{}]
    cells: list[Cell] = []
    for model, method, sample, batch_size, seed, override in itertools.product(
            axes["model"], axes["method"], axes["sample"], axes["batch_size"], axes["seed"], overrides):
        name = cell_name(method, model, sample, batch_size, seed, override)
        if any(c.name == name for c in cells):
            raise EditscaleError(f"{source}: two grid cells are both named {name} (a repeated value, or models "
                                 "whose folders share a name)")
        method_config = {**spec.base.get("method_config", {}), **spec.per_method.get(method, {}), **override}
        fields = {"stats_cache": str(out / "stats"), **spec.base, "model": model, "method": method,
                  "sample": sample, "batch_size": batch_size, "seed": seed, "method_config": method_config}
        try:
            cfg = resolve_config(RunConfig.parse(fields, source=f"{source}: cell {name}"))
        except EditscaleError as e:
            raise EditscaleError(f"{source}: cell {name}: {e}") from e
        path = out / name
        start = "done" if (path / "summary.json").exists() else "resume" if (path / "config.yaml").exists() else "new"
        cells.append(Cell(name, path, cfg, override, start, state="skipped" if start == "done" else "queued"))

    stats: dict[str, StatsTask] = {}
    for cell in cells:
        key = _stats_key(cell.config) if cell.start != "done" else None
        if key is None:
            continue
        cell.stats_key = key
        if key not in stats:
            k = json.loads(key)
            stats[key] = StatsTask(key, cell.config, f"{Path(k['model']).name} layers {k['layers']} "
                                                     f"{k['corpus']} n={k['n_samples']} {k['dtype']}")
        stats[key].cells.append(cell.name)
    return SweepResult(out, cells, list(stats.values()))


def _stats_key(cfg: RunConfig) -> str | None:
    """What a cell's statistics depend on, or None for a method without them (docs/protocol.md §2.5)."""
    from editscale.methods.base import get_method
    from editscale.methods.config import StatsConfig

    cls = get_method(cfg.method).config_class
    if not issubclass(cls, StatsConfig):
        return None
    mc = cls.parse(cfg.method_config)
    return json.dumps({"model": cfg.model, "dtype": cfg.dtype, "stats_cache": cfg.stats_cache,
                       "layers": list(mc.layers), **mc.stats_options()}, sort_keys=True)


def _import_modules(names: Sequence[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise EditscaleError(f"sweep imports: cannot import {name}: {e}") from e


# ---------------------------------------------------------------------- Ray tasks (run in the workers)


def _one_line(e: BaseException) -> str:
    if isinstance(e, EditscaleError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _log_to(path: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
    return log


def _stats_task(cfg: dict[str, Any], threads: int, imports: list[str], log_path: str) -> dict[str, Any]:
    """Build the cell's editor once on the unedited model: `ensure_prepared` computes the
    statistics into the shared cache (the templates it also makes are thrown away)."""
    from editscale.models.loading import load_model
    from editscale.run.runner import build_editor, set_threads
    from editscale.run.store import RunStore

    log = _log_to(log_path)
    t0 = time.perf_counter()
    try:
        _import_modules(imports)
        set_threads(threads)
        c = RunConfig.model_validate(cfg)
        log(f"statistics: pid {os.getpid()}, {threads} threads")
        lm = load_model(c.model, device=c.device, dtype=c.dtype, device_map=c.device_map,
                        max_memory=c.max_memory, offload_folder=c.offload_folder)
        with tempfile.TemporaryDirectory() as scratch:
            build_editor(c, RunStore(scratch), lm.adapter, lm.name, progress=False)
    except Exception as e:
        log(traceback.format_exc())
        return {"ok": False, "error": _one_line(e)}
    seconds = round(time.perf_counter() - t0, 2)
    log(f"statistics ready in {seconds} s")
    return {"ok": True, "seconds": seconds}


def _run_task(cfg: dict[str, Any], out: str, threads: int, imports: list[str], log_path: str,
              stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cell: the ordinary runner, which continues from the directory's checkpoint when it
    holds this run already (and refuses a directory that holds another)."""
    from editscale.run.runner import Runner

    if stats is not None and not stats["ok"]:
        return {"ok": False, "error": f"statistics failed: {stats['error']}"}
    log = _log_to(log_path)
    try:
        _import_modules(imports)
        log(f"run: pid {os.getpid()}, {threads} threads")
        c = RunConfig.model_validate(cfg).model_copy(update={"threads": threads})
        summary = Runner(c, out, progress=False, log=log).run()
    except Exception as e:
        log(traceback.format_exc())
        return {"ok": False, "error": _one_line(e)}
    log(f"done: {summary['edits_done']} edits")
    return {"ok": True, "edits_done": summary["edits_done"]}


# ---------------------------------------------------------------------- the driver


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise EditscaleError(RAY_MISSING) from e
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None,
            runtime_env: dict[str, Any] | None = None) -> bool:
    """Start a local Ray instance (`num_cpus` default: the CPUs this process may use) or join the
    cluster at `address`, unless this process is connected already; True when it connected here.
    The EDITSCALE_* environment variables (task folders, caches) go to every worker."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    env = dict(runtime_env or {})
    env["env_vars"] = {**{k: v for k, v in os.environ.items() if k.startswith("EDITSCALE_")},
                       **env.get("env_vars", {})}
    common = {"runtime_env": env, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus or usable_cpus(), include_dashboard=False, **common)
    return True


def run_sweep(spec: SweepSpec | Path | str, out: Path | str, *, address: str | None = None,
              max_concurrent: int | None = None, dry_run: bool = False, progress: bool = True,
              console: Console | None = None) -> SweepResult:
    """Run (or continue) the sweep into `out`; a cell that fails is marked failed and the others
    go on. `dry_run`: the plan only, without Ray. Uses the Ray instance this process is connected
    to, if any (see `connect`), else starts one (or joins `address`) and stops it at the end."""
    source = str(spec) if not isinstance(spec, SweepSpec) else "sweep"
    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.load(spec)
    else:
        spec.check(source)
    if max_concurrent is not None and max_concurrent < 1:
        raise EditscaleError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    out = Path(out).resolve()
    result = plan(spec, out, source=source)
    if dry_run:
        return result
    ray = import_ray()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "sweep.yaml").write_text(_dump_spec(spec))
    started = connect(address)
    try:
        _execute(ray, spec, result, max_concurrent, progress, console or Console())
    finally:
        if started:
            ray.shutdown()
    return result


def _dump_spec(spec: SweepSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _execute(ray: Any, spec: SweepSpec, result: SweepResult, max_concurrent: int | None, progress: bool,
             console: Console) -> None:
    res = spec.resources
    threads = max(1, math.floor(res.cpus))
    opts: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    logs = result.out / "logs"
    stats_fn = ray.remote(_stats_task).options(**opts)
    run_fn = ray.remote(_run_task).options(**opts)

    stats_refs: dict[str, Any] = {}
    stats_by_ref: dict[Any, StatsTask] = {}
    for i, task in enumerate(result.stats):
        ref = stats_fn.remote(task.config.model_dump(), threads, spec.imports, str(logs / f"stats-{i}.log"))
        stats_refs[task.key] = ref
        stats_by_ref[ref] = task
    queue = [c for c in result.cells if c.start != "done"]
    for c in queue:
        if c.stats_key is not None:
            c.state = "stats"
    running: dict[Any, Cell] = {}

    def launch() -> None:
        while queue and (max_concurrent is None or len(running) < max_concurrent):
            cell = queue.pop(0)
            log = logs / f"{cell.name}.log"
            ref = run_fn.remote(cell.config.model_dump(), str(cell.path), threads, spec.imports, str(log),
                                stats_refs.get(cell.stats_key) if cell.stats_key else None)
            cell.launched = time.time()
            running[ref] = cell

    def collect(timeout: float) -> None:
        if stats_by_ref:
            done, _ = ray.wait(list(stats_by_ref), num_returns=len(stats_by_ref), timeout=0)
            for ref in done:
                task = stats_by_ref.pop(ref)
                outcome = _get(ray, ref)
                task.state, task.error, task.seconds = ("done" if outcome["ok"] else "failed",
                                                        outcome.get("error"), outcome.get("seconds"))
                for cell in result.cells:
                    if cell.stats_key == task.key and cell.state == "stats":
                        cell.state = "queued"
        if not running:
            return
        done, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
        for ref in done:
            cell = running.pop(ref)
            outcome = _get(ray, ref)
            cell.state, cell.error = ("done", None) if outcome["ok"] else ("failed", outcome["error"])

    from rich.live import Live

    live = Live(progress_table(result), console=console, auto_refresh=False) if progress else None
    try:
        if live is not None:
            live.start()
        launch()
        last = 0.0
        while running or queue:
            collect(REFRESH_SECONDS)
            launch()
            if live is not None and time.time() - last >= REFRESH_SECONDS:
                live.update(progress_table(result), refresh=True)
                last = time.time()
        collect(0)
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        raise
    finally:
        if live is not None:
            live.update(progress_table(result), refresh=True)
            live.stop()


def _get(ray: Any, ref: Any) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except Exception as e:  # the worker died (killed, out of memory): the task's own errors come back as values
        return {"ok": False, "error": _one_line(e)}


# ---------------------------------------------------------------------- the table


def _last_row(path: Path, chunk: int = 65536) -> dict[str, Any] | None:
    """The last complete row of a JSONL file, reading only its end."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                lines = f.read().split(b"\n")
                complete = lines if start == 0 else lines[1:]  # the first piece may be cut
                for line in reversed(complete):
                    if line.strip():
                        try:
                            return json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a torn last line
                if start == 0:
                    return None
                chunk *= 4
    except FileNotFoundError:
        return None


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _observe(cell: Cell, now: float) -> tuple[int, float | None, str]:
    """(edits done, ES over the last 50 edits, ETA) from the cell's edits.jsonl; moves a launched
    cell to `running` once its task has started writing."""
    row = _last_row(cell.path / "edits.jsonl")
    done = row["index"] + 1 if row else 0
    es = row.get("es_w50") if row else None
    log = cell.path.parent / "logs" / f"{cell.name}.log"
    if cell.state in ("queued", "stats") and cell.launched is not None and log.exists() \
            and log.stat().st_mtime >= cell.launched:
        cell.state = "running"
    eta = ""
    if cell.state == "running":
        if cell.rate_from is None:
            cell.rate_from = (now, done)
        t0, n0 = cell.rate_from
        if done > n0 and now > t0:
            eta = _duration((cell.config.edits - done) / ((done - n0) / (now - t0)))
    return done, es, eta


def progress_table(result: SweepResult) -> Table:
    now = time.time()
    t = Table(title=f"sweep {result.out}", title_justify="left")
    for col, justify in (("run", "left"), ("state", "left"), ("edits", "right"), ("ES w50", "right"),
                         ("ETA", "right"), ("", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    colors = {"done": "green", "skipped": "green", "failed": "red", "running": "cyan"}
    for cell in result.cells:
        done, es, eta = _observe(cell, now)
        state = f"[{colors[cell.state]}]{cell.state}[/]" if cell.state in colors else cell.state
        note = cell.error or ("resumed" if cell.start == "resume" else "")
        t.add_row(cell.name, state, f"{done}/{cell.config.edits}", "-" if es is None else f"{es:.2f}", eta,
                  note[:160])
    for task in result.stats:
        if task.state == "failed":
            t.add_row(f"statistics {task.label}", "[red]failed[/]", "", "", "", (task.error or "")[:160])
    return t


def plan_table(result: SweepResult) -> Table:
    """What `--dry-run` shows: every cell, its starting state and what sets it apart."""
    t = Table(title=f"sweep {result.out}: {len(result.cells)} runs, {len(result.stats)} statistics tasks",
              title_justify="left")
    for col in ("run", "start", "method", "model", "sample", "batch", "seed", "overrides"):
        t.add_column(col)
    for c in result.cells:
        cfg = c.config
        t.add_row(c.name, c.start, cfg.method, cfg.model, str(cfg.sample), str(cfg.batch_size), str(cfg.seed),
                  json.dumps(c.overrides) if c.overrides else "")
    for task in result.stats:
        t.add_row(f"statistics: {task.label}", "", "", "", "", "", "", f"for {len(task.cells)} runs")
    return t

