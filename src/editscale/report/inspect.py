"""`editscale inspect`: a tour of the embedded model in tables (facts it knows, skills, layer scan)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from editscale.data.factworld import default_world
from editscale.eval.knowledge import knowledge_scores, score_prompt_pairs
from editscale.eval.locate import layer_scan
from editscale.eval.skills import evaluate_skills
from editscale.models.loading import load_model


def tour(console: Any, *, device: str = "cpu", n_show: int = 8, n_facts: int = 500, n_skill: int = 100,
         n_scan: int = 200) -> dict[str, Any]:
    """Load the embedded model and show what it knows, what it can do, and where facts live."""
    loaded = load_model("embedded", device=device)
    adapter = loaded.adapter
    records = default_world().records
    n_params = sum(p.numel() for p in loaded.model.parameters())
    console.print(f"[bold]editscale inspect[/bold]: the embedded model ({n_params:,} parameters, "
                  f"{adapter.n_layers} blocks, d={adapter.d_model}) and its fact world "
                  f"({len(records)} facts)")

    shown = records[:n_show]
    pairs = score_prompt_pairs(adapter, [r.rewrite_prompt for r in shown], [r.target_true for r in shown],
                               [r.target_new for r in shown])
    t = Table(title="Facts it knows (mean per-token NLL; lower is likelier)")
    for col in ("prompt", "true", "NLL", "counterfactual", "NLL", "known"):
        t.add_column(col)
    for r, (a, b) in zip(shown, pairs):
        t.add_row(r.rewrite_prompt, r.target_true, f"{a:.2f}", r.target_new, f"{b:.2f}",
                  "[green]yes[/green]" if a < b else "[red]no[/red]")
    console.print(t)

    know = knowledge_scores(adapter, records[:n_facts])
    t = Table(title=f"Knowledge on {n_facts} records (true object preferred)")
    t.add_column("prompts")
    t.add_column("known", justify="right")
    for g in ("rewrite", "paraphrase", "neighborhood", "unseen"):
        t.add_row(g, f"{100 * know[f'known_{g}']:.1f}%")
    console.print(t)

    skills = evaluate_skills(loaded.model, loaded.tokenizer, n=n_skill)
    t = Table(title=f"Few-shot skills (paper templates, {n_skill} examples each)")
    for col in ("task", "mirrors", "F1"):
        t.add_column(col)
    for name, res in skills.items():
        t.add_row(name, res["mirrors"], f"{res['f1']:.3f}")
    console.print(t)

    scan = layer_scan(adapter, records[:n_scan])
    t = Table(title=f"Where facts live: MLP output at the last subject token zeroed, {n_scan} facts")
    for col in ("block", "still known", "NLL increase of true object"):
        t.add_column(col, justify="right")
    peak = max(scan, key=lambda r: r["nll_increase"])["layer"]
    for row in scan:
        mark = " [bold]<- largest effect[/bold]" if row["layer"] == peak else ""
        t.add_row(str(row["layer"]), f"{100 * row['known']:.1f}%", f"{row['nll_increase']:.2f}{mark}")
    console.print(t)
    return {"knowledge": know, "skills": {k: v["f1"] for k, v in skills.items()}, "layer_scan": scan}
