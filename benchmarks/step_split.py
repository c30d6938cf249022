"""Where an env step's time goes in ``learn()``: env stepping, the rest of the rollout, the update.

For each config (``throughput.py``'s names and options: ``lstm``, ``mnm-p:2x2``, ``--view-size``,
...), in a fresh process: one warm-up rollout and update, then ``--rollouts`` timed ones, with
``env.step`` (the vec env's, so the time of every env), ``collect_rollouts`` and ``train``
wrapped to add up their CPU time (``time.process_time``: this process only, not the time others
take the CPU from it). Printed per env step, in microseconds:

* ``env``: stepping the vec env;
* ``policy+bookkeeping``: the rest of the rollout (observations to tensors, the policy's forward
  pass and sampling, the buffer, callbacks, GAE);
* ``update``: ``train()``, the PPO epochs;
* ``total``: the whole timed ``learn()``.

Configs run in interleaved rounds; medians are reported. The last line is a JSON object.
Not for ``/par`` configs (the worker's CPU time is not this process's) or sb3-contrib.

    python benchmarks/step_split.py --configs lstm mnm-p:2x2 --view-size 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402

PARTS = ("env", "policy+bookkeeping", "update", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = throughput.parse_args(argv)
    if args.configs == throughput.parse_args([]).configs:
        args.configs = ["lstm", "mnm-p"]
    for name in args.configs:
        if name in ("ceiling", "sb3-contrib") or throughput.split_parallel(name)[1]:
            print(
                f"step_split.py: error: {name!r} is not one of our agents in one process",
                file=sys.stderr,
            )
            raise SystemExit(2)
    return args


def measure(config: str, args: argparse.Namespace) -> dict[str, float]:
    """Microseconds of CPU time per env step for each of :data:`PARTS`."""
    name, threads = throughput.split_threads(config, args.threads)
    throughput.apply_suffixes(name)
    throughput._setup_torch(threads)
    env = throughput.make_env(args)
    model = throughput.build_agent(name, args, env, args.device)
    timer = throughput._Timer(model)  # CPU time of collect_rollouts and train
    env_cpu = 0.0
    step = env.step

    def timed_step(actions):
        nonlocal env_cpu
        start = time.process_time()
        out = step(actions)
        env_cpu += time.process_time() - start
        return out

    env.step = timed_step
    per_rollout = args.n_steps * args.n_envs
    model.learn(per_rollout)
    timer.reset()
    env_cpu = 0.0
    start = time.process_time()
    model.learn(per_rollout * args.rollouts, reset_num_timesteps=False)
    total = time.process_time() - start
    env.close()
    per_step = 1e6 / (per_rollout * args.rollouts)
    return {  # the keys of PARTS, in its order
        "env": env_cpu * per_step,
        "policy+bookkeeping": (timer.cpu["rollout"] - env_cpu) * per_step,
        "update": timer.cpu["update"] * per_step,
        "total": total * per_step,
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return {}
    print(f"command: python benchmarks/step_split.py {' '.join(argv)}".rstrip())
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.configs}
    for _ in range(args.rounds):
        for name in args.configs:
            out = subprocess.run(
                [sys.executable, __file__, *argv, "--worker", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    medians = {
        name: {part: statistics.median(r[part] for r in results) for part in PARTS}
        for name, results in runs.items()
    }
    view = f", agent_view_size {args.view_size}" if args.env.startswith("MiniGrid") else ""
    print(f"\n{args.env}{view}, {args.n_envs} envs; CPU us per env step, medians of {args.rounds}")
    print(f"{'config':<14}" + "".join(f"{part:>20}" for part in PARTS))
    for name, row in medians.items():
        print(f"{name:<14}" + "".join(f"{row[part]:20.1f}" for part in PARTS))
    result = {
        "env": args.env,
        "view_size": args.view_size,
        "n_envs": args.n_envs,
        "rounds": args.rounds,
        "us_per_env_step": medians,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
