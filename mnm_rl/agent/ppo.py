"""Recurrent PPO with a memory core, on stable-baselines3's on-policy machinery."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import (
    FloatSchedule,
    explained_variance,
)
from stable_baselines3.common.vec_env import VecEnv

from mnm_rl.agent import explicit, gradient_step, policy_step
from mnm_rl.agent.buffer import ChunkBatch, ChunkRolloutBuffer
from mnm_rl.agent.policy import RecurrentMemoryPolicy, check_action_space
from mnm_rl.agent.ppo_loss import (
    STAT_NAMES,
    LossSettings,
    RolloutSteps,
    ppo_loss,
    ppo_loss_explicit,
)
from mnm_rl.agent.ppo_loss import load_extension as load_loss_kernel
from mnm_rl.memory import CoreState
from mnm_rl.memory.base import diagnostics_summary
from mnm_rl.memory.base import memory_loss as core_memory_loss

SelfMemoryPPO = TypeVar("SelfMemoryPPO", bound="MemoryPPO")


class NonFiniteError(FloatingPointError):
    """A loss, gradient or fast weight became NaN or infinite (the update was not applied), or
    the policy's output did during a rollout (no action can be sampled from it)."""


class MemoryPPO(OnPolicyAlgorithm):
    """Proximal Policy Optimisation with a recurrent memory core (MNM, LSTM, GRU or none).

    Follows stable-baselines3's PPO; the differences are recurrent:

    * the rollout threads the core state through every step; the state is stored only at the start
      of each ``seq_len``-step chunk, and training re-runs whole chunks ``[seq_len, n_chunks]``
      from those states with the in-chunk episode resets (truncated BPTT of length ``seq_len``);
    * the loss adds ``mem_coef`` times the memory's post-write reconstruction loss plus its
      retention loss (MNM cores; the retention loss is zero unless the core has a
      ``retention_lag``).

    Args (beyond SB3's PPO):
        core: memory core name, a shortcut for ``policy_kwargs["core"]``.
        seq_len: chunk length for training and truncated backpropagation through time.
        batch_size: environment steps per minibatch; a multiple of ``seq_len``.
        mem_coef: weight of the memory's reconstruction (meta-)loss.
        ent_coef: the entropy bonus, a constant or, like ``learning_rate`` and ``clip_range``, a
            function of the remaining progress (1 at the start of ``learn``, 0 at the end),
            e.g. ``stable_baselines3.common.utils.LinearSchedule(0.1, 0.01, 0.5)``; logged as
            ``train/ent_coef``.
        on_nonfinite: ``"stop"`` raises :class:`NonFiniteError` when a loss, the gradients or the
            fast weights go NaN/inf (the update is not applied); ``"skip"`` skips and counts.
    """

    policy_aliases: ClassVar[dict[str, type]] = {"MemoryPolicy": RecurrentMemoryPolicy}
    policy: RecurrentMemoryPolicy

    def __init__(
        self,
        policy: str | type[RecurrentMemoryPolicy] = "MemoryPolicy",
        env: GymEnv | str | None = None,
        core: str | None = None,
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 128,
        batch_size: int = 256,
        seq_len: int = 16,
        n_epochs: int = 4,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = True,
        ent_coef: float | Schedule = 0.01,
        vf_coef: float = 0.5,
        mem_coef: float = 1.0,
        max_grad_norm: float = 0.5,
        target_kl: float | None = None,
        on_nonfinite: str = "stop",
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        policy_kwargs = dict(policy_kwargs or {})
        if core is not None:
            policy_kwargs["core"] = core
        for name, value in (
            ("n_steps", n_steps),
            ("batch_size", batch_size),
            ("seq_len", seq_len),
            ("n_epochs", n_epochs),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if n_steps % seq_len:
            raise ValueError(f"n_steps ({n_steps}) must be a multiple of seq_len ({seq_len})")
        if batch_size % seq_len:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of seq_len ({seq_len})")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=False,
            sde_sample_freq=-1,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.mem_coef = mem_coef
        self.target_kl = target_kl
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.nonfinite_skips = 0
        #: The env step at which the training envs' curriculum was switched off (``None``: not
        #: switched off). Set by the training loop; saved with the model, so that a run resumed
        #: from a checkpoint keeps training without it.
        self.train_wrappers_ended_at: int | None = None
        self._last_state: CoreState | None = None
        if getattr(self, "action_space", None) is not None:
            check_action_space(self.action_space)
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        ).to(self.device)
        self.rollout_buffer = ChunkRolloutBuffer(  # type: ignore[assignment]
            self.n_steps,
            self.n_envs,
            self.observation_space,
            self.seq_len,
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
        )
        self.clip_range = FloatSchedule(self.clip_range)
        # The entropy bonus may follow a schedule of the remaining progress, like clip_range.
        self.ent_coef_schedule = FloatSchedule(self.ent_coef)
        if self.clip_range_vf is not None:
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_state"]

    def _setup_learn(
        self,
        total_timesteps,
        callback=None,
        reset_num_timesteps=True,
        tb_log_name="run",
        progress_bar=False,
    ):
        if self._last_state is None:
            self._last_obs = None  # a loaded model restarts its envs' episodes
        total, callback = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if reset_num_timesteps or self._last_state is None:
            self._last_state = self.policy.initial_state(self.n_envs)
        return total, callback

    def _update_info_buffer(
        self,
        infos: list[dict[str, Any]],
        dones: np.ndarray | None = None,
        rewards: np.ndarray | None = None,
    ):
        """Episode statistics; given the step's ``rewards``, an episode succeeds when its final
        reward is positive."""
        assert self.ep_info_buffer is not None and self.ep_success_buffer is not None
        # Only finished episodes carry statistics: look at those envs, not at every env.
        finished = range(len(infos)) if dones is None else np.flatnonzero(dones)
        for i in finished:
            episode = infos[i].get("episode")
            if episode is not None:
                self.ep_info_buffer.extend([episode])
        if dones is not None and rewards is not None:
            self.ep_success_buffer.extend((rewards[finished] > 0).astype(float).tolist())

    # -------------------------------------------------------------------------------- rollout
    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        buffer: ChunkRolloutBuffer = rollout_buffer  # type: ignore[assignment]
        assert self._last_obs is not None and self._last_state is not None
        self.policy.set_training_mode(False)
        buffer.reset()
        callback.on_rollout_start()
        state = self._last_state
        # The buffer keeps each step's inputs where the update reads them, and hands them to the
        # policy as tensors (views): the env's numpy arrays are copied once, into the buffer.
        obs, starts = buffer.start(self._last_obs, self._last_episode_starts)
        # The compiled steps' constant arguments are gathered once for the rollout (steps.plan).
        # Each step after the first begins as soon as its inputs are stored, on a thread of the
        # compiled step's own where that pays (an MNM core's: policy_step.step_thread), and runs
        # while this thread stores the step before it and runs the callbacks; the same steps and
        # draws as one after the other (tests/test_step_thread.py).
        steps = policy_step.rollout_steps(self.policy) if self.device.type == "cpu" else None
        # inference_mode, not no_grad: no version counters or view tracking (about 12% of a
        # policy step). What leaves it is copied into the buffer or, for the recurrent state,
        # cloned into ordinary tensors at chunk starts and at the end of the rollout.
        with torch.inference_mode():
            pending = self.policy.act_later(obs, state, starts, steps)
        for n in range(n_rollout_steps):
            step = pending()
            if not step.finite:
                raise NonFiniteError(
                    f"non-finite policy output (action logits) in the rollout at step "
                    f"{self.num_timesteps}: an observation or the recurrent state holds NaN "
                    "or inf; no update was made from this rollout"
                )
            # named as stable-baselines3's rollout names them, for callbacks that read locals
            actions, log_probs, values, new_state, _ = step
            new_obs, rewards, dones, infos = env.step(actions.cpu().numpy())
            self.num_timesteps += env.num_envs
            obs, starts = buffer.store_next(new_obs, dones)
            # the next step; after the last one, the critic's value of the last observation
            with torch.inference_mode():
                pending = self.policy.act_later(
                    obs, new_state, starts, steps, deterministic=n == n_rollout_steps - 1
                )
            callback.update_locals(locals())
            if not callback.on_step():
                pending()  # the step under way ends before the rollout does
                return False
            if dones.any():  # episode statistics and time-limit bootstraps: ended episodes only
                self._update_info_buffer(infos, dones, rewards)
                if any(infos[i].get("TimeLimit.truncated") for i in np.flatnonzero(dones)):
                    pending()  # the step under way ends before the bootstrap's own step
                rewards = self._bootstrap_truncated(rewards, dones, infos, new_state)
            buffer.add_outputs(actions, rewards, values, log_probs, state)
            state = new_state
            self._last_obs, self._last_episode_starts = new_obs, dones
        self._last_state = state.detach().clone()  # an ordinary tensor again, usable anywhere
        last_values = pending().values
        buffer.compute_returns_and_advantage(last_values, starts)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _bootstrap_truncated(
        self, rewards: np.ndarray, dones: np.ndarray, infos: list[dict[str, Any]], state: CoreState
    ) -> np.ndarray:
        """Add ``gamma * V(terminal obs)`` to the reward of episodes cut by a time limit.

        ``V`` is the critic's value after one more step of the core from ``state`` (the state
        after this step) on the terminal observation: :meth:`RecurrentMemoryPolicy.act` with the
        most likely action, which draws nothing from the generator and on the CPU is the one
        compiled call of a rollout step where the policy has one."""
        truncated = [
            i
            for i in np.flatnonzero(dones).tolist()
            if infos[i].get("TimeLimit.truncated", False)
            and infos[i].get("terminal_observation") is not None
        ]
        if not truncated:
            return rewards
        rewards = rewards.astype(np.float32, copy=True)
        terminal = self.policy.obs_to_tensor(
            _stack_obs([infos[i]["terminal_observation"] for i in truncated])
        )[0]
        with torch.inference_mode():
            step = self.policy.act(
                terminal,
                state.index(truncated),
                torch.zeros(len(truncated), device=self.device),
                deterministic=True,
            )
        rewards[truncated] += self.gamma * step.values.cpu().numpy()
        return rewards

    def _update_learning_rate(self, optimizers) -> None:
        """The scheduled learning rate, times each optimizer group's ``lr_scale`` (the policy's
        ``memory_lr_scale`` for the memory's parameters, 1 for the rest)."""
        super()._update_learning_rate(optimizers)  # logs it and sets every group's lr to it
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_scale", 1.0)

    # ---------------------------------------------------------------------------------- train
    def train(self) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        ent_coef = self.ent_coef_schedule(self._current_progress_remaining)
        clip_range_vf = (
            None
            if self.clip_range_vf is None
            else self.clip_range_vf(self._current_progress_remaining)
        )
        buffer: ChunkRolloutBuffer = self.rollout_buffer  # type: ignore[assignment]
        stats: dict[str, list[float]] = {}

        def record(**values: torch.Tensor | float) -> None:
            for k, v in values.items():
                stats.setdefault(k, []).append(float(v))

        params = list(self.policy.parameters())  # walk the module tree once, not per minibatch
        try_explicit = not explicit.has_gradient_hooks(params)
        continue_training = True
        for _ in range(self.n_epochs):
            approx_kls = []
            for batch in buffer.minibatches(self.batch_size // self.seq_len):
                loss, approx_kl, checks, backward = self._loss(
                    batch, clip_range, clip_range_vf, ent_coef, record, try_explicit
                )
                if self._skip_nonfinite(checks):
                    continue
                approx_kls.append(approx_kl)
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(
                            f"Early stopping at step {self._n_updates} (approx_kl {approx_kl:.3f})"
                        )
                    break
                gradient_step.zero_grad(self.policy.optimizer)
                backward()
                # An explicit pass's backward keeps what it saved while it is referenced (a
                # graph frees its buffers in backward()): let it go before the next minibatch.
                del backward
                grad_norm = gradient_step.clip_grad_norm(params, self.max_grad_norm)
                if self._skip_nonfinite({"gradients": grad_norm}):
                    gradient_step.zero_grad(self.policy.optimizer)
                    continue
                gradient_step.adam_step(self.policy.optimizer)
            self._n_updates += 1
            if not continue_training:
                break

        values, returns = buffer.values.flatten(), buffer.returns.flatten()
        explained_var = explained_variance(values.cpu().numpy(), returns.cpu().numpy())
        for key, series in stats.items():
            self.logger.record(key, float(np.mean(series)))
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/nonfinite_skips", self.nonfinite_skips)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        self.logger.record("train/ent_coef", ent_coef)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def _loss(
        self,
        batch: ChunkBatch,
        clip_range: float,
        clip_range_vf: float | None,
        ent_coef: float,
        record,
        try_explicit: bool = True,
    ):
        """The minibatch's loss, approx_kl, the values to check for finiteness, and the backward
        pass that stores the loss's gradients in the parameters' ``.grad``: without autograd
        where ``try_explicit`` and every piece of the policy has an explicit pass
        (:mod:`mnm_rl.agent.explicit`), else ``loss.backward``."""
        steps = RolloutSteps(
            batch.actions, batch.old_log_probs, batch.advantages, batch.returns, batch.old_values
        )
        settings = LossSettings(
            clip_range, clip_range_vf, ent_coef, self.vf_coef, self.normalize_advantage
        )
        passed = (
            self.policy.explicit_forward_sequence(
                batch.observations, batch.states, batch.episode_starts, self.mem_coef
            )
            if try_explicit and load_loss_kernel() is not None
            else None
        )
        explicit_loss = None if passed is None else ppo_loss_explicit(*passed[:2], steps, settings)
        aux: Mapping[str, torch.Tensor]
        if explicit_loss is not None:
            loss, stats, grad_logits, grad_values = explicit_loss
            _, _, aux, policy_backward = passed

            def backward() -> None:
                explicit.apply_gradients(policy_backward(grad_logits, grad_values))
        else:
            logits, values, _, aux = self.policy.forward_sequence(
                batch.observations, batch.states, batch.episode_starts
            )
            loss, stats = ppo_loss(logits, values, steps, settings)
            backward = None  # loss.backward, once the memory loss is added below
        policy_loss, value_loss, entropy_loss, approx_kl, _ = terms = stats.tolist()
        checks = {"policy loss": policy_loss, "value loss": value_loss, "entropy": entropy_loss}
        record(**{f"train/{name}": value for name, value in zip(STAT_NAMES, terms, strict=True)})
        if aux:
            summary = diagnostics_summary(aux)
            checks["memory loss"] = summary["memory_loss"]
            checks["fast weights"] = summary["max_fast_weight_norm"]
            record(
                **{
                    "train/memory_loss": summary["memory_loss"],
                    "train/retention_loss": summary["recon_retained"],
                    "memory/beta_mean": summary["beta"],
                    "memory/write_gain": summary["recon_before"] - summary["recon_after"],
                    "memory/fast_weight_norm": summary["fast_weight_norm"],
                }
            )
            if backward is None:  # autograd's backward needs the memory loss in the graph
                loss = loss + self.mem_coef * core_memory_loss(aux)
            else:  # the explicit pass has its gradient already: only its value
                loss = loss + self.mem_coef * summary["memory_loss"]
        record(**{"train/loss": loss.item()})
        return loss, approx_kl, checks, backward or loss.backward

    def _skip_nonfinite(self, checks: dict[str, float]) -> bool:
        """True (after counting and logging) when a checked quantity is NaN or infinite.

        The update is never applied. With ``on_nonfinite="stop"`` (default) a
        :class:`NonFiniteError` naming the quantity stops training; with ``"skip"`` the minibatch
        is skipped and counted in ``train/nonfinite_skips``.
        """
        bad = [name for name, value in checks.items() if not math.isfinite(value)]
        if not bad:
            return False
        self.nonfinite_skips += 1
        message = (
            f"non-finite {', '.join(bad)} at update {self._n_updates} "
            f"(step {self.num_timesteps}); the update was not applied"
        )
        if self.on_nonfinite == "stop":
            raise NonFiniteError(message)
        warnings.warn(message + "; skipping the minibatch", RuntimeWarning, stacklevel=2)
        return True

    # -------------------------------------------------------------------------------- predict
    def predict(
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: CoreState | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, CoreState]:
        """Same contract as sb3-contrib's RecurrentPPO: thread ``state`` through calls."""
        return self.policy.predict(observation, state, episode_start, deterministic)

    def learn(
        self: SelfMemoryPPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "MemoryPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMemoryPPO:
        if total_timesteps < 1:
            raise ValueError(f"total_timesteps must be positive, got {total_timesteps}")
        return super().learn(
            total_timesteps, callback, log_interval, tb_log_name, reset_num_timesteps, progress_bar
        )


def _stack_obs(observations: list[Any]) -> Any:
    if isinstance(observations[0], dict):
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


__all__ = ["MemoryPPO", "NonFiniteError"]
