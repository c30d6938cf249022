"""The MNM kernel's hand-written matrix products on their own: ``row_products.h``'s
``matrix_times`` (x M for a few rows) and ``rank_update`` (M + alpha s^T z), now against another
revision's, in one process.

Compiles a small extension (``torch.utils.cpp_extension.load_inline``, the package's compiler
flags) that includes ``mnm_rl/memory/csrc/row_products.h`` as it is in the working tree and, with
``--against REV``, as it was at git revision REV (in a namespace of its own), and times each
product over a batch of ``--batch`` D x D matrices (the fast weights of one layer, laid out as
the kernel keeps them) for each shape: the memory's H and 2H rows, and the controller's
products with its slow weights. Each shape runs in ``--rounds`` rounds, the two builds taking
turns, each the best of a few repeats; the table gives GFLOP/s and the speed-up, the median
of the rounds' ratios of REV's time to the working tree's (above 1: the working tree's is
faster). The outputs of the two builds are compared too: they must be equal (the same sums in
the same order), and the script exits with status 1 if they are not.

These are the products alone, their operands in the caches a loop over one layer leaves them
in. In the kernel they share the caches with everything else a step touches:
``benchmarks/kernel_pairs.py --against REV`` times the kernel as a whole.

    python benchmarks/row_products.py --against cc016ec
    python benchmarks/row_products.py --rounds 3 --repeats 50

The last line printed is a JSON object ``{"against", "rounds", "rows": [{"product", "shape",
"gflops", "other_gflops", "speedup", "equal"}]}`` (``other_*`` and ``speedup`` with
``--against``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEADER = Path("mnm_rl/memory/csrc/row_products.h")
#: (product, rows, K, N) at the benchmarks' sizes (D = 64, H = 4, width 64): rows of each of
#: ``--batch`` matrices, or with rows None one matrix times ``--batch`` rows.
SHAPES = [
    ("matrix_times", 8, 64, 64),  # 2H rows through a layer (the post-write pass)
    ("matrix_times", 4, 64, 64),  # H rows (the pre-write pass)
    ("matrix_times", None, 256, 128),  # the gates' grad times W_rec
    ("matrix_times", None, 832, 64),  # the interaction's grad times W_int
    ("rank_update", 8, 64, 64),  # 2H rows into the weights' grad
    ("rank_update", 4, 64, 64),  # the write, and its undoing
]

SOURCE = r"""
#include <torch/extension.h>
#include <chrono>
#include "current/row_products.h"
#ifdef WITH_OTHER
#include "other/row_products.h"
#endif

template <typename F> double best_seconds(int repeats, const F& f) {
  f();
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - t0;
    best = std::min(best, elapsed.count());
  }
  return best;
}

// Seconds of one call over the batch (the best of `repeats`); out gets the result.
double time_product(bool other, const std::string& product, torch::Tensor x, torch::Tensor m,
                    torch::Tensor out, int64_t rows, int64_t K, int64_t N, int repeats) {
  const float* xp = x.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t batch = m.size(0);
  auto run = [&](auto matrix_times, auto rank_update) {
    if (product == "matrix_times")
      return best_seconds(repeats, [&] {
        for (int64_t b = 0; b < batch; ++b)
          matrix_times(xp + b * rows * K, mp + b * K * N, op + b * rows * N, rows, K, N, false);
      });
    return best_seconds(repeats, [&] {
      rank_update(mp, K * N, xp, xp + batch * rows * K, 1e-3f, op, K * N, batch, rows, K);
    });
  };
#ifdef WITH_OTHER
  if (other)
    return run(mnm_rl_other::matrix_times<float>,
               [](auto... a) { mnm_rl_other::rank_update<float>(a...); });
#endif
  return run(mnm_rl::matrix_times<float>, [](auto... a) { mnm_rl::rank_update<float>(a...); });
}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--against", metavar="REV", help="also time row_products.h as at revision REV")
    p.add_argument("--batch", type=int, default=16, help="matrices per call (sequences)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=200, help="calls per round; the best counts")
    args = p.parse_args(argv)
    if min(args.batch, args.rounds, args.repeats) < 1:
        p.error("--batch, --rounds and --repeats must be positive")
    return args


def header_at(rev: str) -> str:
    """row_products.h as at ``rev``, its namespace renamed so both builds link together."""
    try:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{HEADER}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"row_products.py: error: --against {rev}: {err.stderr.strip()}") from None
    return text.replace("namespace mnm_rl {", "namespace mnm_rl_other {")


