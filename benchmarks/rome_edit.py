"""Where the time of a sequential ROME run goes. Prints:

1. embedded model: seconds per edit split into k*, v*, update and evaluation (ES/PS/NS scoring);
2. evaluation throughput: prompts scored per second (batched, new and true target each);
3. a random GPT-2-XL-shaped layer (d=1600, m=6400, Conv1D storage): the update itself
   (C solve, rank-one product, write into the weight) and the drift measurement.

    python benchmarks/rome_edit.py [--edits 30] [--threads 2] [--no-xl]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from editscale.data.registry import load_records
from editscale.eval.drift import layer_drift
from editscale.eval.proficiency import edit_scores
from editscale.methods.base import EditRequest, apply_deltas, get_method
from editscale.methods.solver.context import EditContext
from editscale.models.loading import load_model


def embedded_edits(n_edits: int) -> None:
    lm = load_model("embedded")
    records = load_records("factworld")
    cls = get_method("rome")
    cfg = cls.default_config("embedded")
    ctx = EditContext(lm.name, progress=False)
    t0 = time.perf_counter()
    ctx.second_moment(lm.adapter, cfg.layers[0], corpus=cfg.mom2_dataset, n_samples=cfg.mom2_n_samples,
                      dtype=cfg.mom2_dtype)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx.context_templates(lm.adapter, cfg.context_template_length_params)
    t_templates = time.perf_counter() - t0
    editor = cls(lm.adapter, cfg, ctx)
    parts: dict[str, list[float]] = {"keys": [], "v_star": [], "update": [], "eval": []}
    for r in records[:n_edits]:
        res = editor.compute([EditRequest.from_record(r)])
        for k in ("keys", "v_star", "update"):
            parts[k].append(res.timings[k])
        apply_deltas(lm.adapter, res.deltas)
        t0 = time.perf_counter()
        edit_scores(lm.adapter, [r])
        parts["eval"].append(time.perf_counter() - t0)
    total = sum(statistics.mean(v) for v in parts.values())
    print(f"[embedded] statistics (cached after the first run): {t_stats:.2f} s; templates: {t_templates:.2f} s")
    print(f"[embedded] seconds per edit over {n_edits} sequential edits: total {total:.3f}")
    for k, v in parts.items():
        print(f"    {k:8s} {statistics.mean(v):.4f} s  ({100 * statistics.mean(v) / total:.0f}%)")

    # evaluation throughput: all prompts of 200 records (rewrite + paraphrase + neighborhood)
    recs = records[:200]
    n_prompts = sum(1 + len(r.paraphrase_prompts) + len(r.neighborhood_prompts) for r in recs)
    t0 = time.perf_counter()
    edit_scores(lm.adapter, recs)
    dt = time.perf_counter() - t0
    print(f"[embedded] evaluation: {n_prompts} prompts x 2 targets in {dt:.2f} s = {n_prompts / dt:.0f} prompts/s")


def xl_layer() -> None:
    d, m = 1600, 6400
    torch.manual_seed(0)
    weight = torch.randn(m, d) * 0.02  # Conv1D storage [m, d]
    w0 = weight.clone()
    a = torch.randn(m, 2 * m, dtype=torch.float32)
    t0 = time.perf_counter()
    c = (a @ a.T / (2 * m)).double() + 1e-3 * torch.eye(m, dtype=torch.float64)
    t_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    chol = torch.linalg.cholesky(c)
    t_chol = time.perf_counter() - t0
    k_bar, k0, resid = torch.randn(m), torch.randn(m), torch.randn(d)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        u = torch.cholesky_solve(k_bar.double()[:, None], chol)[:, 0]
        u = u / u.norm()
        delta = torch.outer(resid.double() / (u @ k0.double()), u).float()  # [d, m]
        weight += delta.T
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    layer_drift(w0, weight)
    t_drift = time.perf_counter() - t0
    print(f"[gpt2-xl layer d={d} m={m}] building a random C: {t_c:.2f} s; Cholesky (once per layer): "
          f"{t_chol:.2f} s")
    print(f"[gpt2-xl layer] update (solve + rank-one + write): {statistics.median(times) * 1000:.1f} ms; "
          f"drift: {t_drift * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-xl", action="store_true", help="skip the GPT-2-XL-shaped layer (needs ~1.5 GB)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    embedded_edits(args.edits)
    if not args.no_xl:
        xl_layer()


if __name__ == "__main__":
    main()
