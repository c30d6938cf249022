"""The baseline LSTM and GRU over a sequence with episode resets, as compiled CPU kernels.

``torch.nn.LSTM`` and ``nn.GRU`` run a whole sequence as one fused call, but they cannot reset
the state of some sequences of a batch in the middle of it. The baseline cores
(:mod:`mnm_rl.memory.baselines`) therefore split a training chunk at every step where any
sequence starts an episode and make one call per span; with short episodes and 16 sequences per
minibatch that is a call every step or two, and the cost grows with how often episodes end. The
kernels (``csrc/lstm_sequence.cpp``, ``csrc/gru_sequence.cpp``, in the extension of
:mod:`mnm_rl.memory.fused`) treat a reset as a mask instead: one call forward and one backward
whatever the resets, with the ``nn.LSTM``/``nn.GRU`` module's own weights. The LSTM's passes
run a training batch in parts on the MNM kernel's threads (:func:`mnm_rl.memory.fused.batch_parts`,
``MNM_RL_KERNEL_THREADS``), each part's sequences on a thread of its own, with the same results
bit for bit as on one thread (with the kernels' own products; with ATen's to rounding).

``tests/test_rnn_kernels.py`` compares them with the module run span by span: outputs, final
state and every gradient, in float64. The cores use them on the CPU, whatever the resets,
unless ``MNM_RL_FUSED=0``: with the kernels' own products (``csrc/dense_products.h``) the LSTM
kernel is also faster than one oneDNN ``nn.LSTM`` call over a sequence without resets
(``benchmarks/rnn_resets.py``, twenty-ninth session; before them it took the kernel only where
an episode starts after the first step).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from mnm_rl.memory import fused, products
from mnm_rl.memory.base import CoreBackward, Gradients


def rnn_kernel(x: Tensor) -> ModuleType | None:
    """The compiled kernels if they apply to ``x [T, B, F]`` (CPU, float32/64, not switched off
    by ``MNM_RL_FUSED=0``), else ``None``. The cores take them for every sequence
    (``benchmarks/rnn_resets.py``) and for a single step, the rollout's: the reset is a mask,
    with no host read, and the step costs about two thirds of ``torch.lstm_cell``'s with the
    resets applied around it."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return fused.load_extension()


