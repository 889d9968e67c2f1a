"""`editscale report`: one self-contained HTML file for one or more runs, a Markdown summary and
the figures as PNG and SVG files beside them.

The HTML holds everything it shows (figures as base64 PNG, styles inline, no script, no link
outside the file), so it opens from disk, mails and archives as one file. It is made from the
runs' JSONL files every time, so it can be remade at any point of a run in progress.

    OUT/report.html   configs side by side, per-run summary, phases and disabling candidates,
                      figures, Tables 2, 3 and 8, retest verdicts
    OUT/report.md     the same tables in Markdown, linking the figure files
    OUT/figures/      <figure>.png and <figure>.svg
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from editscale.analysis.phases import PhaseRule, analyze
from editscale.analysis.properties import distance_table, generation_examples, method_properties
from editscale.analysis.retention import last_measures
from editscale.analysis.rundata import RunData, load_run
from editscale.report.figures import all_figures, save_figure

FIGURE_CAPTIONS = {
    "proficiency": "Editing proficiency: ES, PS and NS of each edit right after it, in the paper's 5-edit blocks "
                   "and as means over the last 5 (dotted) and 50 (solid) edits (paper, Figures 1c and 3a); dashed: "
                   "the share of generated answers that match target_new, over the last 50 edits.",
    "forgetting": "Forgetting: share of earlier successful edits still retained at each checkpoint, by the "
                  "paper's criterion (greedy, sticky; thin: re-tested), by probability (re-tested) and by the "
                  "generated answer (re-tested), and recall of never-edited control facts (paper, Figures 1d, "
                  "3b and 4).",
    "downstream": "Downstream few-shot F1 per task against the number of edits (paper, Figures 2 and 3c).",
    "distance": "Normalised distance ||ΔW||_F / numel of each edited layer from its original weights, log scale; "
                "disabling candidates marked (paper, Figures 2d and 3d).",
}


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    figures: list[Path] = field(default_factory=list)


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """The runs' resolved configs and versions side by side: one row per field, `differs` set
    where the runs disagree."""
    flat = [{**_flatten(r.config.model_dump()), **_flatten(r.versions, "versions.")} for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for k in keys:
        vals = [f.get(k) for f in flat]
        rows.append({"field": k, "values": [_fmt(v, "g") for v in vals],
                     "differs": len({repr(v) for v in vals}) > 1})
    return rows


def summary_rows(runs: Sequence[RunData], analyses: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for run, a in zip(runs, analyses):
        s = run.summary
        f1_0, f1_1 = s.get("downstream_initial_f1") or {}, s.get("downstream_final_f1") or {}
        f1 = " ".join(f"{t[:4]} {f1_0[t]:.2f}→{f1_1.get(t, float('nan')):.2f}" for t in f1_0)
        gen = [r["gen_es"] for r in run.ok_edits if r.get("gen_es") is not None]
        last = run.forgetting[-1] if run.forgetting else {}
        forgotten = (f"{_fmt(s.get('paper_forgotten_pct_final'), '.0f')}% / "
                     f"{_fmt(s.get('prob_forgotten_pct_final'), '.0f')}%")
        if last.get("gen_forgotten_pct") is not None:
            forgotten += f" / {_fmt(last['gen_forgotten_pct'], '.0f')}%"
        code = last_measures(run.forgetting, run.edits)
        out.append({"run": run.path.name, "method": run.config.method, "model": Path(run.config.model).name,
                    "sample": str(run.config.sample), "batch": str(run.batch_size),
                    "edits": f"{run.edits_done}" + ("" if run.finished else " (running)"),
                    "ES": _fmt(s.get("mean_es")), "PS": _fmt(s.get("mean_ps")), "NS": _fmt(s.get("mean_ns")),
                    "ES gen.": _fmt(sum(gen) / len(gen) if gen else None),
                    "forgotten": forgotten,
                    "failing now (all / successful)": f"{_fmt(code['greedy_failing_pct'], '.0f')}% / "
                                                      f"{_fmt(code['greedy_forgotten_pct'], '.0f')}%"
                    if code else "–",
                    "control": _fmt(s.get("control_known_pct_final"), ".0f") + "%",
                    "F1 before→after": f1 or "–",
                    "collapse": "none" if a["collapse_index"] is None else str(a["collapse_index"]),
                    "candidates": str(len(a["candidates"]))})
    return out


MILESTONES = {"es_w50_below_floor": "ES over the last 50 edits below {es_floor}",
              "control_below_floor": "control-fact recall below {control_floor:.0%} of its first value",
              "f1_below_half": "mean downstream F1 below half its first value",
              "text_nll_up_1": "loss on the fixed text up by 1 nat/token"}


def milestone_lines(a: dict[str, Any]) -> list[str]:
    return [f"{text.format(**a['rule'])}: " + ("not within the run" if a["milestones"][key] is None
                                                else f"after {a['milestones'][key]} edits")
            for key, text in MILESTONES.items()]


def candidate_rows(a: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for c in a["candidates"]:
        f1b, f1a = c["f1_before"] or {}, c["f1_after"] or {}
        mean_b = sum(f1b.values()) / len(f1b) if f1b else None
        mean_a = sum(f1a.values()) / len(f1a) if f1a else None
        out.append({"edit": str(c["index"]) + (" ◀ collapse" if c["collapse"] else ""),
                    "case": ", ".join(map(str, c["case_ids"][:3])) + ("…" if len(c["case_ids"]) > 3 else ""),
                    "subject": ", ".join(c["subjects"][:2]) + ("…" if len(c["subjects"]) > 2 else ""),
                    "size / median": _fmt(c["size_ratio"], ".1f") + "×",
                    "distance before→after":
                        f"{_fmt(c['distance_before'], '.2e')} → {_fmt(c['distance_after'], '.2e')}",
                    "ES next": _fmt(c["es_following"]),
                    "control before→after": f"{_fmt(c['control_before'], '.0f')} → {_fmt(c['control_after'], '.0f')}%",
                    "mean F1 before→after": f"{_fmt(mean_b)} → {_fmt(mean_a)}",
                    "text loss before→after": f"{_fmt(c['text_nll_before'])} → {_fmt(c['text_nll_after'])}"})
    return out


def retest_rows(run: RunData) -> list[dict[str, str]]:
    base = next((r for r in run.retest if r["kind"] == "unedited"), {})
    out = []
    for r in run.retest:
        if r["kind"] == "unedited":
            continue
        f1 = r.get("f1") or {}
        out.append({"method": r["method"], "kind": r["kind"], "edit": str(r["index"]),
                    "subject": ", ".join(r["subjects"][:2]),
                    "distance (first edit)": _fmt(r.get("distance_max"), ".2e"),
                    "distance in the run": _fmt(r["in_run"]["distance_after"], ".2e"),
                    "update": _fmt(r.get("update_size"), ".3g"), "ES": _fmt(r.get("es")), "NS": _fmt(r.get("ns")),
                    "control": f"{_fmt(r.get('control_known_pct'), '.0f')}% "
                               f"(of {_fmt(base.get('control_known_pct'), '.0f')}%)",
                    "mean F1": _fmt(sum(f1.values()) / len(f1) if f1 else None),
                    "text loss": f"{_fmt(r.get('text_nll'))} (was {_fmt(base.get('text_nll'))})",
                    "verdict": ("DISABLING: " + "; ".join(r["why"])) if r["disabling"] else "not disabling"})
    return out


def distance_rows(runs: Sequence[RunData]) -> list[dict[str, str]]:
    return [{"run": t["run"], "method": t["method"], "disabling / re-tested": f"{t['disabling']} / {t['candidates']}",
             "distance, disabling": _fmt(t["distance_disabling"], ".3e"),
             "distance, other candidates": _fmt(t["distance_candidates_not_disabling"], ".3e"),
             "distance, normal edits": _fmt(t["distance_normal"], ".3e") + f" ({t['baseline']})",
             "candidates / normal": _fmt(t["ratio"], ".1f") + "×"} for t in distance_table(runs)]


def property_rows(runs: Sequence[RunData], analyses: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for p in method_properties(runs, analyses):
        sde = p["single_disabling_edit"]
        out.append({"method": p["method"] + (f" ({p['variant']})" if p["variant"] else "")
                    + (f" B={p['batch_size']}" if p["batch_size"] > 1 else ""),
                    "model": Path(p["model"]).name, "runs": str(p["runs"]),
                    "efficacy until the collapse (ES)": _fmt(p["efficacy_gradual"]),
                    "locality (NS)": _fmt(p["locality_gradual"]),
                    "edits before the collapse": (_fmt(p["edits_before_collapse"], ".0f") + f" ({p['collapses']} of "
                                                  f"{p['runs']} runs)") if p["collapses"]
                    else f"not observed in {p['edits']}",
                    "edits lasting (ES50 ≥ 0.9, control ≥ 90%)": _fmt(p["edits_lasting"], ".0f")
                    + (" (the whole run)" if p["lasting_all_runs"] else ""),
                    "downstream F1 loss": _fmt(p["downstream_f1_loss"]),
                    "facts forgotten (paper / prob.)": f"{_fmt(p['forgotten_paper_pct'], '.0f')}% / "
                                                       f"{_fmt(p['forgotten_prob_pct'], '.0f')}%",
                    "single disabling edit": "not tested" if sde is None else ("yes" if sde else "no")})
    return out


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "_none_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]).replace("|", "\\|") for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def build_report(dirs: Sequence[Path | str], out: Path | str, *, rule: PhaseRule | None = None,
                 title: str | None = None) -> ReportFiles:
    """Write OUT/report.html, OUT/report.md and OUT/figures/ for the runs in `dirs`."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in dirs]
    analyses = [analyze(r, rule) for r in runs]
    figures, files = [], []
    for name, fig in all_figures(runs, analyses).items():
        png, svg = save_figure(fig, out / "figures", name)
        files += [png, svg]
        figures.append({"name": name, "caption": FIGURE_CAPTIONS.get(name, ""),
                        "png": base64.b64encode(png.read_bytes()).decode("ascii")})
    title = title or ("editscale report: " + ", ".join(r.path.name for r in runs))
    per_run = [{"run": r, "analysis": a, "candidates": candidate_rows(a), "retest": retest_rows(r),
                "milestones": milestone_lines(a),
                "generations": generation_examples(r, a)} for r, a in zip(runs, analyses)]
    ctx = {"title": title, "generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "runs": runs, "summary": summary_rows(runs, analyses), "configs": config_rows(runs),
           "per_run": per_run, "figures": figures, "distance": distance_rows(runs),
           "properties": property_rows(runs, analyses), "rule": (rule or PhaseRule()).model_dump()}
    env = Environment(loader=PackageLoader("editscale.report", "templates"), autoescape=select_autoescape(["j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    page = env.get_template("report.html.j2").render(**ctx)
    (out / "report.html").write_text(page)
    (out / "report.md").write_text(_markdown(ctx, [f for f in files if f.suffix == ".png"], out))
    return ReportFiles(out / "report.html", out / "report.md", files)


def _markdown(ctx: dict[str, Any], pngs: Sequence[Path], out: Path) -> str:
    parts = [f"# {ctx['title']}\n", f"Generated {ctx['generated']} from the runs' files.\n",
             "## Runs\n", markdown_table(ctx["summary"])]
    for item in ctx["per_run"]:
        a = item["analysis"]
        parts.append(f"## {item['run'].path.name}: phases\n")
        phase = (f"gradual phase: edits {a['gradual'][0]}-{a['gradual'][1] - 1}; catastrophic phase from edit "
                 f"{a['collapse_index']} ({a['reason']})" if a["collapse_index"] is not None
                 else f"gradual phase only, edits 0-{a['gradual'][1] - 1} ({a['reason']})")
        parts += [phase + "\n", *[f"- {m}" for m in item["milestones"]], "", "Disabling candidates:\n",
                  markdown_table(item["candidates"])]
        if item["retest"]:
            parts += ["Re-tested as first edits:\n", markdown_table(item["retest"])]
    parts += ["## Figures\n"] + [f"![{p.stem}]({p.relative_to(out)})\n" for p in pngs]
    parts += ["## Table 2: distance of disabling vs normal edits (single edits)\n", markdown_table(ctx["distance"]),
              "## Table 3: the methods at scale\n", markdown_table(ctx["properties"])]
    return "\n".join(parts)
