"""Single ROME edits of the embedded model on its preset succeed: mean ES >= 0.95, PS >= 0.85, NS >= 0.80.

Sized to stay fast: 25 records, each edited alone (measured on the shipped checkpoint: ES 1.000,
PS 0.900, NS 0.810; on 100 records 0.990 / 0.865 / 0.807 by `python benchmarks/single_edits.py
--method rome --n 100`)."""

from __future__ import annotations

import statistics

import pytest

from editscale.data.registry import load_records
from editscale.eval.proficiency import edit_scores
from editscale.methods.base import EditRequest, apply_result, get_method
from editscale.methods.solver.context import EditContext


@pytest.mark.slow
def test_single_rome_edits_succeed(embedded_lm, embedded_stats) -> None:
    lm = embedded_lm
    cls = get_method("rome")
    cfg = cls.default_config("embedded")
    editor = cls(lm.adapter, cfg, EditContext(lm.name, stats_cache_dir=embedded_stats, progress=False))
    original = lm.adapter.snapshot(cfg.layers)
    es, ps, ns = [], [], []
    try:
        for record in load_records("factworld")[:25]:
            apply_result(lm.adapter, editor.compute([EditRequest.from_record(record)]))
            s = edit_scores(lm.adapter, [record])[0]
            lm.adapter.restore(original)  # each fact edited alone, on the original model
            es.append(s.es)
            ps.append(s.ps)
            ns.append(s.ns)
    finally:
        lm.adapter.restore(original)
    assert statistics.mean(es) >= 0.95
    assert statistics.mean(ps) >= 0.85
    assert statistics.mean(ns) >= 0.80
