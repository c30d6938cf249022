"""MiniGrid wrappers for memory agents: a symbolic observation, a start-direction curriculum."""

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


class StartDirection(gym.Wrapper):
    """A start-state curriculum: with probability ``probability`` an episode starts with the agent
    turned to face ``direction`` (0 east, 1 south, 2 west, 3 north) instead of as the env placed
    it; the rest of the episode is unchanged. Draws from the env's own seeded generator, so a
    seeded reset gives the same start.

    On MiniGrid-Memory the agent starts facing east, away from the cue; facing west
    (``direction=2``) it meets the cue the way a detour does, so the policy learns to use a cue
    seen from there with on-policy experience. Meant for ``train_wrappers`` (training only); wrap
    the MiniGrid env itself, before observation wrappers.
    """

    def __init__(self, env: gym.Env, direction: int, probability: float):
        super().__init__(env)
        if direction not in (0, 1, 2, 3):
            raise ValueError(f"direction must be 0, 1, 2 or 3, got {direction}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.direction = direction
        self.probability = probability

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        grid_env = self.env.unwrapped
        if grid_env.np_random.random() < self.probability:
            grid_env.agent_dir = self.direction
            obs = grid_env.gen_obs()
        return obs, info
