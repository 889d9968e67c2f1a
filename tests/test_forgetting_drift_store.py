"""Forgetting semantics (docs/protocol.md §8.4: sticky paper criterion, re-tested probability criterion), the
paper's curves, drift, and the store."""

from __future__ import annotations

import json

import pytest
import torch

from editscale.data.records import EditRecord
from editscale.eval import forgetting as forgetting_mod
from editscale.eval.drift import layer_drift
from editscale.eval.forgetting import ForgettingTracker
from editscale.eval.proficiency import paper_blocks, window_means
from editscale.eval.scoring import ContinuationScore
from editscale.run.store import RunStore


def _rec(i: int) -> EditRecord:
    return EditRecord(case_id=i, subject=f"S{i}", prompt="{} plays the", target_true="piano", target_new="violin")


class Script:
    """Stands in for the scorer: which facts are remembered (greedy, ES) at the next check."""

    def __init__(self) -> None:
        self.greedy: dict[str, bool] = {}
        self.es: dict[str, bool] = {}

    @staticmethod
    def rows(adapter, prompts, targets, batch_size=256):
        return list(zip(prompts, targets))  # the tracker caches these and hands them back to `score`

    def score(self, adapter, rows, batch_size=256):
        out = []
        for p, t in rows:
            subject = p.split(" ")[0]
            ok_es = self.es.get(subject, True)
            is_new = t == "violin"
            nll = (0.5 if ok_es else 2.0) if is_new else 1.0
            out.append(ContinuationScore(nll, nll, self.greedy.get(subject, True) if is_new else False, ()))
        return out


def test_paper_mode_is_sticky_and_probability_mode_sees_returns(monkeypatch) -> None:
    script = Script()
    monkeypatch.setattr(forgetting_mod, "prompt_target_rows", script.rows)
    monkeypatch.setattr(forgetting_mod, "score_rows", script.score)
    tr = ForgettingTracker()
    for i in range(4):
        tr.add(_rec(i), greedy_success=i != 3, es_success=True)  # edit 3 failed (greedy): never counted
    row = tr.check(None, 20)
    assert row["paper_forgotten"] == 0 and row["paper_eligible"] == 3

    script.greedy["S1"] = False
    script.es["S1"] = False
    row = tr.check(None, 40)  # S1 fails at 40
    assert row["paper_newly_forgotten"] == [1] and row["paper_forgotten_pct"] == pytest.approx(100 / 3)
    assert row["prob_forgotten_ids"] == [1]

    script.greedy["S1"] = True
    script.es["S1"] = True
    row = tr.check(None, 60)  # S1 passes again at 60: paper mode keeps it forgotten, never re-tests
    assert tr.paper_forgotten == {1: 40}
    assert row["paper_forgotten"] == 1 and row["paper_newly_forgotten"] == []
    assert row["prob_forgotten"] == 0 and row["prob_came_back"] == [1]

    state = json.loads(json.dumps(tr.state_dict()))
    again = ForgettingTracker()
    again.load_state_dict(state, {i: _rec(i) for i in range(4)})
    assert again.paper_forgotten == tr.paper_forgotten and again.paper_ok == tr.paper_ok
    assert list(again.records) == list(tr.records) and again.checked_upto == 4


def test_a_sampled_checkpoint_retests_the_subset_and_the_last_interval(monkeypatch) -> None:
    script = Script()
    monkeypatch.setattr(forgetting_mod, "prompt_target_rows", script.rows)
    monkeypatch.setattr(forgetting_mod, "score_rows", script.score)
    scored: list[int] = []

    def spy(adapter, rows, batch_size=256):
        scored.extend(int(p.split(" ")[0][1:]) for p, t in rows if t == "violin")
        return script.score(adapter, rows, batch_size)

    monkeypatch.setattr(forgetting_mod, "score_rows", spy)
    tr = ForgettingTracker(sample=3, planned=20, seed=5)
    subset = tr._subset()
    assert len(subset) == 3 and subset == ForgettingTracker(sample=3, planned=20, seed=5)._subset()
    for i in range(10):
        tr.add(_rec(i), greedy_success=True, es_success=True)
    row = tr.check(None, 10)  # the first checkpoint: every edit is new since the last one
    assert sorted(scored) == list(range(10)) and row["sampled"] and row["tested"] == 10
    assert row["sample_size"] == len([i for i in subset if i < 10]) == row["paper_eligible"]
    scored.clear()
    for i in range(10, 14):
        tr.add(_rec(i), greedy_success=True, es_success=True)
    script.greedy = {f"S{i}": False for i in range(14)}  # every edit now fails
    row = tr.check(None, 14)
    assert sorted(scored) == sorted({i for i in subset if i < 14} | set(range(10, 14)))
    counted = [i for i in subset if i < 14]
    assert row["paper_forgotten"] == len(counted) and row["paper_forgotten_pct"] == 100.0
    # edits outside the subset were tested once, in their own interval, and count in no percentage
    assert row["paper_eligible"] == len(counted)


def test_paper_blocks_and_windows() -> None:
    es = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1]  # 12 edits: two full blocks of 5, a partial one dropped
    blocks, smooth = paper_blocks(es)
    assert blocks == [80.0, 40.0] and smooth == [80.0, 60.0]
    assert window_means([1.0, 0.0, 1.0], 2) == 0.5
    assert window_means([1.0, float("nan")], 5) == 1.0


def test_drift_normalisations() -> None:
    w0 = torch.ones(4, 5)
    w = w0.clone()
    w[0, 0] += 3.0
    w[1, 1] += 4.0
    d = layer_drift(w0, w)
    assert d["fro"] == pytest.approx(5.0)
    assert d["dist"] == pytest.approx(5.0 / 20)  # divided by numel, as the paper's code
    assert d["rel"] == pytest.approx(5.0 / (20 ** 0.5))


def test_store_rows_torn_line_truncate_and_checkpoint(tmp_path) -> None:
    store = RunStore(tmp_path / "run")
    store.create()
    for i in range(5):
        store.append("edits", {"index": i, "x": float(i)})
    with open(store.root / "edits.jsonl", "a") as f:
        f.write('{"index": 5, "x"')  # a crash mid-write
    assert [r["index"] for r in store.rows("edits")] == [0, 1, 2, 3, 4]
    store.truncate("edits", "index", 3)
    assert [r["index"] for r in store.rows("edits")] == [0, 1, 2]
    assert store.load_checkpoint() is None
    store.save_checkpoint({"layer1": torch.arange(6.0).view(2, 3)}, {"edits_done": 3})
    store.save_checkpoint({"layer1": torch.ones(2, 3)}, {"edits_done": 6})
    weights, state = store.load_checkpoint()
    assert state["edits_done"] == 6 and torch.equal(weights["layer1"], torch.ones(2, 3))
    # a crash between the two renames leaves only the previous checkpoint, which is still found
    (store.root / "checkpoint").rename(store.root / "checkpoint.old")
    assert store.load_checkpoint()[1]["edits_done"] == 6
