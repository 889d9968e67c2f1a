"""Two runs side by side, each with one torch thread and then each with the default (every CPU this
process may use): what giving a run only its share of the CPUs is worth when runs share a machine,
as the runs of a sweep do.

    python benchmarks/threads.py [--edits 20] [--method rome] [--runs 2]

Each run is `editscale run` in its own process (the embedded model, downstream evaluation off,
different samples); the statistics are computed once beforehand, so both settings time editing only.
Prints each process's wall time, the time of its edit loop (summary.json `wall_seconds_this_process`)
and the threads it used, then the ratio of the slowest process's wall time, default over one thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from editscale.run.config import usable_cpus


def editscale_run(out: Path, stats: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "editscale.cli", "run", "--out", str(out), "--method", args.method,
            "--stats-cache", str(stats), "--downstream-every", "0", "--no-progress", *extra]


def side_by_side(root: Path, stats: Path, args: argparse.Namespace, threads: int | None) -> float:
    label = f"--threads {threads}" if threads else "default threads"
    procs = []
    for i in range(args.runs):
        extra = ["--edits", str(args.edits), "--sample", str(i)] + (["--threads", str(threads)] if threads else [])
        out = root / f"{'t' + str(threads) if threads else 'default'}-{i}"
        procs.append((out, time.perf_counter(), subprocess.Popen(editscale_run(out, stats, args, *extra),
                                                                  stdout=subprocess.DEVNULL)))
    slowest = 0.0
    for out, t0, proc in procs:
        if proc.wait() != 0:
            sys.exit(f"{out}: editscale run failed")
        wall = time.perf_counter() - t0
        slowest = max(slowest, wall)
        s = json.loads((out / "summary.json").read_text())
        print(f"  {label:16s} {out.name:10s} wall {wall:6.1f} s   edit loop {s['wall_seconds_this_process']:6.1f} s   "
              f"{s['threads_this_process']} threads   mean ES {s['mean_es']:.2f}", flush=True)
    return slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--method", default="rome")
    ap.add_argument("--runs", type=int, default=2, help="Runs side by side.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stats = root / "stats"
        t0 = time.perf_counter()
        warm = editscale_run(root / "warm", stats, args, "--edits", "1", "--control", "0")
        subprocess.run(warm, check=True, stdout=subprocess.DEVNULL)
        print(f"{usable_cpus()} usable CPUs; statistics and a first edit: {time.perf_counter() - t0:.1f} s; "
              f"{args.runs} runs of {args.edits} {args.method} edits side by side:", flush=True)
        one = side_by_side(root, stats, args, 1)
        default = side_by_side(root, stats, args, None)
    print(f"slowest run: --threads 1 {one:.1f} s, default {default:.1f} s; default / one thread = "
          f"{default / one:.2f}")


if __name__ == "__main__":
    main()
