"""Few-shot evaluation in the paper's way: greedy decoding of 3 tokens, answer parsed after the marker.

Two modes share the prompts and the metrics:

* ``paper``: the reference protocol (docs/protocol.md §8.5): greedy decoding of ``gen_len`` tokens, the answer
  read after the last marker by substring search, invalid answers (-1) kept in the weighted F1.
* ``logprob``: the label word with the highest mean per-token log-probability of ``" " + word``
  after the prompt (teacher-forced) is the prediction, so there are no invalid outputs.

The helpers below (tokenisation, label targets, result assembly, fitting prompts to the model's
positions) are also used by the shared-prefix evaluator in ``fast.py``, so both paths parse and
score in exactly one way.

A prompt longer than the model's positions keeps only its last demonstrations, whole, as many as
fit (the usual few-shot practice); a prompt that does not fit even without any is refused. Prompts
that fit are evaluated exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from editscale.data.fewshot import Example, FewShotFormat
from editscale.errors import EditscaleError
from editscale.eval.scoring import greedy_generate, score_continuations

MODES = ("paper", "logprob")
log = logging.getLogger(__name__)
# a suite evaluates the same prompts again after every few edits: the shortening is reported once
_REPORTED: set[tuple[str, int, int, int]] = set()


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


def context_length(model: torch.nn.Module) -> int | None:
    """The number of positions the model has (None: its config names no limit)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _room(tokenizer: Any, fmt: FewShotFormat, mode: str, gen_len: int, prompt: str, ids: Sequence[int]) -> int:
    # the positions read past the prompt: every generated or label token but the last is fed back
    if mode == "paper":
        return max(gen_len - 1, 0)
    targets = label_targets(tokenizer, fmt, [prompt], [ids])[0]
    return max(len(t) for t in targets.values()) - 1


def fit_demos(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat, demos: Sequence[Example],
              examples: Sequence[Example], *, mode: str = "paper", gen_len: int = 3, task: str | None = None
              ) -> list[int] | None:
    """How many demonstrations (the last ones) each example's prompt keeps to fit the model's positions.

    None when every prompt fits with all of them. A prompt that does not fit even with none is an
    EditscaleError naming the task and the example.
    """
    limit = context_length(model)
    if limit is None or not examples:
        return None
    name = task or fmt.name

    def fits(prompt: str, ids: Sequence[int]) -> bool:
        return len(ids) + _room(tokenizer, fmt, mode, gen_len, prompt, ids) <= limit

    prompts = [fmt.render_prompt(demos, f) for f, _ in examples]
    all_ids = prompt_token_ids(tokenizer, prompts)
    over = [j for j in range(len(examples)) if not fits(prompts[j], all_ids[j])]
    if not over:
        return None
    kept = [len(demos)] * len(examples)
    for j in over:
        fields, prompt, ids = examples[j][0], prompts[j], all_ids[j]
        for k in range(len(demos) - 1, -1, -1):
            prompt = fmt.render_prompt(demos[len(demos) - k:], fields)
            ids = prompt_token_ids(tokenizer, [prompt])[0]
            if fits(prompt, ids):
                kept[j] = k
                break
        else:
            fewer = f", evaluate only the {j} examples before it (--n / --downstream-n {j})" if j else ""
            raise EditscaleError(
                f"few-shot task {name}: example {j} is {len(ids)} tokens even without demonstrations (and "
                f"{_room(tokenizer, fmt, mode, gen_len, prompt, ids)} more for the answer), beyond the model's "
                f"{limit} positions; leave the task out (--tasks / --downstream){fewer} or use a model with a "
                "longer context")
    key = (name, limit, len(over), len(examples))
    if key not in _REPORTED:
        _REPORTED.add(key)
        log.info("few-shot task %s: %d of %d prompts exceed the model's %d positions; their first demonstrations "
                 "were dropped until each fits (%d to %d of %d kept)", name, len(over), len(examples), limit,
                 min(kept), max(kept[j] for j in over), len(demos))
    return kept


Evaluator = Callable[..., dict[str, Any]]


def evaluate_fitted(evaluate: Evaluator, model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat,
                    demos: Sequence[Example], examples: Sequence[Example], *, mode: str, gen_len: int,
                    batch_size: int, task: str | None) -> dict[str, Any]:
    """`evaluate` (the naive or the shared-prefix path) on prompts that fit the model's positions:
    unchanged when all fit; else once per number of demonstrations kept, merged in example order."""
    check_mode(mode)
    kept = fit_demos(model, tokenizer, fmt, demos, examples, mode=mode, gen_len=gen_len, task=task)
    if kept is None:
        return evaluate(model, tokenizer, fmt, demos, examples, mode=mode, gen_len=gen_len, batch_size=batch_size)
    groups: dict[int, list[int]] = {}
    for j, k in enumerate(kept):
        groups.setdefault(k, []).append(j)
    per_example: dict[str, list[Any]] = {}
    parts = []
    for k in sorted(groups, reverse=True):
        rows = groups[k]
        part = evaluate(model, tokenizer, fmt, demos[len(demos) - k:], [examples[j] for j in rows], mode=mode,
                        gen_len=gen_len, batch_size=batch_size)
        parts.append((len(rows), part))
        for key in ("predictions", "generations", "label_logprobs"):
            if key in part:
                column = per_example.setdefault(key, [None] * len(examples))
                for j, value in zip(rows, part[key], strict=True):
                    column[j] = value
    labels = [y for _, y in examples]
    out: dict[str, Any] = {**fewshot_metrics(labels, per_example["predictions"]), **per_example,
                           "shortened": sum(k < len(demos) for k in kept)}
    # the shared-prefix path's cost figures, over all the groups
    first = parts[0][1]
    if "forward_calls" in first:
        out["prefix_len"] = first["prefix_len"]
        out["forward_calls"] = sum(p["forward_calls"] for _, p in parts)
        out["mean_suffix_len"] = sum(n * p["mean_suffix_len"] for n, p in parts) / len(examples)
    return out


def evaluate_fewshot(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat,
                     demos: Sequence[Example], examples: Sequence[Example], *, gen_len: int = 3,
                     batch_size: int = 32, mode: str = "paper", task: str | None = None) -> dict[str, Any]:
    """Naive evaluation: every example's whole prompt is run through the model on its own row
    (prompts fitted to the model's positions, `evaluate_fitted`; `task` names the task in messages)."""
    return evaluate_fitted(_evaluate_naive, model, tokenizer, fmt, tuple(demos), examples, mode=mode,
                           gen_len=gen_len, batch_size=batch_size, task=task)


def _evaluate_naive(model: torch.nn.Module, tokenizer: Any, fmt: FewShotFormat, demos: Sequence[Example],
                    examples: Sequence[Example], *, gen_len: int, batch_size: int, mode: str) -> dict[str, Any]:
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
