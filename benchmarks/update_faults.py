"""Minor page faults and CPU time of MemoryPPO's PPO update, with and without the kernel's freed
memory kept for reuse (``mnm_rl/memory/allocator.py``).

    python benchmarks/update_faults.py     # mnm-p:2x2, both settings, each in its own process

Each setting runs in a fresh process (``MNM_RL_RETAIN_MEMORY=1`` and ``=0``): the throughput
benchmark's agent (``benchmarks/throughput.py``'s setting), a warm-up ``learn()``, then 7 calls of
``model.train()`` on the last rollout, timed with ``time.process_time``. Prints the median CPU ms
and the minor page faults per ``train()``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def measure(config: str) -> dict[str, float]:
    import throughput

    args = throughput.parse_args([])
    throughput._setup_torch(1)
    model = throughput.build_agent(config, args, throughput.make_env(args), "cpu")
    model.learn(2048)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(7):
        start = time.process_time()
        model.train()
        times.append(time.process_time() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 7
    return {"train_cpu_ms": statistics.median(times) * 1000, "faults_per_train": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnm-p:2x2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.config)))
        return
    results = {}
    for retain in ("1", "0"):
        out = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--worker"],
            env={**os.environ, "MNM_RL_RETAIN_MEMORY": retain},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
        results["kept" if retain == "1" else "returned"] = r = json.loads(out)
        print(
            f"memory {'kept' if retain == '1' else 'returned'}: train() "
            f"{r['train_cpu_ms']:.1f} CPU ms, {r['faults_per_train']:.0f} minor faults"
        )
    print(json.dumps({"config": args.config, **results}))


if __name__ == "__main__":
    main()
