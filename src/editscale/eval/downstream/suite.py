"""A set of downstream tasks evaluated together, repeatedly, on a changing model (docs/protocol.md §8.5).

Examples are loaded once; each evaluation reuses them. Two ways to read a prediction:
- paper: greedy generation of 3 tokens, answer parsed after the marker, invalid outputs (-1) kept
  in the weighted F1, GLUE RTE's gold labels used as they are (the paper's inversion kept);
- logprob: the likelier label word wins (no invalid outputs), RTE's gold labels mapped right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from editscale.eval.downstream.fast import evaluate_fewshot_fast
from editscale.eval.downstream.fewshot import evaluate_fewshot
from editscale.eval.downstream.registry import DownstreamTask, Example, get_tasks

Mode = Literal["paper", "logprob"]
EMBEDDED_DEFAULT = ("sentiment", "paraphrase", "acceptability", "entailment")
GLUE_DEFAULT = ("sst2", "mrpc", "cola", "rte")


def default_tasks(model_name: str) -> tuple[str, ...]:
    """The embedded model is measured on its own four skills, any other model on the paper's GLUE four."""
    return EMBEDDED_DEFAULT if model_name == "embedded" else GLUE_DEFAULT


@dataclass
class LoadedTask:
    task: DownstreamTask
    demos: tuple[Example, ...]
    examples: list[Example]


class DownstreamSuite:
    def __init__(self, names: Sequence[str], *, mode: Mode = "paper", n: int = 200,
                 data_dir: Path | str | None = None, fast: bool = True, batch_size: int = 32,
                 seed: int = 1234) -> None:
        self.mode, self.fast, self.batch_size = mode, fast, batch_size
        self.tasks: list[LoadedTask] = []
        for task in get_tasks(list(names)):
            demos, examples = task.examples(n=n, data_dir=data_dir, seed=seed)
            if mode == "logprob" and task.gold_to_label:
                examples = [(f, task.gold_to_label[y]) for f, y in examples]
            self.tasks.append(LoadedTask(task, demos, examples))

    @property
    def names(self) -> list[str]:
        return [t.task.name for t in self.tasks]

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, dict[str, Any]]:
        """Per task: f1, accuracy, mcc, invalid, total, seconds (and predictions)."""

        fn = evaluate_fewshot_fast if self.fast else evaluate_fewshot
        out = {}
        for t in self.tasks:
            t0 = time.perf_counter()
            res = fn(model, tokenizer, t.task.fmt, t.demos, t.examples, mode=self.mode, batch_size=self.batch_size,
                     task=t.task.name)
            res["seconds"] = time.perf_counter() - t0
            out[t.task.name] = res
        return out


def summary_row(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The compact per-task figures a results row keeps (predictions stay out of the run files). The
    counts stay beside the rates, so another aggregation (the paper's code's, pooled over runs) can
    be computed from the rows."""
    keep = ("f1", "accuracy", "mcc", "correct", "incorrect", "invalid", "total", "shortened", "seconds")
    return {name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k in keep}
            for name, r in results.items()}
