"""Re-test edits of a run as the *first* edit of the unedited model (the paper's Table 2, §3.4.1).

Is a disabling edit a property of the fact, or of the edits before it? Each chosen update of a run
(one edit, or one batch of a batched run) is applied alone to the unedited model, with the run's
method, resolved hyper-parameters, context templates and statistics (or with another `method`),
and the model is measured: the normalised distance of every edited layer (Table 2's measure), the
update size, ES/PS/NS of the edit, recall of the run's control facts, downstream F1 and the health
probe (loss on a fixed text, greedy continuations). The same number of normal updates drawn from
the run (seeded) is measured the same way as a baseline, and so is the unedited model once.

Verdict per update: *disabling as a first edit* when, after it alone, the control recall is below
`control_floor` times the unedited model's, or the fixed text's loss has risen by `nll_rise` nats
per token or more, or the mean downstream F1 is below `f1_floor` times the unedited model's.

Rows go to DIR/retest.jsonl as they are measured; a rerun skips what is already there, so a
killed retest continues and a retest with another method adds its rows beside the first.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from editscale.data.probes import health_probe
from editscale.data.registry import load_records, records_by_id
from editscale.errors import EditscaleError
from editscale.eval.drift import edited_drift
from editscale.eval.forgetting import ForgettingTracker
from editscale.eval.health import health_check
from editscale.eval.proficiency import edit_scores, locality_answers
from editscale.methods.base import EditRequest, apply_result
from editscale.models.loading import load_model, model_key
from editscale.run.config import RetestRule, RunConfig, load_config, resolve_config
from editscale.run.runner import build_editor, downstream_row, downstream_suite
from editscale.run.store import RunStore
from editscale.run.summary import updates


def _verdict(row: dict[str, Any], base: dict[str, Any], rule: RetestRule) -> list[str]:
    why = []
    if base.get("control_known_pct") and row.get("control_known_pct") is not None \
            and row["control_known_pct"] < rule.control_floor * base["control_known_pct"]:
        why.append(f"control recall {row['control_known_pct']:.0f}% < {rule.control_floor:.0%} of "
                   f"{base['control_known_pct']:.0f}%")
    if base.get("text_nll") is not None and row.get("text_nll") is not None \
            and row["text_nll"] - base["text_nll"] >= rule.nll_rise:
        why.append(f"text loss {row['text_nll']:.2f} vs {base['text_nll']:.2f} nats/token")
    if base.get("f1") and row.get("f1"):
        b, a = statistics.mean(base["f1"].values()), statistics.mean(row["f1"].values())
        if b > 0 and a < rule.f1_floor * b:
            why.append(f"mean F1 {a:.2f} < {rule.f1_floor:.0%} of {b:.2f}")
    return why


def retest(out: str, edits: Sequence[int], *, baseline: int | None = None, seed: int = 0,
           method: str | None = None, method_config: dict[str, Any] | None = None, downstream: bool = True,
           rule: RetestRule | None = None, device: str | None = None, progress: bool = True,
           log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Re-test the updates holding `edits` (edit indices of the run) and `baseline` normal ones
    (default: as many) as first edits; returns the rows of DIR/retest.jsonl for this method and
    these hyper-parameter overrides (its `method` label), and the unedited model's row."""
    store = RunStore(out)
    run_cfg = load_config(store.root / "config.yaml")
    rule = rule or RetestRule()
    if method is not None and method != run_cfg.method:
        cfg = RunConfig.parse({**run_cfg.model_dump(), "method": method, "method_config": method_config or {}},
                              source="retest")
    else:
        cfg = run_cfg.model_copy(update={"method_config": {**run_cfg.method_config, **(method_config or {})}})
    cfg = resolve_config(cfg.model_copy(update={"device": device or run_cfg.device}))
    # rows are keyed by this label, so a re-test with other hyper-parameters is kept apart
    label = cfg.method + "".join(f" {k}={v}" for k, v in sorted((method_config or {}).items()))

    units = {unit[0]["index"]: unit for unit in updates(store.iter_rows("edits"))}  # by first edit index
    by_edit = {r["index"]: first for first, unit in units.items() for r in unit}
    missing = [i for i in edits if i not in by_edit]
    if missing:
        raise EditscaleError(f"{out} has no successful edit {', '.join(map(str, missing))} "
                             f"(edits 0-{max(by_edit, default=-1)} were made)")
    if not edits:
        raise EditscaleError("no edits to re-test: name them (--edits i,j,...)")
    chosen = list(dict.fromkeys(by_edit[i] for i in edits))
    normal = [u for u in units if u not in chosen]
    n_base = len(chosen) if baseline is None else baseline
    drawn = sorted(random.Random(seed).sample(normal, min(n_base, len(normal))))
    plan = [("unedited", -1)] + [("candidate", u) for u in chosen] + [("baseline", u) for u in drawn]

    # the unedited model is measured once, whatever method re-tests the edits
    done = {(r["kind"], r["index"], r["method"]) for r in store.iter_rows("retest")}
    todo = [(k, u) for k, u in plan if (k, u, None if k == "unedited" else label) not in done]
    if todo:
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map,
                        max_memory=cfg.max_memory, offload_folder=cfg.offload_folder)
        adapter = lm.adapter
        editor = build_editor(cfg, store, adapter, lm.name, progress=progress)
        original = adapter.snapshot(editor.config.layers, in_layers=editor.in_layers)
        by_id = records_by_id(cfg.dataset, load_records(cfg.dataset, data_path=cfg.data_path, strict=cfg.strict))
        tracker = ForgettingTracker(control=[by_id[c] for c in store.read_json("control.json") or []])
        suite = downstream_suite(cfg, lm.name) if downstream else None
        probe = health_probe(model_key(cfg.model)) if cfg.health else None

        def measure() -> dict[str, Any]:
            row: dict[str, Any] = {**tracker.check_control(adapter)}
            if suite is not None:
                row["f1"] = {k: v["f1"] for k, v in downstream_row(suite, lm, 0)["tasks"].items()}
            if probe is not None:
                row.update(health_check(adapter, probe))
            return row

        base = next((r for r in store.iter_rows("retest") if r["kind"] == "unedited"), None)
        for kind, u in todo:
            t0 = time.perf_counter()
            if kind == "unedited":
                if base is None:
                    base = {"kind": "unedited", "index": -1, "method": None, **measure()}
                    store.append("retest", base)
                continue
            rows = units[u]
            records = [by_id[r["case_id"]] for r in rows]
            requests = [EditRequest.from_record(r) for r in records]
            editor.check_batch(requests)
            result = editor.compute(requests)
            row: dict[str, Any] = {"kind": kind, "index": u, "method": label, "batch": rows[0].get("batch"),
                                   "case_ids": [r.case_id for r in records], "subjects": [r.subject for r in records],
                                   "in_run": {"distance_after": max(d["dist"] for d in rows[-1]["drift"].values()),
                                              "es": statistics.mean(r["es"] for r in rows)}}
            if not result.all_finite():
                row.update(status="nonfinite", disabling=True, why=["the update is not finite"])
            else:
                before = locality_answers(adapter, records)
                apply_result(adapter, result)
                scores = edit_scores(adapter, records, before=before)
                drift = edited_drift(adapter, original)
                row.update(status="ok", distance={k: d["dist"] for k, d in drift.items()},
                           distance_max=max(d["dist"] for d in drift.values()),
                           update_size=result.diagnostics.get("update_norm"),
                           es=statistics.mean(s.es for s in scores), ps=statistics.mean(s.ps for s in scores),
                           ns=statistics.mean(s.ns for s in scores), **measure())
                adapter.restore(original)
                why = _verdict(row, base or {}, rule)
                row.update(disabling=bool(why), why=why)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            store.append("retest", row)
            verdict = "DISABLING" if row["disabling"] else "not disabling"
            log(f"{kind} edit {u} ({', '.join(row['subjects'])}): {verdict}"
                + (f" ({'; '.join(row['why'])})" if row["why"] else "")
                + (f", distance {row['distance_max']:.2e}" if "distance_max" in row else ""))
    keys = {(k, u) for k, u in plan}
    return [r for r in store.iter_rows("retest")
            if r["method"] in (label, None) and (r["kind"], r["index"]) in keys]
