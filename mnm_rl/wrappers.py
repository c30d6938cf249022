"""Small gymnasium wrappers that env presets can name."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
from gymnasium import spaces


def _minigrid_action(name: str) -> int:
    from minigrid.core.actions import Actions

    if name not in Actions.__members__:
        raise ValueError(
            f"unknown MiniGrid action {name!r}; expected one of {', '.join(Actions.__members__)}"
        )
    return int(Actions[name])


class ActionSubset(gym.ActionWrapper):
    """Expose only some actions of a ``Discrete`` action space, renumbered from 0.

    ``actions`` lists the kept actions as indices of the wrapped space or, for MiniGrid, as names
    (``left``, ``right``, ``forward``, ``pickup``, ``drop``, ``toggle``, ``done``).
    """

    def __init__(self, env: gym.Env, actions: Sequence[int | str]):
        super().__init__(env)
        if not isinstance(env.action_space, spaces.Discrete):
            raise ValueError(f"ActionSubset needs a Discrete action space, got {env.action_space}")
        if not actions:
            raise ValueError("ActionSubset needs at least one action")
        n = int(env.action_space.n)
        indices = [a if isinstance(a, int) else _minigrid_action(a) for a in actions]
        for a in indices:
            if not 0 <= a < n:
                raise ValueError(f"action {a} is outside the wrapped space Discrete({n})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"ActionSubset actions repeat: {list(actions)}")
        self.actions = indices
        self.action_space = spaces.Discrete(len(indices))

    def action(self, action) -> int:
        return self.actions[int(action)]


class TrainWrapperGate(gym.Wrapper):
    """Switch a training curriculum off between episodes.

    ``curriculum`` is the env with the preset's ``train_wrappers``; ``plain`` is the same env
    without them (the env they wrap). While :attr:`enabled`, episodes run through the
    curriculum; once it is cleared, the next reset and every episode after it go to the plain
    env. An episode already under way finishes as it started.
    """

    def __init__(self, curriculum: gym.Env, plain: gym.Env):
        super().__init__(curriculum)
        self.plain = plain
        self.enabled = True
        self._active = curriculum

    def end_curriculum(self) -> None:
        """Clear :attr:`enabled`: the next episode and every later one go to the plain env. A
        method, so that ``VecEnv.env_method("end_curriculum")`` reaches the gate in any vec env,
        a worker process's included."""
        self.enabled = False

    def reset(self, **kwargs):
        self._active = self.env if self.enabled else self.plain
        return self._active.reset(**kwargs)

    def step(self, action):
        return self._active.step(action)
