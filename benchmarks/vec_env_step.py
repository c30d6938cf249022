"""Raw stepping of one env by five vec envs, side by side: how much a second process gains.

Times ``step()`` with uniformly random actions of ``--n-envs`` envs of ``--env``, made as
``throughput.py`` makes them (MiniGrid: ``agent_view_size=3``, our symbolic observation), in:

* ``dummy``: SB3's ``DummyVecEnv``, every env in this process;
* ``lean``: ``mnm_rl.lean_vec_env.LeanDummyVecEnv``, the same without its deep copies (what
  ``mnm-rl train`` and ``throughput.py`` step in one process);
* ``parallel``: ``ParallelVecEnv`` with ``--workers`` worker processes, waits that watch shared
  memory before sleeping (the default on x86);
* ``parallel/pipes``: the same with waits on pipes only (``spin=False``, the default elsewhere);
* ``subproc``: SB3's ``SubprocVecEnv``, one process per env, pipes.

All five are built once; then rounds of ``--steps`` vec steps each, every vec env once per round
in turn. Prints a table of medians (env steps per second of wall time, and the ratio to
``dummy``) and, as its last line, a JSON object ``{"env", "n_envs", "workers", "rounds",
"sps": {name: median}, "ratio_to_dummy": {name: ratio}}``.

    python benchmarks/vec_env_step.py
    python benchmarks/vec_env_step.py --env MiniGrid-MemoryS9-v0 --n-envs 32 --workers 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from throughput import make_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", default="MiniGrid-MemoryS7-v0")
    p.add_argument("--n-envs", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="ParallelVecEnv worker processes")
    p.add_argument("--steps", type=int, default=1000, help="vec steps per measurement")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from mnm_rl.lean_vec_env import LeanDummyVecEnv
    from mnm_rl.parallel_vec_env import ParallelVecEnv

    args = parse_args(argv)
    print(f"command: python benchmarks/vec_env_step.py {' '.join(sys.argv[1:])}".rstrip())
    parallel = {"n_workers": args.workers}
    envs = {
        "dummy": make_env(args, vec_env_cls=DummyVecEnv),
        "lean": make_env(args, vec_env_cls=LeanDummyVecEnv),
        "parallel": make_env(args, vec_env_cls=ParallelVecEnv, vec_env_kwargs=parallel),
        "parallel/pipes": make_env(
            args, vec_env_cls=ParallelVecEnv, vec_env_kwargs={**parallel, "spin": False}
        ),
        "subproc": make_env(args, vec_env_cls=SubprocVecEnv),
    }
    rng = np.random.default_rng(0)
    n_actions = int(envs["dummy"].action_space.n)
    sps: dict[str, list[float]] = {name: [] for name in envs}
    try:
        for env in envs.values():
            env.reset()
            for a in rng.integers(n_actions, size=(50, args.n_envs)):  # warm-up
                env.step(a)
        for r in range(args.rounds):
            actions = rng.integers(n_actions, size=(args.steps, args.n_envs))
            for name, env in envs.items():
                start = time.perf_counter()
                for a in actions:
                    env.step(a)
                sps[name].append(args.steps * args.n_envs / (time.perf_counter() - start))
            line = ", ".join(f"{k} {v[-1]:.0f}" for k, v in sps.items())
            print(f"round {r + 1}/{args.rounds}: {line}", flush=True)
    finally:
        for env in envs.values():
            env.close()
    median = {name: statistics.median(v) for name, v in sps.items()}
    ratio = {name: median[name] / median["dummy"] for name in median}
    print(f"\n{args.env}, {args.n_envs} envs, {args.workers} worker(s), medians of {args.rounds}")
    print(f"{'vec env':<16}{'steps/s':>10}{'min..max':>18}{'x dummy':>9}")
    for name, values in sps.items():
        spread = f"{min(values):.0f}..{max(values):.0f}"
        print(f"{name:<16}{median[name]:>10.0f}{spread:>18}{ratio[name]:>9.2f}")
    out = {
        "env": args.env,
        "n_envs": args.n_envs,
        "workers": args.workers,
        "rounds": args.rounds,
        "sps": median,
        "ratio_to_dummy": ratio,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
