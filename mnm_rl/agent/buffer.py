"""Rollout storage for recurrent cores: whole chunks, with the core state kept at chunk starts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


class _Rows:
    """Row-by-row writes into a ``[n, ...]`` tensor, and its rows as tensors.

    A rollout writes one row of each of its tensors per env step. On the CPU the rows are
    written through numpy views of the tensor (``benchmarks/rollout_glue.py``: 0.13 us a row,
    against 1.44 us for a tensor row assignment and 0.88 us for ``copy_`` into a row view); on
    any other device with ``copy_``.
    """

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.arrays = list(tensor.numpy()) if tensor.device.type == "cpu" else None
        self._views: tuple[Tensor, ...] | None = None

    def view(self, t: int) -> Tensor:
        """Row ``t`` as a tensor that shares the storage."""
        if self._views is None:
            self._views = self.tensor.unbind()
        return self._views[t]

    def write(self, t: int, value: np.ndarray | Tensor) -> None:
        """Row ``t`` = ``value`` (numpy or a tensor of the row's shape, cast to its dtype)."""
        if self.arrays is not None:
            self.arrays[t][...] = value.numpy() if isinstance(value, Tensor) else value
        else:
            source = value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
            self.view(t).copy_(source)


class ChunkRolloutBuffer:
    """Stores ``n_steps`` steps of ``n_envs`` environments as tensors on ``device``.

    The rollout is cut into ``n_steps / seq_len`` chunks per environment; the recurrent state is
    stored only at each chunk's start (an MNM state holds ``L * D * D`` fast weights per env), and
    training re-runs each chunk through the core from there, resetting the state wherever
    ``episode_starts`` says a new episode began. ``seq_len`` is the truncated-BPTT length.

    The buffer also holds the policy's inputs: :meth:`start` and :meth:`add` store the env's
    observations and episode starts (numpy, as a ``VecEnv`` returns them) where the next step
    keeps them, and return them as tensors (views of the buffer) for the policy, so a rollout
    step converts nothing. The inputs after the last step are ``next_observation`` and
    ``next_episode_starts``.
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
        #: ``[n_steps, n_envs, ...]`` (a dict of them for a dict space): step ``t``'s inputs.
        self.observations: Observation | None = None
        self.next_observation: Observation | None = None
        self._observation_rows: dict[Any, _Rows] = {}
        self.reset()

    @property
    def n_chunks(self) -> int:
        """Chunks in one rollout, all environments together."""
        return self.n_steps // self.seq_len * self.n_envs

    def reset(self) -> None:
        """Empty the buffer for a new rollout (new tensors: the last rollout's are left as
        they were)."""
        shape, dev = (self.n_steps, self.n_envs), self.device
        self.actions = torch.zeros(shape, dtype=torch.long, device=dev)
        self.rewards = torch.zeros(shape, device=dev)
        # one row more than the steps: the episode starts after the last step
        starts = torch.zeros((self.n_steps + 1, self.n_envs), device=dev)
        self.episode_starts, self.next_episode_starts = starts[:-1], starts[-1]
        self.values = torch.zeros(shape, device=dev)
        self.log_probs = torch.zeros(shape, device=dev)
        self.advantages = torch.zeros(shape, device=dev)
        self.returns = torch.zeros(shape, device=dev)
        self._rows = {
            name: _Rows(tensor)
            for name, tensor in (("actions", self.actions), ("rewards", self.rewards),
                                 ("values", self.values), ("log_probs", self.log_probs),
                                 ("episode_starts", starts))
        }  # fmt: skip
        self.chunk_states: list[CoreState] = []
        self._chunked_observations: Observation | None = None
        self._chunk_start_states: CoreState | None = None
        self.pos = 0
        self._next_stored = 0  # the step whose inputs store_next() stored last

    def start(self, obs: Any, episode_starts: np.ndarray) -> tuple[Observation, Tensor]:
        """Begin a rollout (after :meth:`reset`) from the envs' current observation and episode
        starts, as a ``VecEnv`` gives them (numpy: an array or a dict of arrays): stores them as
        the first step's inputs and returns them as tensors, ``(obs, episode_starts [B])``."""
        if self.pos != 0:
            raise RuntimeError("start() begins an empty buffer: call reset() first")
        if self.observations is None:  # once: kept from one rollout to the next
            self._allocate_observations(obs)
        return self._store_inputs(0, obs, episode_starts)

    def add(
        self,
        action: Tensor,
        reward: np.ndarray | Tensor,
        value: Tensor,
        log_prob: Tensor,
        state: CoreState,
        next_obs: Any,
        next_episode_starts: np.ndarray,
    ) -> tuple[Observation, Tensor]:
        """Store one step for all envs: the policy's outputs, the rewards, the core state *before*
        this step (kept at chunk starts) and the inputs of the next step (the env's new
        observation and whether an episode starts, numpy as for :meth:`start`), which are
        returned as tensors for the next step: ``(obs, episode_starts [B])``.
        :meth:`store_next` then :meth:`add_outputs` do the same in two calls."""
        inputs = self.store_next(next_obs, next_episode_starts)
        self.add_outputs(action, reward, value, log_prob, state)
        return inputs

    def store_next(
        self, next_obs: Any, next_episode_starts: np.ndarray
    ) -> tuple[Observation, Tensor]:
        """The first half of :meth:`add`: store the next step's inputs and return them as
        tensors, ``(obs, episode_starts [B])``, so that the next step can begin before this
        one's outputs are stored (:meth:`add_outputs`)."""
        t = self.pos
        if t >= self.n_steps:
            raise RuntimeError("rollout buffer is full")
        if self.observations is None:
            raise RuntimeError("add() before start(): the first step's inputs are missing")
        self._next_stored = t + 1
        return self._store_inputs(t + 1, next_obs, next_episode_starts)

    def add_outputs(
        self,
        action: Tensor,
        reward: np.ndarray | Tensor,
        value: Tensor,
        log_prob: Tensor,
        state: CoreState,
    ) -> None:
        """The second half of :meth:`add`, after :meth:`store_next`: the step's outputs, its
        rewards and the core state before it (kept at chunk starts)."""
        t = self.pos
        if self._next_stored != t + 1:
            raise RuntimeError("add_outputs() before store_next() stored the next step's inputs")
        if t % self.seq_len == 0:
            # clone: the state may share memory with a parameter (the initial fast weights)
            self.chunk_states.append(state.detach().clone())
        rows = self._rows
        rows["actions"].write(t, action)
        rows["rewards"].write(t, reward)
        rows["values"].write(t, value)
        rows["log_probs"].write(t, log_prob)
        self.pos = t + 1

    def _allocate_observations(self, obs: Any) -> None:
        """Observation storage shaped like ``obs``: ``n_steps + 1`` rows, the last one for the
        observation after the last step."""
        named = obs if isinstance(obs, dict) else {None: obs}
        rows = self.n_steps + 1
        storage = {
            key: torch.zeros((rows, *np.shape(v)), dtype=_torch_dtype(v), device=self.device)
            for key, v in named.items()
        }
        self._observation_rows = {key: _Rows(tensor) for key, tensor in storage.items()}
        if isinstance(obs, dict):
            self.observations = {k: v[:-1] for k, v in storage.items()}
        else:
            self.observations = storage[None][:-1]

    def _store_inputs(
        self, t: int, obs: Any, episode_starts: np.ndarray
    ) -> tuple[Observation, Tensor]:
        """Write step ``t``'s inputs (``t == n_steps``: those after the last step) and return
        them as views."""
        named = obs if isinstance(obs, dict) else {None: obs}
        for key, rows in self._observation_rows.items():
            rows.write(t, named[key])
        starts = self._rows["episode_starts"]
        starts.write(t, episode_starts)
        views = {key: rows.view(t) for key, rows in self._observation_rows.items()}
        if t == self.n_steps:
            self.next_observation = views if isinstance(obs, dict) else views[None]
        return (views if isinstance(obs, dict) else views[None]), starts.view(t)

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


def _torch_dtype(array: Any) -> torch.dtype:
    """The torch dtype of a numpy array's dtype."""
    return torch.from_numpy(np.empty(0, dtype=np.asarray(array).dtype)).dtype
