"""ROME on the embedded model: single edits succeed (issue 3's acceptance figures), on the preset."""

from __future__ import annotations

import statistics

import pytest

from editscale.api import load_records
from editscale.data.factworld import checkpoint_dir
from editscale.eval.proficiency import edit_scores
from editscale.methods.base import EditRequest, get_method
from editscale.methods.solver.context import EditContext
from editscale.models.loading import load_model

pytestmark = pytest.mark.skipif(not (checkpoint_dir() / "model.safetensors").exists(),
                                reason="the embedded checkpoint is not installed")


def test_single_rome_edits_succeed_on_100_records(tmp_path) -> None:
    lm = load_model("embedded")
    cls = get_method("rome")
    cfg = cls.default_config("embedded")
    editor = cls(lm.adapter, cfg, EditContext(lm.name, stats_cache_dir=tmp_path, progress=False))
    layer = cfg.layers[0]
    w0 = lm.adapter.get_mlp_out_weight(layer).clone()
    es, ps, ns = [], [], []
    for record in load_records("factworld")[:100]:
        result = editor.compute([EditRequest.from_record(record)])
        lm.adapter.add_to_mlp_out_weight(layer, result.deltas[layer])
        s = edit_scores(lm.adapter, [record])[0]
        lm.adapter.set_mlp_out_weight(layer, w0)  # each fact edited alone, on the original model
        es.append(s.es)
        ps.append(s.ps)
        ns.append(s.ns)
    assert statistics.mean(es) >= 0.95
    assert statistics.mean(ps) >= 0.85
    assert statistics.mean(ns) >= 0.80
