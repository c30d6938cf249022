"""The baseline LSTM's and GRU's training pass against how often episodes start in a sequence.

One ``LSTMCore`` / ``GRUCore`` (width 64, input 64), a minibatch of 16 sequences x 32 steps (the
S9 preset's), forward and backward, 1 torch thread, wall time, medians of interleaved pairs in
one process: the ``nn`` module run span by span between episode starts (``MNM_RL_FUSED=0``, the
code before the thirteenth session) against the compiled kernel (``mnm_rl.memory.rnn_kernels``,
which the core uses for every sequence; until the twenty-ninth session the LSTM took it only
when an episode starts after the first step). Each step of each sequence
starts an episode with probability ``p``: with 16 sequences, ``p = 0.04`` (25-step episodes,
as a trained agent on MiniGrid-MemoryS9 has) already puts a start in about half of the steps.

    python benchmarks/rnn_resets.py

Prints a table and, as the last line, a JSON list of ``{"core", "p", "spans", "module_ms",
"kernel_ms", "speedup"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mnm_rl.memory import GRUCore, LSTMCore

STEPS, BATCH, WIDTH = 32, 16, 64


def main() -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", type=int, default=21)
    p.add_argument("--probabilities", type=float, nargs="+", default=[0.0, 0.01, 0.04, 0.1])
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'core':4s} {'p':>5s} {'spans':>5s} {'module ms':>9s} {'kernel ms':>9s} speedup")
    for name, core_class in (("lstm", LSTMCore), ("gru", GRUCore)):
        torch.manual_seed(0)
        core = core_class(WIDTH, WIDTH)
        x = torch.randn(STEPS, BATCH, WIDTH, requires_grad=True)
        state = core.initial_state(BATCH)
        for prob in args.probabilities:
            starts = (torch.rand(STEPS, BATCH) < prob).float()

            def step(switch: str, core=core, x=x, state=state, starts=starts) -> float:
                os.environ["MNM_RL_FUSED"] = switch
                begin = time.perf_counter()
                y, final, _ = core(x, state, starts)
                (y.sum() + final["h"].sum()).backward()
                return time.perf_counter() - begin

            times: dict[str, list[float]] = {"0": [], "1": []}
            for switch in times:  # warm-up, and the kernel's build
                step(switch)
            for _ in range(args.pairs):
                for switch, values in times.items():
                    values.append(step(switch))
            spans = 1 + int(starts[1:].any(dim=1).sum())
            a, b = (statistics.median(times[s]) * 1e3 for s in ("0", "1"))
            rows.append({"core": name, "p": prob, "spans": spans, "module_ms": a,
                         "kernel_ms": b, "speedup": a / b})  # fmt: skip
            print(f"{name:4s} {prob:5.2f} {spans:5d} {a:9.2f} {b:9.2f} {a / b:6.2f}x")
    os.environ["MNM_RL_FUSED"] = "1"
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
