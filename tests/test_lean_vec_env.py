"""``LeanDummyVecEnv``: the same episodes as stable-baselines3's ``DummyVecEnv``, and what it
returns is the caller's own, as ``DummyVecEnv``'s deep copies are."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv
from test_parallel_vec_env import assert_same, cartpole_env, minigrid_env, tuple_env

from mnm_rl.lean_vec_env import LeanDummyVecEnv


@pytest.mark.parametrize(
    ("make", "n_envs", "steps"),
    [(minigrid_env, 3, 400), (cartpole_env, 4, 300), (tuple_env, 2, 50)],
    ids=["minigrid-dict-obs", "cartpole-box-obs", "tuple-obs"],
)
def test_same_episodes_as_dummy_vec_env(make, n_envs: int, steps: int):
    dummy, lean = DummyVecEnv([make] * n_envs), LeanDummyVecEnv([make] * n_envs)
    rng = np.random.default_rng(0)
    episodes = 0
    for seed in (3, 11):
        dummy.seed(seed)
        lean.seed(seed)
        assert_same(dummy.reset(), lean.reset())
        assert_same(dummy.reset_infos, lean.reset_infos)
        for _ in range(steps):
            actions = rng.integers(0, dummy.action_space.n, n_envs)
            expected, got = dummy.step(actions), lean.step(actions)
            for a, b in zip(expected, got, strict=True):
                assert_same(a, b)
            assert got[1].dtype == np.float32 and got[2].dtype == bool
            episodes += int(got[2].sum())
    assert episodes >= n_envs  # terminal observations and episode statistics were compared
    dummy.close()
    lean.close()


def test_what_a_step_returns_is_the_callers_own():
    lean = LeanDummyVecEnv([minigrid_env, minigrid_env])
    lean.seed(0)
    first = lean.reset()
    obs, _, _, infos = lean.step(np.array([2, 2]))
    kept = {k: v.copy() for k, v in obs.items()}
    for key, array in obs.items():  # not the env's buffers
        assert not np.shares_memory(array, lean.buf_obs[key]) and not np.shares_memory(
            array, first[key]
        )
    assert all(mine is not theirs for mine, theirs in zip(infos, lean.buf_infos, strict=True))
    infos[0]["mine"] = 1
    seen_end = False
    for _ in range(600):
        next_obs, _, dones, next_infos = lean.step(np.array([0, 1]))
        assert "mine" not in next_infos[0]
        if dones.any():
            i = int(np.flatnonzero(dones)[0])
            terminal = next_infos[i]["terminal_observation"]
            for key, array in terminal.items():  # a copy, not the reset's observation
                assert not np.shares_memory(array, next_obs[key])
            seen_end = True
            break
    assert seen_end
    for key in obs:  # later steps did not write into an earlier step's observation
        np.testing.assert_array_equal(obs[key], kept[key])
    lean.close()


def test_a_terminal_observation_keeps_its_type():
    """A Discrete space's observation is an int: its terminal copy is an int too, as
    ``DummyVecEnv``'s deep copy leaves it."""
    import gymnasium as gym

    def make():
        return gym.make("FrozenLake-v1", is_slippery=False)

    dummy, lean = DummyVecEnv([make]), LeanDummyVecEnv([make])
    dummy.seed(0)
    lean.seed(0)
    dummy.reset(), lean.reset()
    for _ in range(100):  # left, into the corner, until the time limit or a hole
        expected, got = dummy.step(np.array([1])), lean.step(np.array([1]))
        if got[2][0]:
            want = expected[3][0]["terminal_observation"]
            have = got[3][0]["terminal_observation"]
            assert type(have) is type(want) and have == want
            break
    else:
        raise AssertionError("no episode ended")
