"""Few-shot evaluation in the paper's way: greedy decoding of 3 tokens, answer parsed after the marker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sklearn.metrics import f1_score, matthews_corrcoef

from editscale.eval.downstream.templates import FewShotFormat
from editscale.eval.scoring import greedy_generate


def fewshot_metrics(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """The paper's metrics: weighted F1 with invalid (-1) predictions left in, MCC, counts."""
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    invalid = sum(int(p == -1) for p in preds)
    return {
        "f1": float(f1_score(labels, preds, average="weighted", labels=sorted(set(labels)))),
        "mcc": float(matthews_corrcoef(labels, preds)),
        "accuracy": correct / max(len(labels), 1),
        "correct": correct, "incorrect": len(labels) - correct - invalid, "invalid": invalid,
        "total": len(labels),
    }


def evaluate_fewshot(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat,
                     demos: Sequence[tuple[Mapping[str, str], int]],
                     examples: Sequence[tuple[Mapping[str, str], int]], *, gen_len: int = 3,
                     batch_size: int = 32) -> dict[str, Any]:
    prompts = [fmt.render_prompt(demos, f) for f, _ in examples]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gens = greedy_generate(model, ids, gen_len, pad_id=pad, batch_size=batch_size)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    preds = [fmt.parse(q + t) for q, t in zip(prompts, texts)]
    labels = [y for _, y in examples]
    return {**fewshot_metrics(labels, preds), "predictions": preds, "generations": texts}
