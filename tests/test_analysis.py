"""`analyze` on synthetic runs: a planted collapse is found with what surrounds it, a flat run has
none, a batched run's candidate is a batch, the thresholds are options; Tables 2, 3 and 8."""

from __future__ import annotations

from pathlib import Path

import pytest

from editscale.analysis.phases import PhaseRule, analyze
from editscale.analysis.properties import distance_table, generation_examples, method_properties
from editscale.analysis.rundata import RunData
from editscale.run.config import RunConfig

TASKS = ("sst2", "rte")


def synthetic_run(sizes, es, *, batch_size: int = 1, control=None, name: str = "run", retest=()) -> RunData:
    """One row per edit; edits of one batch share its size and drift. `control`: edits_done -> %."""
    rows, fro = [], 0.0
    for i, (s, e) in enumerate(zip(sizes, es)):
        if i % batch_size == 0:
            fro += s
        rows.append({"index": i, "batch": i // batch_size, "case_id": 100 + i, "subject": f"S{i}", "target_new": "X",
                     "status": "ok", "es": e, "ps": e, "ns": 0.8,
                     "drift": {"1": {"fro": fro, "dist": fro / 1000, "rel": fro}},
                     "diagnostics": {"update_norm": s}})
    n = len(rows)
    control = control or {}
    forgetting = [{"edits_done": k, "paper_forgotten_pct": 10.0, "prob_forgotten_pct": 5.0,
                   "control_known_pct": control.get(k, 90.0)} for k in range(10, n + 1, 10)]
    downstream = [{"edits_done": k, "tasks": {t: {"f1": 0.8 if k <= 30 else 0.1} for t in TASKS}}
                  for k in range(0, n + 1, 10)]
    health = [{"edits_done": k, "text_nll": 2.0 if k <= 30 else 7.0,
               "generations": [{"prompt": "P", "text": f"at {k}"}]} for k in range(0, n + 1, 10)]
    cfg = RunConfig(method="rome", edits=n, batch_size=batch_size)
    return RunData(path=Path(name), config=cfg, edits=rows, forgetting=forgetting, downstream=downstream,
                   health=health, retest=list(retest), summary={}, finished=True)


def test_a_planted_collapse_is_found_with_its_surroundings() -> None:
    run = synthetic_run([1.0] * 30 + [50.0] + [1.0] * 19, [1.0] * 31 + [0.0] * 19)
    a = analyze(run)
    assert a["collapse_index"] == 30 and a["gradual"] == (0, 30) and a["catastrophic"] == (30, 50)
    (c,) = a["candidates"]
    assert c["index"] == 30 and c["case_ids"] == [130] and c["subjects"] == ["S30"] and c["collapse"]
    assert c["size_ratio"] == pytest.approx(50.0) and c["median_before"] == 1.0
    assert c["distance_before"] == pytest.approx(30 / 1000) and c["distance_after"] == pytest.approx(80 / 1000)
    assert c["es_following"] == 0.0 and c["n_following"] == 10
    assert c["checkpoints"]["downstream"] == [30, 40]
    assert c["f1_before"] == {"sst2": 0.8, "rte": 0.8} and c["f1_after"] == {"sst2": 0.1, "rte": 0.1}
    assert (c["text_nll_before"], c["text_nll_after"]) == (2.0, 7.0)
    assert a["milestones"] == {"es_w50_below_floor": None, "control_below_floor": None, "f1_below_half": 40,
                               "text_nll_up_1": 40}


def test_a_flat_run_has_no_candidate_and_no_collapse() -> None:
    a = analyze(synthetic_run([1.0 + 0.01 * i for i in range(60)], [1.0] * 60))
    assert a["candidates"] == [] and a["collapse_index"] is None and a["gradual"] == (0, 60)
    assert a["catastrophic"] is None


def test_steady_growth_is_no_jump_against_a_trailing_window() -> None:
    sizes = [1.05 ** i for i in range(200)]  # x3.4 per 25 updates, x130 over the run
    run = synthetic_run(sizes, [1.0] * 200)
    assert analyze(run)["candidates"] == []
    assert len(analyze(run, PhaseRule(baseline_window=0))["candidates"]) > 50  # against the whole history


def test_the_thresholds_are_options() -> None:
    run = synthetic_run([1.0] * 30 + [50.0] + [1.0] * 19, [1.0] * 31 + [0.0] * 19)
    assert analyze(run, PhaseRule(jump_factor=100))["candidates"] == []
    # with a lower ES floor the jump stays a candidate but is no collapse
    assert analyze(run, PhaseRule(es_floor=0.0))["collapse_index"] is None
    assert analyze(run, PhaseRule(es_floor=0.0))["rule"]["es_floor"] == 0.0


def test_control_recall_marks_the_collapse() -> None:
    run = synthetic_run([1.0] * 30 + [50.0] + [1.0] * 19, [1.0] * 50, control={40: 30.0})
    a = analyze(run)
    assert a["collapse_index"] == 30 and "control" in a["reason"]
    assert (a["candidates"][0]["control_before"], a["candidates"][0]["control_after"]) == (90.0, 30.0)
    assert a["milestones"]["control_below_floor"] == 40


def test_a_batched_runs_candidate_is_a_batch() -> None:
    sizes = [1.0] * 48 + [40.0] * 4 + [1.0] * 28  # batches of 4: batch 12 (edits 48-51) jumps
    run = synthetic_run(sizes, [1.0] * 52 + [0.0] * 28, batch_size=4)
    a = analyze(run)
    (c,) = a["candidates"]
    assert a["unit"] == "batch" and c["index"] == 48 and c["batch"] == 12 and c["edits"] == [48, 52]
    assert c["case_ids"] == [148, 149, 150, 151] and a["collapse_index"] == 48


