"""Test-only envs: DelayedCueRecall whose rewards (``NaNRewardCue-v0``) or observations
(``NaNObsCue-v0``) turn NaN after ``nan_after`` steps per env.

The CLI reaches them as ``--env nan_env:NaNRewardCue-v0`` with this folder on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from mnm_rl.envs import DelayedCueRecallEnv


class NaNRewardCue(DelayedCueRecallEnv):
    def __init__(self, nan_after: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_after = nan_after
        self.steps = 0

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        if self.steps > self.nan_after:
            reward = float("nan")
        return obs, reward, terminated, truncated, info


class NaNObsCue(DelayedCueRecallEnv):
    def __init__(self, nan_after: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_after = nan_after
        self.steps = 0

    def _obs(self):
        obs = super()._obs()
        if self.steps > self.nan_after:
            obs[:] = float("nan")
        return obs

    def step(self, action: Any):
        self.steps += 1
        return super().step(action)


if "NaNObsCue-v0" not in gym.registry:
    gym.register(id="NaNObsCue-v0", entry_point=NaNObsCue)
if "NaNRewardCue-v0" not in gym.registry:
    gym.register(id="NaNRewardCue-v0", entry_point=NaNRewardCue)
