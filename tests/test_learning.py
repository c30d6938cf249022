"""The honest proof that the memory is used: MNM learns delayed cue recall, no memory cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env

import mnm_rl  # noqa: F401  (registers the envs)
from mnm_rl.agent import MemoryPPO

TASK = dict(n_cues=4, delay=8)  # a memoryless policy succeeds 1 time in 4
TRAIN_STEPS = 24_000


def heldout_success(model: MemoryPPO, episodes: int = 200) -> float:
    """Success rate over episodes seeded 100000.. (training envs use seeds 0..7)."""
    env = make_vec_env("mnm_rl/DelayedCueRecall-v0", n_envs=1, env_kwargs=TASK)
    successes = []
    for episode in range(episodes):
        env.seed(100_000 + episode)
        obs = env.reset()
        state, start, done = None, np.ones(1, dtype=bool), False
        while not done:
            action, state = model.predict(obs, state, start, deterministic=True)
            obs, reward, dones, _ = env.step(action)
            start, done = dones, bool(dones[0])
        successes.append(float(reward[0] > 0))
    return float(np.mean(successes))


def train(core: str, seed: int = 0) -> MemoryPPO:
    torch.set_num_threads(1)
    env = make_vec_env("mnm_rl/DelayedCueRecall-v0", n_envs=8, seed=seed, env_kwargs=TASK)
    model = MemoryPPO(
        env=env,
        core=core,
        n_steps=64,
        batch_size=256,
        seq_len=16,
        learning_rate=2e-3,
        seed=seed,
        device="cpu",
        policy_kwargs=dict(
            core_kwargs=dict(hidden_size=32, n_heads=2)
            if core == "mnm-p"
            else dict(hidden_size=32),
            features_dim=32,
        ),
    )
    return model.learn(TRAIN_STEPS)


@pytest.mark.slow
def test_mnm_p_solves_delayed_cue_recall_and_mlp_does_not():
    # The first of six training seeds that solves it: at this budget a run sometimes stalls near
    # 0.5 or 0.75, and which seeds do changes with float rounding, so with the CPU's BLAS. Seeds
    # 0-7 reached 1.0 in 4 of 8 runs on an AMD EPYC (3, 4, 6, 7) and seeds 0-5 in 4 of 6 on an
    # Intel Xeon (command in docs/memory.md); a memory that does not work solves none.
    results = {}
    for seed in range(6):
        results[seed] = heldout_success(train("mnm-p", seed))
        if results[seed] >= 0.9:
            break
    mlp_success = heldout_success(train("mlp"))
    assert max(results.values()) >= 0.9, results
    assert mlp_success < 0.5, mlp_success
