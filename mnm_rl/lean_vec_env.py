"""``DummyVecEnv`` without ``copy.deepcopy`` in every step.

stable-baselines3's ``DummyVecEnv.step_wait`` returns ``deepcopy(self.buf_obs)`` and
``deepcopy(self.buf_infos)``, so that what it hands out never changes under the caller. For a
few small numpy arrays and dicts, deepcopy's generic machinery (memo dict, dispatch per object,
``__reduce_ex__`` for arrays) costs more than the copies themselves: py-spy put the two at 15% of
``VecEnv.step`` in an lstm agent's rollout on MiniGrid, whose env steps take a few
microseconds. :class:`LeanDummyVecEnv` makes the same guarantees with plain copies:

* the observations are new arrays, as ``DummyVecEnv`` returns them;
* each info dict is a new dict, and its ``terminal_observation`` a copy of the episode's last
  observation (an env may reuse its observation arrays, and resets right after). Its other
  values are the env's own: gymnasium's and stable-baselines3's wrappers (``Monitor``'s
  ``episode``, ``TimeLimit``'s flags) put new objects in a new dict at every step.

Everything else (resets, seeding, ``reset_infos``, ``get_attr`` ...) is ``DummyVecEnv``'s.
``tests/test_lean_vec_env.py`` steps it next to ``DummyVecEnv`` with the same seeds and actions.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn
from stable_baselines3.common.vec_env.util import dict_to_obs


def _copied(value: Any) -> Any:
    """A copy of an observation: new arrays in a dict or tuple as the observation had them
    (anything else, a Discrete space's int say, as ``deepcopy`` copies it)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    return value.copy() if isinstance(value, np.ndarray) else copy.deepcopy(value)


class LeanDummyVecEnv(DummyVecEnv):
    """``DummyVecEnv`` whose ``step_wait`` and ``reset`` copy what they return with plain copies
    instead of ``copy.deepcopy`` (see the module docstring for what is copied)."""

    def step_wait(self) -> VecEnvStepReturn:  # noqa: D102
        # DummyVecEnv's loop: step each env; where its episode ends, keep the last observation
        # in the info dict and reset it (then the observation is the new episode's first).
        for i, env in enumerate(self.envs):
            obs, reward, terminated, truncated, info = env.step(self.actions[i])
            self.buf_rews[i] = reward
            self.buf_dones[i] = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if self.buf_dones[i]:
                info["terminal_observation"] = _copied(obs)
                obs, self.reset_infos[i] = env.reset()
            self.buf_infos[i] = info
            self._save_obs(i, obs)
        infos = [dict(info) for info in self.buf_infos]
        return self._obs_from_buf(), np.copy(self.buf_rews), np.copy(self.buf_dones), infos

    def _obs_from_buf(self) -> VecEnvObs:
        return dict_to_obs(self.observation_space, {k: v.copy() for k, v in self.buf_obs.items()})