def _store(*tensors: Tensor) -> bool:
    """Whether there will be a backward pass, so the kernel must keep what it needs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class FusedLSTMSequence(torch.autograd.Function):
    """``apply((kernel, store), gates_x, keep, h0, c0, w_hh) -> (hs [T, B, H], c_final [B, H])``;
    ``store``: keep what a backward pass needs (not in the rollout)."""

    @staticmethod
    def forward(ctx, config, gates_x, keep, h0, c0, w_hh):  # noqa: D102
        kernel, store = config
        parts = fused.batch_parts(*gates_x.shape[:2])
        hs, c_final, cs, acts = kernel.lstm_forward(gates_x, keep, h0, c0, w_hh, store, parts)
        ctx.kernel, ctx.parts = kernel, parts  # the backward pass splits the batch alike
        ctx.save_for_backward(keep, h0, c0, w_hh, hs, cs, acts)
        ctx.set_materialize_grads(False)
        return hs, c_final

    @staticmethod
    def backward(ctx, g_hs, g_c):  # noqa: D102
        keep, h0, c0, w_hh, hs, cs, acts = ctx.saved_tensors
        empty = torch.Tensor()  # stands for a zero gradient
        g_gates, g_h0, g_c0, g_w_hh = ctx.kernel.lstm_backward(
            empty if g_hs is None else g_hs.contiguous(),
            empty if g_c is None else g_c.contiguous(),
            keep, h0, c0, w_hh, hs, cs, acts, ctx.parts,
        )  # fmt: skip
        return None, g_gates, None, g_h0, g_c0, g_w_hh


class FusedGRUSequence(torch.autograd.Function):
    """``apply((kernel, store), gates_x, keep, h0, w_hh, b_hh) -> hs [T, B, H]``."""

    @staticmethod
    def forward(ctx, config, gates_x, keep, h0, w_hh, b_hh):  # noqa: D102
        kernel, store = config
        hs, acts = kernel.gru_forward(gates_x, keep, h0, w_hh, b_hh, store)
        ctx.kernel = kernel
        ctx.save_for_backward(keep, h0, w_hh, hs, acts)
        ctx.set_materialize_grads(False)
        return hs

    @staticmethod
    def backward(ctx, g_hs):  # noqa: D102
        keep, h0, w_hh, hs, acts = ctx.saved_tensors
        if g_hs is None:
            return None, None, None, None, None, None
        g_gates, g_h0, g_w_hh, g_b_hh = ctx.kernel.gru_backward(
            g_hs.contiguous(), keep, h0, w_hh, hs, acts
        )
        return None, g_gates, None, g_h0, g_w_hh, g_b_hh


def run_lstm(
    rnn: nn.LSTM, x: Tensor, h0: Tensor, c0: Tensor, episode_starts: Tensor, kernel: ModuleType
) -> tuple[Tensor, Tensor, Tensor]:
    """A one-layer ``rnn`` over ``x [T, B, F]`` from ``(h0, c0)`` ``[B, H]``, the state of
    sequence ``b`` set to zero before step ``t`` where ``episode_starts[t, b]`` is nonzero.
    Returns ``(outputs [T, B, H], h [B, H], c [B, H])`` after the last step."""
    gates_x = products.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)
    keep = (episode_starts == 0).to(x.dtype).contiguous()
    h0, c0, w_hh = h0.contiguous(), c0.contiguous(), rnn.weight_hh_l0
    store = _store(gates_x, h0, c0, w_hh)
    hs, c = FusedLSTMSequence.apply((kernel, store), gates_x.contiguous(), keep, h0, c0, w_hh)
    return hs, hs[-1], c


def run_gru(
    rnn: nn.GRU, x: Tensor, h0: Tensor, episode_starts: Tensor, kernel: ModuleType
) -> tuple[Tensor, Tensor]:
    """A one-layer ``rnn`` over ``x [T, B, F]`` from ``h0 [B, H]``, with resets as in
    :func:`run_lstm`. Returns ``(outputs [T, B, H], h [B, H])`` after the last step."""
    gates_x = products.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0)
    keep = (episode_starts == 0).to(x.dtype).contiguous()
    h0, w_hh, b_hh = h0.contiguous(), rnn.weight_hh_l0, rnn.bias_hh_l0
    store = _store(gates_x, h0, w_hh, b_hh)
    hs = FusedGRUSequence.apply((kernel, store), gates_x.contiguous(), keep, h0, w_hh, b_hh)
    return hs, hs[-1]


def explicit_lstm(
    rnn: nn.LSTM, x: Tensor, h0: Tensor, c0: Tensor, episode_starts: Tensor, kernel: ModuleType
) -> tuple[Tensor, CoreBackward]:
    """:func:`run_lstm`'s outputs ``[T, B, H]`` without autograd, and their backward pass by
    the kernel's (``LSTMCore.explicit_forward``); run both under ``torch.no_grad()``."""
    steps, batch, _ = x.shape
    bias = rnn.bias_ih_l0 + rnn.bias_hh_l0
    flat = x.reshape(steps * batch, -1)
    gates_x, linear_backward = products.linear_explicit(flat, rnn.weight_ih_l0, bias)
    keep = (episode_starts == 0).to(x.dtype).contiguous()
    h0, c0, w_hh = h0.contiguous(), c0.contiguous(), rnn.weight_hh_l0
    parts = fused.batch_parts(steps, batch)
    hs, _, cs, acts = kernel.lstm_forward(
        gates_x.view(steps, batch, -1), keep, h0, c0, w_hh, True, parts
    )

    def backward(g_hs: Tensor) -> tuple[Tensor, Gradients]:
        g_gates, _, _, g_w_hh = kernel.lstm_backward(
            g_hs.contiguous(), torch.Tensor(), keep, h0, c0, w_hh, hs, cs, acts, parts
        )
        g_x, g_w_ih, g_bias = linear_backward(g_gates.view(steps * batch, -1), True)
        # Both biases get the gradient of their sum: two tensors, as the optimizer's clipping
        # scales each gradient in place.
        return g_x.view(steps, batch, -1), [
            (rnn.weight_ih_l0, g_w_ih), (rnn.weight_hh_l0, g_w_hh),
            (rnn.bias_ih_l0, g_bias), (rnn.bias_hh_l0, g_bias.clone()),
        ]  # fmt: skip

    return hs, backward


def explicit_gru(
    rnn: nn.GRU, x: Tensor, h0: Tensor, episode_starts: Tensor, kernel: ModuleType
) -> tuple[Tensor, CoreBackward]:
    """:func:`run_gru`'s outputs ``[T, B, H]`` without autograd, and their backward pass by the
    kernel's (``GRUCore.explicit_forward``); run both under ``torch.no_grad()``."""
    steps, batch, _ = x.shape
    flat = x.reshape(steps * batch, -1)
    gates_x, linear_backward = products.linear_explicit(flat, rnn.weight_ih_l0, rnn.bias_ih_l0)
    keep = (episode_starts == 0).to(x.dtype).contiguous()
    h0, w_hh, b_hh = h0.contiguous(), rnn.weight_hh_l0, rnn.bias_hh_l0
    hs, acts = kernel.gru_forward(gates_x.view(steps, batch, -1), keep, h0, w_hh, b_hh, True)

    def backward(g_hs: Tensor) -> tuple[Tensor, Gradients]:
        g_gates, _, g_w_hh, g_b_hh = kernel.gru_backward(g_hs.contiguous(), keep, h0, w_hh, hs,
                                                         acts)  # fmt: skip
        g_x, g_w_ih, g_b_ih = linear_backward(g_gates.view(steps * batch, -1), True)
        return g_x.view(steps, batch, -1), [
            (rnn.weight_ih_l0, g_w_ih), (rnn.weight_hh_l0, g_w_hh),
            (rnn.bias_ih_l0, g_b_ih), (rnn.bias_hh_l0, g_b_hh),
        ]  # fmt: skip

    return hs, backward
