"""How long the package's C++ extensions take to build from scratch, two ways.

    python benchmarks/build_time.py               # one round: about 7 minutes on 2 cores
    python benchmarks/build_time.py --rounds 3

"one after another": each extension built as a run builds it when it first needs it (torch's
``load`` in turn, in one process; the memory's kernels, several sources, on torch's default of
one compiler per CPU). "in parallel": ``mnm_rl.native.build_in_parallel`` on the extensions not
built (what ``mnm-rl build`` and ``mnm-rl train`` on a CPU run), then the same loads, now from
the cache. Each way runs in a process of its own with a fresh, empty ``TORCH_EXTENSIONS_DIR``
(deleted after), the two ways alternating over ``--rounds`` rounds; wall seconds, medians. Every
extension must build. Prints a table (each extension's own seconds too) and, as its last line,
JSON. ``--modules`` names other modules that define an ``EXTENSION`` (the tests' small ones).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import throughput

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("one after another", "in parallel")

#: What the process of one way runs: build the modules named, print JSON of the seconds.
BUILD = """
import importlib, json, sys, time
from mnm_rl import native
way, modules = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
seconds = {}
if way == "in parallel":
    for result in native.build_in_parallel(native.unbuilt_modules(modules)):
        assert not result.error, result.error
        seconds[result.module] = result.seconds
for name in modules:
    begun = time.perf_counter()
    assert importlib.import_module(name).EXTENSION.load() is not None, name
    seconds.setdefault(name, time.perf_counter() - begun)
print(json.dumps({"total": time.perf_counter() - start, "modules": seconds}))
"""


def build_once(way: str, modules: list[str]) -> dict:
    """One way's build of ``modules`` into a fresh cache, in a process of its own."""
    cache = tempfile.mkdtemp(prefix="mnm_rl_build_time_")
    try:
        environment = {
            **os.environ,
            "TORCH_EXTENSIONS_DIR": cache,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
        }
        environment.pop("MNM_RL_FUSED", None)
        done = subprocess.run(
            [sys.executable, "-c", BUILD, way, *modules],
            env=environment, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"build_time.py: the {way!r} build failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    from mnm_rl import native

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modules", nargs="+", default=list(native.EXTENSION_MODULES))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be positive, got {args.rounds}")
    print(f"machine: {throughput.machine()}", flush=True)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in WAYS if round_ % 2 == 0 else WAYS[::-1]:
            runs[way].append(build_once(way, args.modules))
            print(f"round {round_ + 1}: {way}: {runs[way][-1]['total']:.1f} s", flush=True)
    totals = {way: statistics.median(r["total"] for r in runs[way]) for way in WAYS}
    each = {
        way: {m: statistics.median(r["modules"][m] for r in runs[way]) for m in args.modules}
        for way in WAYS
    }
    width = max(map(len, args.modules))
    print(f"\n{'seconds (medians)':<{width}}  one after another  in parallel")
    for module in args.modules:
        print(f"{module:<{width}}  {each[WAYS[0]][module]:>17.1f}  {each[WAYS[1]][module]:>11.1f}")
    print(f"{'whole build':<{width}}  {totals[WAYS[0]]:>17.1f}  {totals[WAYS[1]]:>11.1f}")
    speedup = totals[WAYS[0]] / totals[WAYS[1]]
    print(f"in parallel: {speedup:.2f}x as fast, {native.usable_cpus()} CPUs")
    result = {
        "cpus": native.usable_cpus(),
        "rounds": args.rounds,
        "seconds": totals,
        "per_module": each,
        "speedup": speedup,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
