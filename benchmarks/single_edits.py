"""Single-edit (or one-batch) ES / PS / NS of any method, over a grid of hyper-parameters.

    python benchmarks/single_edits.py --method rome --n 100 --grid 'layers=[0],[1],[2],[3],[4],[5]'
    python benchmarks/single_edits.py --method ft-c --n 20 --grid norm_constraint=5e-4,2e-3 --set lr=5e-4
    python benchmarks/single_edits.py --method memit --batch 64          # one batch of the first 64 facts

Single edits: each of the first N facts is edited alone on the unedited model, and every parameter
of the edited modules (MLP output weight and bias, MLP input weight for MEND) is restored exactly
before the next one. With
--batch B the first B facts are edited in one compute() call and all B are scored on the model
carrying that update. This is what the embedded presets were chosen on (see their YAML comments).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import torch
import yaml

from editscale.data.registry import load_records
from editscale.eval.proficiency import edit_scores, locality_answers
from editscale.methods.base import EditRequest, apply_result, get_method
from editscale.methods.solver.context import EditContext
from editscale.models.loading import load_model


def measure(lm: Any, method: str, overrides: dict[str, Any], records: list[Any], ctx: EditContext,
            batch: int = 0) -> dict[str, Any]:
    cls = get_method(method)
    cfg = cls.config_class.parse({**cls.default_config(lm.name).model_dump(), **overrides})
    editor = cls(lm.adapter, cfg, ctx)
    editor.prepare()
    saved = lm.adapter.snapshot(cfg.layers, in_layers=editor.in_layers)
    groups = [records[:batch]] if batch else [[r] for r in records]
    scores, results, seconds = [], [], []
    for group in groups:
        t0 = time.perf_counter()
        res = editor.compute([EditRequest.from_record(r) for r in group])
        seconds.append(time.perf_counter() - t0)
        before = locality_answers(lm.adapter, group)
        apply_result(lm.adapter, res)
        scores.extend(edit_scores(lm.adapter, group, before=before))
        lm.adapter.restore(saved)
        results.append(res)
    diag = [r.diagnostics for r in results]
    keys = sorted(set.intersection(*(set(d) for d in diag))) if diag else []
    es, ps, ns = (statistics.mean(getattr(s, k) for s in scores) for k in ("es", "ps", "ns"))
    return {"overrides": overrides, "layers": cfg.layers, "n": len(scores), "batch": batch, "es": es, "ps": ps,
            "ns": ns, "score": 3 / sum(1 / max(x, 1e-9) for x in (es, ps, ns)),  # harmonic mean, as CounterFact's S
            "update_rel_median": statistics.median(d.get("update_rel", float("nan")) for d in diag),
            "seconds_per_call": statistics.mean(seconds),
            "diagnostics_mean": {k: statistics.mean(float(d[k]) for d in diag if d[k] is not None) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n", type=int, default=20, help="facts edited one at a time")
    ap.add_argument("--batch", type=int, default=0, help="instead, one batch of the first B facts")
    ap.add_argument("--set", action="append", default=[], help="fixed override KEY=VALUE (YAML value)")
    ap.add_argument("--grid", action="append", default=[], help="swept override KEY=V1,V2,... (YAML values)")
    ap.add_argument("--dataset", default="factworld", help="records edited (factworld-insert: new subjects)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fixed = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    # "[0],[1]" and "5e-4,2e-3" both read as a YAML list of values
    axes = [(k, yaml.safe_load(f"[{v}]")) for k, _, v in (g.partition("=") for g in args.grid)]
    lm = load_model(args.model)
    records = load_records(args.dataset)[: max(args.n, args.batch)]
    pool = load_records(args.dataset)
    # methods that draw statistics from the dataset's records (UltraEdit's warm start, NAS) take them
    # from the ones after those edited here
    ctx = EditContext(lm.name, progress=False,
                      sample_requests=lambda: [(r.prompt, r.subject, r.target_new) for r in pool[len(records):]])
    results = []
    what = f"one batch of {args.batch}" if args.batch else f"{args.n} single edits"
    print(f"{args.method} on {lm.name}, {what}")
    print(f"{'setting':<44} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'|dW|/|W| med':>13} {'cond(C)':>9} {'s/call':>7}")
    for values in itertools.product(*(v for _, v in axes)):
        overrides = {**fixed, **{k: v for (k, _), v in zip(axes, values, strict=True)}}
        r = measure(lm, args.method, overrides, records, ctx, args.batch)
        results.append(r)
        label = " ".join(f"{k}={v}" for k, v in overrides.items()) or "(preset)"
        cond = r["diagnostics_mean"].get("mom2_cond", float("nan"))
        print(f"{label:<44} {r['es']:>6.3f} {r['ps']:>6.3f} {r['ns']:>6.3f} {r['score']:>6.3f} "
              f"{r['update_rel_median']:>13.3f} {cond:>9.2e} {r['seconds_per_call']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": lm.name, "method": args.method, "command": " ".join(__import__("sys").argv),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
