"""Figures of runs: the paper's figures, drawn from any run directory (or several).

The paper is "Model Editing at Scale leads to Gradual and Catastrophic Forgetting" (Gupta et al., 2024).
Every figure takes the runs (`RunData`) and one `analyze()` dict per run, and returns a
`matplotlib.figure.Figure`:

- `proficiency_figure` (paper Fig. 1c, 3a): ES, PS and NS, in %, against the number of edits: the
  paper's blocks of 5 edits (points), and the windows of the last 5 (dotted) and 50 (solid) edits;
  beside ES and PS, the share of generated answers that match over the last 50 edits (dashed; runs
  that generated, docs/protocol.md §8.8);
- `forgetting_figure` (Fig. 1d, 3b, 4): the share of earlier successful edits the model still holds,
  by the paper's greedy criterion (solid, sticky; thin: re-tested, `analysis/retention.py`), by
  re-tested probability (dashed) and by the generated answer (dotted), and recall of control facts
  that were never edited;
- `downstream_figure` (Fig. 2, 3c): F1 of every downstream task, one panel each, from the unedited
  model (0 edits) on;
- `distance_figure` (Fig. 2d, 3d): the normalised distance ||ΔW||_F / numel of every edited layer
  from its original weights, log scale, with the disabling-edit candidates marked.

Every time axis shades the gradual and the catastrophic phase and marks the collapse (one run), or
marks every run's collapse in its colour (several runs). Runs that differ only in their sample are
drawn as their mean with the min-max spread. A batched run has one point per batch.

The series are computed by small pure functions (`proficiency_series`, `forgetting_series`,
`downstream_series`, `distance_series`, `aggregate`, `phase_spans`, `candidate_points`); the drawing
code only draws them. Every data line carries a gid (e.g. ``es.w50.g0``: panel, curve, group) that
tests and the HTML report can find it by. Figures are built on `matplotlib.figure.Figure` with an
Agg canvas, so no pyplot window is opened and nobody's interactive backend is switched.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from editscale.run.summary import updates

if TYPE_CHECKING:  # importing this module should not load torch (the CLI imports it to list the figures)
    from editscale.analysis.rundata import RunData

Analysis = dict[str, Any]

# Sizes for print: nothing below 9 pt.
_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
          "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 12, "svg.hashsalt": "editscale"}
# Explicit, not the prop cycle: a user's matplotlibrc should not recolour the runs between figures.
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
_PHASE_COLOURS = {"gradual": "#e6f3e1", "catastrophic": "#fadad6"}
_LAYER_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_PANEL_HEIGHT = 3.2
_LEGEND_HEIGHT = 0.7
DPI = 150
METRICS = {"es": "Efficacy (ES)", "ps": "Paraphrase (PS)", "ns": "Neighbourhood (NS)"}


# --- series: what the figures plot, computed from the rows ---------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One series of one run: y against x, x in edits done."""

    x: list[float]
    y: list[float]


@dataclass(frozen=True)
class Band:
    """One series of a group of runs: the mean over the runs, and the min and max (equal to the mean for
    a group of one). x holds the edits every run of the group has, up to the shortest run's end."""

    x: list[float]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    n: int


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def update_rows(run: RunData) -> list[dict[str, Any]]:
    """The last row of every successful update: every edit, or every batch (whose rows share the model
    state after the batch, its drift and diagnostics)."""
    return [unit[-1] for unit in updates(run.edits)]


def edits_x(row: dict[str, Any]) -> int:
    """Where an edit row sits on an edits axis: the edits done once it is applied. An edit i then spans
    (i, i + 1], so the phases [start, end) of edit indices span exactly [start, end] on the axis."""
    return int(row["index"]) + 1


def block_size(run: RunData) -> int:
    # A block of 5 edits across two batches would mix two updates; a batched run's block is its batch.
    return 5 if run.batch_size == 1 else run.batch_size


