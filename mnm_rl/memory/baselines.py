"""Baseline cores behind the same interface: fused LSTM and GRU, and a memoryless MLP."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mnm_rl.memory import products
from mnm_rl.memory.base import CoreBackward, Gradients, RecurrentCore
from mnm_rl.memory.rnn_kernels import (
    explicit_gru,
    explicit_lstm,
    rnn_kernel,
    run_gru,
    run_lstm,
)
from mnm_rl.memory.state import CoreState


def reset_spans(episode_starts: Tensor) -> list[tuple[int, int]]:
    """Split ``[0, T)`` at every step where any sequence starts an episode.

    Inside a span no state is reset, so the span runs through a fused ``nn.LSTM``/``nn.GRU``
    call. One host-device synchronisation per call.
    """
    return _spans(episode_starts.any(dim=1).tolist())


def _spans(resets: list[bool]) -> list[tuple[int, int]]:
    """The reset-free spans for ``resets[t]`` = "some sequence starts an episode at step t"."""
    bounds = [0, *(t for t in range(1, len(resets)) if resets[t]), len(resets)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _FusedRNNCore(RecurrentCore):
    """A ``torch.nn.LSTM``/``GRU`` run over spans without episode resets, or through a compiled
    kernel that takes the resets as a mask (:mod:`mnm_rl.memory.rnn_kernels`)."""

    rnn_type: type[nn.RNNBase]
    state_keys: tuple[str, ...]
    has_explicit_backward = True

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

    def _run(self, x: Tensor, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The fused RNN over a reset-free span ``x [T, B, F]`` from ``hidden`` ([B, H] each)."""
        packed = tuple(h.unsqueeze(0).contiguous() for h in hidden)
        out, new = self.rnn(x, packed if len(packed) > 1 else packed[0])
        new = new if isinstance(new, tuple) else (new,)
        return out, [h.squeeze(0) for h in new]

    def _forward_kernel(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreState]:
        """:meth:`forward` by the compiled kernel: ``(outputs [T, B, H], final state)``."""
        raise NotImplementedError

    def _explicit_kernel(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreBackward]:
        """:meth:`explicit_forward` by the compiled kernel: ``(outputs [T, B, H], backward)``."""
        raise NotImplementedError

    def explicit_forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, memory_weight: float = 0.0
    ) -> tuple[Tensor, Mapping[str, Tensor], CoreBackward] | None:
        """By the compiled kernel where it applies (:func:`~mnm_rl.memory.rnn_kernels.rnn_kernel`),
        else ``None``; no memory, no diagnostics."""
        self._check_inputs(x, state, episode_starts)
        kernel = rnn_kernel(x)
        if kernel is None:
            return None
        out, backward = self._explicit_kernel(x, state, episode_starts, kernel)
        return out, {}, backward

    def forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, CoreState, dict[str, Tensor]]:
        self._check_inputs(x, state, episode_starts)
        kernel = rnn_kernel(x)
        if kernel is not None:
            return (*self._forward_kernel(x, state, episode_starts, kernel), {})
        resets = episode_starts.any(dim=1).tolist()  # one host read per call
        hidden = [state[k] for k in self.state_keys]
        outputs = []
        for start, end in _spans(resets):
            if resets[start]:
                # The initial state is zero: keep the state where no episode starts.
                keep = (episode_starts[start] == 0).unsqueeze(-1)
                hidden = [torch.where(keep, h, 0.0) for h in hidden]
            out, hidden = self._run(x[start:end], hidden)
            outputs.append(out)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out, CoreState(dict(zip(self.state_keys, hidden, strict=True))), {}


