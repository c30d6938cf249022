"""Baseline cores behind the same interface: fused LSTM and GRU, and a memoryless MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnm_rl.memory.base import RecurrentCore
from mnm_rl.memory.state import CoreState


def reset_spans(episode_starts: Tensor) -> list[tuple[int, int]]:
    """Split ``[0, T)`` at every step where any sequence starts an episode.

    Inside a span no state is reset, so the span runs through a fused ``nn.LSTM``/``nn.GRU``
    call. One host-device synchronisation per call.
    """
    steps = episode_starts.shape[0]
    cuts = (torch.nonzero(episode_starts[1:].any(dim=1)).flatten() + 1).tolist()
    bounds = [0, *cuts, steps]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _FusedRNNCore(RecurrentCore):
    """A ``torch.nn.LSTM``/``GRU`` run over spans without episode resets."""

    rnn_type: type[nn.RNNBase]
    state_keys: tuple[str, ...]

    def __init__(self, input_size: int, hidden_size: int = 64):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = hidden_size
        self.rnn = self.rnn_type(input_size, hidden_size)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> CoreState:
        device = device or next(self.parameters()).device
        return CoreState(
            {k: torch.zeros(batch_size, self.hidden_size, device=device) for k in self.state_keys}
        )

    def _to_rnn(self, state: CoreState):
        hidden = tuple(state[k].unsqueeze(0).contiguous() for k in self.state_keys)
        return hidden if len(hidden) > 1 else hidden[0]

    def _from_rnn(self, hidden) -> CoreState:
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return CoreState({k: v.squeeze(0) for k, v in zip(self.state_keys, hidden, strict=True)})

    def forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, CoreState, dict[str, Tensor]]:
        self._check_inputs(x, state, episode_starts)
        initial = self.initial_state(x.shape[1], x.device)
        outputs = []
        for start, end in reset_spans(episode_starts):
            state = state.reset_where(episode_starts[start], initial)
            out, hidden = self.rnn(x[start:end], self._to_rnn(state))
            state = self._from_rnn(hidden)
            outputs.append(out)
        return torch.cat(outputs), state, {}


class LSTMCore(_FusedRNNCore):
    """LSTM baseline; state ``h, c`` of shape ``[B, hidden_size]``."""

    rnn_type = nn.LSTM
    state_keys = ("h", "c")


class GRUCore(_FusedRNNCore):
    """GRU baseline; state ``h`` of shape ``[B, hidden_size]``."""

    rnn_type = nn.GRU
    state_keys = ("h",)


class MLPCore(RecurrentCore):
    """No memory: a two-layer tanh MLP applied to each step independently; empty state."""

    def __init__(self, input_size: int, hidden_size: int = 64):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(input_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
        )

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> CoreState:
        return CoreState(batch_size=batch_size)

    def forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, CoreState, dict[str, Tensor]]:
        self._check_inputs(x, state, episode_starts)
        return self.net(x), state, {}
