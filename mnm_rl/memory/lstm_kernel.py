"""The baseline LSTM over a sequence with episode resets, as one compiled CPU kernel per pass.

``torch.nn.LSTM`` runs a whole sequence as one fused call, but it cannot reset the state of
some sequences of a batch in the middle of it. :class:`mnm_rl.memory.LSTMCore` therefore splits
a training chunk at every step where any sequence starts an episode and makes one call per
span; with short episodes and 16 sequences per minibatch that is a call every step or two, and
its cost grows with how often episodes end. The kernel (``csrc/lstm_sequence.cpp``, in the
extension of :mod:`mnm_rl.memory.fused`) treats a reset as a mask instead: one call forward and
one backward whatever the resets, with ``nn.LSTM``'s own weights.

``tests/test_lstm_kernel.py`` compares it with ``nn.LSTM`` run span by span: outputs, final
state and every gradient, in float64. :class:`~mnm_rl.memory.LSTMCore` uses it on the CPU for
sequences with an episode start after their first step (a single rollout step keeps
``torch.lstm_cell``, a sequence without resets one ``nn.LSTM`` call), unless ``MNM_RL_FUSED=0``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from mnm_rl.memory import fused


def lstm_kernel(x: Tensor) -> ModuleType | None:
    """The compiled kernel if it applies to ``x [T, B, F]`` (CPU, float32/64, more than one
    step, not switched off by ``MNM_RL_FUSED=0``), else ``None``."""
    if (
        x.shape[0] < 2
        or not fused.fused_enabled()
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
    ):
        return None
    return fused.load_extension()


class FusedLSTMSequence(torch.autograd.Function):
    """``apply((kernel, store), gates_x, keep, h0, c0, w_hh) -> (hs [T, B, H], c_final [B, H])``;
    ``store``: keep what a backward pass needs (not in the rollout)."""

    @staticmethod
    def forward(ctx, config, gates_x, keep, h0, c0, w_hh):  # noqa: D102
        kernel, store = config
        hs, c_final, cs, acts = kernel.lstm_forward(gates_x, keep, h0, c0, w_hh, store)
        ctx.kernel = kernel
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
            keep, h0, c0, w_hh, hs, cs, acts,
        )  # fmt: skip
        return None, g_gates, None, g_h0, g_c0, g_w_hh


def run_lstm(
    rnn: nn.LSTM, x: Tensor, h0: Tensor, c0: Tensor, episode_starts: Tensor, kernel: ModuleType
) -> tuple[Tensor, Tensor, Tensor]:
    """A one-layer ``rnn`` over ``x [T, B, F]`` from ``(h0, c0)`` ``[B, H]``, the state of
    sequence ``b`` set to zero before step ``t`` where ``episode_starts[t, b]`` is nonzero.
    Returns ``(outputs [T, B, H], h [B, H], c [B, H])`` after the last step."""
    gates_x = nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)
    keep = (episode_starts == 0).to(x.dtype).contiguous()
    h0, c0, w_hh = h0.contiguous(), c0.contiguous(), rnn.weight_hh_l0
    # Keep what the backward pass needs only when there will be one.
    store = torch.is_grad_enabled() and any(t.requires_grad for t in (gates_x, h0, c0, w_hh))
    hs, c = FusedLSTMSequence.apply((kernel, store), gates_x.contiguous(), keep, h0, c0, w_hh)
    return hs, hs[-1], c
