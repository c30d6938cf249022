"""The kernels' hand-written dense products (``mnm_rl/memory/csrc/dense_products.h``) against
ATen's (``at::mm``, MKL's sgemm), one CPU thread, in one process.

Compiles a small extension (``torch.utils.cpp_extension.load_inline``, the package's compiler
flags) that includes ``dense_products.h`` and times, inside C++ (no Python between calls), ``C =
A B`` at the shapes the kernels multiply (float32), each the best of ``--repeats`` timed loops,
in ``--rounds`` rounds with the two taking turns. The table gives GFLOP/s of each and the
speed-up (the median of the rounds' ratios of ATen's time to ours); the two results are compared
too (they differ in rounding only: the script exits with status 1 beyond 1e-4 relative).

MKL picks its code by CPU: on Intel CPUs with AVX-512 it uses it, and there the gap is smaller
or gone; on our AMD EPYC machines (AVX-512, Zen 5) it runs its AVX2 code, the hand-written tiles
the CPU's 64-byte vectors.

    python benchmarks/dense_products.py
    python benchmarks/dense_products.py --rounds 3 --repeats 5

The last line printed is a JSON object ``{"cpu", "rounds", "rows": [{"product", "shape",
"aten_gflops", "dense_gflops", "speedup", "max_rel_diff"}]}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from mnm_rl import native

ROOT = Path(__file__).resolve().parents[1]

#: (product, M, K, N, left operand transposed): the kernels' products at the benchmarks' sizes
#: (width 64, MNM D = 64 and 4 heads; a minibatch of 16 sequences x 16 steps; 8 envs).
SHAPES = [
    ("controller step, training: [h; read] W_rec^T", 16, 128, 256, False),
    ("controller step, rollout", 8, 128, 256, False),
    ("MNM interaction step: h W_int^T", 16, 64, 832, False),
    ("LSTM backward step: g_gates W_hh", 16, 256, 64, False),
    ("input projection, a minibatch: x W_ih^T", 256, 64, 256, False),
    ("weight gradient: g_gates^T x", 256, 256, 64, True),
    ("head layer, a minibatch", 256, 64, 64, False),
    ("head layer, a rollout step", 8, 64, 64, False),
]

SOURCE = r"""
#include <torch/extension.h>
#include <chrono>
#include "dense_products.h"

template <typename F> double best_seconds(int64_t repeats, int64_t loops, const F& f) {
  double best = 1e30;
  for (int64_t r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < loops; ++i) f();
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / loops);
  }
  return best;
}

// Seconds per product (best of repeats) of at::mm_out and of dense_products.h, and their results.
std::vector<at::Tensor> time_products(const at::Tensor& a, const at::Tensor& b, int64_t repeats,
                                      int64_t loops) {
  at::Tensor aten = at::empty({a.size(0), b.size(1)}, a.options());
  at::Tensor dense = at::empty_like(aten);
  const double t_aten = best_seconds(repeats, loops, [&] { at::mm_out(aten, a, b); });
  const double t_dense =
      best_seconds(repeats, loops, [&] { mnm_rl::product_into(dense, a, b); });
  return {at::tensor({t_aten, t_dense}, at::kDouble), aten, dense};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("time_products", &time_products); }
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=7, help="timed loops per round; the best")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be positive")
    return args


def build():
    """The timing extension, with dense_products.h from the working tree."""
    from torch.utils.cpp_extension import load_inline

    csrc = ROOT / "mnm_rl" / "memory" / "csrc"
    name = "mnm_rl_dense_products_timing"
    with native.extension_build_lock(name) as build_directory:  # survives a killed build
        return load_inline(
            name,
            cpp_sources=[SOURCE],
            extra_cflags=native.COMPILE_FLAGS + [f"-I{csrc}"],
            extra_ldflags=native.LINK_FLAGS,
            build_directory=str(build_directory),
            verbose=False,
        )


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    module = build()
    rows = []
    print(f"{'product':48s} {'shape':>22s} {'ATen GFLOP/s':>12s} {'ours':>7s} {'speed-up':>8s}")
    for name, m, k, n, transposed in SHAPES:
        gen = torch.Generator().manual_seed(m + k + n)
        a = torch.randn(k, m, generator=gen).t() if transposed else torch.randn(m, k, generator=gen)
        b = torch.randn(k, n, generator=gen)
        flops = 2 * m * k * n
        loops = max(1, int(2e7 // flops))
        ratios, aten_times, dense_times = [], [], []
        for _ in range(args.rounds):
            seconds, aten, dense = module.time_products(a, b, args.repeats, loops)
            aten_times.append(float(seconds[0]))
            dense_times.append(float(seconds[1]))
            ratios.append(aten_times[-1] / dense_times[-1])
        diff = float((aten - dense).abs().max() / aten.abs().max().clamp_min(1e-30))
        shape = f"[{m} x {k}]{'^T' if transposed else ''} x [{k} x {n}]"
        row = {
            "product": name,
            "shape": shape,
            "aten_gflops": flops / statistics.median(aten_times) / 1e9,
            "dense_gflops": flops / statistics.median(dense_times) / 1e9,
            "speedup": statistics.median(ratios),
            "max_rel_diff": diff,
        }
        rows.append(row)
        print(f"{name:48s} {shape:>22s} {row['aten_gflops']:12.1f} {row['dense_gflops']:7.1f} "
              f"{row['speedup']:7.2f}x")  # fmt: skip
    out = {"cpu": cpu_name(), "rounds": args.rounds, "rows": rows}
    print(json.dumps(out))
    if any(row["max_rel_diff"] > 1e-4 for row in rows):
        sys.exit("dense_products.py: the two products disagree beyond rounding")
    return out


if __name__ == "__main__":
    main()
