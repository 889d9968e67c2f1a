"""What a notebook user imports: load a model, load records, measure facts and skills, scan layers.

The CLI is a thin layer over these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from editscale.data.records import EditRecord
from editscale.errors import EditscaleError, UnknownNameError
from editscale.models.adapter import ModelAdapter
from editscale.models.loading import LoadedModel, load_model


def _factworld(data_path: Path | None, limit: int | None) -> list[EditRecord]:
    from editscale.data.factworld import default_world

    if data_path is not None:
        raise EditscaleError("the factworld dataset is generated from its seed; it takes no --data-path")
    return default_world().records


def _counterfact(data_path: Path | None, limit: int | None) -> list[EditRecord]:
    from editscale.data.counterfact import load_counterfact

    # with no path the published file is downloaded once into the cache
    return load_counterfact(path=data_path)


def _zsre(data_path: Path | None, limit: int | None) -> list[EditRecord]:
    from editscale.data.zsre import load_zsre

    if data_path is None:
        raise EditscaleError("zsre needs --data-path pointing at a MEND-format file (zsre_mend_eval.json)")
    return load_zsre(data_path)


DATASETS: dict[str, Callable[[Path | None, int | None], list[EditRecord]]] = {
    "factworld": _factworld,
    "counterfact": _counterfact,
    "zsre": _zsre,
}


def load_records(dataset: str, *, data_path: Path | str | None = None, limit: int | None = None
                 ) -> list[EditRecord]:
    """Records of a named dataset, validated; ``limit`` keeps the first ones."""
    if dataset not in DATASETS:
        raise UnknownNameError(f"unknown dataset '{dataset}'; known datasets: {', '.join(DATASETS)}")
    if data_path is not None and not Path(data_path).exists():
        raise EditscaleError(f"--data-path {data_path} does not exist")
    if limit is not None and limit < 0:
        raise EditscaleError(f"the number of records must be >= 0, got {limit}")
    records = DATASETS[dataset](Path(data_path) if data_path is not None else None, limit)
    return records[:limit] if limit is not None else records


def resolve_skill_tasks(names: Sequence[str] | None, n: int = 200) -> list[str]:
    """Check skill task names (None = all) and the example count; return the names."""
    from editscale.data.factworld.skills import SKILL_TASKS

    names = list(names or SKILL_TASKS)
    unknown = [t for t in names if t not in SKILL_TASKS]
    if unknown:
        raise UnknownNameError(f"unknown skill task(s) {', '.join(unknown)}; known: {', '.join(SKILL_TASKS)}")
    if n < 2 or n % 2:
        raise EditscaleError(f"--n must be an even number >= 2 (balanced labels), got {n}")
    return names


def evaluate_skills(model: torch.nn.Module, tokenizer: Any, names: Sequence[str] | None = None, *,
                    n: int = 200, seed: int = 1234) -> dict[str, dict[str, Any]]:
    """Few-shot F1 of the embedded skill tasks on balanced sets of ``n`` examples."""
    from editscale.data.factworld.skills import SKILL_TASKS
    from editscale.eval.downstream.suite import DownstreamSuite

    names = resolve_skill_tasks(names, n)
    results = DownstreamSuite(names, n=n, seed=seed).evaluate(model, tokenizer)
    return {name: {"mirrors": SKILL_TASKS[name].mirrors, **res} for name, res in results.items()}


def layer_scan(adapter: ModelAdapter, records: Sequence[EditRecord]) -> list[dict[str, float]]:
    """Where facts live: the effect of zeroing one layer's MLP output at the last subject token.

    For each block, the MLP's contribution at that token is removed (its recorded output is
    subtracted) and we measure how often the true object still beats the new one, and the mean
    drop in the true object's log-probability. A large drop marks a layer that stores the facts.
    """
    from editscale.eval.knowledge import score_prompt_pairs

    prompts = [r.rewrite_prompt for r in records]
    trues = [r.target_true for r in records]
    news = [r.target_new for r in records]
    positions = adapter.subject_token_indices([r.prompt for r in records], [r.subject for r in records])
    enc = adapter.encode(prompts)
    # batch_size=n: every forward pass then holds the n prompts in record order (first with the
    # true target, then with the new one), so one position and one delta per record line up
    n = len(records)
    base = score_prompt_pairs(adapter, prompts, trues, news, batch_size=n)
    rows = []
    for layer in range(adapter.n_layers):
        with adapter.record("mlp", layer, positions) as rec:
            adapter.logits(enc)
        with adapter.intervene("mlp", layer, positions, -rec.last):
            ablated = score_prompt_pairs(adapter, prompts, trues, news, batch_size=n)
        rows.append({
            "layer": layer,
            "known": sum(a < b for a, b in ablated) / len(ablated),
            "nll_increase": sum(a[0] - b[0] for a, b in zip(ablated, base)) / len(base),
        })
    return rows


def demo_report(console: Any, *, device: str = "cpu", n_show: int = 8, n_scan: int = 200) -> dict[str, Any]:
    """Load the embedded model and show what it knows, what it can do, and where facts live."""
    from rich.table import Table

    from editscale.data.factworld import default_world
    from editscale.eval.knowledge import knowledge_scores, score_prompt_pairs

    loaded: LoadedModel = load_model("embedded", device=device)
    adapter = loaded.adapter
    records = default_world().records
    n_params = sum(p.numel() for p in loaded.model.parameters())
    console.print(f"[bold]editscale demo[/bold]: the embedded model ({n_params:,} parameters, "
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

    know = knowledge_scores(adapter, records[:500])
    t = Table(title="Knowledge on 500 records (true object preferred)")
    t.add_column("prompts")
    t.add_column("known", justify="right")
    for g in ("rewrite", "paraphrase", "neighborhood", "unseen"):
        t.add_row(g, f"{100 * know[f'known_{g}']:.1f}%")
    console.print(t)

    skills = evaluate_skills(loaded.model, loaded.tokenizer, n=100)
    t = Table(title="Few-shot skills (paper templates, 100 examples each)")
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
