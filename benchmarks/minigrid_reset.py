"""MiniGrid-Memory's resets and steps: MiniGrid's ``MemoryEnv._gen_grid`` against mnm_rl's kept
wall plan, that plan with and without the kept views' images, and those with mnm_rl's integer
step.

Four variants, all with the fast view and int actions of mnm_rl's env builder: ``minigrid``
(MiniGrid's own grid code), ``plan`` (the grid from a kept wall plan,
``mnm_rl.envs.minigrid_memory.FastMemoryGrid``, every view computed), ``kept`` (the plan, and
the images of the views met kept and reused, ``KeptViews``) and ``step`` (the plan, the kept
views and ``FastMemoryStep`` instead of MiniGrid's ``MemoryEnv.step``: what mnm_rl's env
builder makes); the first three step with MiniGrid's own ``step``.
Two measurements, each in interleaved rounds (every variant once per round, the order reversed
every other round, medians reported):

* ``reset``: microseconds per ``env.reset()`` of one env of each ``--envs`` id;
* ``step``: raw stepping of ``--n-envs`` envs of the first env id in a ``LeanDummyVecEnv``, made
  as ``throughput.py`` makes them (its ``ceiling``, ``ceiling/mgreset/mgstep`` for MiniGrid's
  grid, ``ceiling/viewcalc/mgstep`` for the plan alone, ``ceiling/mgstep`` for the kept views),
  with two kinds of actions: ``random`` (the ceiling's: long episodes, few resets) and
  ``walker`` (east to the split, then north or south onto an object: episodes of a few steps,
  as an agent that has learned the task makes them, when resets weigh most). Only the
  ``step()`` calls are timed, not the walker's choice of actions.

Prints two tables and, as its last line, a JSON object ``{"rounds", "view", "reset": [{"env",
"minigrid_us", "plan_us", "kept_us", "step_us", "plan_speedup", "kept_speedup",
"step_speedup"}], "step": [{"env", "view", "n_envs", "actions", "steps_per_episode",
"minigrid_sps", "plan_sps", "kept_sps", "step_sps", "plan_speedup", "kept_speedup",
"step_speedup"}]}``: ``plan_speedup`` is the plan over MiniGrid's code, ``kept_speedup`` the
kept views over the plan alone, ``step_speedup`` the integer step over the kept views alone,
each the median over rounds of the round's ratio.

    python benchmarks/minigrid_reset.py
    python benchmarks/minigrid_reset.py --envs MiniGrid-MemoryS7-v0 --rounds 15
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
from minigrid_view import median_ratio  # noqa: E402

DEFAULT_ENVS = [
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-MemoryS9-v0",
    "MiniGrid-MemoryS13Random-v0",
    "MiniGrid-MemoryS17Random-v0",
]
#: MiniGrid's actions: turn left, turn right, move forward.
LEFT, RIGHT, FORWARD = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--envs", nargs="+", default=DEFAULT_ENVS, help="MiniGrid-Memory env ids")
    p.add_argument("--view-size", type=int, default=3, help="agent_view_size (odd, >= 3)")
    p.add_argument("--resets", type=int, default=500, help="resets per env and round")
    p.add_argument("--n-envs", type=int, default=8, help="envs of the stepping measurement")
    p.add_argument("--steps", type=int, default=400, help="vec steps per stepping round")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    if args.view_size < 3 or args.view_size % 2 == 0:
        p.error(f"--view-size must be an odd number of at least 3, got {args.view_size}")
    if min(args.resets, args.n_envs, args.steps, args.rounds) < 1:
        p.error("--resets, --n-envs, --steps and --rounds must be positive")
    bad = [e for e in args.envs if not e.startswith("MiniGrid-Memory")]
    if bad:
        p.error(f"--envs must be MiniGrid-Memory ids, got {' '.join(bad)}")
    return args


#: The variants: (fast_reset, kept_views, fast_step) of each.
VARIANTS = {
    "minigrid": (False, False, False),
    "plan": (True, False, False),
    "kept": (True, True, False),
    "step": (True, True, True),
}


def builder_env(env_id: str, view: int, fast_reset: bool, kept_views: bool, fast_step: bool):
    """One env as mnm_rl's env builder makes it (fast view, int actions), with or without the
    fast grid, the kept views and the integer step."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the MiniGrid envs)

    from mnm_rl.envs.minigrid_actions import use_int_actions
    from mnm_rl.envs.minigrid_memory import use_fast_memory_grid
    from mnm_rl.envs.minigrid_view import use_fast_view

    env = gym.make(env_id, agent_view_size=view)
    use_fast_view(env)
    if fast_reset:
        assert use_fast_memory_grid(env, kept_views=kept_views, fast_step=fast_step)
    return use_int_actions(env)


