"""Delayed cue recall: remember one of K symbols across a blank delay, then name it."""

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


class DelayedCueRecallEnv(RecallEnv):
    """Show one of ``n_cues`` symbols, wait ``delay`` blank steps, then ask which one it was.

    An episode lasts exactly ``delay + 2`` steps. The first ``delay + 1`` actions are ignored
    (reward 0); the action on the query step scores 1.0 if it equals the cue and ends the episode.
    A memoryless policy succeeds with probability ``1 / n_cues``.

    Observation (``float32``, length ``n_cues + 2``): ``[0:n_cues]`` one-hot of the cue on the first
    step and zeros afterwards, ``[n_cues]`` cue-phase flag, ``[n_cues + 1]`` query-phase flag. The
    observation after the episode ends is all zeros.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, n_cues: int = 4, delay: int = 8, render_mode: str | None = None) -> None:
        self.n_cues = check_int("n_cues", n_cues, 2)
        self.delay = check_int("delay", delay, 0)
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])
        self.episode_length = self.delay + 2
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.n_cues + 2,), dtype=np.float32)
        self.action_space = spaces.Discrete(self.n_cues)
        self._cue: int | None = None

    @property
    def cue(self) -> int:
        """The cue of the current episode (the correct answer)."""
        if self._cue is None:
            raise RuntimeError("call reset() before reading the cue")
        return self._cue

    @property
    def target(self) -> int:
        """The correct answer: the cue."""
        return self.cue

    @property
    def phase(self) -> str:
        """``"cue"``, ``"delay"``, ``"query"`` or ``"done"`` for the current observation."""
        if self._t == 0:
            return "cue"
        if self._t <= self.delay:
            return "delay"
        if self._t == self.delay + 1:
            return "query"
        return "done"

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.n_cues + 2, dtype=np.float32)
        phase = self.phase
        if phase == "cue":
            obs[self.cue] = 1.0
            obs[self.n_cues] = 1.0
        elif phase == "query":
            obs[self.n_cues + 1] = 1.0
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw a new cue uniformly; return the cue observation."""
        super().reset(seed=seed)
        self._cue = int(self.np_random.integers(self.n_cues))
        return self._start_episode()

    def _describe(self, phase: str) -> str:
        if phase == "cue":
            return f" cue={self._cue}"
        if phase == "done":
            return f" answer={self._answer} cue={self._cue}"
        return ""

    def _panels(self, phase: str) -> list[tuple[int, int, int]]:
        if phase == "cue":
            return [symbol_color(self._cue, self.n_cues)]
        if phase == "query":
            return [QUERY_COLOR]
        if self._answer is not None:
            return [symbol_color(self._answer, self.n_cues)]
        return [EMPTY_COLOR]
