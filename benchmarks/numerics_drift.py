"""How far ROME's default and `--numerics reference` arithmetic drift apart over sequential edits.

    python benchmarks/numerics_drift.py [--edits 40] [--threads 1]

Two sequences of ROME edits of the first N fact-world records on the embedded model, one with
`numerics: default` (u = C⁻¹k by an fp64 Cholesky solve) and one with `numerics: reference` (the
reference's fp32 inverse of C), each from the unedited model; printed per edit: the largest
difference of the two deltas relative to the reference delta's largest entry. Once with C as the
embedded preset keeps it (fp64), once with C cast to fp32 as the published presets' mom2_dtype.
"""

from __future__ import annotations

import argparse
import time

import torch

from editscale.data.registry import load_records
from editscale.methods.base import EditRequest, apply_result, get_method
from editscale.methods.solver.context import EditContext
from editscale.methods.solver.stats import condition_number
from editscale.models.loading import load_model


def deltas(lm, cfg, layer: int, c: torch.Tensor, requests: list[EditRequest]) -> list[torch.Tensor]:
    editor = get_method("rome")(lm.adapter, cfg, EditContext(lm.name, progress=False, mom2={layer: c}))
    original = lm.adapter.snapshot(cfg.layers)
    out = []
    try:
        for r in requests:
            res = editor.compute([r])
            apply_result(lm.adapter, res)
            out.append(res.deltas[layer].double().cpu())
    finally:
        lm.adapter.restore(original)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    base = get_method("rome").default_config("embedded")
    layer = base.layers[0]
    requests = [EditRequest.from_record(r) for r in load_records("factworld")[: args.edits]]
    c64 = EditContext(lm.name, progress=False).second_moment(lm.adapter, layer, **base.stats_options())
    print(f"ROME on the embedded model, layer {layer}, cond(C) {condition_number(c64):.3g}, {args.edits} edits")
    for name, c in (("C in fp64 (the embedded preset)", c64), ("C in fp32 (the published presets)", c64.float())):
        t0 = time.perf_counter()
        ref = deltas(lm, base.model_copy(update={"numerics": "reference"}), layer, c, requests)
        dflt = deltas(lm, base.model_copy(update={"numerics": "default"}), layer, c, requests)
        rel = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(ref, dflt, strict=True)]
        worst = max(range(len(rel)), key=rel.__getitem__)
        print(f"{name}: first edit {rel[0]:.2g}, largest {rel[worst]:.2g} (edit {worst + 1}), last {rel[-1]:.2g} "
              f"({time.perf_counter() - t0:.0f} s)")
        print("  per edit: " + " ".join(f"{x:.1e}" for x in rel))


if __name__ == "__main__":
    main()
