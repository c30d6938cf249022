"""Schedules of a hyperparameter over a run, as stable-baselines3 takes them: functions of the
remaining progress (1 at the start of ``learn``, 0 at its end)."""

from __future__ import annotations


class LateLinearDecay:
    """``start`` for the first ``decay_from`` share of the run, then linearly to ``end`` at its
    end: ``LateLinearDecay(1e-3, 1e-4, 0.8)`` keeps 1e-3 for 80% of the steps, gives 5.5e-4 at
    90% and 1e-4 at the end. ``decay_from=0`` is a linear decay over the whole run."""

    def __init__(self, start: float, end: float, decay_from: float = 0.0):
        if not 0.0 <= decay_from < 1.0:
            raise ValueError(f"decay_from must be in [0, 1), got {decay_from}")
        self.start, self.end, self.decay_from = start, end, decay_from

    def __call__(self, progress_remaining: float) -> float:
        done = 1.0 - progress_remaining
        if done <= self.decay_from:
            return self.start
        share = min(1.0, (done - self.decay_from) / (1.0 - self.decay_from))
        return self.start + (self.end - self.start) * share

    def __repr__(self) -> str:
        return f"LateLinearDecay(start={self.start}, end={self.end}, decay_from={self.decay_from})"
