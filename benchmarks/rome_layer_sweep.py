"""Which block should ROME edit in the embedded model? Edit N facts each alone, per layer, and print
ES / PS / NS, the update size relative to the layer and cond(C).

    python benchmarks/rome_layer_sweep.py --n 100 [--layers 0,1,2] [--set clamp_norm_factor=2] [--json out.json]

Each fact is edited on the unedited model (the edit is removed before the next one), so this
measures single-edit quality, the figure the ROME layer choice is made on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import yaml

from editscale.api import load_records
from editscale.eval.proficiency import edit_scores
from editscale.methods.base import EditRequest, get_method
from editscale.methods.solver.context import EditContext
from editscale.models.loading import load_model


def single_edits(lm, method: str, overrides: dict, records, ctx: EditContext) -> dict[str, float]:
    cls = get_method(method)
    cfg = cls.config_class.parse({**cls.default_config(lm.name).model_dump(), **overrides})
    editor = cls(lm.adapter, cfg, ctx)
    layer = cfg.layers[0]
    w0 = lm.adapter.get_mlp_out_weight(layer).clone()
    es, ps, ns, rel, seconds = [], [], [], [], []
    for r in records:
        t0 = time.perf_counter()
        res = editor.compute([EditRequest.from_record(r)])
        seconds.append(time.perf_counter() - t0)
        lm.adapter.add_to_mlp_out_weight(layer, res.deltas[layer])
        s = edit_scores(lm.adapter, [r])[0]
        lm.adapter.set_mlp_out_weight(layer, w0)
        es.append(s.es)
        ps.append(s.ps)
        ns.append(s.ns)
        rel.append(res.diagnostics["update_rel"])
    return {"layer": layer, "n": len(records), "es": statistics.mean(es), "ps": statistics.mean(ps),
            "ns": statistics.mean(ns), "update_rel_median": statistics.median(rel),
            "mom2_cond": ctx.mom2_condition(layer), "seconds_per_edit": statistics.mean(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layers", default=None, help="comma-separated; default all blocks")
    ap.add_argument("--set", action="append", default=[], help="hyper-parameter override KEY=VALUE")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    lm = load_model(args.model)
    records = load_records("factworld")[: args.n]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(lm.adapter.n_layers))
    ctx = EditContext(lm.name, progress=False)
    results = []
    print(f"{'layer':>5} {'ES':>6} {'PS':>6} {'NS':>6} {'|dW|/|W| med':>13} {'cond(C)':>10} {'s/edit':>7}")
    for layer in layers:
        r = single_edits(lm, args.method, {**overrides, "layers": [layer]}, records, ctx)
        results.append(r)
        print(f"{layer:>5} {r['es']:>6.3f} {r['ps']:>6.3f} {r['ns']:>6.3f} {r['update_rel_median']:>13.3f} "
              f"{r['mom2_cond']:>10.2e} {r['seconds_per_edit']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": lm.name, "method": args.method, "overrides": overrides, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
