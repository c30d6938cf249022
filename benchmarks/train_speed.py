"""End-to-end training speed: ``mnm-rl train`` wall time with the fused MNM kernel and without.

Runs the CLI on an env preset for each configuration in interleaved rounds (one process at a
time), each in a fresh run folder under a temporary directory, and reports the median wall time
of the whole command (start-up, training, checkpoints and a short final evaluation) and env
steps per second of wall time. A configuration is an agent preset, with ``/eager`` appended to
run the core's plain PyTorch code (``MNM_RL_FUSED=0``), ``/k2`` to let the MNM kernel split
each minibatch between two threads of its own (``MNM_RL_KERNEL_THREADS=2``), ``/par`` (last,
before any ``@N``) to step the envs in two processes (``train.env_workers=1``), and ``@N`` to
train with N torch threads (``train.torch_threads``; 1 without it), e.g. ``mnm-p/eager@2``,
``mnm-p/k2/par``.

    python benchmarks/train_speed.py                         # MiniGrid-MemoryS9, 200k steps
    python benchmarks/train_speed.py --env MiniGrid-Memory --timesteps 300000 --rounds 1
    python benchmarks/train_speed.py --configs mnm-p mnm-p/k2 lstm lstm/eager gru gru/eager

The last line printed is a JSON object: ``{"env", "timesteps", "rounds", "wall_s": {config:
median seconds}, "sps": {config: env steps per second}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EAGER = "/eager"
KERNEL2 = "/k2"
PARALLEL = "/par"
THREADS = "@"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", default="MiniGrid-MemoryS9")
    p.add_argument("--timesteps", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=["mnm-p", "mnm-p/eager", "lstm"])
    p.add_argument("--eval-episodes", type=int, default=20, help="final held-out evaluation")
    return p.parse_args(argv)


def run_once(config: str, args: argparse.Namespace, root: Path) -> float:
    """Wall seconds of one ``mnm-rl train`` run of ``config``."""
    name, _, threads = config.partition(THREADS)
    env_workers = int(name.endswith(PARALLEL))
    name = name.removesuffix(PARALLEL)
    agent = name.removesuffix(EAGER).removesuffix(KERNEL2)
    env = dict(os.environ, MNM_RL_FUSED="0" if name.endswith(EAGER) else "1")
    if name.endswith(KERNEL2):
        env["MNM_RL_KERNEL_THREADS"] = "2"
    run_dir = Path(tempfile.mkdtemp(prefix=agent + "-", dir=root))
    run_dir.rmdir()  # the CLI creates it
    cmd = [
        sys.executable, "-m", "mnm_rl", "train", "--env", args.env, "--agent", agent,
        "--seed", "0", "--timesteps", str(args.timesteps), "--run-dir", str(run_dir),
        "--no-progress", "--set", f"train.eval_episodes={args.eval_episodes}",
        "--set", f"train.torch_threads={threads or 1}",
        "--set", f"train.env_workers={env_workers}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print(f"command: python benchmarks/train_speed.py {' '.join(sys.argv[1:])}".rstrip())
    times: dict[str, list[float]] = {c: [] for c in args.configs}
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        for r in range(args.rounds):
            for config in args.configs:
                times[config].append(run_once(config, args, Path(tmp)))
            line = ", ".join(f"{c} {t[-1]:.0f} s" for c, t in times.items())
            print(f"round {r + 1}/{args.rounds}: {line}", flush=True)
    wall = {c: statistics.median(t) for c, t in times.items()}
    sps = {c: args.timesteps / s for c, s in wall.items()}
    print(f"\n{args.env}, {args.timesteps} env steps, median of {args.rounds} round(s)")
    print(f"{'config':14s} {'wall s':>8s} {'steps/s':>8s}")
    for c in args.configs:
        print(f"{c:14s} {wall[c]:8.1f} {sps[c]:8.0f}")
    result = {"env": args.env, "timesteps": args.timesteps, "rounds": args.rounds,
              "wall_s": wall, "sps": sps}  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