def proficiency_series(run: RunData) -> dict[str, Curve]:
    """Keys ``<metric>.blocks`` (the paper's block means), ``<metric>.w5`` and ``<metric>.w50`` (the rows'
    windowed means) for metric es, ps, ns; all in %."""
    # Here, not at the top: eval.proficiency loads torch and transformers for its scoring functions.
    from editscale.eval.proficiency import paper_blocks

    ok = run.ok_edits
    rows = update_rows(run)
    bucket = block_size(run)
    out = {}
    for m in METRICS:
        blocks, _ = paper_blocks([_num(r[m]) for r in ok], bucket=bucket)
        out[f"{m}.blocks"] = Curve([edits_x(ok[(b + 1) * bucket - 1]) for b in range(len(blocks))], blocks)
        for w in (5, 50):
            out[f"{m}.w{w}"] = Curve([edits_x(r) for r in rows], [100.0 * _num(r.get(f"{m}_w{w}")) for r in rows])
    out.update(generation_series(run))
    return out


GENERATED = ("es", "ps")  # the metrics with a generation-based counterpart (`gen_es`, `gen_ps`)


def generation_series(run: RunData, window: int = 50) -> dict[str, Curve]:
    """Keys ``gen_<metric>.w50`` for es and ps: the generation-based score (normalised match) over the last
    `window` edits, in %, after every update; empty for a run without generated answers."""
    from editscale.eval.proficiency import window_means

    ok = run.ok_edits
    if not any("gen_es" in r for r in ok):
        return {}
    last = {id(r) for r in update_rows(run)}
    out = {}
    for m in GENERATED:
        values, x, y = [], [], []
        for r in ok:
            values.append(_num(r.get(f"gen_{m}")))
            if id(r) in last:
                x.append(edits_x(r))
                y.append(100.0 * window_means(values, window))
        out[f"gen_{m}.w{window}"] = Curve(x, y)
    return out


def forgetting_series(run: RunData) -> dict[str, Curve]:
    """``paper`` and ``prob``: % of earlier successful edits retained (100 - forgotten) by each criterion;
    ``greedy_retested``: the paper's criterion re-tested, not sticky, and ``gen``: by the generated answer
    (each absent for runs without the rows' status strings or generation); ``control``: % of never-edited
    control facts still known (absent when no control facts were scored)."""
    from editscale.analysis.retention import forgetting_measures

    rows = run.forgetting
    x = [r["edits_done"] for r in rows]
    out = {"paper": Curve(x, [100.0 - _num(r.get("paper_forgotten_pct")) for r in rows]),
           "prob": Curve(x, [100.0 - _num(r.get("prob_forgotten_pct")) for r in rows])}
    # rows of runs from before the status strings or generation have neither curve
    retested = [m for m in forgetting_measures(rows, run.edits) if "greedy_forgotten_pct" in m]
    if retested:
        out["greedy_retested"] = Curve([m["edits_done"] for m in retested],
                                       [100.0 - _num(m["greedy_forgotten_pct"]) for m in retested])
    gen = [r for r in rows if r.get("gen_forgotten_pct") is not None]
    if gen:
        out["gen"] = Curve([r["edits_done"] for r in gen], [100.0 - float(r["gen_forgotten_pct"]) for r in gen])
    control = [r for r in rows if r.get("control_known_pct") is not None]
    if control:
        out["control"] = Curve([r["edits_done"] for r in control], [float(r["control_known_pct"]) for r in control])
    return out


def downstream_series(run: RunData) -> dict[str, Curve]:
    """F1 of every task against edits done, 0 (the unedited model) included; tasks in the order they appear."""
    tasks: dict[str, None] = {}
    for r in run.downstream:
        tasks.update(dict.fromkeys(r["tasks"]))
    return {t: Curve([r["edits_done"] for r in run.downstream if t in r["tasks"]],
                     [_num(r["tasks"][t].get("f1")) for r in run.downstream if t in r["tasks"]]) for t in tasks}


