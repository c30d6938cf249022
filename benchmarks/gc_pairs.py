"""Does Python's garbage collector cost `learn()` time? Interleaved rounds in one process.

    python benchmarks/gc_pairs.py                     # lstm and mnm-p:2x2, 5 rounds
    python benchmarks/gc_pairs.py --configs mlp lstm gru mnm-p --rounds 7

For each config (named as in ``benchmarks/throughput.py``: same env, 8 envs, n_steps 128,
minibatch 256, 4 epochs, 1 torch thread), after a warm-up ``learn()``, each round times
``learn()`` of 2 rollouts three ways: the collector on as usual, ``gc.freeze()`` (what exists
when training starts is never scanned again) and ``gc.disable()``. Prints median env steps/s and
the ratios to "on"; the last line is JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import throughput

MODES = ("on", "freeze", "off")


def measure(name: str, rounds: int, args: argparse.Namespace) -> dict[str, float]:
    throughput._setup_torch(args.threads)
    env = throughput.make_env(args)
    model = throughput.build_agent(name, args, env, "cpu")
    steps = 2 * args.n_steps * args.n_envs
    model.learn(steps // 2)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(rounds):
        # the modes in turn, the order rotated every round (a fixed order favours one position)
        for mode in MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]:
            gc.unfreeze()
            gc.enable()
            gc.collect()
            if mode == "freeze":
                gc.freeze()
            elif mode == "off":
                gc.disable()
            start = time.perf_counter()
            model.learn(steps, reset_num_timesteps=False)
            rates[mode].append(steps / (time.perf_counter() - start))
            gc.enable()
    return {mode: statistics.median(values) for mode, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["lstm", "mnm-p:2x2"])
    parser.add_argument("--rounds", type=int, default=5)
    ours = parser.parse_args()
    args = throughput.parse_args([])
    results = {name: measure(name, ours.rounds, args) for name in ours.configs}
    print("| config | GC on (steps/s) | gc.freeze() | gc.disable() |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['on']:.0f} | {r['freeze']:.0f} ({r['freeze'] / r['on']:.3f}x) "
            f"| {r['off']:.0f} ({r['off'] / r['on']:.3f}x) |"
        )
    print(json.dumps({"rounds": ours.rounds, "sps": results}))


if __name__ == "__main__":
    main()
