"""Shared pieces of the recall tasks: argument checks, drawing, and the answer-scoring step."""

from __future__ import annotations

import colorsys
import operator
from typing import Any

import gymnasium as gym
import numpy as np

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


class RecallEnv(gym.Env[np.ndarray, np.int64]):
    """A task that shows something, waits, then scores one answer on its query step.

    Subclasses set ``episode_length``, ``action_space``, implement ``phase``, ``target``, ``_obs``
    and, for :meth:`render`, ``_describe`` and ``_panels``, and call :meth:`_start_episode` at the
    end of their ``reset``. Actions before the
    query are ignored (reward 0); the query step's action scores 1.0 if it equals ``target`` and
    ends the episode, with ``info = {"is_success": bool, "target": int}``.
    """

    _t = 0
    _answer: int | None = None
    _started = False

    @property
    def phase(self) -> str:
        raise NotImplementedError

    @property
    def target(self) -> int:
        raise NotImplementedError

    def _obs(self) -> np.ndarray:
        raise NotImplementedError

    def _describe(self, phase: str) -> str:
        """What the ``"ansi"`` line shows after the step counter and phase (:meth:`render` adds
        the verdict once the episode is done)."""
        raise NotImplementedError

    def _panels(self, phase: str) -> list[tuple[int, int, int]]:
        """The colours of the ``"rgb_array"`` frame's panels."""
        raise NotImplementedError

    def render(self) -> str | np.ndarray | None:  # type: ignore[override]
        """A text line (``"ansi"``) or a ``64x64x3`` uint8 frame (``"rgb_array"``)."""
        if self.render_mode is None or not self._started:
            return None
        phase = self.phase
        outcome = None if self._answer is None else self._answer == self.target
        if self.render_mode == "ansi":
            text = f"t={self._t}/{self.episode_length} {phase:<5}{self._describe(phase)}"
            if phase == "done":
                text += " correct" if outcome else " wrong"
            return text
        return draw_frame(self._panels(phase), phase, self._t / self.episode_length, outcome)

    def _start_episode(self) -> tuple[np.ndarray, dict[str, Any]]:
        self._t, self._answer, self._started = 0, None, True
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Advance one step; only the action on the query step is scored."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self.phase == "done":
            raise RuntimeError("episode has terminated; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r} for {self.action_space}")
        if self.phase != "query":
            self._t += 1
            return self._obs(), 0.0, False, False, {}
        self._answer = int(action)
        success = self._answer == self.target
        self._t += 1
        info = {"is_success": success, "target": self.target}
        return self._obs(), float(success), True, False, info
