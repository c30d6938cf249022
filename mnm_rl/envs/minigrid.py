"""MiniGrid wrappers for memory agents: a symbolic observation, start-state curricula."""

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
        _check_probability(probability)
        self.direction = direction
        self.probability = probability

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        grid_env = self.env.unwrapped
        if grid_env.np_random.random() < self.probability:
            grid_env.agent_dir = self.direction
            obs = grid_env.gen_obs()
        return obs, info


class MinStartColumn(gym.Wrapper):
    """MiniGrid-Memory: the agent starts no further west than column ``min_column``.

    MemoryEnv draws the start column uniformly from the corridor, ``1 .. hallway_end``; from
    column 1 the cue is in view at the start (the agent stands next to it). This wrapper redraws
    a start west of ``min_column`` uniformly from ``min_column .. hallway_end``, so starts are
    uniform over those columns and a policy can only see the cue by going back for it. With
    ``probability`` < 1 only that share of such starts is moved (the rest stay, and train the
    policy for them too). Draws from the env's own seeded generator, so a seeded reset gives the
    same start. Meant for ``train_wrappers`` (training only); wrap the MiniGrid env itself,
    before observation wrappers.
    """

    def __init__(self, env: gym.Env, min_column: int, probability: float = 1.0):
        super().__init__(env)
        if min_column < 1:
            raise ValueError(f"min_column must be at least 1, got {min_column}")
        # MemoryEnv's corridor ends at hallway_end <= width - 3 (shorter with random_length):
        # catch a column past it when the env is built, not at the first reset
        width = getattr(env.unwrapped, "width", None)
        if width is not None and min_column > width - 3:
            raise ValueError(
                f"min_column {min_column} is beyond the corridor (its last start column is at "
                f"most {width - 3})"
            )
        _check_probability(probability)
        self.min_column = min_column
        self.probability = probability

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        grid_env = self.env.unwrapped
        x, y = (int(v) for v in grid_env.agent_pos)
        # draws only for a start west of min_column, and nothing extra at probability 1
        if x < self.min_column and (
            self.probability >= 1.0 or grid_env.np_random.random() < self.probability
        ):
            last = _last_start_column(grid_env, y)
            if last < self.min_column:
                raise ValueError(
                    f"min_column {self.min_column} is beyond the corridor (its last start "
                    f"column is {last})"
                )
            grid_env.agent_pos = np.array(
                (int(grid_env.np_random.integers(self.min_column, last + 1)), y)
            )
            obs = grid_env.gen_obs()
        return obs, info


def _check_probability(probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")


def _last_start_column(grid_env, row: int) -> int:
    """The last column MemoryEnv may start the agent in on ``row``: its corridor runs east from
    column 1 up to and including the junction (``hallway_end + 1``), one past the last start."""
    x = 1
    while x + 1 < grid_env.width and grid_env.grid.get(x + 1, row) is None:
        x += 1
    return x - 1
