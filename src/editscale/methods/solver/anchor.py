"""NAS, norm-anchor scaling (Liu et al. 2026, arXiv 2602.02543; docs/protocol.md §2.6): the reference
norm every solved value vector is rescaled to, taken once from the unedited model.

The reference norm is the upper-trimmed mean (the largest `trim` share dropped) of ‖m0 + δ‖ over a
seeded sample of requests, each optimised on its bare prompt alone (no context templates) with the
method's own target settings; m0 + δ is the MLP-output part of the target at the edited (ROME) or
z (MEMIT family) layer. Reference: `SasyaTitech/NAS: util/vstar_stats.py`, which optimises the
sample with MEMIT's settings for every method; here each method's own are used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from editscale.errors import EditscaleError
from editscale.methods.solver.targets import optimize_targets
from editscale.models.adapter import ModelAdapter

PER_PASS = 16  # requests optimised together (optimize_targets), as the reference's batches


def reference_norm(adapter: ModelAdapter, layer: int, requests: Sequence[tuple[str, str, str]], *, site: str,
                   samples: int, trim: float, seed: int = 0, **target_options: Any) -> float:
    """The NAS reference norm of a layer from `samples` of `requests` (prompt, subject, target)."""
    if not requests:
        raise EditscaleError("norm_anchor needs requests to take its reference norm from; none were given")
    chosen = random.Random(seed).sample(list(requests), min(samples, len(requests)))
    norms: list[float] = []
    for i in range(0, len(chosen), PER_PASS):
        found = optimize_targets(adapter, layer, chosen[i:i + PER_PASS], ["{}"], site=site, **target_options)
        norms += [t.value_norm for t in found]
    norms.sort()
    kept = norms[:len(norms) - int(trim * len(norms))] or norms
    return sum(kept) / len(kept)
