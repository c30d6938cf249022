"""Step an env by hand with a trained policy, threading the recurrent state yourself.

    python examples/step_by_hand.py runs/MiniGrid-Memory/mnm-p/0-20250101-120000 --episodes 3

``predict`` takes the state it returned at the previous step, and ``episode_start=True`` on the
first step of each episode (the state is then reset to the core's initial state).
"""

from __future__ import annotations

import argparse

import numpy as np

import mnm_rl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder (or a model file inside one)")
    parser.add_argument("--episodes", type=int, default=3)
    args = parser.parse_args()

    policy = mnm_rl.load_policy(args.run, device="cpu")
    config = mnm_rl.load_run_config(args.run)
    env = mnm_rl.make_run_env(args.run)
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=config.env.eval_seeds.seed(episode))
        state, start, done, total, steps = None, True, False, 0.0, 0
        while not done:
            action, state = policy.predict(
                obs, state=state, episode_start=np.array([start]), deterministic=True
            )
            start = False
            obs, reward, terminated, truncated, _ = env.step(int(action))
            done = terminated or truncated
            total += float(reward)
            steps += 1
        verdict = "success" if reward > 0 else "failure"
        print(f"episode {episode}: {steps} steps, return {total:.3f}, {verdict}")
    env.close()


if __name__ == "__main__":
    main()
