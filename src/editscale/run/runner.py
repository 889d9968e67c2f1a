"""The runner: edit N facts one after another (or batch after batch) and measure as edits accumulate.

Per edit: ES/PS/NS of that edit (with windowed means over the last 5 and 50), the drift of every
edited layer, the editor's diagnostics and timings. Every `eval_every` edits: forgetting of all
earlier successful edits and the control set's recall. Every `downstream_every` edits: few-shot
skills. With the forgetting checkpoints: the model's health (`eval/health.py`). Every
`checkpoint_every` edits: a checkpoint (`run/checkpoint.py`), so `resume` continues where a killed
run stopped and ends with the same rows and weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editscale.data.probes import health_probe
from editscale.data.records import EditRecord
from editscale.data.registry import control_pool, load_records, records_by_id
from editscale.data.sampling import edit_order
from editscale.errors import EditscaleError
from editscale.eval.downstream.suite import DownstreamSuite, default_tasks, summary_row
from editscale.eval.drift import edited_drift
from editscale.eval.forgetting import ForgettingTracker, select_control
from editscale.eval.generation import generation_scores
from editscale.eval.health import health_check
from editscale.eval.proficiency import edit_scores, locality_answers, window_means
from editscale.methods.base import Editor, EditRequest, apply_result, get_method, in_name
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.stats import default_cache_dir, file_digest, given_second_moments
from editscale.methods.solver.templates import load_templates_file
from editscale.models.adapter import EditedParams, ModelAdapter
from editscale.models.loading import LoadedModel, load_model, model_key
from editscale.run.checkpoint import load_checkpoint, save_checkpoint
from editscale.run.config import RunConfig, dump_config, load_config, resolve_config, usable_cpus
from editscale.run.progress import ProgressBar
from editscale.run.store import CHECKPOINT, LOCK, RUN_ROWS, RunStore
from editscale.run.summary import summarize

WINDOWS = (5, 50)


@dataclass
class RunState:
    edits_done: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"es": [], "ps": [], "ns": []})
    skipped: list[int] = field(default_factory=list)


class Runner:
    """One run directory's run. The config is resolved on construction (method presets filled in,
    `resolve_config`), so `runner.cfg` is what config.yaml will hold."""

    def __init__(self, cfg: RunConfig, out: Path | str, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = resolve_config(cfg)
        self.store = RunStore(out)
        self.progress = progress
        self.log = log

    @classmethod
    def resume(cls, out: Path | str, **kwargs: Any) -> Runner:
        path = Path(out) / "config.yaml"
        if not path.exists():
            raise EditscaleError(f"{out} holds no run (no config.yaml)")
        return cls(load_config(path), out, **kwargs)

    def _check_dir(self) -> list[str]:
        """Refuse a run directory this run cannot use, before any model or data is loaded. Returns the
        fields in which the config of a run that never made an edit differs: that run is replaced."""
        root = self.store.root
        _check_writable(root)
        path = root / "config.yaml"
        if path.exists():
            before = load_config(path)
            if before.identity() != self.cfg.identity():
                diff = [k for k, v in self.cfg.identity().items() if before.identity().get(k) != v]
                if not self._made_no_edit():
                    raise EditscaleError(
                        f"{root} holds another run (differs in: {', '.join(diff)}); "
                        "use a new --out, or `editscale resume DIR` to continue that run")
                return diff
        elif root.exists() and any(p.name != LOCK for p in root.iterdir()):
            raise EditscaleError(f"{root} exists and is not an editscale run directory")
        return []

    def _made_no_edit(self) -> bool:
        # a run that failed before its first edit (bad data, an option only checked on use) has nothing
        # worth keeping; refusing it would make the corrected command need a new --out
        root = self.store.root
        if any((root / name).exists() for name in (CHECKPOINT, f"{CHECKPOINT}.old")):
            return False
        edits = root / "edits.jsonl"
        if not edits.exists():
            return True
        with open(edits, "rb") as f:
            return not f.readline().endswith(b"\n")  # a torn first line is no edit

    def _replace_unstarted(self, diff: list[str]) -> None:
        """Remove what the replaced run derived from its config (templates, control set, rows of the
        unedited model), so this run computes its own."""
        root = self.store.root
        self.log(f"{root}: replacing the config of a run that made no edit (differs in: {', '.join(diff)})")
        for name in ("config.yaml", "templates.json", ANCHORS_FILE, "control.json", "summary.json",
                     *(f"{rows}.jsonl" for rows in RUN_ROWS)):
            (root / name).unlink(missing_ok=True)
        shutil.rmtree(root / f"{CHECKPOINT}.tmp", ignore_errors=True)

    def run(self) -> dict[str, Any]:
        """Edit until `cfg.edits` are done (continuing from the run directory's checkpoint), with
        `cfg.threads` torch threads (summary.json: `threads_this_process`); the process's count is
        restored on return."""
        before = torch.get_num_threads()
        threads = set_threads(self.cfg.threads)
        try:
            self._check_dir()  # before the lock too: a directory that holds something else gets no lock file
            with self.store.lock(self.log):  # for the whole run, so a second writer fails before loading a model
                return self._run(threads)
        finally:
            torch.set_num_threads(before)

    def _run(self, threads: int) -> dict[str, Any]:
        cfg = self.cfg
        replaced = self._check_dir()
        if replaced:
            self._replace_unstarted(replaced)  # under the lock, unlike the check in `run`
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map,
                        max_memory=cfg.max_memory, offload_folder=cfg.offload_folder)
        records = load_records(cfg.dataset, data_path=cfg.data_path, strict=cfg.strict)
        order = edit_order(records, sample=cfg.sample, sample_file=cfg.sample_file, edits=cfg.edits,
                           dataset=cfg.dataset, data_path=cfg.data_path, order=cfg.order,
                           skip_missing=cfg.skip_missing)
        edits = order[: cfg.edits]
        self.store.create()
        self.store.write_text("config.yaml", dump_config(cfg))

        adapter = lm.adapter
        editor = build_editor(cfg, self.store, adapter, lm.name, progress=self.progress)
        self.store.write_text("config.yaml", dump_config(cfg, inputs=run_inputs(cfg)))
        layers, in_layers = list(editor.config.layers), editor.in_layers
        original = adapter.snapshot(layers, biases=False, in_layers=in_layers)
        tracker = ForgettingTracker(sample=cfg.forgetting_sample, planned=cfg.edits, seed=cfg.seed,
                                    generate=cfg.generation == "all")
        by_id = records_by_id(cfg.dataset, records)
        control_ids = self.store.read_json("control.json")
        if control_ids is None:
            pool = control_pool(cfg.dataset, order, cfg.edits)
            tracker.control = select_control(adapter, pool, cfg.control) if cfg.control else []
            self.store.write_json("control.json", [r.case_id for r in tracker.control])
        else:
            tracker.control = [by_id[c] for c in control_ids]
        suite = downstream_suite(cfg, lm.name) if cfg.downstream_every else None
        if suite is not None and not any(r["edits_done"] == 0 for r in self.store.iter_rows("downstream")):
            self.store.append("downstream", downstream_row(suite, lm, 0))  # the unedited model
        probe = health_probe(model_key(cfg.model)) if cfg.health else None
        if probe is not None and not any(r["edits_done"] == 0 for r in self.store.iter_rows("health")):
            self.store.append("health", {"edits_done": 0, **health_check(adapter, probe)})

        state = RunState()
        ckpt = load_checkpoint(self.store)
        if ckpt is not None:
            adapter.restore(ckpt.params)
            editor.load_state_dict(ckpt.editor_state)
            saved = ckpt.state
            state = RunState(saved["edits_done"], saved["history"], saved.get("skipped", []))
            tracker.load_state_dict(saved["tracker"], by_id)
            self.log(f"resuming {self.store.root} after edit {state.edits_done}")
        # rows past the checkpoint were written by the killed process: an uninterrupted run
        # writes them again, so they go
        self.store.truncate("edits", "index", state.edits_done)
        self.store.truncate("forgetting", "edits_done", state.edits_done + 1)
        self.store.truncate("downstream", "edits_done", state.edits_done + 1)
        self.store.truncate("health", "edits_done", state.edits_done + 1)

        t_start = time.perf_counter()
        done_before = state.edits_done
        with ProgressBar(self.progress, cfg.edits, state.edits_done) as bar:
            while state.edits_done < cfg.edits:
                i = state.edits_done
                batch = edits[i:min(i + cfg.batch_size, cfg.edits)]
                rows = self._edit_batch(editor, adapter, batch, i, original, state, tracker)
                for row in rows:
                    self.store.append("edits", row)
                if rows[0]["status"] == "nonfinite" and cfg.on_nonfinite == "stop":
                    self.log(f"edit {i} (case {batch[0].case_id}{' and its batch' if len(batch) > 1 else ''}) "
                             "gave a non-finite update; stopping (--on-nonfinite skip would skip it)")
                    break
                before, state.edits_done = i, i + len(batch)
                row = rows[-1]

                def due(every: int, _before: int = before) -> bool:
                    # crossing a multiple of `every`, so batch sizes need not divide the intervals
                    return state.edits_done // every > _before // every or state.edits_done == cfg.edits

                if due(cfg.eval_every):
                    self.store.append("forgetting",
                                      tracker.check(adapter, state.edits_done, skipped=state.skipped))
                    if probe is not None:
                        self.store.append("health", {"edits_done": state.edits_done, **health_check(adapter, probe)})
                if suite is not None and due(cfg.downstream_every):
                    drow = downstream_row(suite, lm, state.edits_done)
                    self.store.append("downstream", drow)
                    row = {**row, "downstream": drow}
                if due(cfg.checkpoint_every):
                    save_checkpoint(self.store, adapter.snapshot(layers, in_layers=in_layers), editor.state_dict(),
                                    {"edits_done": state.edits_done, "history": state.history,
                                     "skipped": state.skipped, "tracker": tracker.state_dict()})
                bar(state.edits_done, row)
        elapsed = time.perf_counter() - t_start
        summary = {**summarize(self.store, cfg), "edits_done": state.edits_done, "nonfinite_edits": state.skipped,
                   "wall_seconds_this_process": round(elapsed, 2),
                   "edits_this_process": state.edits_done - done_before, "threads_this_process": threads}
        self.store.write_json("summary.json", summary)
        return summary

    def _edit_batch(self, editor: Editor, adapter: ModelAdapter, records: list[EditRecord], first_index: int,
                    original: EditedParams, state: RunState, tracker: ForgettingTracker
                    ) -> list[dict[str, Any]]:
        """Edit the records together (one request each), score each, return one row per record."""
        t0 = time.perf_counter()
        requests = [EditRequest.from_record(r) for r in records]
        editor.check_batch(requests)
        result = editor.compute(requests)
        t1 = time.perf_counter()
        rows: list[dict[str, Any]] = [
            {"index": first_index + k, "batch": first_index // self.cfg.batch_size, "case_id": r.case_id,
             "subject": r.subject, "target_new": r.target_new, "target_true": r.target_true}
            for k, r in enumerate(records)]
        bad = result.nonfinite_parts()
        scores = None
        if not bad:
            saved = adapter.snapshot(set(result.deltas) | set(result.bias_deltas), in_layers=result.in_deltas)
            before = locality_answers(adapter, records)  # zsRE's NS compares with the answers before the edit
            apply_result(adapter, result)
            scores = edit_scores(adapter, records, before=before)
            if not all(math.isfinite(s.nll_new) and math.isfinite(s.nll_true) for s in scores):
                adapter.restore(saved)  # the logits went non-finite: undo exactly
                bad = sorted({*map(str, result.deltas), *map(str, result.bias_deltas),
                              *map(in_name, result.in_deltas)})
                scores = None
        t2 = time.perf_counter()
        if scores is None:
            state.skipped.extend(r["index"] for r in rows)
            for row in rows:
                row.update(status="nonfinite", bad_layers=bad, diagnostics=_clean(result.diagnostics))
            return rows
        editor.after_apply(requests, result)
        drift = edited_drift(adapter, original)
        t3 = time.perf_counter()
        # generated answers (docs/protocol.md §8.8): timed apart, so their cost per edit shows
        gens = generation_scores(adapter, records) if self.cfg.generation != "off" else None
        t4 = time.perf_counter()
        timings = {**{k: round(v, 5) for k, v in result.timings.items()}, "edit": round(t1 - t0, 5),
                   "eval": round(t2 - t1, 5), "drift": round(t3 - t2, 5), "total": round(t4 - t0, 5),
                   "batch_size": len(records)}
        if gens is not None:
            timings["generation"] = round(t4 - t3, 5)
        h = state.history
        for j, (record, row, sc) in enumerate(zip(records, rows, scores)):
            h["es"].append(sc.es)
            h["ps"].append(sc.ps)
            h["ns"].append(sc.ns)
            gen = gens[j] if gens is not None else None
            tracker.add(record, greedy_success=sc.rewrite_correct, es_success=sc.es == 1.0,
                        gen_success=None if gen is None else gen.es == 1.0)
            row.update(status="ok", **sc.as_row(), **(gen.as_row() if gen is not None else {}))
            for w in WINDOWS:
                for k in ("es", "ps", "ns"):
                    row[f"{k}_w{w}"] = window_means(h[k], w)
            # drift, diagnostics and timings belong to the batch: every row of it carries them
            row.update(drift=drift, diagnostics=_clean(result.diagnostics), timings=timings)
        return rows


def _check_writable(root: Path) -> None:
    """A run directory must be (or be creatable as) a directory this process can write."""
    if root.exists() and not root.is_dir():
        raise EditscaleError(f"--out {root} is a file, not a directory; pass a new or existing run directory")
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise EditscaleError(f"--out {root}: {existing} is a file, not a directory; pass another --out")
    # access() also answers EROFS for a read-only file system, which the permission bits do not show
    if not os.access(existing, os.W_OK | os.X_OK):
        what = root if existing == root else f"{root} cannot be created: {existing}"
        raise EditscaleError(f"--out {what} is not writable; pass a directory you can write to")


def set_threads(threads: int | None) -> int:
    """Give torch `threads` CPU threads (None: every CPU this process may use); returns the number.
    Runs side by side (a sweep) would otherwise each start one thread per core of the machine."""
    n = threads or usable_cpus()
    torch.set_num_threads(n)
    # torch allows this once, before any inter-op work; the intra-op count is what matters
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    return n


ANCHORS_FILE = "norm_anchor.json"  # NAS reference norms, taken from the base model once per run


def build_editor(cfg: RunConfig, store: RunStore, adapter: ModelAdapter, model_name: str, *,
                 progress: bool = True) -> Editor:
    """The run's editor with its explicit inputs: the templates already in the run directory (a
    resumed run and `retest` reuse them), the seed and the statistics cache."""
    editor_cls = get_method(cfg.method)
    stored = store.read_json("templates.json") or {}
    templates = dict(stored)
    if cfg.templates is not None:
        given = load_templates_file(cfg.templates)
        if stored and any(stored.get(k, v) != v for k, v in given.items()):
            raise EditscaleError(f"--templates {cfg.templates} no longer holds the templates {store.root} was edited "
                                 "with (its templates.json); restore the file or start a new run")
        templates = {**templates, **given}
    anchors = store.read_json(ANCHORS_FILE) or {}
    method_cfg = editor_cls.config_class.parse(cfg.method_config)
    mom2 = given_second_moments(cfg.stats, adapter, method_cfg.layers) if cfg.stats is not None else {}

    def sample_requests() -> list[tuple[str, str, str]]:
        return [(r.prompt, r.subject, r.target_new)
                for r in load_records(cfg.dataset, data_path=cfg.data_path, strict=cfg.strict)]

    ctx = EditContext(model_name, seed=cfg.seed, templates=dict(templates), mom2=mom2,
                      stats_cache_dir=Path(cfg.stats_cache) if cfg.stats_cache else None, progress=progress,
                      anchor_norms=dict(anchors), sample_requests=sample_requests)
    editor = editor_cls(adapter, method_cfg, ctx)
    editor.ensure_prepared()  # before a checkpoint is loaded: statistics come from the base model
    if ctx.templates and ctx.templates != stored:
        store.write_json("templates.json", ctx.templates)
    if ctx.anchor_norms and ctx.anchor_norms != anchors:
        store.write_json(ANCHORS_FILE, ctx.anchor_norms)
    return editor


def run_inputs(cfg: RunConfig) -> dict[str, Any]:
    """Where a run's context templates and covariance statistics came from (config.yaml `inputs`)."""
    def given(path: str) -> dict[str, Any]:
        return {"source": "file", "path": str(Path(path).resolve()), "sha256": file_digest(path)}

    out: dict[str, Any] = {"templates": given(cfg.templates) if cfg.templates is not None else
                           {"source": "generated from the unedited model", "seed": cfg.seed}}
    if cfg.stats is not None:
        out["stats"] = given(cfg.stats)
    elif "mom2_dataset" in cfg.method_config:
        out["stats"] = {"source": "cache", "corpus": cfg.method_config["mom2_dataset"],
                        "n_samples": cfg.method_config.get("mom2_n_samples"),
                        "cache_dir": str(Path(cfg.stats_cache).resolve() if cfg.stats_cache else default_cache_dir())}
    return out


def downstream_suite(cfg: RunConfig, model_name: str) -> DownstreamSuite | None:
    """The run's downstream tasks, or None when it has none."""
    names = default_tasks(model_name) if cfg.downstream is None else cfg.downstream
    if not names:
        return None
    return DownstreamSuite(names, mode=cfg.downstream_mode, n=cfg.downstream_n, data_dir=cfg.glue_dir)


def downstream_row(suite: DownstreamSuite, lm: LoadedModel, edits_done: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = suite.evaluate(lm.model, lm.tokenizer)
    return {"edits_done": edits_done, "mode": suite.mode, "tasks": summary_row(results),
            "seconds": round(time.perf_counter() - t0, 4)}


def _clean(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in d.items()}
