"""MiniGrid observation wrapper for memory agents."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX


class SymbolicMiniGrid(gym.ObservationWrapper):
    """Keep MiniGrid's symbolic image and direction, drop the text mission.

    The image becomes an ``int64`` Box whose per-channel upper bounds are the real symbol counts
    (object, colour, door state), so encoders embed symbols instead of treating them as pixels
    (and stable-baselines3 neither rescales nor transposes them).
    Observation: ``{"image": int64 [V, V, 3], "direction": Discrete(4)}``.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        image = env.observation_space["image"]
        high = np.empty(image.shape, dtype=np.int64)
        high[..., 0] = max(OBJECT_TO_IDX.values())
        high[..., 1] = max(COLOR_TO_IDX.values())
        high[..., 2] = max(STATE_TO_IDX.values())
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, high, dtype=np.int64),
                "direction": spaces.Discrete(4),
            }
        )

    def observation(self, observation: dict) -> dict:
        return {
            "image": observation["image"].astype(np.int64),
            "direction": int(observation["direction"]),
        }