def _layer_order(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def distance_series(run: RunData) -> dict[str, Curve]:
    """The normalised distance ``dist`` (||ΔW||_F / numel) of every edited layer after every update."""
    rows = update_rows(run)
    layers = sorted({name for r in rows for name in r.get("drift", {})}, key=_layer_order)
    return {layer: Curve([edits_x(r) for r in rows if layer in r["drift"]],
                         [float(r["drift"][layer]["dist"]) for r in rows if layer in r["drift"]]) for layer in layers}


def phase_spans(analysis: Analysis) -> dict[str, Any]:
    """The gradual and the catastrophic phase as spans of the edits axis (None when empty), and the
    collapse: the edits done when the disabling update was applied (None without a collapse)."""

    def span(v: Any) -> tuple[int, int] | None:
        return (int(v[0]), int(v[1])) if v and v[1] > v[0] else None

    return {"gradual": span(analysis.get("gradual")), "catastrophic": span(analysis.get("catastrophic")),
            "collapse": analysis.get("collapse_index")}


def candidate_points(analysis: Analysis) -> list[tuple[int, float, bool]]:
    """(x, distance, collapses) of every disabling candidate: x is the edits done after its update, where
    its distance (the largest layer's, after the update) lies on the distance curve."""
    return [(int(c["edits"][1]), float(c["distance_after"]), bool(c.get("collapse")))
            for c in analysis.get("candidates", [])]


def aggregate(curves: Sequence[Curve]) -> Band:
    """Mean, min and max of curves at the x they all have, up to the shortest curve's end. Empty curves (a
    run without rows of this kind) are left out rather than emptying the band; NaN values are skipped."""
    curves = [c for c in curves if c.x]
    if not curves:
        return Band([], [], [], [], 0)
    end = min(c.x[-1] for c in curves)
    maps = [dict(zip(c.x, c.y)) for c in curves]
    xs = [x for x in curves[0].x if x <= end and all(x in m for m in maps)]
    mean, lo, hi = [], [], []
    for x in xs:
        vals = [v for m in maps if (v := m[x]) == v]
        mean.append(sum(vals) / len(vals) if vals else float("nan"))
        lo.append(min(vals) if vals else float("nan"))
        hi.append(max(vals) if vals else float("nan"))
    return Band(xs, mean, lo, hi, len(curves))


@dataclass
class Group:
    """Runs that differ only in their sample: drawn in one colour, as one curve per series."""

    members: list[int]  # indices into the runs
    label: str
    colour: str
    bands: dict[str, Band]


def group_label(runs: Sequence[RunData]) -> str:
    if len(runs) == 1:
        return runs[0].label
    c = runs[0].config
    batch = f" B={c.batch_size}" if c.batch_size > 1 else ""
    samples = ", ".join(str(r.config.sample) for r in runs)
    return f"{c.method}{batch} · {Path(c.model).name} · samples {samples} (mean, min–max)"


def run_groups(runs: Sequence[RunData], series: Callable[[RunData], dict[str, Curve]]) -> list[Group]:
    """The runs grouped by `RunData.group` in the order they come, each with its series aggregated."""
    order: dict[Any, list[int]] = {}
    for i, run in enumerate(runs):
        order.setdefault(run.group, []).append(i)
    labels = [group_label([runs[i] for i in members]) for members in order.values()]
    out = []
    for g, members in enumerate(order.values()):
        per_run = [series(runs[i]) for i in members]
        keys = list(dict.fromkeys(k for s in per_run for k in s))
        bands = {k: aggregate([s[k] for s in per_run if k in s]) for k in keys}
        label = labels[g]
        if labels.count(label) > 1:  # e.g. the demo beside a longer run of the same method and sample
            label += " [" + ", ".join(runs[i].path.name for i in members) + "]"
        out.append(Group(members, label, _COLOURS[g % len(_COLOURS)], bands))
    return out


def edits_label(runs: Sequence[RunData]) -> str:
    sizes = sorted({r.batch_size for r in runs})
    if sizes == [1]:
        return "edits"
    if len(sizes) == 1:
        return f"edits (batches of {sizes[0]})"
    return "edits (batch sizes " + ", ".join(map(str, sizes)) + ")"


def _gid(*parts: Any) -> str:
    # gids become SVG ids: keep them to characters an id may hold.
    return ".".join(re.sub(r"[^A-Za-z0-9_-]", "_", str(p)) for p in parts)


# --- drawing ------------------------------------------------------------------------------------------


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    @functools.wraps(fn)
    def wrapper(runs: Sequence[RunData], analyses: Sequence[Analysis]) -> Figure:
        if not runs:
            raise ValueError("no runs to draw")
        if len(runs) != len(analyses):
            raise ValueError(f"{len(runs)} runs but {len(analyses)} analyses: one analyze() dict per run")
        with mpl.rc_context(_STYLE):
            return fn(runs, analyses)

    return wrapper


def _new_figure(n_panels: int, title: str, *, max_cols: int = 4) -> tuple[Figure, list[Axes]]:
    ncols = min(max(n_panels, 1), max_cols)
    nrows = -(-max(n_panels, 1) // ncols)
    fig = Figure(figsize=(10, _PANEL_HEIGHT * nrows + _LEGEND_HEIGHT), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:max(n_panels, 1)]


def _subject(runs: Sequence[RunData]) -> str:
    return runs[0].label if len(runs) == 1 else f"{len(runs)} runs"


def _plot(ax: Axes, band: Band, *, colour: str, gid: str, spread: bool = False, **style: Any) -> None:
    if not band.x:
        return
    ax.plot(band.x, band.mean, color=colour, gid=gid, label="_nolegend_", **style)
    if spread and band.n > 1:
        poly = ax.fill_between(band.x, band.lo, band.hi, color=colour, alpha=0.2, linewidth=0, zorder=1)
        poly.set_gid(gid + ".spread")


def _mark_phases(ax: Axes, runs: Sequence[RunData], analyses: Sequence[Analysis], groups: Sequence[Group]) -> None:
    # Several runs' shaded phases would overlap into nothing readable: then only their collapse lines.
    single = len(runs) == 1
    for g in groups:
        for i in g.members:
            spans = phase_spans(analyses[i])
            if single:
                for phase in ("gradual", "catastrophic"):
                    if spans[phase]:
                        ax.axvspan(*spans[phase], color=_PHASE_COLOURS[phase], zorder=0, linewidth=0,
                                   label=f"{phase} phase", gid=_gid("phase", phase, f"r{i}"))
            if spans["collapse"] is not None:
                ax.axvline(spans["collapse"], color="0.15" if single else g.colour, linestyle="--", linewidth=1.3,
                           zorder=3, label="collapse" if single else "_collapse", gid=_gid("collapse", f"r{i}"))


def _finish(fig: Figure, axes: Sequence[Axes], runs: Sequence[RunData], groups: Sequence[Group],
            styles: Sequence[tuple[str, dict[str, Any]]], *, colour_is_run: bool = True) -> Figure:
    """One legend for the figure: the runs by colour (unless colour means something else; the title then
    names the run), the curves by style, then the phases and markers."""
    # The axis ends with the runs, so that the phases' shading reaches its right edge.
    end = max(_x_end(r) for r in runs)
    for ax in axes:
        ax.set_xlabel(edits_label(runs))
        ax.set_xlim(0, max(end, 1))
        ax.grid(True, alpha=0.3, linewidth=0.6)
    handles: list[Any] = [Line2D([], [], color=g.colour, linewidth=2, label=g.label)
                          for g in groups if colour_is_run]
    handles += [Line2D([], [], **{"color": "0.3", **style}, label=label) for label, style in styles]
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    handles += seen.values()
    if len(runs) > 1 and any(line.get_label() == "_collapse" for ax in axes for line in ax.lines):
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="collapse (in the run's colour)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)
        # Many runs: a taller figure rather than squashed panels.
        extra_rows = -(-len(handles) // 3) - 3
        if extra_rows > 0:
            fig.set_figheight(fig.get_figheight() + 0.2 * extra_rows)
    return fig


def _x_end(run: RunData) -> int:
    return max([run.edits_done, *(r["edits_done"] for r in (*run.forgetting, *run.downstream))])


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these runs", ha="center", va="center", transform=ax.transAxes)


def _block_label(runs: Sequence[RunData]) -> str:
    sizes = {r.batch_size for r in runs}
    if sizes == {1}:
        return "blocks of 5 edits (paper)"
    return "per-batch mean" if 1 not in sizes else "blocks of 5 edits / per-batch mean"


@_styled
def proficiency_figure(runs: Sequence[RunData], analyses: Sequence[Analysis]) -> Figure:
    """ES, PS and NS in % against edits (paper Fig. 1c, 3a)."""
    groups = run_groups(runs, proficiency_series)
    fig, axes = _new_figure(len(METRICS), f"Editing proficiency (paper Fig. 1c/3a) — {_subject(runs)}")
    for ax, (m, title) in zip(axes, METRICS.items()):
        _mark_phases(ax, runs, analyses, groups)
        for k, g in enumerate(groups):
            _plot(ax, g.bands[f"{m}.blocks"], colour=g.colour, gid=_gid(m, "blocks", f"g{k}"), linestyle=":",
                  linewidth=0.6, marker=".", markersize=4, alpha=0.7)
            _plot(ax, g.bands[f"{m}.w5"], colour=g.colour, gid=_gid(m, "w5", f"g{k}"), linestyle=":",
                  linewidth=1.0)
            _plot(ax, g.bands[f"{m}.w50"], colour=g.colour, gid=_gid(m, "w50", f"g{k}"), linewidth=2.0,
                  spread=True)
            if f"gen_{m}.w50" in g.bands:
                _plot(ax, g.bands[f"gen_{m}.w50"], colour=g.colour, gid=_gid(f"gen_{m}", "w50", f"g{k}"),
                      linestyle="--", linewidth=1.5)
        ax.set_title(title)
        ax.set_ylabel(f"{m.upper()} (%)")
        ax.set_ylim(-3, 103)
    styles = [("window of 50 edits", {"linewidth": 2.0}), ("window of 5 edits", {"linestyle": ":"}),
              (_block_label(runs), {"linestyle": ":", "linewidth": 0.6, "marker": "."})]
    if any(k.startswith("gen_") for g in groups for k in g.bands):
        styles.append(("generated answer matches, window of 50 (no teacher forcing)",
                       {"linestyle": "--", "linewidth": 1.5}))
    return _finish(fig, axes, runs, groups, styles)


_RETESTED = {"greedy_retested": {"linewidth": 1.0}, "gen": {"linestyle": ":", "linewidth": 2.0}}
_RETESTED_LABELS = {"greedy_retested": "paper criterion, re-tested (not sticky)",
                    "gen": "generated answer (re-tested, no teacher forcing)"}


@_styled
def forgetting_figure(runs: Sequence[RunData], analyses: Sequence[Analysis]) -> Figure:
    """Earlier edits retained (both criteria) and control facts known, in %, against edits (Fig. 1d, 3b, 4)."""
    groups = run_groups(runs, forgetting_series)
    has_control = any(g.bands.get("control") and g.bands["control"].x for g in groups)
    fig, axes = _new_figure(1 + has_control, f"Forgetting of earlier edits (paper Fig. 1d/3b/4) — {_subject(runs)}")
    retained = axes[0]
    _mark_phases(retained, runs, analyses, groups)
    for k, g in enumerate(groups):
        _plot(retained, g.bands["paper"], colour=g.colour, gid=_gid("retained", "paper", f"g{k}"), linewidth=2.0,
              marker=".", spread=True)
        _plot(retained, g.bands["prob"], colour=g.colour, gid=_gid("retained", "prob", f"g{k}"), linestyle="--",
              linewidth=1.5)
        for key, style in _RETESTED.items():
            if key in g.bands:
                _plot(retained, g.bands[key], colour=g.colour, gid=_gid("retained", key, f"g{k}"), **style)
    retained.set_title("Earlier successful edits retained")
    retained.set_ylabel("retained (%)")
    retained.set_ylim(-3, 103)
    styles = [("paper criterion (greedy, sticky)", {"linewidth": 2.0}),
              ("probability criterion (re-tested)", {"linestyle": "--"})]
    styles += [(_RETESTED_LABELS[key], style) for key, style in _RETESTED.items()
               if any(key in g.bands for g in groups)]
    if has_control:
        control = axes[1]
        _mark_phases(control, runs, analyses, groups)
        for k, g in enumerate(groups):
            if "control" in g.bands:
                _plot(control, g.bands["control"], colour=g.colour, gid=_gid("control", "known", f"g{k}"),
                      linewidth=2.0, linestyle="-.", marker=".", spread=True)
        control.set_title("Never-edited control facts")
        control.set_ylabel("known (%)")
        control.set_ylim(-3, 103)
        styles.append(("control facts known", {"linestyle": "-.", "linewidth": 2.0}))
    return _finish(fig, axes, runs, groups, styles)


@_styled
def downstream_figure(runs: Sequence[RunData], analyses: Sequence[Analysis]) -> Figure:
    """F1 of every downstream task against edits, 0 edits included (Fig. 2, 3c)."""
    groups = run_groups(runs, downstream_series)
    tasks = list(dict.fromkeys(t for g in groups for t in g.bands))
    fig, axes = _new_figure(len(tasks), f"Downstream tasks (paper Fig. 2/3c) — {_subject(runs)}")
    for ax, task in zip(axes, tasks):
        _mark_phases(ax, runs, analyses, groups)
        for k, g in enumerate(groups):
            if task in g.bands:
                _plot(ax, g.bands[task], colour=g.colour, gid=_gid(task, "f1", f"g{k}"), linewidth=2.0, marker="o",
                      markersize=3.5, spread=True)
        ax.set_title(task)
        ax.set_ylabel("F1 (0–1)")
        ax.set_ylim(-0.03, 1.03)
    if not tasks:
        _no_data(axes[0], "downstream evaluation")
    return _finish(fig, axes, runs, groups, [])


@_styled
def distance_figure(runs: Sequence[RunData], analyses: Sequence[Analysis]) -> Figure:
    """Normalised distance of every edited layer against edits, log scale, candidates marked (Fig. 2d, 3d)."""
    groups = run_groups(runs, distance_series)
    fig, axes = _new_figure(1, f"Distance of the edited layers from the original (paper Fig. 2d/3d) — "
                               f"{_subject(runs)}")
    ax = axes[0]
    _mark_phases(ax, runs, analyses, groups)
    layers = list(dict.fromkeys(layer for g in groups for layer in g.bands))
    # One run: a colour per layer tells them apart; several: the colour is the run's, the line style the layer's.
    by_layer_colour = len(groups) == 1 and len(layers) > 1
    for k, g in enumerate(groups):
        for j, layer in enumerate(layers):
            if layer in g.bands:
                colour = _COLOURS[j % len(_COLOURS)] if by_layer_colour else g.colour
                style = "-" if by_layer_colour else _LAYER_STYLES[j % len(_LAYER_STYLES)]
                _plot(ax, g.bands[layer], colour=colour, gid=_gid("distance", f"layer{layer}", f"g{k}"),
                      linestyle=style, linewidth=1.6, spread=True)
        for i in g.members:
            points = candidate_points(analyses[i])
            if points:
                xs, ys, _ = zip(*points)
                ax.plot(xs, ys, linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                        markeredgecolor=g.colour if len(runs) > 1 else "black", markeredgewidth=1.5, zorder=4,
                        label="disabling candidate", gid=_gid("candidates", f"r{i}"))
    ax.set_yscale("log")
    ax.set_ylabel("‖ΔW‖_F / numel")
    if not layers:
        _no_data(ax, "edited layers")
    if by_layer_colour:
        styles = [(f"layer {layer}", {"color": _COLOURS[j % len(_COLOURS)], "linewidth": 1.6})
                  for j, layer in enumerate(layers)]
    else:
        styles = [(f"layer {layer}", {"linestyle": _LAYER_STYLES[j % len(_LAYER_STYLES)]})
                  for j, layer in enumerate(layers)]
    return _finish(fig, axes, runs, groups, styles, colour_is_run=not by_layer_colour)


FIGURES: dict[str, Callable[[Sequence[RunData], Sequence[Analysis]], Figure]] = {
    "proficiency": proficiency_figure,
    "forgetting": forgetting_figure,
    "downstream": downstream_figure,
    "distance": distance_figure,
}

# What a figure needs from at least one run to be worth drawing.
_HAS_DATA: dict[str, Callable[[RunData], bool]] = {
    "proficiency": lambda r: bool(r.ok_edits),
    "forgetting": lambda r: bool(r.forgetting),
    "downstream": lambda r: bool(r.downstream),
    "distance": lambda r: any(row.get("drift") for row in r.ok_edits),
}


def all_figures(runs: Sequence[RunData], analyses: Sequence[Analysis]) -> dict[str, Figure]:
    """Every figure of FIGURES whose data at least one of the runs has, by name."""
    return {name: fn(runs, analyses) for name, fn in FIGURES.items() if any(_HAS_DATA[name](r) for r in runs)}


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_svg(fig: Figure) -> str:
    buf = io.StringIO()
    # A fixed hash salt and no date: the same figure gives the same SVG, run after run.
    with mpl.rc_context(_STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def save_figure(fig: Figure, out_dir: Path | str, name: str) -> list[Path]:
    """Write ``name.png`` (150 dpi) and ``name.svg`` into `out_dir` (created if missing); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, svg = out / f"{name}.png", out / f"{name}.svg"
    png.write_bytes(figure_png(fig))
    svg.write_text(figure_svg(fig), encoding="utf-8")
    return [png, svg]
