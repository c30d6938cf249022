"""Paired timing of the features extractor's compiled grid path against its plain PyTorch path.

For each config, ``throughput.py``'s agent in the issue's setting (MiniGrid-MemoryS7, 7 x 7
view, 8 envs x 128 steps, 4 epochs of minibatches of 16 sequences x 16 steps), one process,
1 torch thread: CPU time of whole PPO updates, ``train()``, on one collected rollout, the
extractor's grid taking the compiled kernel (:mod:`mnm_rl.agent.grid_linear`) or the plain
embeddings and ``Linear`` in turn, parameters and optimizer state put back before each call
(``kernel_pairs.py``'s update phase, with the encoder switched instead of the MNM kernel).
Both train through autograd (``MNM_RL_EXPLICIT_BACKWARD=0`` while it runs: the plain path has
no explicit backward pass, ``mnm_rl.agent.explicit``), so that only the encoder differs.

    python benchmarks/encoder_pairs.py                          # lstm and mnm-p, 9 pairs
    python benchmarks/encoder_pairs.py --configs lstm mnm-p:1x1 --pairs 30

Prints a table and, as the last line, a JSON list of ``{"config", "plain_ms", "compiled_ms",
"speedup", "pair_speedup"}`` (``speedup``: the ratio of the medians, plain / compiled;
``pair_speedup``: the median of the pairs' own ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch
from kernel_pairs import pair_speedup, time_train_calls
from throughput import environment_variable

from mnm_rl.agent import explicit


def use_plain(model) -> None:
    extractor = model.policy.features_extractor
    if extractor.grid_layout is not None:
        extractor.compiled_layout, extractor.grid_layout = extractor.grid_layout, None


def use_compiled(model) -> None:
    extractor = model.policy.features_extractor
    extractor.grid_layout = getattr(extractor, "compiled_layout", extractor.grid_layout)
    if extractor.grid_layout is None:
        raise RuntimeError("this agent's observations have no grid for the compiled path")


def autograd_only() -> contextlib.AbstractContextManager[None]:
    """``MNM_RL_EXPLICIT_BACKWARD=0`` inside, as it was after."""
    return environment_variable(explicit.SWITCH_VARIABLE, "0")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["lstm", "mnm-p"],
                   help="throughput.py's agent configs")  # fmt: skip
    p.add_argument("--pairs", type=int, default=9)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'config':12s} {'plain ms':>9s} {'compiled ms':>12s} speedup pair med")
    for config in args.configs:
        with autograd_only():
            times = time_train_calls(config, {"plain": use_plain, "compiled": use_compiled},
                                     args.pairs)  # fmt: skip
        a, b = statistics.median(times["plain"]), statistics.median(times["compiled"])
        paired = pair_speedup(times["plain"], times["compiled"])
        rows.append({"config": config, "plain_ms": a * 1e3, "compiled_ms": b * 1e3,
                     "speedup": a / b, "pair_speedup": paired})  # fmt: skip
        print(f"{config:12s} {a * 1e3:9.1f} {b * 1e3:12.1f} {a / b:6.2f}x {paired:7.3f}x")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
