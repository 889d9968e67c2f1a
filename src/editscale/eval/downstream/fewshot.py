"""Few-shot evaluation in the paper's way: greedy decoding of 3 tokens, answer parsed after the marker.

Two modes share the prompts and the metrics:

* ``paper``: the reference protocol (docs/protocol.md §8.5): greedy decoding of ``gen_len`` tokens, the answer
  read after the last marker by substring search, invalid answers (-1) kept in the weighted F1.
* ``logprob``: the label word with the highest mean per-token log-probability of ``" " + word``
  after the prompt (teacher-forced) is the prediction, so there are no invalid outputs.

The helpers below (tokenisation, label targets, result assembly) are also used by the
shared-prefix evaluator in ``fast.py``, so both paths parse and score in exactly one way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from editscale.data.fewshot import Example, FewShotFormat
from editscale.errors import EditscaleError
from editscale.eval.scoring import greedy_generate, score_continuations

MODES = ("paper", "logprob")


def fewshot_metrics(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """The paper's metrics: weighted F1 with invalid (-1) predictions left in, MCC, counts."""
    # Imported here: sklearn pulls in scipy (2.5 s), which every `editscale` command would pay at start.
    from sklearn.metrics import f1_score, matthews_corrcoef

    correct = sum(int(p == y) for p, y in zip(preds, labels))
    invalid = sum(int(p == -1) for p in preds)
    return {
        "f1": float(f1_score(labels, preds, average="weighted", labels=sorted(set(labels)))),
        "mcc": float(matthews_corrcoef(labels, preds)),
        "accuracy": correct / max(len(labels), 1),
        "correct": correct, "incorrect": len(labels) - correct - invalid, "invalid": invalid,
        "total": len(labels),
    }


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise EditscaleError(f"unknown few-shot mode '{mode}'; known modes: {', '.join(MODES)}")


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The one tokenisation of few-shot prompts that every evaluator feeds to the model.

    With the tokenizer's special tokens, as the paper's `tok(prompt)` call: nothing for GPT-2 and
    GPT-J, the BOS token for Llama-style tokenizers (which expect it).
    """
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def label_targets(tokenizer: Any, fmt: FewShotFormat, prompts: Sequence[str], ids: Sequence[Sequence[int]]
                  ) -> list[dict[int, list[int]]]:
    """Per example, label -> token ids of ``" " + label word`` as they follow that prompt's tokens.

    The ids are read off a tokenisation of the full string (so SentencePiece gets no stray "▁");
    if a merge across the boundary changed the prompt's own tokens, the word is tokenised alone.
    """
    out: list[dict[int, list[int]]] = []
    for prompt, prompt_ids in zip(prompts, ids, strict=True):
        n = len(prompt_ids)
        targets: dict[int, list[int]] = {}
        for label, word in sorted(fmt.label_words.items()):
            full = list(tokenizer(f"{prompt} {word}")["input_ids"])  # tokenised as the prompt is
            if full[:n] == list(prompt_ids) and len(full) > n:
                targets[label] = full[n:]
            else:
                targets[label] = list(tokenizer(f" {word}", add_special_tokens=False)["input_ids"])
        out.append(targets)
    return out


def paper_result(tokenizer: Any, fmt: FewShotFormat, prompts: Sequence[str], gens: Sequence[Sequence[int]],
                 labels: Sequence[int]) -> dict[str, Any]:
    """Decode the generated tokens and parse them as the paper's code does (prompt text included)."""
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in gens]
    preds = [fmt.parse(q + t) for q, t in zip(prompts, texts)]
    return {**fewshot_metrics(labels, preds), "predictions": preds, "generations": texts}


def logprob_result(fmt: FewShotFormat, scores: Sequence[Mapping[int, float]], labels: Sequence[int]
                   ) -> dict[str, Any]:
    """Predict the label with the highest mean log-prob (ties go to the smaller label)."""
    preds = [max(sorted(s), key=lambda y, s=s: s[y]) for s in scores]
    return {**fewshot_metrics(labels, preds), "predictions": preds,
            "generations": [fmt.label_words[p] for p in preds], "label_logprobs": [dict(s) for s in scores]}


def evaluate_fewshot(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat,
                     demos: Sequence[Example], examples: Sequence[Example], *, gen_len: int = 3,
                     batch_size: int = 32, mode: str = "paper") -> dict[str, Any]:
    """Naive evaluation: every example's whole prompt is run through the model on its own row."""
    check_mode(mode)
    prompts = [fmt.render_prompt(demos, f) for f, _ in examples]
    ids = prompt_token_ids(tokenizer, prompts)
    labels = [y for _, y in examples]
    pad = pad_token_id(tokenizer)
    if mode == "paper":
        gens = greedy_generate(model, ids, gen_len, pad_id=pad, batch_size=batch_size)
        return paper_result(tokenizer, fmt, prompts, gens, labels)
    targets = label_targets(tokenizer, fmt, prompts, ids)
    rows = [(p, t[y]) for p, t in zip(ids, targets) for y in sorted(t)]
    flat = score_continuations(model, rows, pad_id=pad, batch_size=batch_size)
    scores, k = [], 0
    for t in targets:
        scores.append({y: -flat[k + j].mean_nll for j, y in enumerate(sorted(t))})
        k += len(t)
    return logprob_result(fmt, scores, labels)
