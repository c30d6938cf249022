"""MiniGrid's actions as Python ints (``mnm_rl.envs.minigrid_actions``): the same episodes."""

from __future__ import annotations

import copy
import pickle

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
import pytest
from minigrid.envs import MemoryEnv
from minigrid_training import assert_same_parameters, trained_parameters
from stable_baselines3.common.env_util import is_wrapped

from mnm_rl.env_factory import make_env, resolve_env
from mnm_rl.envs.minigrid_actions import (
    SWITCH_VARIABLE,
    IntActions,
    steps_like_minigrid,
    use_int_actions,
)


@pytest.mark.parametrize("kind", [np.int8, np.int32, np.int64, np.uint8, np.uint64])
def test_numpy_integers_become_ints_of_the_same_value(kind) -> None:
    env = IntActions(gym.make("MiniGrid-MemoryS7-v0"))
    action = env.action(kind(5))
    assert type(action) is int and action == 5


@pytest.mark.parametrize("action", [3, np.array(2), np.array([1]), 2.0, "left"])
def test_anything_else_passes_unchanged(action) -> None:
    assert IntActions(gym.make("MiniGrid-MemoryS7-v0")).action(action) is action


class ActionTypes(gym.Wrapper):
    """Records the type of every action the base env gets."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.types: list[type] = []

    def step(self, action):
        self.types.append(type(action))
        return self.env.step(action)


@pytest.mark.parametrize(
    "env_id", ["MiniGrid-MemoryS7-v0", "MiniGrid-DoorKey-5x5-v0", "MiniGrid-KeyCorridorS3R1-v0"]
)
def test_the_same_episodes_with_numpy_actions_and_with_ints(env_id: str) -> None:
    """Every action MiniGrid has (turns, forward, pickup, drop, toggle, done), as the numpy
    integers a vec env passes: the same observations, rewards, ends and agent states, and the
    base env got ints."""
    seen = ActionTypes(gym.make(env_id, agent_view_size=5))
    ints, plain = IntActions(seen), gym.make(env_id, agent_view_size=5)
    assert use_int_actions(ints) is ints  # it has the wrapper already
    rng = np.random.default_rng(0)
    n_actions = int(plain.action_space.n)
    assert n_actions == 7
    rewards = carried = 0
    for episode in range(40):
        observations = [env.reset(seed=episode)[0] for env in (ints, plain)]
        done = False
        while not done:
            np.testing.assert_array_equal(observations[0]["image"], observations[1]["image"])
            assert observations[0]["direction"] == observations[1]["direction"]
            # mostly forward, so episodes reach their goals and doors
            action = np.int64(2 if rng.random() < 0.4 else rng.integers(n_actions))
            results = [env.step(action) for env in (ints, plain)]
            assert results[0][1:] == results[1][1:]
            bases = [env.unwrapped for env in (ints, plain)]
            assert tuple(bases[0].agent_pos) == tuple(bases[1].agent_pos)
            assert bases[0].agent_dir == bases[1].agent_dir
            assert type(bases[0].carrying) is type(bases[1].carrying)
            observations = [r[0] for r in results]
            done = results[0][2] or results[0][3]
            rewards += results[0][1] > 0
            carried += bases[0].carrying is not None
    assert set(seen.types) == {int}
    assert rewards > 0  # some episode ended with the reward
    if env_id != "MiniGrid-MemoryS7-v0":  # Memory turns pickup into toggle
        assert carried > 0


def test_installed_only_on_minigrid_envs_and_only_once(monkeypatch) -> None:
    cartpole = gym.make("CartPole-v1")  # discrete actions, not MiniGrid
    assert use_int_actions(cartpole) is cartpole
    own = gym.make("mnm_rl/DelayedCueRecall-v0")
    assert use_int_actions(own) is own
    env = gym.make("MiniGrid-MemoryS7-v0")
    wrapped = use_int_actions(env)
    assert isinstance(wrapped, IntActions) and wrapped.env is env
    assert use_int_actions(wrapped) is wrapped
    assert is_wrapped(gym.wrappers.RecordEpisodeStatistics(wrapped), IntActions)
    assert not is_wrapped(env, IntActions)
    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    assert use_int_actions(env) is env


class ItemActions(MemoryEnv):
    """A MiniGrid env of someone else's whose step uses what only a numpy integer has."""

    def step(self, action):
        return super().step(action.item())


def test_a_class_with_a_step_of_its_own_keeps_numpy_actions() -> None:
    own = ItemActions(size=7)
    assert not steps_like_minigrid(own)
    assert use_int_actions(own) is own
    own.reset(seed=0)
    assert own.step(np.int64(2))[1] == 0  # action.item() works: it got the numpy integer
    with pytest.raises(AttributeError):
        IntActions(ItemActions(size=7)).step(np.int64(2))  # what the wrapper would have done
    # MiniGrid's own subclasses, BabyAI's too, step like MiniGrid
    for env_id in ("MiniGrid-MemoryS7-v0", "MiniGrid-DoorKey-5x5-v0", "BabyAI-GoToRedBallGrey-v0"):
        assert steps_like_minigrid(gym.make(env_id)), env_id


def test_env_builder_wraps_minigrid_envs(monkeypatch) -> None:
    memory = resolve_env("MiniGrid-Memory")  # the preset, with its training-only wrappers
    for training in (False, True):
        env = make_env(memory, monitor=True, training=training)
        assert is_wrapped(env, IntActions)
        env.reset(seed=0)
        assert env.step(np.int64(2))[1] == 0
    assert not is_wrapped(make_env(resolve_env("mnm_rl/DelayedCueRecall-v0")), IntActions)
    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    assert not is_wrapped(make_env(memory, monitor=True, training=True), IntActions)


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))])
def test_copies_keep_the_wrapper(duplicate) -> None:
    twin = duplicate(use_int_actions(gym.make("MiniGrid-MemoryS7-v0")))
    assert is_wrapped(twin, IntActions)
    twin.reset(seed=0)
    assert twin.step(np.int64(1))[1] == 0


def test_training_is_the_same_with_numpy_actions_and_with_ints(monkeypatch) -> None:
    """The same seeds give the same policy, parameter for parameter, whether MiniGrid gets its
    actions as ints (the env builder's default) or as numpy integers (the switch)."""
    policies = []
    for switch in ("1", "0"):
        monkeypatch.setenv(SWITCH_VARIABLE, switch)

        def check(envs, ints=switch == "1"):
            assert [is_wrapped(e, IntActions) for e in envs] == [ints] * 2

        policies.append(trained_parameters(check))
    assert_same_parameters(*policies)
