"""MiniGrid's observation code against mnm_rl's fast view (and int actions), side by side.

Two measurements, each in interleaved rounds (every variant once per round, medians reported):

* ``gen_obs``: microseconds per call of MiniGrid's ``MiniGridEnv.gen_obs`` and of
  ``mnm_rl.envs.minigrid_view.view_image``, over the states of a random walk (both functions
  called once in each state, in alternating order), for each ``--envs`` id and ``--views`` size;
* ``step``: raw stepping with random actions of ``--n-envs`` envs in a ``DummyVecEnv``, made as
  ``throughput.py`` makes them (MiniGrid with ``SymbolicMiniGrid``, ``Monitor``; its
  ``ceiling``), for each view size of the first env id, three ways: with MiniGrid's own view
  and with the fast one, both given their actions as the numpy integers ``DummyVecEnv``
  passes (``minigrid``, ``fast``), and with the fast view and the actions as Python ints
  (``ints``: ``mnm_rl.envs.minigrid_actions``; what mnm_rl's env builder does).

Prints two tables and, as its last line, a JSON object ``{"rounds", "gen_obs": [{"env",
"view", "minigrid_us", "fast_us", "speedup"}], "step": [{"env", "view", "n_envs",
"minigrid_sps", "fast_sps", "ints_sps", "speedup", "ints_speedup", "total_speedup"}]}``:
``speedup`` is fast over MiniGrid's, ``ints_speedup`` ints over fast, ``total_speedup`` ints
over MiniGrid's; every speedup is the median over rounds of the round's ratio.

    python benchmarks/minigrid_view.py
    python benchmarks/minigrid_view.py --envs MiniGrid-MemoryS7-v0 --views 3 7 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402

DEFAULT_ENVS = [
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-MemoryS13-v0",
    "MiniGrid-DoorKey-8x8-v0",
    "MiniGrid-KeyCorridorS3R3-v0",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--envs", nargs="+", default=DEFAULT_ENVS, help="MiniGrid env ids")
    p.add_argument("--views", nargs="+", type=int, default=[3, 5, 7], help="agent_view_size")
    p.add_argument("--states", type=int, default=500, help="random-walk states per gen_obs round")
    p.add_argument("--n-envs", type=int, default=8, help="envs of the stepping measurement")
    p.add_argument("--steps", type=int, default=300, help="vec steps per stepping round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    if any(v < 3 or v % 2 == 0 for v in args.views):
        p.error(f"--views must be odd numbers of at least 3 (MiniGrid), got {args.views}")
    if min(args.states, args.n_envs, args.steps, args.rounds) < 1:
        p.error("--states, --n-envs, --steps and --rounds must be positive")
    return args


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of ``a[r] / b[r]``."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def time_gen_obs(env_id: str, view: int, states: int, rounds: int) -> dict[str, Any]:
    """Per-call microseconds of MiniGrid's gen_obs and of view_image, round by round."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the MiniGrid envs)
    from minigrid.minigrid_env import MiniGridEnv

    from mnm_rl.envs.minigrid_view import view_image

    env = gym.make(env_id, agent_view_size=view)
    base = env.unwrapped
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    clock = time.perf_counter_ns
    own: list[float] = []
    fast: list[float] = []
    for _ in range(rounds):
        own_ns = fast_ns = 0
        for state in range(states):
            for which in (0, 1) if state % 2 else (1, 0):
                start = clock()
                if which:
                    view_image(base)
                else:
                    MiniGridEnv.gen_obs(base)
                elapsed = clock() - start
                if which:
                    fast_ns += elapsed
                else:
                    own_ns += elapsed
            _, _, terminated, truncated, _ = env.step(int(rng.integers(base.action_space.n)))
            if terminated or truncated:
                env.reset()
        own.append(own_ns / states / 1e3)
        fast.append(fast_ns / states / 1e3)
    env.close()
    return {
        "env": env_id,
        "view": view,
        "minigrid_us": statistics.median(own),
        "fast_us": statistics.median(fast),
        "speedup": median_ratio(own, fast),
    }


def time_stepping(env_id: str, view: int, n_envs: int, steps: int, rounds: int) -> dict:
    """Raw stepping (throughput.py's ceiling) with MiniGrid's view and with the fast one, both
    with numpy integer actions, and with the fast view and int actions."""
    setting = argparse.Namespace(env=env_id, n_envs=n_envs, view_size=view)
    envs = {
        "minigrid": throughput.make_env(setting, fast_view=False, int_actions=False),
        "fast": throughput.make_env(setting, int_actions=False),
        "ints": throughput.make_env(setting),
    }
    rng = np.random.default_rng(0)
    n_actions = int(envs["fast"].action_space.n)
    sps: dict[str, list[float]] = {name: [] for name in envs}
    try:
        for env in envs.values():
            env.reset()
            for action in rng.integers(n_actions, size=(50, n_envs)):  # warm-up
                env.step(action)
        for r in range(rounds):
            actions = rng.integers(n_actions, size=(steps, n_envs))
            for name in envs if r % 2 else reversed(envs):
                start = time.perf_counter()
                for action in actions:
                    envs[name].step(action)
                sps[name].append(steps * n_envs / (time.perf_counter() - start))
    finally:
        for env in envs.values():
            env.close()
    return {
        "env": env_id,
        "view": view,
        "n_envs": n_envs,
        "minigrid_sps": statistics.median(sps["minigrid"]),
        "fast_sps": statistics.median(sps["fast"]),
        "ints_sps": statistics.median(sps["ints"]),
        "speedup": median_ratio(sps["fast"], sps["minigrid"]),
        "ints_speedup": median_ratio(sps["ints"], sps["fast"]),
        "total_speedup": median_ratio(sps["ints"], sps["minigrid"]),
    }


def print_table(
    title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]
) -> None:
    """One row per env and view, then a column per ``(header, key, format)``."""
    print(f"\n{title}")
    print(f"{'env':<32}{'view':>5}" + "".join(f"{header:>14}" for header, _, _ in columns))
    for row in rows:
        cells = "".join(f"{format(row[key], fmt):>14}" for _, key, fmt in columns)
        print(f"{row['env']:<32}{row['view']:>5}{cells}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(f"command: python benchmarks/minigrid_view.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(f"machine: {throughput.machine()}", flush=True)
    calls = [
        time_gen_obs(env_id, view, args.states, args.rounds)
        for env_id in args.envs
        for view in args.views
    ]
    print_table(
        f"gen_obs, us per call (medians of {args.rounds} rounds of {args.states} states)",
        calls,
        [("MiniGrid", "minigrid_us", ".1f"), ("fast", "fast_us", ".1f"),
         ("speed-up", "speedup", ".2f")],
    )  # fmt: skip
    stepping = [
        time_stepping(args.envs[0], view, args.n_envs, args.steps, args.rounds)
        for view in args.views
    ]
    print_table(
        f"raw stepping, {args.n_envs} envs (DummyVecEnv), env steps/s (medians); numpy actions "
        "but in the ints column",
        stepping,
        [("MiniGrid", "minigrid_sps", ".0f"), ("fast", "fast_sps", ".0f"),
         ("fast+ints", "ints_sps", ".0f"), ("fast/MiniGrid", "speedup", ".2f"),
         ("ints/fast", "ints_speedup", ".2f"), ("ints/MiniGrid", "total_speedup", ".2f")],
    )  # fmt: skip
    out = {"rounds": args.rounds, "gen_obs": calls, "step": stepping}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
