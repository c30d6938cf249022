"""Rollouts with and without the compiled step's own thread, paired in one process.

``MemoryPPO.collect_rollouts`` begins each rollout step on a thread of the compiled policy step's
own (``mnm_rl.agent.policy_step.StepThread``) as soon as its inputs are stored, and stores the
step before it and runs the callbacks meanwhile. ``policy_step.step_thread`` gives MNM policies
such a thread and the other cores none. This script times, for each ``--configs`` agent
(``throughput.py``'s names and setting: MiniGrid-MemoryS7, 8 envs x 128 steps, one torch
thread), ``--pairs`` pairs of whole rollouts (``collect_rollouts``, no update) of one agent,
one with a thread and one on the rollout's thread alone, the order alternating; the thread is
made for every core here (``StepThread`` directly), so that the cores that go without one show
why. Prints, per config, the median of the pairs' ratios (rollout time without the thread over
with it: above 1, the thread pays) with its quartiles, and, as its last line, a JSON object
``{"pairs", "view", "speedup": {config: median}, "quartiles": {config: [q1, q3]}}``.

    python benchmarks/rollout_thread.py
    python benchmarks/rollout_thread.py --configs mnm-p mnm-p:2x2 lstm --pairs 60 --view-size 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402


def measure(config: str, args: argparse.Namespace) -> list[float]:
    """The pairs' ratios, rollout time on one thread over rollout time with the step thread."""
    from stable_baselines3.common.callbacks import BaseCallback

    from mnm_rl.agent import policy_step

    setting = throughput.parse_args(["--view-size", str(args.view_size)])
    throughput._setup_torch(1)
    env = throughput.make_env(setting, for_sb3_contrib=False, env_workers=0)
    model = throughput.build_agent(config, setting, env, "cpu")
    model.learn(setting.n_steps * setting.n_envs)  # warm: kernels built, buffers allocated

    class Steps(BaseCallback):
        def _on_step(self) -> bool:
            return True

    callback = Steps()
    callback.init_callback(model)
    kernel = policy_step.load_extension()
    chosen = policy_step.step_thread
    ratios = []
    try:
        for pair in range(args.pairs):
            seconds = {}
            for threaded in (True, False) if pair % 2 == 0 else (False, True):
                thread = kernel.StepThread() if threaded else None
                policy_step.step_thread = lambda _policy, thread=thread: thread
                start = time.perf_counter()
                model.collect_rollouts(env, callback, model.rollout_buffer, setting.n_steps)
                seconds[threaded] = time.perf_counter() - start
            ratios.append(seconds[False] / seconds[True])
    finally:
        policy_step.step_thread = chosen
    return ratios


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["mnm-p", "mnm-p:2x2", "lstm"])
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--view-size", type=int, default=3)
    args = p.parse_args()
    print(f"command: python benchmarks/rollout_thread.py {' '.join(sys.argv[1:])}")
    print(f"machine: {throughput.machine()}")
    result = {"pairs": args.pairs, "view": args.view_size, "speedup": {}, "quartiles": {}}
    print(f"{'config':12s} {'speedup':>8s}  quartiles")
    for config in args.configs:
        ratios = measure(config, args)
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        result["speedup"][config] = statistics.median(ratios)
        result["quartiles"][config] = [q1, q3]
        print(f"{config:12s} {statistics.median(ratios):8.3f}  [{q1:.3f}, {q3:.3f}]")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