def test_a_run_in_progress_is_analysed_as_far_as_it_went() -> None:
    run = synthetic_run([1.0] * 30 + [50.0] + [1.0] * 2, [1.0] * 31 + [0.0] * 2)
    run.finished = False
    a = analyze(run)
    assert not a["finished"] and a["edits_done"] == 33 and a["collapse_index"] == 30


def _retest_row(kind, index, dist, disabling, method="rome"):
    return {"kind": kind, "index": index, "method": method, "status": "ok", "distance_max": dist,
            "disabling": disabling}


def test_table_2_means_the_distances_of_disabling_and_normal_edits() -> None:
    retest = [{"kind": "unedited", "index": -1, "method": None},
              _retest_row("candidate", 30, 4e-4, True), _retest_row("candidate", 35, 2e-4, True),
              _retest_row("baseline", 3, 1e-6, False), _retest_row("baseline", 7, 3e-6, False),
              _retest_row("candidate", 30, 1e-6, False, method="memit")]
    run = synthetic_run([1.0] * 40, [1.0] * 40, retest=retest)
    rows = {r["method"]: r for r in distance_table([run])}
    assert rows["rome"]["distance_disabling"] == pytest.approx(3e-4)
    assert rows["rome"]["distance_normal"] == pytest.approx(2e-6) and rows["rome"]["ratio"] == pytest.approx(150)
    assert rows["memit"]["disabling"] == 0 and rows["memit"]["distance_candidates_not_disabling"] == 1e-6


def test_table_3_averages_samples_and_reads_the_retest() -> None:
    collapsing = synthetic_run([1.0] * 30 + [50.0] + [1.0] * 19, [1.0] * 31 + [0.0] * 19, name="a",
                               retest=[_retest_row("candidate", 30, 4e-4, True)])
    flat = synthetic_run([1.0] * 50, [0.5] * 50, name="b")
    flat.config = flat.config.model_copy(update={"sample": 1})
    (row,) = method_properties([collapsing, flat], [analyze(collapsing), analyze(flat)])
    assert row["runs"] == 2 and row["collapses"] == 1 and row["edits_before_collapse"] == 30
    assert row["efficacy_gradual"] == pytest.approx((1.0 + 0.5) / 2)  # ES before the collapse, per run
    assert row["downstream_f1_loss"] == pytest.approx(0.7)  # 0.8 -> 0.1 in both runs
    assert row["single_disabling_edit"] is True


def test_table_8_shows_the_model_around_the_collapse() -> None:
    run = synthetic_run([1.0] * 30 + [50.0] + [1.0] * 19, [1.0] * 31 + [0.0] * 19)
    ex = generation_examples(run, analyze(run))
    assert [(e["edits_done"], e["when"]) for e in ex] == [(0, "unedited"), (30, "before the collapse"),
                                                         (40, "after the collapse"), (50, "last")]
    assert ex[2]["generations"][0]["text"] == "at 40" and ex[2]["text_nll"] == 7.0


def _with_es_w50(run: RunData) -> RunData:
    for i, r in enumerate(run.edits):
        window = run.edits[max(0, i - 49):i + 1]
        r["es_w50"] = sum(x["es"] for x in window) / len(window)
    return run


def test_lasting_edits_stop_at_the_first_checkpoint_below_either_floor() -> None:
    from editscale.analysis.phases import lasting_edits

    # control facts at 95% until 40 edits, 85% from 50: the run lasted 40 edits
    run = _with_es_w50(synthetic_run([1.0] * 80, [1.0] * 80, control={k: 95.0 if k <= 40 else 85.0
                                                                       for k in range(10, 81, 10)}))
    assert lasting_edits(run) == (40, True)
    # ES of the last 50 edits below 0.9 at the first checkpoint (5 of 10): it lasted no edit
    good_control = {k: 95.0 for k in range(10, 61, 10)}
    run = _with_es_w50(synthetic_run([1.0] * 60, [1.0] * 5 + [0.0] * 55, control=good_control))
    assert lasting_edits(run) == (0, True)
    run = _with_es_w50(synthetic_run([1.0] * 60, [1.0] * 25 + [0.5] * 35, control=good_control))
    assert lasting_edits(run) == (30, True)  # ES50 at 30 edits: 27.5 / 30 = 0.92; at 40: 32.5 / 40 = 0.81
    # never below: the whole run, and Table 3 says so
    run = _with_es_w50(synthetic_run([1.0] * 40, [1.0] * 40, control={k: 99.0 for k in range(10, 41, 10)}))
    assert lasting_edits(run) == (40, False)
    (row,) = method_properties([run], [analyze(run)])
    assert row["edits_lasting"] == 40 and row["lasting_all_runs"]


def test_table_3_separates_runs_that_depart_from_the_preset() -> None:
    from editscale.methods.base import resolve_method_config

    preset = resolve_method_config("memit", "embedded").model_dump(mode="json")
    runs = []
    for i, overrides in enumerate([{}, {"norm_anchor": True}]):
        run = synthetic_run([1.0] * 20, [1.0] * 20, name=f"r{i}")
        cfg = RunConfig(method="memit", model="embedded", edits=20, method_config={**preset, **overrides})
        runs.append(RunData(path=run.path, config=cfg, edits=run.edits, forgetting=run.forgetting,
                            downstream=run.downstream, health=run.health, retest=[], summary={}, finished=True))
    rows = method_properties(runs, [analyze(r) for r in runs])
    assert [(r["method"], r["variant"], r["runs"]) for r in rows] == [("memit", "", 1),
                                                                     ("memit", "norm_anchor=True", 1)]
