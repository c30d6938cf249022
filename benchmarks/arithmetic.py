"""Arithmetic floor of each core: FLOPs per env step of a PPO ``learn()``, and the time they take
at this CPU core's dense matrix-multiply rate.

For every core at the throughput benchmark's sizes (width 64, 64 input features), counts the
floating-point operations of one step of one sequence in the forward pass (the rollout's policy
step) and in forward plus backward (one epoch of the update), with ``torch.utils.flop_counter``
on a ``[seq_len 16, batch 16]`` call. The fused LSTM/GRU kernels are not in the counter's table,
so they are counted by formula: ``2 * G * hidden * (inputs + hidden)`` multiply-adds-as-FLOPs per
step for G gate blocks (4 for LSTM, 3 for GRU), the backward pass twice the forward.

The MNM cores are counted in their PyTorch form (as under ``MNM_RL_FUSED=0``, whatever the
environment): the counter does not see inside the fused kernel, which does the same products
(until the forty-fourth session this script counted the kernel's calls as no work at all where it
was built).

Then ``core MFLOP / env step`` = forward + ``n_epochs`` x (forward + backward), and the time that
takes at the measured single-thread SGEMM rate (a square float32 matmul of ``--gemm-size``): a
lower bound on the core's share of an env step, since small batched ops run below that rate.

Then, for each MNM core, the rate at which the fused kernel runs that arithmetic: one thread, a
training pass (``mnm_rl.memory.fused.explicit_sequence``'s forward and backward, with the core's
input and output projections, as a PPO update runs it) over ``--kernel-batch`` sequences of 16
steps (8: one of the two parts a minibatch of 16 is split into), the median of ``--kernel-calls``
calls; its effective rate is the counted FLOPs over that time, given also as a fraction of the
kernels' own dense product tiles' rate on this CPU (``dense_products.h`` through the extension's
``linear_forward``, a ``[1024 x 64] x [64 x 256]`` product: the input projection's shape with
more rows, so that the call's packing and allocation are a small part of it). Where
that fraction is near one, only less arithmetic makes the kernel faster. Prints a table and, as
its last line, JSON.

    python benchmarks/arithmetic.py
    python benchmarks/arithmetic.py --kernel-calls 0   # the counts alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from types import ModuleType

import torch
from throughput import environment_variable
from torch.utils.flop_counter import FlopCounterMode

from mnm_rl import native
from mnm_rl.memory import fused, make_core

CONFIGS = {
    "lstm": ("lstm", {}),
    "gru": ("gru", {}),
    "mnm-p": ("mnm-p", {}),
    "mnm-g": ("mnm-g", {}),
    "mnm-p:2x2": ("mnm-p", {"n_heads": 2, "n_layers": 2}),
    "mnm-p:1x1": ("mnm-p", {"n_heads": 1, "n_layers": 1}),
}
GATE_BLOCKS = {"lstm": 4, "gru": 3}
#: The steps of a training sequence (the benchmark's ``seq_len``).
SEQ_LEN = 16


def compiled_kernels_off() -> contextlib.AbstractContextManager[None]:
    """The compiled kernels switched off (``MNM_RL_FUSED=0``) inside, as before outside."""
    return environment_variable(native.SWITCH_VARIABLE, "0")


def step_flops(kind: str, kwargs: dict, width: int, features: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per step of one sequence; an MNM core's in its
    PyTorch form (:func:`compiled_kernels_off`)."""
    if kind in GATE_BLOCKS:
        forward = 2 * GATE_BLOCKS[kind] * width * (features + width)
        return forward, 3 * forward
    seq_len, batch = SEQ_LEN, 16
    core = make_core(kind, features, hidden_size=width, **kwargs)
    x = torch.randn(seq_len, batch, features, requires_grad=True)
    with compiled_kernels_off(), FlopCounterMode(display=False) as counter:
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


@contextlib.contextmanager
def one_kernel_thread() -> Iterator[None]:
    """The fused kernel on one thread inside (``MNM_RL_KERNEL_THREADS`` unset there too); after,
    the environment as before and the kernel's own setting back at its default (``None``)."""
    fused.set_kernel_threads(1)
    try:
        with environment_variable(fused.KERNEL_THREADS_VARIABLE, None):
            yield
    finally:
        fused.set_kernel_threads(None)


