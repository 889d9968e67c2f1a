"""Naive vs shared-prefix few-shot evaluation (paper mode: greedy, 3 tokens), side by side. Prints,
per skill task, the seconds of each path, their ratio and whether F1s, predictions and generated texts agree:

1. the embedded model on its 4 skill tasks (``--n`` examples each, default 200);
2. a GPT-2-small-shaped model with random weights (12 blocks, d=768, 12 heads) on the same tasks'
   prompts (``--gpt2-n`` examples each, default 8: the naive path costs seconds per example there),
   with the real GPT-2 tokenizer from /work/shared/data/tokenizers/gpt2, else the embedded one.

    python benchmarks/downstream_speed.py [--n 200] [--gpt2-n 8] [--batch-size 32] [--threads 0] [--no-gpt2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from editscale.data.factworld import default_world
from editscale.data.factworld.skills import SKILL_TASKS, skill_eval_set
from editscale.eval.downstream.fast import evaluate_fewshot_fast
from editscale.eval.downstream.fewshot import evaluate_fewshot
from editscale.models.loading import load_model

# the shared data folder: $EDITSCALE_SHARED, else ../shared next to the repository
SHARED_DIR = Path(os.environ.get("EDITSCALE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
GPT2_TOKENIZER_DIR = SHARED_DIR / "data/tokenizers/gpt2"


def compare(label: str, model: torch.nn.Module, tokenizer: Any, n: int, batch_size: int) -> None:
    reserved = default_world().reserved_names
    print(f"[{label}] paper mode, {n} examples per task, batch size {batch_size}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"    {'task':14s} {'prefix':>6s} {'suffix':>6s} {'naive s':>9s} {'fast s':>8s} {'ratio':>6s}  "
          f"{'F1 naive':>8s} {'F1 fast':>8s}  same F1 / preds / generations")
    total_naive = total_fast = 0.0
    all_same = True
    for name, task in SKILL_TASKS.items():
        es = skill_eval_set(task, reserved, n=n)
        t0 = time.perf_counter()
        naive = evaluate_fewshot(model, tokenizer, task.fmt, es.demos, es.examples, batch_size=batch_size)
        t_naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = evaluate_fewshot_fast(model, tokenizer, task.fmt, es.demos, es.examples, batch_size=batch_size)
        t_fast = time.perf_counter() - t0
        same_f1 = naive["f1"] == fast["f1"]
        same_preds = naive["predictions"] == fast["predictions"]
        same_gens = naive["generations"] == fast["generations"]
        all_same &= same_f1 and same_preds and same_gens
        total_naive += t_naive
        total_fast += t_fast
        print(f"    {name:14s} {fast['prefix_len']:6d} {fast['mean_suffix_len']:6.1f} {t_naive:9.2f} {t_fast:8.2f} "
              f"{t_naive / t_fast:6.1f}  {naive['f1']:8.4f} {fast['f1']:8.4f}  {same_f1} / {same_preds} / {same_gens}")
    print(f"    {'all tasks':14s} {'':6s} {'':6s} {total_naive:9.2f} {total_fast:8.2f} "
          f"{total_naive / total_fast:6.1f}  identical: {all_same}")


def gpt2_shaped(embedded_tokenizer: Any) -> tuple[torch.nn.Module, Any, str]:
    if (GPT2_TOKENIZER_DIR / "vocab.json").is_file():
        tokenizer, source = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR)), "GPT-2 tokenizer"
    else:
        tokenizer, source = embedded_tokenizer, "embedded tokenizer (GPT-2 files absent)"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    model = GPT2LMHeadModel(config).eval()
    model.requires_grad_(False)
    return model, tokenizer, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="examples per task for the embedded model (even)")
    ap.add_argument("--gpt2-n", type=int, default=8, help="examples per task for the GPT-2-shaped model (even)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-shaped model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    with torch.no_grad():
        compare("embedded", lm.model, lm.tokenizer, args.n, args.batch_size)
        if not args.no_gpt2:
            model, tokenizer, source = gpt2_shaped(lm.tokenizer)
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            compare(f"GPT-2-shaped random, {n_params:.0f}M params, {source}", model, tokenizer, args.gpt2_n,
                    args.batch_size)


if __name__ == "__main__":
    main()
