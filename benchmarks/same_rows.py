"""Do two run directories hold the same results? Rows of edits/forgetting/downstream.jsonl compared
with their timings left out, plus the checkpoint's tensors bit for bit.

    python benchmarks/same_rows.py RUN_A RUN_B

Used to show that a refactor changes no behaviour: the same `editscale run` before and after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def without_timings(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if k not in ("timings", "seconds")}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    same = True
    for name in ("edits", "forgetting", "downstream", "health"):
        rows = [[without_timings(json.loads(line)) for line in (d / f"{name}.jsonl").read_text().splitlines()]
                if (d / f"{name}.jsonl").exists() else [] for d in (args.a, args.b)]
        equal = rows[0] == rows[1]
        same &= equal
        print(f"{name}.jsonl: {len(rows[0])} vs {len(rows[1])} rows, {'identical' if equal else 'DIFFERENT'} "
              "(timings excluded)")
        for i, (x, y) in enumerate(zip(*rows)):
            if x != y:
                print(f"  first difference at row {i}: " + ", ".join(k for k in x if x.get(k) != y.get(k)))
                break
    for name in ("templates.json", "control.json"):  # a method without templates writes none
        equal = [(d / name).read_bytes() if (d / name).exists() else None for d in (args.a, args.b)]
        equal = equal[0] == equal[1]
        same &= equal
        print(f"{name}: {'identical' if equal else 'DIFFERENT'}")
    wa, wb = (load_file(str(d / "checkpoint" / "weights.safetensors")) for d in (args.a, args.b))
    equal = sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    same &= equal
    print(f"checkpoint tensors {', '.join(sorted(wa))}: {'bit-equal' if equal else 'DIFFERENT'}")
    print("same results" if same else "the runs differ")


if __name__ == "__main__":
    main()