def kernel_pass_ms(kernel: ModuleType, kind: str, kwargs: dict, width: int, features: int,
                   batch: int, calls: int) -> tuple[float, float]:  # fmt: skip
    """Median ms of the fused kernel's training pass (forward, backward) over ``batch``
    sequences of :data:`SEQ_LEN` steps, on one thread, as a PPO update runs it
    (``fused.explicit_sequence``, an episode starting in one sequence half-way)."""
    core = make_core(kind, features, hidden_size=width, **kwargs)
    x = torch.randn(SEQ_LEN, batch, features)
    starts = torch.zeros(SEQ_LEN, batch)
    starts[SEQ_LEN // 2, batch // 2] = 1
    state = core.initial_state(batch)
    grad = torch.randn(SEQ_LEN, batch, core.output_size)
    forward, backward = [], []
    with one_kernel_thread(), torch.no_grad():
        for call in range(calls + 3):  # three warm-up calls
            start = time.perf_counter()
            _, _, run_backward = fused.explicit_sequence(core, x, starts, state, kernel, 0.1)
            middle = time.perf_counter()
            run_backward(grad)
            end = time.perf_counter()
            if call >= 3:
                forward.append(middle - start)
                backward.append(end - middle)
    return statistics.median(forward) * 1e3, statistics.median(backward) * 1e3


def tile_gflops(
    kernel: ModuleType, rows: int = 1024, inner: int = 64, cols: int = 256, calls: int = 200
) -> float:
    """Median rate of the kernels' own dense products (``dense_products.h``, through the
    extension's ``linear_forward`` on one thread) for ``[rows x inner] x [inner x cols]``."""
    x, weight = torch.randn(rows, inner), torch.randn(cols, inner)
    times = []
    for call in range(calls + 3):
        start = time.perf_counter()
        kernel.linear_forward(x, weight, None, 1)
        if call >= 3:
            times.append(time.perf_counter() - start)
    return 2 * rows * inner * cols / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--n-epochs", type=int, default=4)
    p.add_argument("--gemm-size", type=int, default=256)
    p.add_argument("--kernel-batch", type=int, default=8)
    p.add_argument(
        "--kernel-calls",
        type=int,
        default=300,
        help="timed training passes per MNM core (0: no kernel timings)",
    )
    args = p.parse_args(argv)
    if args.kernel_batch < 1 or args.kernel_calls < 0:
        p.error("--kernel-batch must be >= 1 and --kernel-calls >= 0")
    kernel = fused.load_extension() if args.kernel_calls > 0 else None
    if args.kernel_calls > 0 and kernel is None:
        p.error(
            "the fused kernel is not built (or MNM_RL_FUSED=0): time it or pass --kernel-calls 0"
        )
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
    result = {"gemm_gflops": gflops, "n_epochs": args.n_epochs, "cores": rows}
    if args.kernel_calls > 0:
        result["tile_gflops"] = tiles = tile_gflops(kernel)
        result["kernel_batch"] = args.kernel_batch
        print(f"\nthe kernels' dense product tiles, [1024 x 64] x [64 x 256]: {tiles:.1f} GFLOP/s")
        print(f"fused training pass, {args.kernel_batch} sequences x {SEQ_LEN} steps, one thread "
              "(medians):")  # fmt: skip
        print(f"{'core':<11}{'fwd ms':>8}{'bwd ms':>8}{'GFLOP/s':>9}{'of tiles':>10}")
        for name, (kind, kwargs) in CONFIGS.items():
            if kind in GATE_BLOCKS:
                continue
            fwd_ms, bwd_ms = kernel_pass_ms(kernel, kind, kwargs, args.width, args.features,
                                            args.kernel_batch, args.kernel_calls)  # fmt: skip
            work = rows[name]["forward_backward_mflop"] * 1e6 * SEQ_LEN * args.kernel_batch
            rate = work / ((fwd_ms + bwd_ms) * 1e-3) / 1e9
            rows[name].update(
                kernel_forward_ms=fwd_ms,
                kernel_backward_ms=bwd_ms,
                kernel_gflops=rate,
                kernel_fraction_of_tiles=rate / tiles,
            )
            print(f"{name:<11}{fwd_ms:>8.3f}{bwd_ms:>8.3f}{rate:>9.1f}{rate / tiles:>10.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
