"""Delayed cue recall: remember one of K symbols across a blank delay, then name it.

Also holds the small numpy drawing helpers shared by the package's environments.
"""

from __future__ import annotations

import colorsys
import operator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

#: Side of the square ``rgb_array`` frames, in pixels.
FRAME_SIZE = 64

_PHASE_COLORS: dict[str, tuple[int, int, int]] = {
    "cue": (40, 110, 230),
    "store": (40, 110, 230),
    "delay": (110, 110, 110),
    "query": (240, 200, 30),
    "done": (200, 200, 200),
}
#: Panel colour of a blank step and of the unanswered query.
EMPTY_COLOR = (35, 35, 35)
QUERY_COLOR = (250, 250, 250)
_CORRECT = (40, 200, 70)
_WRONG = (220, 40, 40)


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an ``int``; raise ``ValueError`` unless it is an integer >= minimum."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def check_render_mode(render_mode: str | None, modes: list[str]) -> str | None:
    """Validate ``render_mode`` against the declared ``modes`` (``None`` disables rendering)."""
    if render_mode is not None and render_mode not in modes:
        raise ValueError(f"render_mode must be None or one of {modes}, got {render_mode!r}")
    return render_mode


def symbol_color(symbol: int, n_symbols: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for ``symbol`` out of ``n_symbols`` (evenly spaced hues)."""
    r, g, b = colorsys.hsv_to_rgb(symbol / n_symbols, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_frame(
    panels: list[tuple[int, int, int]],
    phase: str,
    progress: float,
    outcome: bool | None = None,
) -> np.ndarray:
    """Draw a ``FRAME_SIZE`` x ``FRAME_SIZE`` RGB frame.

    A top bar coloured by ``phase``, one filled square per entry of ``panels`` side by side, a
    bottom progress bar filled to ``progress`` in [0, 1], and, when ``outcome`` is not ``None``, a
    green (correct) or red (wrong) border around the last panel.
    """
    frame = np.zeros((FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)
    frame[:8] = _PHASE_COLORS[phase]
    margin, gap = 6, 4
    top, bottom = 14, FRAME_SIZE - 14
    width = (FRAME_SIZE - 2 * margin - gap * (len(panels) - 1)) // len(panels)
    for i, color in enumerate(panels):
        left = margin + i * (width + gap)
        frame[top:bottom, left : left + width] = color
        if outcome is not None and i == len(panels) - 1:
            border = _CORRECT if outcome else _WRONG
            frame[top - 2 : bottom + 2, left - 2 : left + width + 2][:, :2] = border
            frame[top - 2 : bottom + 2, left - 2 : left + width + 2][:, -2:] = border
            frame[top - 2 : top, left - 2 : left + width + 2] = border
            frame[bottom : bottom + 2, left - 2 : left + width + 2] = border
    filled = int(round(np.clip(progress, 0.0, 1.0) * FRAME_SIZE))
    frame[FRAME_SIZE - 6 :, :filled] = (255, 255, 255)
    frame[FRAME_SIZE - 6 :, filled:] = (60, 60, 60)
    return frame


class DelayedCueRecallEnv(gym.Env[np.ndarray, np.int64]):
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
        self._t = 0
        self._answer: int | None = None

    @property
    def cue(self) -> int:
        """The cue of the current episode (the correct answer)."""
        if self._cue is None:
            raise RuntimeError("call reset() before reading the cue")
        return self._cue

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
        self._t = 0
        self._answer = None
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Advance one step; only the action on the query step is scored."""
        if self._cue is None:
            raise RuntimeError("call reset() before step()")
        if self.phase == "done":
            raise RuntimeError("episode has terminated; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r} for {self.action_space}")
        if self.phase != "query":
            self._t += 1
            return self._obs(), 0.0, False, False, {}
        self._answer = int(action)
        success = self._answer == self._cue
        self._t += 1
        info = {"is_success": success, "target": self._cue}
        return self._obs(), float(success), True, False, info

    def render(self) -> str | np.ndarray | None:  # type: ignore[override]
        """A text line (``"ansi"``) or a ``64x64x3`` uint8 frame (``"rgb_array"``)."""
        if self.render_mode is None or self._cue is None:
            return None
        phase = self.phase
        outcome = None if self._answer is None else self._answer == self._cue
        if self.render_mode == "ansi":
            text = f"t={self._t}/{self.episode_length} {phase:<5}"
            if phase == "cue":
                text += f" cue={self._cue}"
            elif phase == "done":
                verdict = "correct" if outcome else "wrong"
                text += f" answer={self._answer} cue={self._cue} {verdict}"
            return text
        if phase == "cue":
            panel = symbol_color(self._cue, self.n_cues)
        elif phase == "query":
            panel = QUERY_COLOR
        elif self._answer is not None:
            panel = symbol_color(self._answer, self.n_cues)
        else:
            panel = EMPTY_COLOR
        return draw_frame([panel], phase, self._t / self.episode_length, outcome)