def time_resets(env_id: str, view: int, resets: int, rounds: int) -> dict[str, Any]:
    """Microseconds per reset of each variant."""
    envs = {name: builder_env(env_id, view, *flags) for name, flags in VARIANTS.items()}
    us: dict[str, list[float]] = {name: [] for name in envs}
    for env in envs.values():
        env.reset(seed=0)
        for _ in range(20):  # warm-up
            env.reset()
    for r in range(rounds):
        for name in envs if r % 2 else reversed(envs):
            reset = envs[name].reset
            start = time.perf_counter()
            for _ in range(resets):
                reset()
            us[name].append((time.perf_counter() - start) / resets * 1e6)
    return {
        "env": env_id,
        **{f"{name}_us": statistics.median(us[name]) for name in envs},
        "plan_speedup": median_ratio(us["minigrid"], us["plan"]),
        "kept_speedup": median_ratio(us["plan"], us["kept"]),
        "step_speedup": median_ratio(us["kept"], us["step"]),
    }


def walker_actions(venv, rng: np.random.Generator) -> np.ndarray:
    """For each env: forward along the corridor to the split, then turn north or south (at
    random) and step onto the object there, which ends the episode."""
    actions = np.empty(venv.num_envs, dtype=np.int64)
    for i, env in enumerate(venv.envs):
        base = env.unwrapped
        x, direction = int(base.agent_pos[0]), base.agent_dir
        if x == base.success_pos[0] and direction in (0, 2):  # at the split, facing along
            actions[i] = LEFT if rng.random() < 0.5 else RIGHT
        else:
            actions[i] = FORWARD
    return actions


def time_stepping(
    env_id: str, view: int, n_envs: int, steps: int, rounds: int, walker: bool
) -> dict[str, Any]:
    """Env steps per second of raw stepping of each variant."""
    setting = argparse.Namespace(env=env_id, n_envs=n_envs, view_size=view)
    envs = {
        name: throughput.make_env(
            setting, fast_reset=fast_reset, kept_views=kept_views, fast_step=fast_step
        )
        for name, (fast_reset, kept_views, fast_step) in VARIANTS.items()
    }
    rng = np.random.default_rng(0)
    n_actions = int(envs["kept"].action_space.n)
    sps: dict[str, list[float]] = {name: [] for name in envs}
    episodes = 0
    try:
        for env in envs.values():
            env.reset()
        for r in range(rounds + 1):  # round 0 warms up
            for name in envs if r % 2 else reversed(envs):
                venv = envs[name]
                elapsed, ended = 0.0, 0
                for _ in range(steps):
                    if walker:
                        action = walker_actions(venv, rng)
                    else:
                        action = rng.integers(n_actions, size=n_envs)
                    start = time.perf_counter()
                    dones = venv.step(action)[2]
                    elapsed += time.perf_counter() - start
                    ended += int(dones.sum())
                if r:
                    sps[name].append(steps * n_envs / elapsed)
                    episodes += ended
    finally:
        for env in envs.values():
            env.close()
    return {
        "env": env_id,
        "view": view,
        "n_envs": n_envs,
        "actions": "walker" if walker else "random",
        "steps_per_episode": len(envs) * rounds * steps * n_envs / max(episodes, 1),
        **{f"{name}_sps": statistics.median(sps[name]) for name in envs},
        "plan_speedup": median_ratio(sps["plan"], sps["minigrid"]),
        "kept_speedup": median_ratio(sps["kept"], sps["plan"]),
        "step_speedup": median_ratio(sps["step"], sps["kept"]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    print(f"command: python benchmarks/minigrid_reset.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(f"machine: {throughput.machine()}", flush=True)
    resets = [time_resets(env_id, args.view_size, args.resets, args.rounds) for env_id in args.envs]
    print(
        f"\nreset(), us per call (medians of {args.rounds} rounds of {args.resets} resets; "
        f"agent_view_size {args.view_size})"
    )
    header = (
        f"{'MiniGrid':>10}{'plan':>10}{'kept':>10}{'step':>10}{'plan/MiniGrid':>15}"
        f"{'kept/plan':>11}{'step/kept':>11}"
    )
    print(f"{'env':<32}{header}")
    for row in resets:
        print(
            f"{row['env']:<32}{row['minigrid_us']:>10.1f}{row['plan_us']:>10.1f}"
            f"{row['kept_us']:>10.1f}{row['step_us']:>10.1f}{row['plan_speedup']:>15.2f}"
            f"{row['kept_speedup']:>11.2f}{row['step_speedup']:>11.2f}"
        )
    stepping = [
        time_stepping(args.envs[0], args.view_size, args.n_envs, args.steps, args.rounds, walker)
        for walker in (False, True)
    ]
    print(
        f"\nraw stepping of {args.n_envs} envs of {args.envs[0]} (LeanDummyVecEnv), env steps/s "
        f"(medians of {args.rounds} rounds of {args.steps} steps)"
    )
    print(f"{'actions':<10}{'steps/episode':>15}{header}")
    for row in stepping:
        print(
            f"{row['actions']:<10}{row['steps_per_episode']:>15.1f}{row['minigrid_sps']:>10.0f}"
            f"{row['plan_sps']:>10.0f}{row['kept_sps']:>10.0f}{row['step_sps']:>10.0f}"
            f"{row['plan_speedup']:>15.2f}{row['kept_speedup']:>11.2f}{row['step_speedup']:>11.2f}"
        )
    out = {"rounds": args.rounds, "view": args.view_size, "reset": resets, "step": stepping}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
