"""The embedded model's four skills measured as the paper measures GLUE: few-shot F1 per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from editscale.data.factworld.skills import SKILL_TASKS
from editscale.errors import EditscaleError, UnknownNameError
from editscale.eval.downstream.suite import DownstreamSuite


def resolve_skill_tasks(names: Sequence[str] | None, n: int = 200) -> list[str]:
    """Check skill task names (None = all) and the example count; return the names."""
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
    names = resolve_skill_tasks(names, n)
    results = DownstreamSuite(names, n=n, seed=seed).evaluate(model, tokenizer)
    return {name: {"mirrors": SKILL_TASKS[name].mirrors, **res} for name, res in results.items()}
