"""Key-value recall: store ``n_pairs`` associations shown one per step, then answer one query."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from mnm_rl.envs.recall import (
    EMPTY_COLOR,
    QUERY_COLOR,
    RecallEnv,
    check_int,
    check_render_mode,
    symbol_color,
)


class KeyValueRecallEnv(RecallEnv):
    """Show ``n_pairs`` key -> value pairs, wait ``delay`` blank steps, then query one key.

    Keys are distinct, drawn from ``n_keys`` symbols; values are drawn independently (with
    repetition) from ``n_values`` symbols, or, with ``distinct_values``, without repetition;
    the queried pair is uniform over the shown ones. With repeated values a policy that keeps
    only a count per value (no key -> value binding) and answers the most frequent one beats
    chance (0.53 at 4 pairs and 4 values); distinct values take that shortcut away. An
    episode lasts exactly ``n_pairs + delay + 1`` steps. Actions before the query are ignored
    (reward 0); the action on the query step scores 1.0 if it equals the queried key's value and
    ends the episode. A memoryless policy succeeds with probability ``1 / n_values``.

    Observation (``float32``, length ``n_keys + n_values + 3``): ``[0:n_keys]`` one-hot key,
    ``[n_keys:n_keys + n_values]`` one-hot value, then flags ``store``, ``delay``, ``query``.
    Store steps set key, value and the store flag; delay steps set only the delay flag; the query
    step sets the queried key and the query flag with the value zeroed. The observation after the
    episode ends is all zeros.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        n_pairs: int = 4,
        n_keys: int = 8,
        n_values: int = 4,
        delay: int = 0,
        distinct_values: bool = False,
        render_mode: str | None = None,
    ) -> None:
        self.n_pairs = check_int("n_pairs", n_pairs, 1)
        self.n_keys = check_int("n_keys", n_keys, 1)
        self.n_values = check_int("n_values", n_values, 2)
        self.delay = check_int("delay", delay, 0)
        if not isinstance(distinct_values, bool):
            raise TypeError(f"distinct_values must be a bool, got {distinct_values!r}")
        self.distinct_values = distinct_values
        if self.n_pairs > self.n_keys:
            raise ValueError(
                f"n_pairs ({self.n_pairs}) must not exceed n_keys ({self.n_keys}) "
                "because the shown keys are distinct"
            )
        if distinct_values and self.n_pairs > self.n_values:
            raise ValueError(
                f"n_pairs ({self.n_pairs}) must not exceed n_values ({self.n_values}) "
                "with distinct_values"
            )
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])
        self.episode_length = self.n_pairs + self.delay + 1
        self.obs_size = self.n_keys + self.n_values + 3
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.obs_size,), dtype=np.float32)
        self.action_space = spaces.Discrete(self.n_values)
        self._keys: np.ndarray | None = None
        self._values = np.zeros(0, dtype=np.int64)
        self._query = 0

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The ``(key, value)`` pairs of the current episode, in presentation order."""
        if self._keys is None:
            raise RuntimeError("call reset() before reading the pairs")
        return [(int(k), int(v)) for k, v in zip(self._keys, self._values, strict=True)]

    @property
    def query_position(self) -> int:
        """Which pair is queried: its index in presentation order (0 = shown first)."""
        if self._keys is None:
            raise RuntimeError("call reset() before reading the query")
        return self._query

    @property
    def query_key(self) -> int:
        """The key asked for on the query step."""
        return self.pairs[self._query][0]

    @property
    def target(self) -> int:
        """The value of the queried key (the correct answer)."""
        return self.pairs[self._query][1]

    @property
    def phase(self) -> str:
        """``"store"``, ``"delay"``, ``"query"`` or ``"done"`` for the current observation."""
        if self._t < self.n_pairs:
            return "store"
        if self._t < self.n_pairs + self.delay:
            return "delay"
        if self._t == self.n_pairs + self.delay:
            return "query"
        return "done"

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.obs_size, dtype=np.float32)
        flags = self.n_keys + self.n_values
        phase = self.phase
        if phase == "store":
            key, value = self.pairs[self._t]
            obs[key] = 1.0
            obs[self.n_keys + value] = 1.0
            obs[flags] = 1.0
        elif phase == "delay":
            obs[flags + 1] = 1.0
        elif phase == "query":
            obs[self.query_key] = 1.0
            obs[flags + 2] = 1.0
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw new pairs and a query; return the first store observation."""
        super().reset(seed=seed)
        self._keys = self.np_random.choice(self.n_keys, size=self.n_pairs, replace=False)
        if self.distinct_values:
            self._values = self.np_random.choice(self.n_values, size=self.n_pairs, replace=False)
        else:
            self._values = self.np_random.integers(self.n_values, size=self.n_pairs)
        self._query = int(self.np_random.integers(self.n_pairs))
        return self._start_episode()

    def _describe(self, phase: str) -> str:
        if phase == "store":
            key, value = self.pairs[self._t]
            return f" key={key} value={value}"
        if phase == "query":
            return f" key={self.query_key} value=?"
        if phase == "done":
            return f" key={self.query_key} answer={self._answer} value={self.target}"
        return ""

    def _panels(self, phase: str) -> list[tuple[int, int, int]]:
        key_panel, value_panel = EMPTY_COLOR, EMPTY_COLOR
        if phase == "store":
            key, value = self.pairs[self._t]
            key_panel = symbol_color(key, self.n_keys)
            value_panel = symbol_color(value, self.n_values)
        elif phase in ("query", "done"):
            key_panel = symbol_color(self.query_key, self.n_keys)
            value_panel = QUERY_COLOR
            if self._answer is not None:
                value_panel = symbol_color(self._answer, self.n_values)
        return [key_panel, value_panel]