class LSTMCore(_FusedRNNCore):
    """LSTM baseline; state ``h, c`` of shape ``[B, hidden_size]``.

    On the CPU a sequence runs through the compiled kernel of :mod:`mnm_rl.memory.rnn_kernels`
    (one call whatever the resets) when it is available; otherwise span by span between episode
    starts through ``nn.LSTM``, and a single step (the rollout's) through the LSTM cell op.
    """

    rnn_type = nn.LSTM
    state_keys = ("h", "c")

    def _forward_kernel(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreState]:
        out, h, c = run_lstm(self.rnn, x, state["h"], state["c"], episode_starts, kernel)
        return out, CoreState({"h": h, "c": c})

    def _explicit_kernel(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreBackward]:
        return explicit_lstm(self.rnn, x, state["h"], state["c"], episode_starts, kernel)

    def _run(self, x: Tensor, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if x.shape[0] != 1:
            return super()._run(x, hidden)
        # One step without the compiled kernel (CUDA, MNM_RL_FUSED=0): the LSTM cell op with
        # nn.LSTM's own weights computes the same equations without nn.LSTM's per-call overhead
        # (about a third of the call's time).
        rnn = self.rnn
        h, c = torch.lstm_cell(
            x[0],
            (hidden[0], hidden[1]),
            rnn.weight_ih_l0,
            rnn.weight_hh_l0,
            rnn.bias_ih_l0,
            rnn.bias_hh_l0,
        )
        return h.unsqueeze(0), [h, c]


class GRUCore(_FusedRNNCore):
    """GRU baseline; state ``h`` of shape ``[B, hidden_size]``. On the CPU a sequence runs
    through the compiled kernel of :mod:`mnm_rl.memory.rnn_kernels` when it is available, with
    or without resets (``nn.GRU`` has no fused CPU path: the kernel is about 2x faster even for
    one span); otherwise span by span through ``nn.GRU``, and a single step through the GRU
    cell op."""

    rnn_type = nn.GRU
    state_keys = ("h",)

    def _forward_kernel(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreState]:
        out, h = run_gru(self.rnn, x, state["h"], episode_starts, kernel)
        return out, CoreState({"h": h})

    def _explicit_kernel(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, kernel
    ) -> tuple[Tensor, CoreBackward]:
        return explicit_gru(self.rnn, x, state["h"], episode_starts, kernel)

    def _run(self, x: Tensor, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if x.shape[0] != 1:
            return super()._run(x, hidden)
        # One step without the compiled kernel: the GRU cell op with nn.GRU's own weights, as
        # LSTMCore does: the same equations without nn.GRU's per-call overhead
        # (tests/test_fast_paths.py).
        rnn = self.rnn
        h = torch.gru_cell(
            x[0], hidden[0], rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
        )
        return h.unsqueeze(0), [h]


class MLPCore(RecurrentCore):
    """No memory: a two-layer tanh MLP applied to each step independently; empty state."""

    has_explicit_backward = True

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
        for layer in self.net:  # the Linear layers by the kernels' products where they apply
            x = (
                products.linear(x, layer.weight, layer.bias)
                if isinstance(layer, nn.Linear)
                else layer(x)
            )
        return x, state, {}

    def explicit_forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, memory_weight: float = 0.0
    ) -> tuple[Tensor, Mapping[str, Tensor], CoreBackward] | None:
        """The two layers by :func:`~mnm_rl.memory.products.linear_explicit`, the tanh
        derivative from the outputs (``1 - y^2``, as autograd's); no memory, no diagnostics."""
        self._check_inputs(x, state, episode_starts)
        lead = x.shape[:-1]
        hidden = x.reshape(-1, x.shape[-1])
        layers = [layer for layer in self.net if isinstance(layer, nn.Linear)]
        outputs, backwards = [], []
        for layer in layers:
            hidden, backward = products.linear_explicit(hidden, layer.weight, layer.bias)
            hidden = hidden.tanh_()
            outputs.append(hidden)
            backwards.append(backward)

        def backward(grad: Tensor) -> tuple[Tensor, Gradients]:
            grad = grad.reshape(-1, grad.shape[-1])
            gradients: Gradients = []
            for layer, y, layer_backward in zip(
                reversed(layers), reversed(outputs), reversed(backwards), strict=True
            ):
                grad, g_weight, g_bias = layer_backward(grad * (1 - y * y), True)
                gradients += [(layer.weight, g_weight), (layer.bias, g_bias)]
            return grad.view(*lead, -1), gradients

        return hidden.view(*lead, -1), {}, backward
