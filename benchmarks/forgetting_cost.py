"""The cost of one forgetting checkpoint against the number of earlier edits, up to 10,000.

A checkpoint re-tests every earlier successful edit (both targets on its rewrite prompt) and the
control facts. Three ways side by side on the embedded model:

- re-tokenised: every checkpoint tokenises every row again (the tracker's way before it kept them);
- kept: rows tokenised once per edit and kept by the tracker (the first checkpoint tokenises);
- sampled: `--forgetting-sample K`, a fixed subset of K edits plus the last interval's.

The fact world has 1,800 subjects; beyond that the benchmark re-uses its records under new case
ids (the rows' lengths, hence the cost, are the fact world's).

    python benchmarks/forgetting_cost.py [--sizes 100,1000,10000] [--sample 1000] [--interval 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from editscale.data.registry import load_records
from editscale.eval.forgetting import ForgettingTracker
from editscale.eval.knowledge import prompt_target_rows
from editscale.eval.scoring import score_continuations
from editscale.models.loading import load_model


def records_for(n: int):
    base = load_records("factworld")
    return [dataclasses.replace(base[i % len(base)], case_id=i) for i in range(n)]


def retokenised(lm, records, batch_size: int = 256) -> float:
    """A checkpoint that tokenises every row again."""
    t0 = time.perf_counter()
    prompts = [r.rewrite_prompt for r in records]
    rows = prompt_target_rows(lm.adapter, prompts + prompts, [r.target_new for r in records] +
                              [r.target_true for r in records], batch_size=batch_size)
    score_continuations(lm.model, rows, pad_id=lm.adapter.pad_token_id, batch_size=batch_size)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,5000,10000")
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--interval", type=int, default=10, help="edits between checkpoints (the last interval's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retokenised-up-to", type=int, default=1000, help="largest size also timed re-tokenising")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    print(f"embedded model, {args.threads} threads; seconds per checkpoint (edits only, no control set)")
    print(f"{'earlier edits':>14} {'re-tok.':>8} {'kept: 1st':>9} {'kept':>8} {'ratio':>6} "
          f"{'sampled K=' + str(args.sample):>16}")
    for n in (int(x) for x in args.sizes.split(",")):
        records = records_for(n)
        tr = ForgettingTracker()
        for r in records:
            tr.add(r, greedy_success=True, es_success=True)
        first = tr.check(lm.adapter, n)["seconds"]  # tokenises every row once
        # later checkpoints: nobody forgets for the paper criterion's re-test set to stay whole
        tr.paper_forgotten.clear()
        now = tr.check(lm.adapter, n)["seconds"]
        old = retokenised(lm, records) if n <= args.retokenised_up_to else float("nan")
        sampled = ForgettingTracker(sample=args.sample, planned=n)
        for r in records[: n - args.interval]:
            sampled.add(r, greedy_success=True, es_success=True)
        sampled.check(lm.adapter, n - args.interval)
        for r in records[n - args.interval:]:
            sampled.add(r, greedy_success=True, es_success=True)
        row = sampled.check(lm.adapter, n)
        print(f"{n:>14} {old:>8.3f} {first:>9.3f} {now:>8.3f} {old / now:>5.1f}x "
              f"{row['seconds']:>9.3f} ({row['tested']} tested)")


if __name__ == "__main__":
    main()
