"""Where a rollout step's time goes, measured inside ``learn()``.

A rollout step of ``MemoryPPO.collect_rollouts`` is the policy's step (begun by
``RecurrentMemoryPolicy.act_later``, then waited for), the envs' step, storing the step in the
rollout buffer (``store_next``, ``add_outputs``) and the loop's own Python (callbacks, episode
statistics, time-limit checks). Timed alone, each of these runs warm; inside ``learn()`` it runs
after the others have taken the caches, and takes longer. This script wraps each piece of one
agent's rollout loop with a timer and runs ``learn()`` (``throughput.py``'s setting:
MiniGrid-MemoryS7, 8 envs x 128 steps, one torch thread; a warm-up rollout first), and gives each
piece's wall time per rollout step of the 8 envs (microseconds). Inside ``act_later``: gathering
the compiled step's arguments (``StepPlan.call``), beginning it on the step thread
(``launch_call``: MNM cores) or running it here (``run_call``). ``wait`` is the time the
rollout waits for a step begun on the thread. ``callbacks`` are the callbacks' ``on_step`` and
``update_locals`` (since the forty-fourth session), ``episode statistics`` the info buffer's
update for ended episodes, ``bootstraps`` the time-limit bootstraps (their compiled steps'
``run_call`` counted in its row too, and their wait for the step under way in ``wait``).
``rest`` is the rollout's time outside the pieces listed at the top level: the loop's own
Python. Each timer adds about half a microsecond to its piece.

Each config runs in a process of its own (one config's agent, threads and variables do not
touch the next one's). Prints a table (a column per config) and, as its last line, a JSON object
``{"view", "rollouts", "us_per_step": {config: {piece: us}}}``.

    python benchmarks/rollout_pieces.py
    python benchmarks/rollout_pieces.py --configs lstm mnm-p/k2 mnm-p:2x2/k2 --rollouts 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402

#: The pieces, in the table's order; those inside ``act_later`` indented.
PIECES = ["act_later", "  StepPlan.call", "  launch_call", "  run_call", "wait", "env.step",
          "store_next", "add_outputs", "callbacks", "episode statistics", "bootstraps", "rest",
          "rollout"]  # fmt: skip
#: The pieces whose sum with ``rest`` is the rollout.
TOP = ("act_later", "wait", "env.step", "store_next", "add_outputs", "callbacks",
       "episode statistics", "bootstraps")  # fmt: skip


def _timed(function, seconds: dict[str, float], name: str, depth: dict[str, int]):
    """``function`` timed into ``seconds[name]``: its outermost calls only (a callback list's
    ``on_step`` calls its callbacks' own)."""

    def timed(*args, **kwargs):
        depth[name] += 1
        outermost = depth[name] == 1
        start = time.perf_counter() if outermost else 0.0
        try:
            return function(*args, **kwargs)
        finally:
            depth[name] -= 1
            if outermost:
                seconds[name] += time.perf_counter() - start

    return timed


def measure(config: str, args: argparse.Namespace) -> dict[str, float]:
    """Microseconds per rollout step of each piece of ``config``'s rollouts."""
    from stable_baselines3.common.callbacks import BaseCallback

    from mnm_rl.agent import policy, policy_step

    name = throughput.split_suffixes(config)[0]
    throughput.apply_suffixes(config)
    setting = throughput.parse_args(["--view-size", str(args.view_size)])
    throughput._setup_torch(1)
    env = throughput.make_env(setting)
    model = throughput.build_agent(name, setting, env, "cpu")
    model.learn(setting.n_steps * setting.n_envs)  # warm: kernels built, buffers allocated
    seconds: dict[str, float] = defaultdict(float)
    patched = [
        (env, "step", "env.step"),
        (model.policy, "act_later", "act_later"),
        (model.rollout_buffer, "store_next", "store_next"),
        (model.rollout_buffer, "add_outputs", "add_outputs"),
        (model, "collect_rollouts", "rollout"),
        (policy_step.StepPlan, "call", "  StepPlan.call"),
        (policy_step, "launch_call", "  launch_call"),
        (policy_step, "run_call", "  run_call"),
        (policy.PendingStep, "__call__", "wait"),
        (BaseCallback, "on_step", "callbacks"),
        (BaseCallback, "update_locals", "callbacks"),
        (model, "_update_info_buffer", "episode statistics"),
        (model, "_bootstrap_truncated", "bootstraps"),
    ]
    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in patched]
    depth: dict[str, int] = defaultdict(int)
    for owner, attribute, piece in patched:
        setattr(owner, attribute, _timed(getattr(owner, attribute), seconds, piece, depth))
    try:
        model.learn(setting.n_steps * setting.n_envs * args.rollouts, reset_num_timesteps=False)
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
        env.close()
    steps = setting.n_steps * args.rollouts
    # the last value's step and time-limit bootstraps are steps too: per rollout step of 8 envs
    seconds["rest"] = seconds["rollout"] - sum(seconds[piece] for piece in TOP)
    return {piece: 1e6 * seconds[piece] / steps for piece in PIECES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["lstm", "mnm-p/k2"])
    p.add_argument("--rollouts", type=int, default=30, help="timed rollouts per config")
    p.add_argument("--view-size", type=int, default=3, help="MiniGrid's agent_view_size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rollouts < 1:
        p.error("--rollouts must be positive")
    if args.view_size < 3 or args.view_size % 2 == 0:
        p.error("--view-size must be odd and at least 3 (MiniGrid's views)")
    for config in args.configs:
        if config in ("ceiling", "sb3-contrib"):
            p.error(f"--configs: {config} has no MemoryPPO rollout to take apart")
    return args


def measure_apart(config: str, args: argparse.Namespace) -> dict[str, float]:
    """:func:`measure` in a process of its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--configs", config, "--worker",
               "--rollouts", str(args.rollouts), "--view-size", str(args.view_size)]  # fmt: skip
    return throughput.run_worker(command, f"{config}'s process")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:  # one config, its pieces as the last line
        print(json.dumps(measure(args.configs[0], args)))
        return {}
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python benchmarks/rollout_pieces.py {command}".rstrip())
    print(f"machine: {throughput.machine()}")
    result = {"view": args.view_size, "rollouts": args.rollouts, "us_per_step": {}}
    for config in args.configs:
        result["us_per_step"][config] = measure_apart(config, args)
    print("us per rollout step of 8 envs, inside learn()")
    print(f"{'piece':16s}" + "".join(f"{c:>16s}" for c in args.configs))
    for piece in PIECES:
        row = "".join(f"{result['us_per_step'][c][piece]:16.1f}" for c in args.configs)
        print(f"{piece:16s}{row}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
