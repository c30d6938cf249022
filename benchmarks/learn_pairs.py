"""Our agents' training throughput in pairs: a rollout plus update of each in turn, in one process.

``throughput.py`` times each config in a process of its own, one config after another, each
for a few seconds; on a shared host the load changes between them, and its rounds disagree by up
to 1.5x (docs/benchmarks.md). Here every agent lives in one process and they take turns, one
``learn()`` of one rollout (rollout plus update, a fraction of a second) each, the order
reversed every other turn (``kernel_pairs.turns``). A change in the machine's load then hits the
agents of one turn alike, and the figure is, for each config, the **median over the turns of
its rate divided by the reference's** (the first config) in the same turn, with its quartiles
and a 95% confidence interval of that median (the distribution-free one: the order statistics
``n / 2 -+ 0.98 sqrt(n)`` of the ``n`` ratios, a binomial interval that assumes only that the
turns are independent).

Configs are ``throughput.py``'s names for our agents (``lstm``, ``mnm-p``, ``mnm-p:2x2``, ...),
optionally ending in ``/k2`` (the MNM kernel splits a training batch between two threads while
that agent runs: ``fused.set_kernel_threads(2)``) and then ``/par`` (the agent's own
``ParallelVecEnv`` with one worker process; an idle agent's worker sleeps). Switches that hold
for a whole process (``/eager``, ``/unmap``, ``@N``) and the non-agents (``ceiling``,
``sb3-contrib``) are ``throughput.py``'s. Every agent is built in the same setting
(``throughput.py``'s options: env, view size, envs, rollout length, epochs, minibatch, width).

    python benchmarks/learn_pairs.py                         # mnm-p/k2/par against lstm/par, 3x3
    python benchmarks/learn_pairs.py --view-size 7 --pairs 60
    python benchmarks/learn_pairs.py --configs lstm/par mnm-p:2x2/par mnm-p:1x1/par

The last line printed is a JSON object: ``{"env", "view_size", ..., "reference", "pairs",
"sps": {config: median steps/s}, "ratio": {config: median of the turns' ratios},
"ratio_quartiles": {config: [q1, q3]}, "ratio_ci95": {config: [low, high]},
"ratios": {config: [every turn's ratio]}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402
from kernel_pairs import turns  # noqa: E402

DEFAULT_CONFIGS = ["lstm/par", "mnm-p/k2/par"]
#: A progress line every this many timed turns.
PROGRESS_EVERY = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="the reference config first, then the configs to divide by it")  # fmt: skip
    p.add_argument("--pairs", type=int, default=40, help="timed turns of every agent")
    p.add_argument("--warm-up", type=int, default=2, help="untimed turns first")
    for flag in ("--env", "--n-envs", "--view-size", "--n-steps", "--batch-size", "--n-epochs",
                 "--seq-len", "--hidden"):  # fmt: skip
        p.add_argument(flag, help=f"as throughput.py's {flag}")
    args = p.parse_args(argv)
    setting = [x for flag in ("env", "n_envs", "view_size", "n_steps", "batch_size", "n_epochs",
                              "seq_len", "hidden")
               if getattr(args, flag) is not None
               for x in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]  # fmt: skip
    args.setting = throughput.parse_args(setting)
    if len(args.configs) < 2:
        p.error("--configs: give a reference config and at least one more")
    if len(set(args.configs)) != len(args.configs):
        p.error("--configs: each config once")
    for config in args.configs:
        problem = config_problem(config)
        if problem:
            p.error(f"--configs: {config!r} {problem}")
    if args.pairs < 1 or args.warm_up < 0:
        p.error("--pairs must be positive and --warm-up not negative")
    if os.environ.get(throughput.SUFFIXES[throughput.KERNEL2][0]):
        p.error(f"unset {throughput.SUFFIXES[throughput.KERNEL2][0]}: this script sets the "
                "kernel's threads agent by agent (/k2)")  # fmt: skip
    return args


def parse_config(config: str) -> tuple[str, int, int]:
    """``"mnm-p/k2/par"`` -> ``("mnm-p", 2, 1)``: the agent, its kernel threads (1, or 2 with
    ``/k2``) and its env worker processes (1 with ``/par``)."""
    name, workers = throughput.split_parallel(config)
    if name.endswith(throughput.KERNEL2):
        return name.removesuffix(throughput.KERNEL2), 2, workers
    return name, 1, workers


def config_problem(config: str) -> str | None:
    """Why ``config`` cannot run here, or ``None``."""
    name = parse_config(config)[0]
    if throughput.THREADS in config or any(name.endswith(s) for s in throughput.SUFFIXES):
        return "holds for a whole process: use throughput.py"
    core = throughput.split_config(name)[0]
    if core not in {a.partition(":")[0] for a in throughput.AGENTS} - {"sb3-contrib"}:
        return "is not one of our agents (lstm, gru, mlp, mnm-p, mnm-g, mnm-p:HxL)"
    return None


class Agent:
    """One config's agent and env, and the kernel threads to set while it trains."""

    def __init__(self, config: str, setting: argparse.Namespace) -> None:
        name, self.kernel_threads, workers = parse_config(config)
        self.env = throughput.make_env(setting, env_workers=workers)
        self.model = throughput.build_agent(name, setting, self.env, "cpu")
        self.steps = setting.n_steps * setting.n_envs

    def learn_once(self) -> float:
        """Wall seconds of one ``learn()`` of one rollout (rollout plus update)."""
        from mnm_rl.memory import fused

        fused.set_kernel_threads(self.kernel_threads)
        try:
            start = time.perf_counter()
            self.model.learn(self.steps, reset_num_timesteps=False)
            return time.perf_counter() - start
        finally:
            fused.set_kernel_threads(None)


