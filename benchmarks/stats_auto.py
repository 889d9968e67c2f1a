"""Full vs `auto` covariance statistics (docs/protocol.md §2.5.1; FastMEMIT, arXiv 2506.04226). Prints:

1. seconds, documents and tokens of the embedded ROME preset's statistics (5,000 documents) and of
   `mom2_n_samples: auto`, on layer 1 over `factworld`, both computed afresh (a new cache folder);
2. the relative Frobenius difference of the two C;
3. ROME edits of the first N factworld records, each made alone on the unedited model with either C:
   the relative difference of the rank-one deltas (mean, max), the cosine of their directions, and
   ES / PS / NS of the edits made with each.

    python benchmarks/stats_auto.py [--records 20] [--threads 2] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from editscale.data.registry import load_records
from editscale.eval.proficiency import edit_scores
from editscale.methods.base import EditRequest, apply_deltas, get_method
from editscale.methods.solver import stats as stats_mod
from editscale.methods.solver.context import EditContext
from editscale.models.loading import load_model


def timed_stats(adapter, layer: int, n_samples: int | str, dtype: str, cache: Path) -> tuple[torch.Tensor, dict]:
    opts = {"corpus": "factworld", "n_samples": n_samples, "dtype": dtype, "cache_dir": cache}
    t0 = time.perf_counter()
    c = stats_mod.second_moment(adapter, layer, model_name="embedded", progress=False, **opts)
    seconds = time.perf_counter() - t0
    meta = stats_mod.stats_metadata(stats_mod.stats_path(adapter, layer, **opts))
    return c, {**meta, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a new temporary folder (no cache hits)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("embedded")
    cls = get_method("rome")
    cfg = cls.default_config("embedded")
    layer = cfg.layers[0]
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        c_full, m_full = timed_stats(lm.adapter, layer, cfg.mom2_n_samples, cfg.mom2_dtype, cache)
        c_auto, m_auto = timed_stats(lm.adapter, layer, "auto", cfg.mom2_dtype, cache)
    d_mlp = lm.adapter.d_mlp
    for label, m in (("full", m_full), ("auto", m_auto)):
        extra = f"  stop: {m.get('auto_stopped')} (change {m.get('auto_change')}, cond {m.get('auto_cond')})" \
            if label == "auto" else f"  (n_samples {cfg.mom2_n_samples})"
        print(f"[{label}] {m['seconds']:7.1f} s  {int(m['docs']):5d} documents  {int(m['tokens']):7d} tokens "
              f"({int(m['tokens']) / d_mlp:.0f} x d_mlp {d_mlp}){extra}")
    rel_c = float((c_auto.double() - c_full.double()).norm() / c_full.double().norm())
    cond_full, cond_auto = stats_mod.condition_number(c_full), stats_mod.condition_number(c_auto)
    print(f"speed-up {m_full['seconds'] / m_auto['seconds']:.1f}x, "
          f"{int(m_full['tokens']) / int(m_auto['tokens']):.1f}x fewer tokens; "
          f"||C_auto - C_full||_F / ||C_full||_F = {rel_c:.4f}; "
          f"cond(C_full) {cond_full:.3g}, cond(C_auto) {cond_auto:.3g}")

    records = load_records("factworld")[:args.records]
    editors = {}
    for label, c in (("full", c_full), ("auto", c_auto)):
        ctx = EditContext(lm.name, mom2={layer: c}, progress=False)
        editors[label] = cls(lm.adapter, cfg, ctx)
    rel, cos, scores = [], [], {"full": [], "auto": []}
    for r in records:
        deltas = {}
        for label, editor in editors.items():
            delta = editor.compute([EditRequest.from_record(r)]).deltas[layer]
            saved = lm.adapter.snapshot([layer], biases=False)
            apply_deltas(lm.adapter, {layer: delta})
            scores[label].append(edit_scores(lm.adapter, [r])[0])
            lm.adapter.restore(saved)  # exact: the next edit starts from the unedited model
            deltas[label] = delta.double()
        rel.append(float((deltas["auto"] - deltas["full"]).norm() / deltas["full"].norm()))
        cos.append(float((deltas["auto"] * deltas["full"]).sum() / (deltas["auto"].norm() * deltas["full"].norm())))
    print(f"ROME edits of {len(records)} factworld records, each alone on the unedited model:")
    print(f"    ||dW_auto - dW_full|| / ||dW_full||: mean {statistics.mean(rel):.4f}, max {max(rel):.4f}; "
          f"cosine mean {statistics.mean(cos):.4f}, min {min(cos):.4f}")
    for label, s in scores.items():
        print(f"    [{label}] ES {statistics.mean(x.es for x in s):.3f}  PS {statistics.mean(x.ps for x in s):.3f}  "
              f"NS {statistics.mean(x.ns for x in s):.3f}")


if __name__ == "__main__":
    main()
