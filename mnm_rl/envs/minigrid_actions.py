"""MiniGrid's actions as Python ints.

A vectorised env hands each env its action as a numpy integer (stable-baselines3's
``DummyVecEnv`` indexes an array of them). MiniGrid's ``step`` compares the action with members
of its ``Actions`` enum, one after another (``MemoryEnv`` once more), and a numpy integer
compared with an ``IntEnum`` member is slow: numpy looks for its array hooks on the member's
class, and each missing one goes through ``EnumType.__getattr__`` and raises (about nine such
lookups per step). With a Python int the comparisons are plain integer ones: on this project's
2-core VM raw stepping of 8 MiniGrid-MemoryS7 envs with random actions takes 13.5 us per env
step instead of 27.1 at a 3 x 3 view (1.99x as fast), 1.75x at 5 x 5 and 1.58x at 7 x 7, on top
of the fast view (``python benchmarks/minigrid_view.py``; docs/benchmark_runs/).

:class:`IntActions` converts numpy integers to ints and passes anything else on as it is, so the
env takes the same branches and returns the same results (``tests/test_minigrid_actions.py``).
:func:`use_int_actions` wraps one env with it; mnm_rl's env builder does so for every env whose
``step`` is MiniGrid's own code (MiniGrid's and BabyAI's envs; a subclass with a ``step`` of its
own may rely on numpy's integers and is left as it is), ``MNM_RL_INT_ACTIONS=0`` in the
environment leaves them all as they come.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from minigrid.minigrid_env import MiniGridEnv
from stable_baselines3.common.env_util import is_wrapped

#: Set to ``0`` in the environment to hand MiniGrid envs their actions as they come.
SWITCH_VARIABLE = "MNM_RL_INT_ACTIONS"


class IntActions(gym.ActionWrapper):
    """Hands the env a numpy integer action (``np.int64(2)``) as the Python int of the same
    value; any other action unchanged."""

    def action(self, action: Any) -> Any:
        return int(action) if isinstance(action, np.integer) else action


def int_actions_enabled() -> bool:
    """Whether :func:`use_int_actions` may wrap envs: not switched off by
    ``MNM_RL_INT_ACTIONS=0``."""
    return os.environ.get(SWITCH_VARIABLE, "1") != "0"


def steps_like_minigrid(env: gym.Env) -> bool:
    """Whether ``env``'s base is a ``MiniGridEnv`` whose ``step`` is MiniGrid's own code (from
    the ``minigrid`` package: ``MiniGridEnv.step`` or one of its envs', BabyAI's included), which
    only compares the action with ints. A class of someone else's may use what only a numpy
    integer has (``action.item()``, ``action.dtype``)."""
    base = env.unwrapped
    return isinstance(base, MiniGridEnv) and type(base).step.__module__.startswith("minigrid.")


def use_int_actions(env: gym.Env) -> gym.Env:
    """``env`` wrapped in :class:`IntActions` if it steps like MiniGrid
    (:func:`steps_like_minigrid`) with a ``Discrete`` action space, unless
    ``MNM_RL_INT_ACTIONS=0`` or it has the wrapper already; else ``env`` itself."""
    if (
        not steps_like_minigrid(env)
        or not isinstance(env.action_space, gym.spaces.Discrete)
        or not int_actions_enabled()
        or is_wrapped(env, IntActions)
    ):
        return env
    return IntActions(env)
