"""Which held-out MiniGrid-Memory episodes a run fails: its final evaluation by start case.

    python benchmarks/heldout_failures.py runs/s7west/*seed5 > docs/results/failures.txt

Reads each run's final ``eval.json`` (per-episode success by seed), resets the run's own env
with each of those seeds (no policy is run), and groups the episodes by how they start: the
start column (1: next to the cue, which is then in view), the cue (key or ball) and on which
side the matching object lies. A deterministic policy that fails a whole group has a blind spot
(e.g. every start next to a key), not noise. Prints a table per run and, last, a JSON line
``{run: {"success": float, "cases": [{"start_column", "cue", "target", "episodes",
"failures"}, ...]}}``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from minigrid.envs.memory import MemoryEnv

from mnm_rl.env_factory import make_env
from mnm_rl.runs import EVAL_FILE, load_config


def start_case(env, seed: int) -> tuple[int, str, str]:
    """(start column, cue object, side of the matching object) of the episode ``seed``."""
    env.reset(seed=seed)
    grid_env = env.unwrapped
    middle = grid_env.height // 2
    cue = grid_env.grid.get(1, middle - 1).type
    target = "up" if grid_env.success_pos[1] < middle else "down"
    return int(grid_env.agent_pos[0]), cue, target


def failure_cases(run_dir: Path) -> dict:
    """The run's final held-out success and its episodes and failures per start case."""
    report = json.loads((run_dir / EVAL_FILE).read_text())
    env = make_env(load_config(run_dir).env)
    if not isinstance(env.unwrapped, MemoryEnv):
        raise ValueError(f"{run_dir} is not a MiniGrid-Memory run")
    episodes, failures = Counter(), Counter()
    for episode in report["per_episode"]:
        case = start_case(env, episode["seed"])
        episodes[case] += 1
        failures[case] += not episode["success"]
    cases = [
        {
            "start_column": column,
            "cue": cue,
            "target": target,
            "episodes": episodes[column, cue, target],
            "failures": failures[column, cue, target],
        }
        for column, cue, target in sorted(episodes)
    ]
    return {"success": report["success_rate"], "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a final eval.json")
    args = parser.parse_args()
    results = {}
    for run_dir in args.runs:
        if not (run_dir / EVAL_FILE).exists():
            parser.error(f"{run_dir} has no {EVAL_FILE}")
        try:
            result = results[str(run_dir)] = failure_cases(run_dir)
        except ValueError as err:
            parser.error(str(err))
        print(f"{run_dir}: held-out success {result['success']:.4f}")
        print("| start column | cue | target | episodes | failures |")
        print("| --- | --- | --- | --- | --- |")
        for case in result["cases"]:
            mark = "**" if case["failures"] else ""
            print(
                f"| {case['start_column']} | {case['cue']} | {case['target']} "
                f"| {case['episodes']} | {mark}{case['failures']}{mark} |"
            )
        print()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
