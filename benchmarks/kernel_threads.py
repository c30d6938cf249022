"""The fused MNM kernel's training pass on one thread against its batch split between several.

One MNM core (width 64), forward and backward over 16 steps x B sequences, torch on 1 thread,
the kernel with ``MNM_RL_KERNEL_THREADS`` = 1 and = ``--threads`` (2), interleaved in one
process; wall time (the point is to use a second core), medians.

    python benchmarks/kernel_threads.py

Prints a table and, as the last line, a JSON list of ``{"size", "batch", "one_thread_ms",
"split_ms", "threads", "speedup"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mnm_rl.memory import MNMCore, fused

CASES = [((1, 1), 16), ((2, 2), 16), ((4, 3), 16), ((2, 2), 32), ((2, 2), 8)]


def main() -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    split = f"{args.threads} threads ms"
    print(f"{'size':6s} {'batch':>5s} {'1 thread ms':>11s} {split:>12s} speedup")
    for (heads, layers), batch in CASES:
        torch.manual_seed(0)
        core = MNMCore(64, hidden_size=64, n_heads=heads, n_layers=layers)
        x = torch.randn(16, batch, 64)
        starts = torch.zeros(16, batch)
        starts[5, batch // 2] = 1

        def step(threads: int, core=core, x=x, batch=batch, starts=starts) -> float:
            os.environ[fused.KERNEL_THREADS_VARIABLE] = str(threads)
            begin = time.perf_counter()
            y, _, aux = core(x, core.initial_state(batch), starts)
            (y.sum() + aux["recon_after"].sum()).backward()
            return time.perf_counter() - begin

        times: dict[int, list[float]] = {1: [], args.threads: []}
        for threads in times:
            step(threads)
        for _ in range(args.pairs):
            for threads, values in times.items():
                values.append(step(threads))
        a, b = (statistics.median(times[t]) * 1e3 for t in (1, args.threads))
        rows.append({"size": f"{heads}x{layers}", "batch": batch, "one_thread_ms": a,
                     "split_ms": b, "threads": args.threads, "speedup": a / b})  # fmt: skip
        print(f"{heads}x{layers:<4d} {batch:5d} {a:11.2f} {b:12.2f} {a / b:6.2f}x")
    del os.environ[fused.KERNEL_THREADS_VARIABLE]
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
