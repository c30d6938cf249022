"""The fused MNM kernel on one thread against its batch split between several.

One MNM core (width 64), torch on 1 thread, the kernel with ``MNM_RL_KERNEL_THREADS`` = 1 and
= ``--threads`` (2), interleaved in one process; wall time (the point is to use a second core),
medians. Two phases:

* ``train``: forward and backward over 16 steps x B sequences;
* ``rollout``: 32 single steps of B envs without autograd, every step split into parts however
  small (``MIN_STEP_PART_ROWS`` set to 1 here), to show from which batch size a split pays.

    python benchmarks/kernel_threads.py

Prints a table and, as the last line, a JSON list of ``{"size", "batch", "phase",
"one_thread_ms", "split_ms", "threads", "speedup"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mnm_rl.memory import MNMCore, fused

CASES = {
    "train": [((1, 1), 16), ((2, 2), 16), ((4, 3), 16), ((2, 2), 32), ((2, 2), 8)],
    "rollout": [
        ((2, 2), 8),
        ((2, 2), 16),
        ((2, 2), 32),
        ((2, 2), 64),
        ((4, 3), 8),
        ((4, 3), 16),
        ((4, 3), 32),
        ((4, 3), 64),
    ],
}


def run_phase(core: MNMCore, phase: str, batch: int):
    """One timed call of ``phase`` for ``core``: a function of the kernel thread count."""
    if phase == "train":
        x = torch.randn(16, batch, 64)
        starts = torch.zeros(16, batch)
        starts[5, batch // 2] = 1

        def work() -> None:
            y, _, aux = core(x, core.initial_state(batch), starts)
            (y.sum() + aux["recon_after"].sum()).backward()

    else:
        x, starts = torch.randn(1, batch, 64), torch.zeros(1, batch)

        def work() -> None:
            state = core.initial_state(batch)
            with torch.inference_mode():
                for _ in range(32):
                    _, state, _ = core(x, state, starts)

    def step(threads: int) -> float:
        os.environ[fused.KERNEL_THREADS_VARIABLE] = str(threads)
        begin = time.perf_counter()
        work()
        return time.perf_counter() - begin

    return step


def main() -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    fused.MIN_STEP_PART_ROWS = 1  # split every rollout step, to measure it
    rows = []
    split = f"{args.threads} threads ms"
    print(f"{'size':6s} {'batch':>5s} {'phase':8s} {'1 thread ms':>11s} {split:>12s} speedup")
    for phase, cases in CASES.items():
        for (heads, layers), batch in cases:
            torch.manual_seed(0)
            core = MNMCore(64, hidden_size=64, n_heads=heads, n_layers=layers)
            step = run_phase(core, phase, batch)
            times: dict[int, list[float]] = {1: [], args.threads: []}
            for threads in times:
                step(threads)
            for _ in range(args.pairs):
                for threads, values in times.items():
                    values.append(step(threads))
            a, b = (statistics.median(times[t]) * 1e3 for t in (1, args.threads))
            rows.append({"size": f"{heads}x{layers}", "batch": batch, "phase": phase,
                         "one_thread_ms": a, "split_ms": b, "threads": args.threads,
                         "speedup": a / b})  # fmt: skip
            print(f"{heads}x{layers:<4d} {batch:5d} {phase:8s} {a:11.2f} {b:12.2f} {a / b:6.2f}x")
    del os.environ[fused.KERNEL_THREADS_VARIABLE]
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
