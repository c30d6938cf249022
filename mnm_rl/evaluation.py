"""Held-out evaluation: run a policy on the env preset's evaluation seeds.

Episode ``k`` resets its env with ``eval_seeds.start + k``, so results are reproducible and the
seeds never overlap the training seeds. A few envs run side by side; the recurrent state of each
is threaded through ``predict`` and reset (``episode_start``) when its next episode begins.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mnm_rl.config import ConfigError, EnvSpec
from mnm_rl.env_factory import make_env


@dataclass
class Episode:
    """One evaluation episode."""

    seed: int
    ret: float
    length: int
    success: bool


def _stack(observations: list[Any]) -> Any:
    if isinstance(observations[0], dict):
        return {k: np.stack([np.asarray(o[k]) for o in observations]) for k in observations[0]}
    return np.stack([np.asarray(o) for o in observations])


def run_episodes(
    policy,
    spec: EnvSpec,
    episodes: int,
    deterministic: bool = True,
    n_parallel: int = 8,
    max_steps: int = 100_000,
) -> list[Episode]:
    """Run ``episodes`` held-out episodes; success means a positive final reward."""
    if episodes < 1:
        raise ConfigError(f"--episodes must be positive, got {episodes}")
    if episodes > len(spec.eval_seeds):
        raise ConfigError(
            f"{episodes} episodes exceed the {len(spec.eval_seeds)} evaluation seeds of {spec.name}"
        )
    n = min(n_parallel, episodes)
    envs = [make_env(spec) for _ in range(n)]
    try:
        return _run(policy, spec, envs, episodes, deterministic, max_steps)
    finally:
        for env in envs:
            env.close()


def _run(policy, spec, envs, episodes, deterministic, max_steps) -> list[Episode]:
    n = len(envs)
    results: dict[int, Episode] = {}
    current = list(range(n))  # episode index run by each env (None when idle)
    next_episode = n
    obs = [env.reset(seed=spec.eval_seeds.seed(k))[0] for env, k in zip(envs, current, strict=True)]
    returns = np.zeros(n)
    lengths = np.zeros(n, dtype=int)
    starts = np.ones(n, dtype=bool)
    state = None
    while len(results) < episodes:
        actions, state = policy.predict(_stack(obs), state, starts, deterministic=deterministic)
        starts = np.zeros(n, dtype=bool)
        for i, env in enumerate(envs):
            if current[i] is None:
                continue
            obs[i], reward, terminated, truncated, _ = env.step(actions[i])
            returns[i] += float(reward)
            lengths[i] += 1
            if terminated or truncated or lengths[i] >= max_steps:
                k = current[i]
                seed = spec.eval_seeds.seed(k)
                results[k] = Episode(seed, float(returns[i]), int(lengths[i]), float(reward) > 0)
                returns[i], lengths[i] = 0.0, 0
                if next_episode < episodes:
                    current[i] = next_episode
                    obs[i] = env.reset(seed=spec.eval_seeds.seed(next_episode))[0]
                    starts[i] = True
                    next_episode += 1
                else:
                    current[i] = None  # idle: keeps stepping its last obs, results ignored
    return [results[k] for k in range(episodes)]


def summarize(episodes: list[Episode]) -> dict[str, float | int]:
    """Success rate, return and length statistics."""
    returns = np.array([e.ret for e in episodes])
    lengths = np.array([e.length for e in episodes])
    success = np.array([e.success for e in episodes], dtype=float)
    return {
        "episodes": len(episodes),
        "success_rate": float(success.mean()),
        "success_rate_stderr": float(success.std(ddof=0) / np.sqrt(len(success))),
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "mean_length": float(lengths.mean()),
    }


def evaluate(
    policy,
    spec: EnvSpec,
    episodes: int,
    deterministic: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate and return a JSON-ready report (summary, seeds, per-episode results)."""
    start = time.time()
    results = run_episodes(policy, spec, episodes, deterministic)
    return {
        **summarize(results),
        "env": spec.name,
        "env_id": spec.id,
        "deterministic": deterministic,
        "seeds": [spec.eval_seeds.start, spec.eval_seeds.start + episodes],
        **(extra or {}),
        "wall_time_s": round(time.time() - start, 2),
        "per_episode": [asdict(e) for e in results],
    }


__all__ = ["Episode", "evaluate", "run_episodes", "summarize"]