def run_pairs(agents: dict[str, Agent], pairs: int, warm_up: int) -> dict[str, list[float]]:
    """Steps/s of every agent in each timed turn; the turns' order alternates."""
    rates: dict[str, list[float]] = {config: [] for config in agents}
    for turn in range(warm_up + pairs):
        for config, agent in turns(turn, agents):
            seconds = agent.learn_once()
            if turn >= warm_up:
                rates[config].append(agent.steps / seconds)
        done = turn + 1 - warm_up
        if done > 0 and (done % PROGRESS_EVERY == 0 or done == pairs):
            line = ", ".join(f"{c} {statistics.median(r):.0f}" for c, r in rates.items())
            print(f"turn {done}/{pairs}, median steps/s so far: {line}", flush=True)
    return rates


def summary(args: argparse.Namespace, rates: dict[str, list[float]]) -> dict[str, Any]:
    reference, *others = args.configs
    ratios = {c: [a / b for a, b in zip(rates[c], rates[reference], strict=True)] for c in others}
    s = args.setting
    return {
        "env": s.env, "view_size": s.view_size, "n_envs": s.n_envs, "n_steps": s.n_steps,
        "batch_size": s.batch_size, "n_epochs": s.n_epochs, "seq_len": s.seq_len,
        "hidden": s.hidden, "threads": 1, "reference": reference, "pairs": args.pairs,
        "sps": {c: statistics.median(r) for c, r in rates.items()},
        "ratio": {c: statistics.median(r) for c, r in ratios.items()},
        "ratio_quartiles": {c: quartiles(r) for c, r in ratios.items()},
        "ratio_ci95": {c: median_interval(r) for c, r in ratios.items()},
        "ratios": ratios,
    }  # fmt: skip


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (the median of each half, for one value that value)."""
    if len(values) == 1:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def median_interval(values: list[float], z: float = 1.96) -> list[float]:
    """A distribution-free confidence interval of the median (95% at ``z = 1.96``): the order
    statistics ``k`` and ``n - 1 - k`` with ``k = floor((n - z sqrt(n)) / 2)``, by the normal
    approximation of the binomial count of values below the median; min and max when ``n`` is
    too small for that."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2))
    return [ordered[k], ordered[n - 1 - k]]


def print_table(out: dict[str, Any], rates: dict[str, list[float]]) -> None:
    print(f"{'config':16s} {'steps/s':>8s} {'min..max':>13s}   rate over {out['reference']}"
          " in the same turn: median [95% CI] (quartiles, min..max)")  # fmt: skip
    for config, values in rates.items():
        low, high, median = min(values), max(values), statistics.median(values)
        line = f"{config:16s} {median:8.0f} {low:6.0f}..{high:<6.0f}"
        if config in out["ratio"]:
            (q1, q3), r = out["ratio_quartiles"][config], out["ratios"][config]
            ratio, (low, high) = out["ratio"][config], out["ratio_ci95"][config]
            line += f"   {ratio:.3f} [{low:.3f}, {high:.3f}]"
            line += f" ({q1:.3f}..{q3:.3f}, {min(r):.2f}..{max(r):.2f})"
        print(line)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    import torch

    torch.set_num_threads(1)
    s = args.setting
    print(f"machine: {throughput.machine()}")
    print(f"command: python benchmarks/learn_pairs.py {' '.join(raw)}")
    print(
        f"env {s.env} (agent_view_size {s.view_size} if MiniGrid), {s.n_envs} envs, n_steps "
        f"{s.n_steps}, batch {s.batch_size}, {s.n_epochs} epochs, seq_len {s.seq_len}, width "
        f"{s.hidden}, torch threads 1, cpu; {args.warm_up} + {args.pairs} turns",
        flush=True,
    )
    agents = {config: Agent(config, s) for config in args.configs}
    try:
        rates = run_pairs(agents, args.pairs, args.warm_up)
    finally:
        for agent in agents.values():
            agent.env.close()
    out = summary(args, rates)
    print()
    print_table(out, rates)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
