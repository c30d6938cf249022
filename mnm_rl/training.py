"""Training a run: build :class:`~mnm_rl.agent.MemoryPPO` from a resolved config, log to
TensorBoard, show progress, write checkpoints, and resume from them.

The agent knows nothing of this module; this module only calls the agent's public API.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure

from mnm_rl.agent import MemoryPPO, NonFiniteError
from mnm_rl.config import ConfigError, RunConfig
from mnm_rl.env_factory import end_train_wrappers, make_vec_env, train_base_seed
from mnm_rl.memory import fused
from mnm_rl.runs import (
    MODEL_FILE,
    TB_DIR,
    CheckpointError,
    checkpoint_path,
    checkpoint_steps,
    latest_model,
    policy_file_for,
    save_model,
)
from mnm_rl.safe_policy import save_policy_file


class TrainingInterrupted(Exception):
    """Training stopped on request (a signal); ``path`` is the checkpoint saved on the way out."""

    def __init__(self, path: Path, num_timesteps: int):
        super().__init__(f"interrupted at {num_timesteps} env steps; saved {path}")
        self.path = path
        self.num_timesteps = num_timesteps


class TrainingFault(Exception):
    """Training stopped on a non-finite loss, gradient or fast weight (the update not applied)."""


def save_checkpoint(model: MemoryPPO, path: Path) -> Path:
    """Save the SB3 model at ``path`` and its safe policy file next to it, both atomically.

    The policy file is written first, so every model file on disk has its policy file.
    """
    save_policy_file(model, policy_file_for(path))
    return save_model(model, path)


class StopOnRequest(BaseCallback):
    """Stop ``learn`` cleanly at the next env step once ``event`` is set (by a signal handler)."""

    def __init__(self, event: threading.Event):
        super().__init__()
        self.event = event

    def _on_step(self) -> bool:
        return not self.event.is_set()


class ProgressBar(BaseCallback):
    """A tqdm bar over env steps with the throughput and the rollout success rate."""

    def __init__(self, total_timesteps: int, refresh_s: float = 1.0):
        super().__init__()
        self.total_timesteps = total_timesteps
        self.refresh_s = refresh_s
        self.bar = None

    def _on_training_start(self) -> None:
        from tqdm import tqdm

        self._start_steps = self.model.num_timesteps
        self._start_time = self._last_refresh = time.monotonic()
        self.bar = tqdm(
            total=self.total_timesteps,
            initial=self._start_steps,
            unit="step",
            unit_scale=True,
            dynamic_ncols=True,
            mininterval=self.refresh_s,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]",
        )

    def _on_step(self) -> bool:
        now = time.monotonic()
        if self.bar is not None and now - self._last_refresh >= self.refresh_s:
            self._refresh(now)
        return True

    def _refresh(self, now: float) -> None:
        self._last_refresh = now
        steps = self.model.num_timesteps
        fps = (steps - self._start_steps) / max(now - self._start_time, 1e-9)
        buffer = self.model.ep_success_buffer
        success = f"{np.mean(buffer):.2f}" if buffer else "-"
        self.bar.set_postfix_str(f"fps={fps:.0f} success={success}", refresh=False)
        self.bar.total = max(self.bar.total, steps)  # the last rollout may overshoot the total
        self.bar.update(steps - self.bar.n)

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self._refresh(time.monotonic())
            self.bar.close()
            self.bar = None


class PeriodicCheckpoint(BaseCallback):
    """Save the model to ``checkpoints/step_<N>.zip`` every ``every`` env steps (atomically)."""

    def __init__(self, run_dir: Path, every: int):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.every = every
        self.saved: list[Path] = []

    def _on_training_start(self) -> None:
        self._next = (self.model.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        steps = self.model.num_timesteps
        if steps >= self._next:
            self.saved.append(save_checkpoint(self.model, checkpoint_path(self.run_dir, steps)))
            while self._next <= steps:
                self._next += self.every
        return True


class PeriodicEval(BaseCallback):
    """Evaluate on the env's held-out seeds every ``every`` env steps and at the end of training.

    Logs ``eval/success_rate``, ``eval/mean_return`` and ``eval/mean_length`` to TensorBoard at the
    exact env step of the evaluation, so a run has a held-out learning curve.
    """

    def __init__(self, spec, every: int, episodes: int, deterministic: bool = True):
        super().__init__()
        self.spec = spec
        self.every = every
        self.episodes = min(episodes, len(spec.eval_seeds))
        self.deterministic = deterministic
        self.history: list[tuple[int, float]] = []

    def _on_training_start(self) -> None:
        self._next = (self.model.num_timesteps // self.every + 1) * self.every

    def _evaluate(self) -> None:
        from mnm_rl.evaluation import run_episodes, summarize

        steps = self.model.num_timesteps
        summary = summarize(run_episodes(self.model, self.spec, self.episodes, self.deterministic))
        for key in ("success_rate", "mean_return", "mean_length"):
            self.logger.record(f"eval/{key}", summary[key])
        self.logger.dump(step=steps)
        self.history.append((steps, float(summary["success_rate"])))

    def _on_step(self) -> bool:
        if self.model.num_timesteps >= self._next:
            self._evaluate()
            while self._next <= self.model.num_timesteps:
                self._next += self.every
        return True

    def _on_training_end(self) -> None:
        if not self.history or self.history[-1][0] < self.model.num_timesteps:
            self._evaluate()


class EndTrainWrappers(BaseCallback):
    """Switch the training envs' ``train_wrappers`` off once the run reaches ``until`` env steps,
    or once at least ``until_success`` of the last ``window`` finished training episodes
    succeeded (a positive final reward), whichever comes first. A run resumed from a checkpoint
    saved after the switch, or already past ``until``, trains without them from the start.
    Records the switch in ``model.train_wrappers_ended_at`` and logs ``train/train_wrappers``
    (1 while they apply, 0 after)."""

    def __init__(
        self, until: int | None = None, until_success: float | None = None, window: int = 100
    ):
        super().__init__()
        if until is None and until_success is None:
            raise ValueError("EndTrainWrappers needs until, until_success or both")
        self.until, self.until_success = until, until_success
        self.outcomes: deque[bool] = deque(maxlen=window)
        self.ended = False

    def _on_training_start(self) -> None:
        if self.model.train_wrappers_ended_at is not None:
            self._end()
        self._check()

    def _on_step(self) -> bool:
        if self.ended:
            return True
        if self.until_success is not None:
            # the step's outcome as collect_rollouts sees it, before any bootstrap of timeouts
            finished = np.flatnonzero(self.locals["dones"])
            self.outcomes.extend((self.locals["rewards"][finished] > 0).tolist())
        self._check()
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("train/train_wrappers", 0 if self.ended else 1)

    def _check(self) -> None:
        if self.ended:
            return
        by_steps = self.until is not None and self.model.num_timesteps >= self.until
        by_success = (
            self.until_success is not None
            and len(self.outcomes) == self.outcomes.maxlen
            and sum(self.outcomes) >= self.until_success * len(self.outcomes)
        )
        if by_steps or by_success:
            self._end()
            self.model.train_wrappers_ended_at = self.model.num_timesteps

    def _end(self) -> None:
        if end_train_wrappers(self.model.get_env()) == 0:
            raise RuntimeError("the curriculum is set to end but no training env has a gate")
        self.ended = True


def build_model(config: RunConfig, env) -> MemoryPPO:
    """A fresh :class:`MemoryPPO` for ``config`` on ``env``."""
    try:
        return MemoryPPO(
            env=env,
            seed=config.train.seed,
            device=config.train.device,
            **config.agent.model_kwargs(),
        )
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"cannot build the agent: {str(err).splitlines()[0]}") from None


def check_device(device: str) -> None:
    """:class:`ConfigError` unless ``device`` names a usable torch device."""
    try:
        torch.device(device if device != "auto" else "cpu")
    except RuntimeError as err:
        raise ConfigError(f"bad --device {device!r}: {err}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")


def train_run(
    config: RunConfig,
    run_dir: Path,
    resume_from: Path | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> MemoryPPO:
    """Train until ``config.train.timesteps`` env steps, starting fresh or from a checkpoint.

    Writes TensorBoard events to ``run_dir/tb``, periodic checkpoints and the final
    ``run_dir/model.zip`` (each with its safe policy file). Once ``stop`` is set (the CLI's
    signal handlers set it), training ends at the next env step, a checkpoint is saved and
    :class:`TrainingInterrupted` is raised. A non-finite loss, gradient or fast weight raises
    :class:`TrainingFault` naming it; the update is not applied and no checkpoint is written, so
    the last one on disk is the last good one. TensorBoard events are flushed in every case.
    """
    train = config.train
    check_device(train.device)
    if train.torch_threads is not None:
        torch.set_num_threads(train.torch_threads)
    fused.set_kernel_threads(train.kernel_threads)
    try:  # MNM_RL_KERNEL_THREADS is read at every kernel call: a bad value fails here, once
        fused.kernel_threads()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    done = checkpoint_steps(resume_from) if resume_from is not None else 0
    remaining = train.timesteps - done
    if remaining <= 0:
        raise ConfigError(
            f"the run already has {done} env steps; pass --timesteps larger than {done}"
        )
    env = make_vec_env(
        config.env,
        train.n_envs,
        train_base_seed(config.env, train.seed, train.n_envs, done),
        env_workers=train.env_workers,
    )
    try:
        if resume_from is None:
            model = build_model(config, env)
        else:
            model = MemoryPPO.load(resume_from, env=env, device=train.device)
    except BaseException:
        env.close()  # stops env worker processes, if any
        raise
    model.set_logger(configure(str(Path(run_dir) / TB_DIR), ["tensorboard"]))
    checkpointer = PeriodicCheckpoint(run_dir, train.checkpoint_every)
    callbacks: list[BaseCallback] = [checkpointer]
    if stop is not None:
        callbacks.insert(0, StopOnRequest(stop))
    if train.eval_every > 0:
        callbacks.append(
            PeriodicEval(
                config.env, train.eval_every, train.eval_every_episodes, train.eval_deterministic
            )
        )
    if config.env.train_wrappers_end:
        callbacks.append(
            EndTrainWrappers(
                config.env.train_wrappers_until,
                config.env.train_wrappers_until_success,
                config.env.train_wrappers_window,
            )
        )
    if progress:
        callbacks.append(ProgressBar(train.timesteps))
    try:
        model.learn(
            remaining,
            callback=CallbackList(callbacks),
            reset_num_timesteps=resume_from is None,
        )
        if stop is not None and stop.is_set():
            path = save_checkpoint(model, checkpoint_path(run_dir, model.num_timesteps))
            raise TrainingInterrupted(path, model.num_timesteps)
        save_checkpoint(model, Path(run_dir) / MODEL_FILE)
    except NonFiniteError as err:
        raise TrainingFault(f"{err}; {_last_good(run_dir)}") from None
    finally:
        model.logger.close()  # flushes the TensorBoard writer
        env.close()
    return model


def _last_good(run_dir: Path) -> str:
    try:
        return f"the last good checkpoint is {latest_model(run_dir)}"
    except (CheckpointError, ConfigError):
        return "no checkpoint was written before it"


__all__ = [
    "EndTrainWrappers",
    "PeriodicCheckpoint",
    "StopOnRequest",
    "TrainingFault",
    "TrainingInterrupted",
    "PeriodicEval",
    "ProgressBar",
    "build_model",
    "check_device",
    "save_checkpoint",
    "train_run",
]