def build(against: str | None, folder: Path):
    """The timing extension, with the working tree's header and, with ``against``, REV's."""
    from torch.utils.cpp_extension import load_inline

    from mnm_rl.native import COMPILE_FLAGS

    (folder / "current").mkdir()
    (folder / "current" / "row_products.h").write_text((ROOT / HEADER).read_text())
    flags = [*COMPILE_FLAGS, f"-I{folder}"]
    name = "mnm_rl_row_products_bench"
    if against:
        (folder / "other").mkdir()
        (folder / "other" / "row_products.h").write_text(header_at(against))
        flags.append("-DWITH_OTHER")
        name += "_against"
    return load_inline(
        name=name, cpp_sources=SOURCE, functions=["time_product"], extra_cflags=flags,
        build_directory=str(folder), verbose=False,
    )  # fmt: skip


def time_shape(ext, shape: tuple, args: argparse.Namespace, with_other: bool) -> dict[str, Any]:
    import torch

    product, rows, K, N = shape
    batch, rows = (args.batch, rows) if rows is not None else (1, args.batch)
    generator = torch.Generator().manual_seed(0)
    # matrix_times: x [batch, rows, K]; rank_update: s and z [batch, rows, D], one after the other
    x = torch.randn(1 if product == "matrix_times" else 2, batch, rows, K, generator=generator)
    flops = 2.0 * batch * rows * K * N
    m = torch.randn(batch, K, N, generator=generator) * 0.1
    outs = {which: torch.zeros(batch, rows if product == "matrix_times" else K, N)
            for which in (False, True)}  # fmt: skip
    seconds: dict[bool, list[float]] = {False: [], True: []}
    builds = [False, True] if with_other else [False]
    for r in range(args.rounds):
        for other in builds if r % 2 == 0 else builds[::-1]:
            seconds[other].append(
                ext.time_product(other, product, x, m, outs[other], rows, K, N, args.repeats)
            )
    row: dict[str, Any] = {
        "product": product,
        "shape": f"{batch} x [{rows} x {K}] x [{K} x {N}]",
        "gflops": flops / statistics.median(seconds[False]) / 1e9,
    }
    if with_other:
        row["other_gflops"] = flops / statistics.median(seconds[True]) / 1e9
        row["speedup"] = statistics.median(
            o / c for o, c in zip(seconds[True], seconds[False], strict=True)
        )
        row["equal"] = bool(torch.equal(outs[False], outs[True]))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)
    print(f"command: python benchmarks/row_products.py {' '.join(argv or sys.argv[1:])}".rstrip())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import machine

    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        ext = build(args.against, Path(folder))
        rows = [time_shape(ext, shape, args, args.against is not None) for shape in SHAPES]
    print(f"\nGFLOP/s, medians of {args.rounds} rounds (each the best of {args.repeats} calls)")
    header = f"{'product':<14}{'shape':<34}{'GFLOP/s':>9}"
    if args.against:
        header += f"{args.against[:10]:>12}{'speed-up':>10}{'equal':>7}"
    print(header)
    for row in rows:
        line = f"{row['product']:<14}{row['shape']:<34}{row['gflops']:>9.1f}"
        if args.against:
            line += f"{row['other_gflops']:>12.1f}{row['speedup']:>9.2f}x{str(row['equal']):>7}"
        print(line)
    out = {"against": args.against, "rounds": args.rounds, "rows": rows}
    print(json.dumps(out))
    if args.against and not all(row["equal"] for row in rows):
        print("row_products.py: the two builds' outputs differ", file=sys.stderr)
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
