"""Where facts live: the effect on recall of removing one block's MLP output at the subject token."""

from __future__ import annotations

from collections.abc import Sequence

from editscale.data.records import EditRecord
from editscale.eval.knowledge import score_prompt_pairs
from editscale.models.adapter import ModelAdapter


def layer_scan(adapter: ModelAdapter, records: Sequence[EditRecord]) -> list[dict[str, float]]:
    """Per block: recall with that block's MLP contribution at the last subject token removed.

    The MLP output at that token is recorded and then subtracted; we measure how often the true
    object still beats the new one, and the mean increase of the true object's NLL. A large
    increase marks a block that stores the facts.
    """
    prompts = [r.rewrite_prompt for r in records]
    trues = [r.target_true for r in records]
    news = [r.target_new for r in records]
    positions = adapter.subject_token_indices([r.prompt for r in records], [r.subject for r in records])
    enc = adapter.encode(prompts)
    # batch_size=n, in order: every forward pass then holds the n prompts in record order (first
    # with the true target, then with the new one), so one position and one delta per record line up
    n = len(records)
    base = score_prompt_pairs(adapter, prompts, trues, news, batch_size=n, in_order=True)
    rows = []
    for layer in range(adapter.n_layers):
        with adapter.record("mlp", layer, positions) as rec:
            adapter.logits(enc)
        with adapter.intervene("mlp", layer, positions, -rec.last):
            ablated = score_prompt_pairs(adapter, prompts, trues, news, batch_size=n, in_order=True)
        rows.append({
            "layer": layer,
            "known": sum(a < b for a, b in ablated) / len(ablated),
            "nll_increase": sum(a[0] - b[0] for a, b in zip(ablated, base)) / len(base),
        })
    return rows
