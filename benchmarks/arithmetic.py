"""Arithmetic floor of each core: FLOPs per env step of a PPO ``learn()``, and the time they take
at this CPU core's dense matrix-multiply rate.

For every core at the throughput benchmark's sizes (width 64, 64 input features), counts the
floating-point operations of one step of one sequence in the forward pass (the rollout's policy
step) and in forward plus backward (one epoch of the update), with ``torch.utils.flop_counter``
on a ``[seq_len 16, batch 16]`` call. The fused LSTM/GRU kernels are not in the counter's table,
so they are counted by formula: ``2 * G * hidden * (inputs + hidden)`` multiply-adds-as-FLOPs per
step for G gate blocks (4 for LSTM, 3 for GRU), the backward pass twice the forward.

Then ``core MFLOP / env step`` = forward + ``n_epochs`` x (forward + backward), and the time that
takes at the measured single-thread SGEMM rate (a square float32 matmul of ``--gemm-size``, the
fastest shape this core runs): a lower bound on the core's share of an env step, since small
batched ops run far below that rate. Prints a table and, as its last line, JSON.

    python benchmarks/arithmetic.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mnm_rl.memory import make_core

CONFIGS = {
    "lstm": ("lstm", {}),
    "gru": ("gru", {}),
    "mnm-p": ("mnm-p", {}),
    "mnm-g": ("mnm-g", {}),
    "mnm-p:2x2": ("mnm-p", {"n_heads": 2, "n_layers": 2}),
    "mnm-p:1x1": ("mnm-p", {"n_heads": 1, "n_layers": 1}),
}
GATE_BLOCKS = {"lstm": 4, "gru": 3}


def step_flops(kind: str, kwargs: dict, width: int, features: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per step of one sequence."""
    if kind in GATE_BLOCKS:
        forward = 2 * GATE_BLOCKS[kind] * width * (features + width)
        return forward, 3 * forward
    seq_len, batch = 16, 16
    core = make_core(kind, features, hidden_size=width, **kwargs)
    x = torch.randn(seq_len, batch, features, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y, _, aux = core(x, core.initial_state(batch), torch.zeros(seq_len, batch))
        forward = counter.get_total_flops()
        (y.sum() + aux["recon_after"].sum()).backward()
    return forward / (seq_len * batch), counter.get_total_flops() / (seq_len * batch)


def gemm_gflops(size: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` single-thread float32 matmul rate, GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    count = max(1, int(1e9 / (2 * size**3)))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        best = min(best, (time.perf_counter() - start) / count)
    return 2 * size**3 / best / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--n-epochs", type=int, default=4)
    p.add_argument("--gemm-size", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gflops = gemm_gflops(args.gemm_size)
    rows = {}
    for name, (kind, kwargs) in CONFIGS.items():
        forward, train = step_flops(kind, kwargs, args.width, args.features)
        per_env_step = forward + args.n_epochs * train
        rows[name] = {
            "forward_mflop": forward / 1e6,
            "forward_backward_mflop": train / 1e6,
            "learn_mflop_per_env_step": per_env_step / 1e6,
            "us_per_env_step_at_gemm_rate": per_env_step / (gflops * 1e3),
        }
    print(f"single-thread SGEMM {args.gemm_size}^3: {gflops:.1f} GFLOP/s")
    print(f"{'core':<11}{'fwd MFLOP':>11}{'fwd+bwd':>10}{'learn/env step':>16}{'us at SGEMM':>13}")
    for name, row in rows.items():
        print(
            f"{name:<11}{row['forward_mflop']:>11.3f}{row['forward_backward_mflop']:>10.3f}"
            f"{row['learn_mflop_per_env_step']:>16.3f}{row['us_per_env_step_at_gemm_rate']:>13.1f}"
        )
    print(json.dumps({"gemm_gflops": gflops, "n_epochs": args.n_epochs, "cores": rows}))


if __name__ == "__main__":
    main()
