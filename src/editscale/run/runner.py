"""The sequential runner: edit N facts one after another, measure after each edit and on a schedule.

Per edit: ES/PS/NS of that edit (with windowed means over the last 5 and 50), the drift of every
edited layer, the editor's diagnostics and timings. Every `eval_every` edits: forgetting of all
earlier successful edits and the control set's recall. Every `checkpoint_every` edits: the edited
layers' weights and the runner state, so `resume` continues where a killed run stopped and ends with
the same rows and weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from editscale.data.records import EditRecord
from editscale.errors import EditscaleError
from editscale.eval.drift import layer_drift
from editscale.eval.forgetting import ForgettingTracker, select_control
from editscale.eval.proficiency import edit_scores, window_means
from editscale.methods.base import Editor, EditRequest, MethodConfig, apply_result, get_method
from editscale.methods.solver.context import EditContext
from editscale.run.config import RunConfig, dump_config, load_config
from editscale.run.store import RunStore

WINDOWS = (5, 50)


def resolve_method_config(cfg: RunConfig, model_name: str, method_config_file: Path | None = None,
                          overrides: dict[str, Any] | None = None) -> RunConfig:
    """Fill cfg.method_config: the preset for the model, then a YAML file, then overrides."""
    editor_cls = get_method(cfg.method)
    if cfg.method_config and method_config_file is None and not overrides:
        editor_cls.config_class.parse(cfg.method_config, source="method_config")  # validate
        return cfg
    base: dict[str, Any] = {}
    if method_config_file is not None:
        base = editor_cls.config_class.from_yaml(method_config_file).model_dump()
    else:
        base = editor_cls.default_config(model_name).model_dump()
    base.update(cfg.method_config)
    base.update(overrides or {})
    resolved = editor_cls.config_class.parse(base, source="method config").model_dump(mode="json")
    return cfg.model_copy(update={"method_config": resolved})


def select_edit_order(records: list[EditRecord], cfg: RunConfig) -> list[EditRecord]:
    """The records of sample `cfg.sample` in order: a sample file's list, or the paper's recipe
    (unique subjects, seed 37, cumulative shuffles) rebuilt over this dataset."""
    from editscale.data.sampling import load_sample_file, make_samples, select_sample, unique_subject_indices

    if cfg.sample_file:
        samples = load_sample_file(cfg.sample_file)
    else:
        samples = make_samples(unique_subject_indices(records), n_samples=cfg.sample + 1)
    key = str(cfg.sample)
    if key not in samples:
        raise EditscaleError(f"no sample {key}; the sample file holds {', '.join(sorted(samples, key=int))}")
    if cfg.edits > len(samples[key]):
        raise EditscaleError(f"--edits {cfg.edits} is more than sample {key} holds ({len(samples[key])} "
                             f"records of dataset '{cfg.dataset}')")
    by = "position" if cfg.sample_file is None else "case_id"
    return select_sample(records, samples, key, None, by=by)


@dataclass
class RunState:
    edits_done: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"es": [], "ps": [], "ns": []})
    skipped: list[int] = field(default_factory=list)


class Runner:
    def __init__(self, cfg: RunConfig, out: Path | str, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.store = RunStore(out)
        self.progress = progress
        self.log = log

    # ------------------------------------------------------------------ setup

    @classmethod
    def resume(cls, out: Path | str, **kwargs: Any) -> Runner:
        path = Path(out) / "config.yaml"
        if not path.exists():
            raise EditscaleError(f"{out} holds no run (no config.yaml)")
        return cls(load_config(path), out, **kwargs)

    def _check_dir(self) -> None:
        path = self.store.root / "config.yaml"
        if path.exists():
            before = load_config(path)
            if before.identity() != self.cfg.identity():
                diff = [k for k, v in self.cfg.identity().items() if before.identity().get(k) != v]
                raise EditscaleError(
                    f"{self.store.root} holds another run (differs in: {', '.join(diff)}); "
                    "use a new --out, or `editscale resume DIR` to continue that run")
        elif self.store.root.exists() and any(self.store.root.iterdir()):
            raise EditscaleError(f"{self.store.root} exists and is not an editscale run directory")

    def run(self) -> dict[str, Any]:
        from editscale.api import load_records
        from editscale.models.loading import load_model

        cfg = self.cfg
        self._check_dir()
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        cfg = self.cfg = resolve_method_config(cfg, lm.name)
        records = load_records(cfg.dataset, data_path=cfg.data_path)
        order = select_edit_order(records, cfg)
        edits = order[: cfg.edits]
        self.store.create()
        self.store.write_text("config.yaml", dump_config(cfg))

        adapter = lm.adapter
        editor_cls = get_method(cfg.method)
        method_cfg: MethodConfig = editor_cls.config_class.parse(cfg.method_config)
        layers = list(method_cfg.layers)
        templates = self.store.read_json("templates.json") or {}
        ctx = EditContext(lm.name, seed=cfg.seed, templates=dict(templates),
                          stats_cache_dir=Path(cfg.stats_cache) if cfg.stats_cache else None, progress=self.progress)
        editor: Editor = editor_cls(adapter, method_cfg, ctx)

        # Everything taken from the base model happens before a checkpoint is loaded.
        editor.ensure_prepared()
        if ctx.templates and ctx.templates != templates:
            self.store.write_json("templates.json", ctx.templates)
        original = {layer: adapter.get_mlp_out_weight(layer).detach().float().cpu().clone() for layer in layers}
        tracker = ForgettingTracker()
        control_ids = self.store.read_json("control.json")
        by_id = {r.case_id: r for r in records}
        if control_ids is None:
            tracker.control = select_control(adapter, order[cfg.edits:], cfg.control) if cfg.control else []
            self.store.write_json("control.json", [r.case_id for r in tracker.control])
        else:
            tracker.control = [by_id[c] for c in control_ids]
        suite = self._downstream_suite(cfg, lm.name)
        if suite is not None and not any(r["edits_done"] == 0 for r in self.store.iter_rows("downstream")):
            self.store.append("downstream", self._downstream_row(suite, lm, 0))  # the unedited model

        state = RunState()
        ckpt = self.store.load_checkpoint()
        if ckpt is not None:
            weights, saved = ckpt
            for layer in layers:
                adapter.set_mlp_out_weight(layer, weights[f"layer{layer}"])
                if f"bias{layer}" in weights:
                    with torch.no_grad():
                        bias = adapter.module("mlp_out", layer).bias
                        bias.copy_(weights[f"bias{layer}"].to(bias.dtype))
            editor_state = {k.removeprefix("editor."): v for k, v in weights.items() if k.startswith("editor.")}
            if editor_state:
                editor.load_state_dict(editor_state)  # type: ignore[attr-defined]
            state = RunState(saved["edits_done"], saved["history"], saved.get("skipped", []))
            tracker.load_state_dict(saved["tracker"], by_id)
            self.log(f"resuming {self.store.root} after edit {state.edits_done}")
        # rows past the checkpoint were written by the killed process: an uninterrupted run
        # writes them again, so they go
        self.store.truncate("edits", "index", state.edits_done)
        self.store.truncate("forgetting", "edits_done", state.edits_done + 1)
        self.store.truncate("downstream", "edits_done", state.edits_done + 1)

        t_start = time.perf_counter()
        done_before = state.edits_done
        with _progress_bar(self.progress, cfg.edits, state.edits_done) as bar:
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
                    self.store.append("forgetting", tracker.check(adapter, state.edits_done))
                if suite is not None and due(cfg.downstream_every):
                    drow = self._downstream_row(suite, lm, state.edits_done)
                    self.store.append("downstream", drow)
                    row = {**row, "downstream": drow}
                if due(cfg.checkpoint_every):
                    self._checkpoint(adapter, layers, state, tracker, editor)
                bar(state.edits_done, row)
        elapsed = time.perf_counter() - t_start
        summary = self._summary(state, elapsed, state.edits_done - done_before)
        self.store.write_json("summary.json", summary)
        return summary

    def _downstream_suite(self, cfg: RunConfig, model_name: str) -> Any:
        from editscale.eval.downstream.suite import DownstreamSuite, default_tasks

        names = default_tasks(model_name) if cfg.downstream is None else cfg.downstream
        if not cfg.downstream_every or not names:
            return None
        return DownstreamSuite(names, mode=cfg.downstream_mode, n=cfg.downstream_n, data_dir=cfg.glue_dir)

    def _downstream_row(self, suite: Any, lm: Any, edits_done: int) -> dict[str, Any]:
        from editscale.eval.downstream.suite import summary_row

        t0 = time.perf_counter()
        results = suite.evaluate(lm.model, lm.tokenizer)
        return {"edits_done": edits_done, "mode": suite.mode, "tasks": summary_row(results),
                "seconds": round(time.perf_counter() - t0, 4)}

    # ------------------------------------------------------------------ one edit

    def _edit_batch(self, editor: Editor, adapter: Any, records: list[EditRecord], first_index: int,
                    original: dict[int, torch.Tensor], state: RunState, tracker: ForgettingTracker
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
        bad = [layer for layer, d in (*result.deltas.items(), *result.bias_deltas.items())
               if not torch.isfinite(d).all()]
        scores = None
        if not bad:
            saved = self._edited_params(adapter, result)
            apply_result(adapter, result)
            scores = edit_scores(adapter, records)
            if not all(math.isfinite(s.nll_new) and math.isfinite(s.nll_true) for s in scores):
                self._restore_params(adapter, saved)  # the logits went non-finite: undo exactly
                bad = sorted(set(result.deltas) | set(result.bias_deltas))
                scores = None
        t2 = time.perf_counter()
        if scores is None:
            state.skipped.extend(r["index"] for r in rows)
            for row in rows:
                row.update(status="nonfinite", bad_layers=bad, diagnostics=_clean(result.diagnostics))
            return rows
        after_apply = getattr(editor, "after_apply", None)
        if after_apply is not None:
            after_apply(requests, result)  # e.g. AlphaEdit's record of the keys it must now preserve
        drift = {str(layer): layer_drift(original[layer], adapter.get_mlp_out_weight(layer)) for layer in original}
        t3 = time.perf_counter()
        timings = {**{k: round(v, 5) for k, v in result.timings.items()}, "edit": round(t1 - t0, 5),
                   "eval": round(t2 - t1, 5), "drift": round(t3 - t2, 5), "total": round(t3 - t0, 5),
                   "batch_size": len(records)}
        h = state.history
        for record, row, sc in zip(records, rows, scores):
            h["es"].append(sc.es)
            h["ps"].append(sc.ps)
            h["ns"].append(sc.ns)
            tracker.add(record, greedy_success=sc.rewrite_correct, es_success=sc.es == 1.0)
            row.update(status="ok", **sc.as_row())
            for w in WINDOWS:
                for k in ("es", "ps", "ns"):
                    row[f"{k}_w{w}"] = window_means(h[k], w)
            # drift, diagnostics and timings belong to the batch: every row of it carries them
            row.update(drift=drift, diagnostics=_clean(result.diagnostics), timings=timings)
        return rows

    @staticmethod
    def _edited_params(adapter: Any, result: Any) -> dict[tuple[str, int], torch.Tensor]:
        saved = {("w", layer): adapter.get_mlp_out_weight(layer).detach().clone() for layer in result.deltas}
        saved.update({("b", layer): adapter.module("mlp_out", layer).bias.detach().clone()
                      for layer in result.bias_deltas})
        return saved

    @staticmethod
    def _restore_params(adapter: Any, saved: dict[tuple[str, int], torch.Tensor]) -> None:
        for (kind, layer), value in saved.items():
            if kind == "w":
                adapter.set_mlp_out_weight(layer, value)
            else:
                with torch.no_grad():
                    adapter.module("mlp_out", layer).bias.copy_(value)

    def _checkpoint(self, adapter: Any, layers: list[int], state: RunState, tracker: ForgettingTracker,
                    editor: Editor) -> None:
        weights = {f"layer{layer}": adapter.get_mlp_out_weight(layer).float() for layer in layers}
        # biases too: FT-C trains them (for the other methods they are saved unchanged)
        weights.update({f"bias{layer}": adapter.module("mlp_out", layer).bias.detach().float()
                        for layer in layers if adapter.module("mlp_out", layer).bias is not None})
        # a method's own state (AlphaEdit's preserved keys) travels with the weights
        state_dict = getattr(editor, "state_dict", None)
        weights.update({f"editor.{k}": v for k, v in (state_dict() if state_dict else {}).items()})
        self.store.save_checkpoint(weights, {"edits_done": state.edits_done, "history": state.history,
                                             "skipped": state.skipped, "tracker": tracker.state_dict()})

    def _summary(self, state: RunState, elapsed: float, edits_this_process: int) -> dict[str, Any]:
        return {**summarize(self.store, self.cfg), "edits_done": state.edits_done, "nonfinite_edits": state.skipped,
                "wall_seconds_this_process": round(elapsed, 2), "edits_this_process": edits_this_process}


def summarize(store: RunStore, cfg: RunConfig) -> dict[str, Any]:
    """The summary figures of a run from its files: a finished run's summary.json, or a running one's so far."""
    rows = [r for r in store.iter_rows("edits") if r["status"] == "ok"]
    forget = store.rows("forgetting")
    last = forget[-1] if forget else {}
    mode = cfg.forgetting
    max_drift = max((d["dist"] for r in rows for d in r["drift"].values()), default=0.0)
    # a batch's timings are on each of its rows: count each batch once
    batch_times = {r.get("batch", r["index"]): r["timings"]["total"] for r in rows}

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if r[key] == r[key]]
        return sum(vals) / len(vals) if vals else float("nan")

    downstream = store.rows("downstream")
    return {
        "edits_done": (rows[-1]["index"] + 1) if rows else 0,
        "edits_planned": cfg.edits,
        "nonfinite_edits": [r["index"] for r in store.iter_rows("edits") if r["status"] != "ok"],
        "mean_es": mean("es"), "mean_ps": mean("ps"), "mean_ns": mean("ns"),
        "forgetting_mode": mode,
        "forgotten_pct_final": last.get(f"{'paper' if mode == 'paper' else 'prob'}_forgotten_pct", 0.0),
        "paper_forgotten_pct_final": last.get("paper_forgotten_pct", 0.0),
        "prob_forgotten_pct_final": last.get("prob_forgotten_pct", 0.0),
        "control_known_pct_final": last.get("control_known_pct"),
        "downstream_initial_f1": {k: v["f1"] for k, v in downstream[0]["tasks"].items()} if downstream else {},
        "downstream_final_f1": {k: v["f1"] for k, v in downstream[-1]["tasks"].items()} if downstream else {},
        "downstream_final_at": downstream[-1]["edits_done"] if downstream else None,
        "max_drift": max_drift,
        "final_drift": rows[-1]["drift"] if rows else {},
        "seconds_per_edit": sum(batch_times.values()) / len(rows) if rows else float("nan"),
    }


def _clean(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in d.items()}


class _progress_bar:
    """Edits/s, ETA and live ES / NS (last 50) and drift; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self.f1 = ""  # the latest downstream F1s, shown until the next evaluation

    def __enter__(self) -> Callable[[int, dict[str, Any]], None]:
        if not self.enabled:
            return lambda n, row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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


def run_summary_yaml(summary: dict[str, Any]) -> str:
    return yaml.safe_dump(summary, sort_keys=False)


def load_model_or_run(name_or_dir: str | Path, *, device: str = "cpu") -> tuple[Any, str]:
    """A model by preset/hub name/directory, or a run directory's model at its latest checkpoint."""
    from editscale.models.loading import load_model

    path = Path(name_or_dir)
    if not (path / "config.yaml").exists():
        return load_model(str(name_or_dir), device=device), str(name_or_dir)
    cfg = load_config(path / "config.yaml")
    lm = load_model(cfg.model, device=device, dtype=cfg.dtype)
    ckpt = RunStore(path).load_checkpoint()
    if ckpt is None:
        return lm, f"{path} (no checkpoint yet: the unedited {cfg.model})"
    weights, state = ckpt
    for key, w in weights.items():
        if key.startswith("layer"):
            lm.adapter.set_mlp_out_weight(int(key.removeprefix("layer")), w)
        elif key.startswith("bias"):
            with torch.no_grad():
                lm.adapter.module("mlp_out", int(key.removeprefix("bias"))).bias.copy_(w)
    return lm, f"{path} after {state['edits_done']} edits"
