"""A MEMIT or EMMET batch of the embedded model on its preset reaches its facts: ES >= 0.90.

Sized to stay fast: a batch of 16 (measured on the shipped checkpoint: ES 1.000 for both; 0.953 and
0.922 on a batch of 64 by `python benchmarks/single_edits.py --method M --batch 64`)."""

from __future__ import annotations

import statistics

import pytest

from editscale.data.registry import load_records
from editscale.eval.proficiency import edit_scores
from editscale.methods.base import EditRequest, apply_result, get_method
from editscale.methods.solver.context import EditContext


@pytest.mark.slow
@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_one_batch_of_embedded_facts(method: str, embedded_lm, embedded_stats) -> None:
    lm = embedded_lm
    cls = get_method(method)
    cfg = cls.default_config("embedded")
    editor = cls(lm.adapter, cfg, EditContext(lm.name, stats_cache_dir=embedded_stats, progress=False))
    records = load_records("factworld")[:16]
    result = editor.compute([EditRequest.from_record(r) for r in records])
    assert set(result.deltas) == {0, 1} and result.all_finite()
    original = lm.adapter.snapshot(cfg.layers)
    try:
        apply_result(lm.adapter, result)
        assert statistics.mean(s.es for s in edit_scores(lm.adapter, records)) >= 0.9
    finally:
        lm.adapter.restore(original)
