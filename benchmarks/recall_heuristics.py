"""What key-value recall rewards without key -> value associations: exact success rates of
three policies that ignore which key a value belonged to, on the presets' held-out episodes.

    python benchmarks/recall_heuristics.py --episodes 20000
    python benchmarks/recall_heuristics.py --runs runs/kvr/*   # and what trained agents answer

* **memoryless**: any fixed answer (chance, ``1 / n_values``);
* **one shown value**: a value drawn uniformly from the distinct values shown;
* **most frequent value**: the value shown most often (ties split evenly): a counter per value,
  which any recurrent core can keep without binding values to keys.

With ``--runs``, each run's final policy (most likely action) also answers its preset's first
200 held-out episodes. Reported: its success; how often its answer is a most frequent shown value,
over the episodes where one value was shown more often than another (1.0 for the counting policy;
none such with distinct values); and its success by the position of the queried pair (1 = shown
first).

Prints one row per preset (and run); the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

import mnm_rl  # noqa: F401  (registers the envs)
from mnm_rl.env_factory import make_env, resolve_env
from mnm_rl.loading import load_policy
from mnm_rl.runs import load_config

PRESETS = (
    "KeyValueRecall",
    "KeyValueRecall-Hard",
    "KeyValueRecall-Distinct",
    "KeyValueRecall-Distinct-Hard",
)


def expected_success(values: list[int], target: int, n_values: int) -> dict[str, float]:
    """The three policies' probability of answering ``target`` after ``values`` were shown."""
    counts = Counter(values)
    modes = modes_of(values)
    return {
        "memoryless": 1 / n_values,
        "one shown value": (target in counts) / len(counts),
        "most frequent value": (target in modes) / len(modes),
    }


def modes_of(values: list[int]) -> set[int]:
    counts = Counter(values)
    return {v for v, c in counts.items() if c == max(counts.values())}


def replay(run: Path, episodes: int = 200) -> dict[str, float]:
    """Success of a run's final policy and how often its answer is a most frequent value."""
    spec = load_config(run).env
    policy = load_policy(run, device="cpu")
    env = make_env(spec)
    success = on_mode = informative = 0
    by_position: dict[int, list[bool]] = {}
    for episode in range(episodes):
        obs, _ = env.reset(seed=spec.eval_seeds.start + episode)
        values = [v for _, v in env.unwrapped.pairs]
        position = env.unwrapped.query_position + 1
        state, start, done = None, np.ones(1, dtype=bool), False
        while not done:
            action, state = policy.predict(obs[None], state, start, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(int(action[0]))
            start, done = np.zeros(1, dtype=bool), terminated or truncated
        success += reward > 0
        modes = modes_of(values)
        if len(modes) < len(set(values)):  # some shown value is more frequent than another
            informative += 1
            on_mode += int(action[0]) in modes
        by_position.setdefault(position, []).append(reward > 0)
    return {
        "success": success / episodes,
        "answer_is_most_frequent": on_mode / informative if informative else None,
        "success_by_position": {p: float(np.mean(v)) for p, v in sorted(by_position.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20_000)
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="trained run folders")
    args = parser.parse_args()
    results = {}
    print(f"{'preset':29s} memoryless  one shown value  most frequent value")
    for name in PRESETS:
        spec = resolve_env(name)
        env = make_env(spec).unwrapped
        totals: Counter[str] = Counter()
        for episode in range(args.episodes):
            env.reset(seed=spec.eval_seeds.start + episode)
            values = [v for _, v in env.pairs]
            totals.update(expected_success(values, env.target, env.n_values))
        results[name] = {k: v / args.episodes for k, v in totals.items()}
        r = results[name]
        print(
            f"{name:29s} {r['memoryless']:.3f}       {r['one shown value']:.3f}            "
            f"{r['most frequent value']:.3f}"
        )
    for run in args.runs:
        results[str(run)] = r = replay(run)
        positions = " ".join(f"{v:.2f}" for v in r["success_by_position"].values())
        most = r["answer_is_most_frequent"]
        most_text = "-" if most is None else f"{most:.3f}"
        print(
            f"{str(run):50s} success {r['success']:.3f}  "
            f"answer is a most frequent value {most_text}  "
            f"success by queried pair 1..n: {positions}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
