"""Rollout storage for recurrent cores: whole chunks, with the core state kept at chunk starts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from mnm_rl.agent.policy import Observation, map_obs
from mnm_rl.memory import CoreState


@dataclass
class ChunkBatch:
    """A minibatch of ``N`` whole chunks, time-major: every tensor is ``[seq_len, N, ...]``.

    ``states`` is the core state before each chunk's first step (batch size ``N``). Every step is a
    real environment step: there is no padding, so every step enters the loss.
    """

    observations: Observation
    actions: Tensor
    episode_starts: Tensor
    old_values: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    returns: Tensor
    states: CoreState


class ChunkRolloutBuffer:
    """Stores ``n_steps`` steps of ``n_envs`` environments as tensors on ``device``.

    The rollout is cut into ``n_steps / seq_len`` chunks per environment; the recurrent state is
    stored only at each chunk's start (an MNM state holds ``L * D * D`` fast weights per env), and
    training re-runs each chunk through the core from there, resetting the state wherever
    ``episode_starts`` says a new episode began. ``seq_len`` is the truncated-BPTT length.
    """

    def __init__(
        self,
        n_steps: int,
        n_envs: int,
        observation_space: spaces.Space,
        seq_len: int,
        device: torch.device,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
    ):
        if n_steps % seq_len:
            raise ValueError(f"n_steps ({n_steps}) must be a multiple of seq_len ({seq_len})")
        self.n_steps, self.n_envs, self.seq_len = n_steps, n_envs, seq_len
        self.observation_space = observation_space
        self.device = device
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.observations: Observation | None = None
        self.reset()

    @property
    def n_chunks(self) -> int:
        """Chunks in one rollout, all environments together."""
        return self.n_steps // self.seq_len * self.n_envs

    def reset(self) -> None:
        shape, dev = (self.n_steps, self.n_envs), self.device
        self.actions = torch.zeros(shape, dtype=torch.long, device=dev)
        self.rewards = torch.zeros(shape, device=dev)
        self.episode_starts = torch.zeros(shape, device=dev)
        self.values = torch.zeros(shape, device=dev)
        self.log_probs = torch.zeros(shape, device=dev)
        self.advantages = torch.zeros(shape, device=dev)
        self.returns = torch.zeros(shape, device=dev)
        self.chunk_states: list[CoreState] = []
        self._chunked_observations: Observation | None = None
        self._chunk_start_states: CoreState | None = None
        self.pos = 0

    def add(
        self,
        obs: Observation,
        action: Tensor,
        reward: Tensor,
        episode_start: Tensor,
        value: Tensor,
        log_prob: Tensor,
        state: CoreState,
    ) -> None:
        """Store one step for all envs; ``state`` is the core state *before* this step."""
        if self.pos >= self.n_steps:
            raise RuntimeError("rollout buffer is full")
        if self.observations is None:
            self.observations = map_obs(
                obs,
                lambda v: torch.zeros((self.n_steps, *v.shape), dtype=v.dtype, device=self.device),
            )
        self._chunked_observations = self._chunk_start_states = None
        if isinstance(obs, dict):
            for k, v in obs.items():
                self.observations[k][self.pos] = v
        else:
            self.observations[self.pos] = obs
        if self.pos % self.seq_len == 0:
            # clone: the state may share memory with a parameter (the initial fast weights)
            self.chunk_states.append(state.detach().clone())
        for buf, x in (
            (self.actions, action),
            (self.rewards, reward),
            (self.episode_starts, episode_start),
            (self.values, value),
            (self.log_probs, log_prob),
        ):
            buf[self.pos] = x
        self.pos += 1

    @property
    def full(self) -> bool:
        return self.pos == self.n_steps

    def compute_returns_and_advantage(self, last_values: Tensor, dones: Tensor) -> None:
        """Generalised advantage estimation (as stable-baselines3's RolloutBuffer).

        The TD errors are computed for all steps at once; the backward recursion over time runs
        in numpy on the host, where each of its ``n_steps`` tiny steps costs about a microsecond
        instead of a dozen torch ops (same float32 arithmetic, same order).
        """
        values = self.values.cpu().numpy()
        non_terminal = 1.0 - np.concatenate(
            [self.episode_starts[1:].cpu().numpy(), dones.float().cpu().numpy()[None]]
        )
        next_values = np.concatenate([values[1:], last_values.cpu().numpy()[None]])
        deltas = self.rewards.cpu().numpy() + self.gamma * next_values * non_terminal - values
        decay = self.gamma * self.gae_lambda * non_terminal
        advantages = np.empty_like(deltas)
        last_gae = np.zeros(self.n_envs, dtype=deltas.dtype)
        for t in reversed(range(self.n_steps)):
            last_gae = deltas[t] + decay[t] * last_gae
            advantages[t] = last_gae
        self.advantages = torch.as_tensor(advantages, device=self.device)
        self.returns = self.advantages + self.values

    def _as_chunks(self, x: Tensor) -> Tensor:
        """``[n_steps, n_envs, ...] -> [seq_len, n_chunks, ...]``; chunk ``c * n_envs + e``."""
        per_env = self.n_steps // self.seq_len
        x = x.reshape(per_env, self.seq_len, self.n_envs, *x.shape[2:]).transpose(0, 1)
        return x.reshape(self.seq_len, per_env * self.n_envs, *x.shape[3:])

    def minibatches(
        self, chunks_per_batch: int, generator: torch.Generator | None = None
    ) -> Iterator[ChunkBatch]:
        """Shuffled minibatches of whole chunks (the last one may be smaller)."""
        if not self.full:
            raise RuntimeError(f"rollout buffer holds {self.pos} of {self.n_steps} steps")
        assert self.observations is not None
        if self._chunked_observations is None:  # once per rollout, not once per epoch
            self._chunked_observations = map_obs(self.observations, self._as_chunks)
        obs = self._chunked_observations
        fields = [
            self._as_chunks(x)
            for x in (
                self.actions,
                self.episode_starts,
                self.values,
                self.log_probs,
                self.advantages,
                self.returns,
            )
        ]
        if self._chunk_start_states is None:  # chunk c's states are rows c*n_envs .. +n_envs
            self._chunk_start_states = CoreState.cat(self.chunk_states)
        states = self._chunk_start_states
        order = torch.randperm(self.n_chunks, generator=generator).to(self.device)
        for start in range(0, self.n_chunks, chunks_per_batch):
            idx = order[start : start + chunks_per_batch]
            yield ChunkBatch(
                map_obs(obs, lambda v, i=idx: v.index_select(1, i)),
                *(f.index_select(1, idx) for f in fields),
                states=states.index(idx),
            )
