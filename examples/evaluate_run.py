"""Load a run's policy and evaluate it with stable-baselines3's ``evaluate_policy``.

    python examples/evaluate_run.py runs/DelayedCueRecall/mnm-p/0-20250101-120000 --episodes 50

The env is rebuilt from the run's saved config (same gymnasium id, kwargs and wrappers) and seeded
with the preset's held-out evaluation seeds.
"""

from __future__ import annotations

import argparse

from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import mnm_rl
from mnm_rl.env_factory import make_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder (or a model file inside one)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--n-envs", type=int, default=4)
    args = parser.parse_args()

    policy = mnm_rl.load_policy(args.run, device="cpu")
    config = mnm_rl.load_run_config(args.run)
    env = DummyVecEnv([lambda: Monitor(make_env(config.env)) for _ in range(args.n_envs)])
    env.seed(config.env.eval_seeds.start)  # env i starts from held-out seed start + i
    mean, std = evaluate_policy(policy, env, n_eval_episodes=args.episodes, deterministic=True)
    print(f"{config.agent.name} on {config.env.name}: mean return {mean:.3f} +- {std:.3f}")


if __name__ == "__main__":
    main()
