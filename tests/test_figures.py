"""The figures of runs, checked by the data they plot (line data, spans, markers), not by their pixels."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from editscale.analysis.phases import analyze
from editscale.analysis.rundata import RunData
from editscale.eval.proficiency import paper_blocks, window_means
from editscale.report import figures as F
from editscale.run.config import RunConfig

N, COLLAPSE = 60, 40
TASKS = ("sentiment", "entailment")


def make_run(*, sample: int = 0, batch_size: int = 1, method: str = "rome", shift: float = 0.0,
             downstream: bool = True) -> RunData:
    """A run whose update at edit COLLAPSE is 50 times the others and after which ES is 0: a planted collapse.
    `shift` moves the distances (x(1 + shift)) and the forgetting (+ shift) so that two samples differ."""
    rows, hist = [], {"es": [], "ps": [], "ns": []}
    for i in range(N):
        b = i // batch_size
        after = i >= COLLAPSE
        es, ps, ns = (0.0 if after or i % 7 == 3 else 1.0), (0.25 if after else 0.5 + 0.1 * (i % 3)), 0.8
        for k, v in (("es", es), ("ps", ps), ("ns", ns)):
            hist[k].append(v)
        size = 50.0 if b * batch_size == COLLAPSE else 1.0
        scale = (1.0 + shift) * (100.0 if after else 1.0)
        rows.append({
            "index": i, "batch": b, "case_id": 1000 + i, "subject": f"s{i}", "target_new": "x", "status": "ok",
            "es": es, "ps": ps, "ns": ns,
            **{f"{k}_w{w}": window_means(hist[k], w) for k in hist for w in (5, 50)},
            "drift": {"1": {"dist": 1e-4 * (b + 1) * scale, "fro": 1.0 * (b + 1), "rel": 0.1},
                      "2": {"dist": 3e-4 * (b + 1) * scale, "fro": 2.0 * (b + 1), "rel": 0.2}},
            "diagnostics": {"update_norm": size}})
    forgetting = [{"edits_done": d, "paper_forgotten_pct": d / 2 + shift, "prob_forgotten_pct": d / 4,
                   "control_known_pct": 90.0 - d / 5} for d in range(10, N + 1, 10)]
    down = [{"edits_done": d, "tasks": {t: {"f1": 1.0 - d / 100 - 0.1 * j, "accuracy": 0.9}
                                        for j, t in enumerate(TASKS)}} for d in (0, 20, 40, 60)]
    cfg = RunConfig(method=method, model="embedded", edits=N, sample=sample, batch_size=batch_size)
    return RunData(path=Path(f"/nonexistent/{method}-{sample}-{batch_size}"), config=cfg, edits=rows,
                   forgetting=forgetting, downstream=down if downstream else [], health=[], retest=[],
                   summary={}, finished=True)


def line(fig: Figure, gid: str):
    found = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == gid]
    assert len(found) == 1, (gid, [ln.get_gid() for ax in fig.axes for ln in ax.lines])
    return found[0]


def span(ax, gid: str) -> tuple[float, float]:
    (patch,) = [p for p in ax.patches if p.get_gid() == gid]
    if isinstance(patch, Rectangle):
        return patch.get_x(), patch.get_x() + patch.get_width()
    xs = patch.get_xy()[:, 0]
    return float(xs.min()), float(xs.max())


@pytest.fixture(scope="module")
def run() -> RunData:
    return make_run()


@pytest.fixture(scope="module")
def analysis(run: RunData) -> dict:
    a = analyze(run)
    assert a["collapse_index"] == COLLAPSE and a["catastrophic"] == (COLLAPSE, N)  # the planted collapse
    return a


def test_proficiency_plots_windows_and_paper_blocks(run: RunData, analysis: dict) -> None:
    fig = F.proficiency_figure([run], [analysis])
    assert len(fig.axes) == 3
    for m in ("es", "ps", "ns"):
        w50 = line(fig, f"{m}.w50.g0")
        assert list(w50.get_xdata()) == list(range(1, N + 1))
        assert list(w50.get_ydata()) == pytest.approx([100 * r[f"{m}_w50"] for r in run.edits])
        assert list(line(fig, f"{m}.w5.g0").get_ydata()) == pytest.approx([100 * r[f"{m}_w5"] for r in run.edits])
        blocks = line(fig, f"{m}.blocks.g0")
        assert list(blocks.get_ydata()) == pytest.approx(paper_blocks([r[m] for r in run.edits])[0])
        assert list(blocks.get_xdata()) == list(range(5, N + 1, 5))
    es_ax = fig.axes[0]
    assert es_ax.get_ylim()[0] <= 0 and es_ax.get_ylim()[1] >= 100 and "%" in es_ax.get_ylabel()
    assert es_ax.get_xlabel() == "edits"


def test_phases_are_shaded_and_the_collapse_marked(run: RunData, analysis: dict) -> None:
    for name, fn in F.FIGURES.items():
        fig = fn([run], [analysis])
        for ax in fig.axes:
            assert span(ax, "phase.catastrophic.r0") == pytest.approx((COLLAPSE, N)), name
            assert span(ax, "phase.gradual.r0") == pytest.approx((0, COLLAPSE)), name
            assert [ln.get_xdata()[0] for ln in ax.lines if ln.get_gid() == "collapse.r0"] == [COLLAPSE], name
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        # in the legend once each, however many panels
        assert legend.count("gradual phase") == legend.count("catastrophic phase") == legend.count("collapse") == 1


def test_forgetting_shows_what_is_retained_by_both_criteria_and_control(run: RunData, analysis: dict) -> None:
    fig = F.forgetting_figure([run], [analysis])
    paper, prob = line(fig, "retained.paper.g0"), line(fig, "retained.prob.g0")
    assert list(paper.get_xdata()) == [r["edits_done"] for r in run.forgetting]
    assert list(paper.get_ydata()) == pytest.approx([100 - r["paper_forgotten_pct"] for r in run.forgetting])
    assert list(prob.get_ydata()) == pytest.approx([100 - r["prob_forgotten_pct"] for r in run.forgetting])
    assert paper.get_linestyle() == "-" and prob.get_linestyle() == "--"
    control = line(fig, "control.known.g0")
    assert list(control.get_ydata()) == pytest.approx([r["control_known_pct"] for r in run.forgetting])
    assert len(fig.axes) == 2 and all("%" in ax.get_ylabel() for ax in fig.axes)


def test_downstream_has_a_panel_per_task_from_the_unedited_model(run: RunData, analysis: dict) -> None:
    fig = F.downstream_figure([run], [analysis])
    assert [ax.get_title() for ax in fig.axes] == list(TASKS)
    for t in TASKS:
        f1 = line(fig, f"{t}.f1.g0")
        assert list(f1.get_xdata()) == [0, 20, 40, 60]
        assert list(f1.get_ydata()) == pytest.approx([r["tasks"][t]["f1"] for r in run.downstream])


def test_distance_is_log_scale_per_layer_with_candidates(run: RunData, analysis: dict) -> None:
    fig = F.distance_figure([run], [analysis])
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "‖ΔW‖_F / numel"
    for layer in ("1", "2"):
        ln = line(fig, f"distance.layer{layer}.g0")
        assert list(ln.get_ydata()) == pytest.approx([r["drift"][layer]["dist"] for r in run.edits])
    cands = line(fig, "candidates.r0")
    (cand,) = analysis["candidates"]
    assert list(cands.get_xdata()) == [cand["edits"][1]] == [COLLAPSE + 1]
    assert list(cands.get_ydata()) == pytest.approx([cand["distance_after"]])
    assert cand["distance_after"] == pytest.approx(run.edits[COLLAPSE]["drift"]["2"]["dist"])  # on layer 2's line


def test_runs_of_one_group_are_drawn_as_mean_and_spread() -> None:
    runs = [make_run(sample=0), make_run(sample=1, shift=1.0)]
    assert runs[0].group == runs[1].group
    analyses = [analyze(r) for r in runs]
    fig = F.forgetting_figure(runs, analyses)
    ax = fig.axes[0]
    paper = line(fig, "retained.paper.g0")  # one line for both samples
    assert not [ln for ln in ax.lines if ln.get_gid() == "retained.paper.g1"]
    expected = [100 - (a["paper_forgotten_pct"] + b["paper_forgotten_pct"]) / 2
                for a, b in zip(runs[0].forgetting, runs[1].forgetting)]
    assert list(paper.get_ydata()) == pytest.approx(expected)
    spread = [c for c in ax.collections if c.get_gid() == "retained.paper.g0.spread"]
    assert len(spread) == 1 and isinstance(spread[0], PolyCollection)
    ys = spread[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(100 - runs[1].forgetting[-1]["paper_forgotten_pct"])
    assert ys.max() == pytest.approx(100 - runs[0].forgetting[0]["paper_forgotten_pct"])
    # several runs: no shading, each run's collapse in the group's colour
    assert not [p for p in ax.patches if (p.get_gid() or "").startswith("phase.")]
    assert {ln.get_color() for ln in ax.lines if (ln.get_gid() or "").startswith("collapse.")} == {paper.get_color()}
    assert "samples 0, 1" in [t.get_text() for t in fig.legends[0].get_texts()][0]

    dist = F.distance_figure(runs, analyses)
    mean = line(dist, "distance.layer1.g0").get_ydata()
    assert list(mean) == pytest.approx([(r0["drift"]["1"]["dist"] + r1["drift"]["1"]["dist"]) / 2
                                        for r0, r1 in zip(runs[0].edits, runs[1].edits)])


def test_runs_that_differ_in_more_than_their_sample_are_not_grouped() -> None:
    a, b = make_run(sample=0), make_run(sample=0)
    b.config = b.config.model_copy(update={"edits": b.config.edits + 100})  # the demo beside a longer run
    assert a.group == make_run(sample=3).group and a.group != b.group
    a.path, b.path = Path("first"), Path("second")
    labels = [g.label for g in F.run_groups([a, b], F.distance_series)]
    assert labels[0] != labels[1] and labels[0].endswith("[first]")  # the same legend text, told apart


def test_a_group_is_truncated_to_its_shortest_run() -> None:
    band = F.aggregate([F.Curve([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0]), F.Curve([1, 2, 3], [3.0, 4.0, float("nan")])])
    assert band.x == [1, 2, 3] and band.mean == [2.0, 3.0, 3.0] and band.lo == [1.0, 2.0, 3.0] and band.n == 2


def test_runs_of_different_groups_get_their_own_colours(run: RunData, analysis: dict) -> None:
    other = make_run(method="memit")
    fig = F.proficiency_figure([run, other], [analysis, analyze(other)])
    a, b = line(fig, "es.w50.g0"), line(fig, "es.w50.g1")
    assert a.get_color() != b.get_color()
    collapse = {ln.get_gid(): ln.get_color() for ln in fig.axes[0].lines if "collapse" in ln.get_gid()}
    assert collapse == {"collapse.r0": a.get_color(), "collapse.r1": b.get_color()}


def test_a_batched_run_has_one_point_per_batch() -> None:
    batched = make_run(batch_size=4)
    a = analyze(batched)
    assert a["collapse_index"] == COLLAPSE
    fig = F.distance_figure([batched], [a])
    ln = line(fig, "distance.layer1.g0")
    assert list(ln.get_xdata()) == list(range(4, N + 1, 4))
    assert list(ln.get_ydata()) == pytest.approx([batched.edits[i]["drift"]["1"]["dist"] for i in range(3, N, 4)])
    assert "batches of 4" in fig.axes[0].get_xlabel()
    prof = F.proficiency_figure([batched], [a])
    assert len(line(prof, "es.w50.g0").get_xdata()) == N // 4 == len(line(prof, "es.blocks.g0").get_xdata())
    assert all("batches of 4" in ax.get_xlabel() for ax in prof.axes)


def test_text_is_readable_in_print(run: RunData, analysis: dict) -> None:
    fig = F.proficiency_figure([run], [analysis])
    texts = [fig._suptitle, *fig.legends[0].get_texts()]
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
    assert min(t.get_fontsize() for t in texts) >= 9
    assert "1c" in fig._suptitle.get_text()
    w, h = fig.get_size_inches()
    assert w == pytest.approx(10) and 3 <= h <= 4.5


def test_save_figure_writes_png_and_svg(tmp_path: Path, run: RunData, analysis: dict) -> None:
    fig = F.distance_figure([run], [analysis])
    png, svg = F.save_figure(fig, tmp_path / "figs", "distance")
    assert (png.name, svg.name) == ("distance.png", "distance.svg")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1500, int(fig.get_size_inches()[1] * 150))
    assert png.read_bytes().startswith(b"\x89PNG")  # written by figure_png
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_all_figures_skips_absent_data(run: RunData, analysis: dict) -> None:
    assert set(F.FIGURES) == {"proficiency", "forgetting", "downstream", "distance"}
    bare = make_run(downstream=False)
    figs = F.all_figures([bare], [analyze(bare)])
    assert set(figs) == {"proficiency", "forgetting", "distance"}
    assert all(isinstance(f, Figure) for f in figs.values())
    with pytest.raises(ValueError, match="one analyze"):
        F.distance_figure([run], [])
