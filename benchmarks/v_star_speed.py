"""v* (ROME's target optimisation) on the embedded model, editscale's way against the reference's way
(whole rows, full logits: `optimize_target(..., full_logits=True)`), side by side in one process.

    python benchmarks/v_star_speed.py [--n 10] [--threads 1]

Prints seconds per v* both ways and the largest relative difference of the targets.
"""

from __future__ import annotations

import argparse
import time

import torch

from editscale.data.registry import load_records
from editscale.methods.base import get_method
from editscale.methods.rome import RomeConfig
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.targets import optimize_target
from editscale.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="insertion facts (factworld-insert), one v* each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    cfg = get_method("rome").default_config("embedded")  # the embedded preset: block 1, 20 steps
    assert isinstance(cfg, RomeConfig)
    templates = EditContext(lm.name, seed=0, progress=False).context_templates(lm.adapter,
                                                                               cfg.context_template_length_params)
    records = load_records("factworld-insert")[:args.n]
    seconds, found = {}, {}
    for full in (True, False, True, False):  # twice each, interleaved: the second pair is reported
        t0 = time.perf_counter()
        found[full] = [optimize_target(lm.adapter, cfg.layers[0], r.prompt, r.subject, r.target_new, templates,
                                       site="mlp", **cfg.target_options(), full_logits=full) for r in records]
        seconds[full] = (time.perf_counter() - t0) / len(records)
    diff = max(float((a.v_star - b.v_star).norm() / a.v_star.norm()) for a, b in zip(found[True], found[False]))
    print(f"embedded, {len(records)} insertion facts, {len(templates)} templates, {cfg.v_num_grad_steps} steps, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"    reference way (whole rows, full logits)   {seconds[True]:.3f} s per v*")
    print(f"    editscale (suffixes over a prefix cache)   {seconds[False]:.3f} s per v*   "
          f"{seconds[True] / seconds[False]:.1f}x")
    print(f"    largest relative difference of v*: {diff:.1e}")


if __name__ == "__main__":
    main()
