"""Whole PPO updates on one kernel thread against two, paired in one process.

For each ``--configs`` agent of ``throughput.py`` (built in its setting, one torch thread), one
rollout is collected, then ``train()`` (every epoch and minibatch of one update, from that same
rollout) runs with the kernels' threads set to 1 and to ``--threads`` in turns, the order
reversed every other pair. Since the thirty-fourth session the kernel threads split the MNM
kernel's batch, the lstm kernel's batch, the input projections' rows and the actor and critic
heads (``MNM_RL_KERNEL_THREADS``, ``train.kernel_threads``); each update leaves the parameters
as the other would, so the pairs time the same work. Wall time, medians, and the median of the
pairs' ratios with a 95% interval (``learn_pairs.median_interval``).

    python benchmarks/update_threads.py
    python benchmarks/update_threads.py --configs lstm gru mnm-p:2x2 --pairs 60

Prints a table and, as its last line, a JSON list of ``{"config", "threads", "one_thread_ms",
"split_ms", "speedup", "ci95"}`` (``speedup``: the median of one thread's time over the split
one's, pair by pair).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learn_pairs  # noqa: E402
import throughput  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["lstm", "mnm-p"])
    p.add_argument("--threads", type=int, default=2, help="the split side's kernel threads")
    p.add_argument("--pairs", type=int, default=40)
    args, rest = p.parse_known_args(argv)
    if args.threads < 2 or args.pairs < 1:
        p.error("--threads must be at least 2 and --pairs positive")
    args.setting = throughput.parse_args(["--configs", *args.configs, *rest])
    return args


def time_updates(config: str, setting: argparse.Namespace, threads: int, pairs: int) -> dict:
    """One agent's update times, one kernel thread against ``threads``, from one rollout."""
    from mnm_rl.memory import fused

    agent = learn_pairs.Agent(config, setting)
    try:
        agent.take_turn()  # a rollout in the buffer, the kernels built
        model = agent.model
        start = copy.deepcopy(model.policy.state_dict())
        optimizer = copy.deepcopy(model.policy.optimizer.state_dict())
        times: dict[int, list[float]] = {1: [], threads: []}
        for pair in range(pairs + 1):  # pair 0 warms both up
            for count in (1, threads) if pair % 2 else (threads, 1):
                model.policy.load_state_dict(start)  # every update from the same parameters
                model.policy.optimizer.load_state_dict(optimizer)
                fused.set_kernel_threads(count)
                try:
                    begin = time.perf_counter()
                    model.train()
                    elapsed = time.perf_counter() - begin
                finally:
                    fused.set_kernel_threads(None)
                if pair:
                    times[count].append(elapsed)
    finally:
        agent.close()
    ratios = [a / b for a, b in zip(times[1], times[threads], strict=True)]
    return {
        "config": config,
        "threads": threads,
        "one_thread_ms": statistics.median(times[1]) * 1e3,
        "split_ms": statistics.median(times[threads]) * 1e3,
        "speedup": statistics.median(ratios),
        "ci95": learn_pairs.median_interval(ratios),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    raw = sys.argv[1:] if argv is None else argv
    print(f"machine: {throughput.machine()}")
    print(f"command: python benchmarks/update_threads.py {' '.join(raw)}".rstrip(), flush=True)
    rows = [time_updates(c, args.setting, args.threads, args.pairs) for c in args.configs]
    split = f"{args.threads} threads ms"
    print(f"\n{'config':16s} {'1 thread ms':>11s} {split:>12s}  speed-up [95% CI]")
    for row in rows:
        low, high = row["ci95"]
        print(f"{row['config']:16s} {row['one_thread_ms']:11.2f} {row['split_ms']:12.2f}  "
              f"{row['speedup']:.3f} [{low:.3f}, {high:.3f}]")  # fmt: skip
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
