"""Collapse detection on synthetic runs."""

from __future__ import annotations

from editscale.analysis.phases import find_phases


def _rows(sizes, es):
    fro, out = 0.0, []
    for i, (s, e) in enumerate(zip(sizes, es)):
        fro += s
        out.append({"index": i, "status": "ok", "es": e, "drift": {"1": {"fro": fro}},
                    "diagnostics": {"update_norm": s}})
    return out


def test_a_jump_followed_by_collapse_is_found() -> None:
    sizes = [1.0] * 30 + [50.0] + [1.0] * 19
    es = [1.0] * 31 + [0.0] * 19
    p = find_phases(_rows(sizes, es))
    assert p.collapse_index == 30 and p.gradual == (0, 30) and p.catastrophic == (30, 50)


def test_a_jump_without_collapse_is_only_a_candidate() -> None:
    sizes = [1.0] * 30 + [50.0] + [1.0] * 19
    p = find_phases(_rows(sizes, [1.0] * 50))
    assert p.collapse_index is None and p.candidates == [30] and p.gradual == (0, 50)


def test_control_recall_can_mark_the_collapse() -> None:
    sizes = [1.0] * 30 + [50.0] + [1.0] * 19
    forgetting = [{"edits_done": 20, "control_known_pct": 90.0}, {"edits_done": 40, "control_known_pct": 30.0}]
    p = find_phases(_rows(sizes, [1.0] * 50), forgetting)
    assert p.collapse_index == 30 and "control" in p.reason


def test_gradual_growth_is_no_collapse() -> None:
    sizes = [1.0 + 0.1 * i for i in range(60)]
    assert find_phases(_rows(sizes, [0.4] * 60)).collapse_index is None
