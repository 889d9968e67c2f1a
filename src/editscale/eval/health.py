"""Is the model still a language model? The loss on a fixed text and greedy continuations of fixed
prompts (`data/probes.py`), recorded by the runner at its forgetting checkpoints and by `retest`.

A collapse shows here as a loss that jumps and continuations that turn to repetition or noise
(the paper's Table 8), which ES/PS/NS of single facts cannot show.
"""

from __future__ import annotations

import time
from typing import Any

from editscale.data.probes import Probe
from editscale.eval.generation import prompt_ids
from editscale.eval.scoring import greedy_generate, score_continuations
from editscale.models.adapter import ModelAdapter


def health_check(adapter: ModelAdapter, probe: Probe, *, n_new: int = 12) -> dict[str, Any]:
    """`text_nll`: mean per-token loss over the probe's texts; `generations`: prompt and greedy
    continuation of `n_new` tokens for each probe prompt (one batched pass each); `seconds`."""
    t0 = time.perf_counter()
    tok = adapter.tokenizer
    rows = []
    max_len = getattr(adapter.model.config, "n_positions", None) or getattr(
        adapter.model.config, "max_position_embeddings", 1024)
    for text in probe.texts:
        ids = tok(text, add_special_tokens=True)["input_ids"][:max_len]
        rows.append((ids[:1], ids[1:]))
    scores = score_continuations(adapter.model, rows, pad_id=adapter.pad_token_id)
    n_tokens = sum(len(t) for _, t in rows)
    nll = sum(s.sum_nll for s in scores) / n_tokens if n_tokens else float("nan")
    outs = greedy_generate(adapter.model, prompt_ids(adapter, probe.prompts), n_new, pad_id=adapter.pad_token_id)
    gens = [{"prompt": p, "text": tok.decode(o, skip_special_tokens=True)} for p, o in zip(probe.prompts, outs)]
    return {"text_nll": round(nll, 5), "generations": gens, "seconds": round(time.perf_counter() - t0, 4)}
