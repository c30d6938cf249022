"""The MNM recurrence as one compiled CPU kernel per sequence (``csrc/mnm_sequence.cpp``).

Eager PyTorch runs an MNM step as about 200 small operators, and at the sizes RL uses (a
minibatch of 8-32 sequences, width 64) each costs microseconds of dispatch and allocation
whatever its size. The kernel does a whole sequence, forward and backward, in one call each:
the controller's matrix products go to BLAS once per step for the whole batch, the memory is
plain loops per sequence, and the backward pass recomputes each step's activations instead of
storing them.

It computes what :class:`mnm_rl.memory.MNMCore` computes (``tests/test_fused.py`` compares
outputs, final states and every gradient in float64), for both write rules and activations, in
the paper's order (write, then read) and without the retention loss; :meth:`MNMCore.forward`
falls back to the PyTorch code for everything else (CUDA tensors, ``read_before_write``,
``retention_lag``). The extension is compiled with ``torch.utils.cpp_extension`` the first
time it is needed (about a minute; cached under ``~/.cache/torch_extensions``). Without a C++
compiler, or with ``MNM_RL_FUSED=0`` in the environment, the PyTorch code runs instead.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("csrc") / "mnm_sequence.cpp"
_extension: ModuleType | None = None
_load_failed = False


def fused_enabled() -> bool:
    """Whether the fused kernel may be used: not switched off by ``MNM_RL_FUSED=0``."""
    return os.environ.get("MNM_RL_FUSED", "1") != "0"


def load_extension() -> ModuleType | None:
    """The compiled kernel, built on first use; ``None`` (with one warning) if it cannot be."""
    global _extension, _load_failed
    if _extension is not None or _load_failed:
        return _extension
    try:
        from torch.utils.cpp_extension import load

        _extension = load(
            name="mnm_rl_sequence",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fno-trapping-math"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no headers: fall back to PyTorch
        _load_failed = True
        warnings.warn(
            f"mnm-rl: the fused MNM kernel could not be built ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); using the PyTorch code",
            RuntimeWarning,
            stacklevel=2,
        )
    return _extension


class FusedSequence(torch.autograd.Function):
    """``MNMCore``'s recurrence over ``[T, B]`` steps; see :func:`run_sequence`."""

    @staticmethod
    def forward(
        ctx,
        gates_x,
        keep,
        h0,
        c0,
        r0,
        m0,
        w_rec,
        w_int,
        b_int,
        w_beta,
        b_beta,
        w_fb,
        b_fb,
        m_init,
        config,
    ):  # noqa: D102 (autograd API)
        ext, n_heads, gradient_rule, tanh_act, eps, store = config
        hs, reads, after, before, values, beta, norm, c, post, h_in, c_in, r_in = ext.forward(
            gates_x,
            keep,
            h0,
            c0,
            r0,
            m0,
            w_rec,
            w_int,
            b_int,
            w_beta,
            b_beta,
            w_fb,
            b_fb,
            m_init,
            n_heads,
            gradient_rule,
            tanh_act,
            eps,
            store,
        )
        final_weights = post[(gates_x.shape[0] - 1) % post.shape[0]]
        if store:
            ctx.config = config
            ctx.save_for_backward(
                gates_x, keep, m0, w_rec, w_int, b_int, w_beta, b_beta, w_fb, b_fb, m_init, hs
            )
            ctx.intermediates = (post, h_in, c_in, r_in)
        ctx.mark_non_differentiable(norm)
        ctx.set_materialize_grads(False)
        return hs, reads, after, before, values, beta, norm, c, final_weights.clone()

    @staticmethod
    def backward(ctx, g_hs, g_reads, g_after, g_before, g_values, g_beta, _g_norm, g_c, g_m):
        ext, n_heads, gradient_rule, tanh_act, eps, _ = ctx.config
        (gates_x, keep, m0, w_rec, w_int, b_int, w_beta, b_beta, w_fb, b_fb, m_init, hs) = (
            ctx.saved_tensors
        )
        post, h_in, c_in, r_in = ctx.intermediates

        def dense(g: Tensor | None) -> Tensor:
            return torch.Tensor() if g is None else g.contiguous()

        grads = ext.backward(
            dense(g_hs),
            dense(g_reads),
            dense(g_after),
            dense(g_before),
            dense(g_values),
            dense(g_beta),
            dense(g_c),
            dense(g_m),
            gates_x,
            keep,
            m0,
            post,
            h_in,
            c_in,
            r_in,
            hs,
            w_rec,
            w_int,
            b_int,
            w_beta,
            b_beta,
            w_fb,
            b_fb,
            m_init,
            n_heads,
            gradient_rule,
            tanh_act,
            eps,
        )
        return (grads[0], None, *grads[1:], None)


def run_sequence(
    core,
    gates_x: Tensor,
    episode_starts: Tensor,
    h: Tensor,
    c: Tensor,
    read: Tensor,
    fast_weights: Tensor,
    ext: ModuleType,
) -> tuple[Tensor, ...]:
    """``MNMCore``'s recurrence over a sequence with the kernel.

    ``gates_x [T, B, 4 * hidden]`` is the input part of the controller's gates. Returns
    ``(hs [T, B, hidden], reads [T, B, D], answer_after, answer_before, values [T, B, H, D],
    beta [T, B], fast_weight_norm [T, B], c [B, hidden], fast_weights [B, L, D, D])``.
    """
    memory = core.memory
    dtype = gates_x.dtype
    keep = (episode_starts == 0).to(dtype).contiguous()
    if memory.feedback is not None:
        w_fb, b_fb = memory.feedback.weight, memory.feedback.bias
    else:  # mnm-g has no feedback functions: the kernel ignores these
        w_fb = b_fb = gates_x.new_empty(0)
    # Keep what the backward pass needs only when there will be one (not in the rollout).
    store = torch.is_grad_enabled() and (
        any(p.requires_grad for p in core.parameters())
        or any(t.requires_grad for t in (gates_x, h, c, read, fast_weights))
    )
    config = (
        ext,
        core.n_heads,
        memory.write_rule == "mnm-g",
        memory.activation == "tanh",
        float(memory.eps),
        store,
    )
    h, c, read, fast_weights = (t.to(dtype).contiguous() for t in (h, c, read, fast_weights))
    return FusedSequence.apply(
        gates_x.contiguous(),
        keep,
        h,
        c,
        read,
        fast_weights,
        core.recurrent_gates.weight,
        core.interaction.weight,
        core.interaction.bias,
        core.beta_gate.weight.view(-1),
        core.beta_gate.bias,
        w_fb,
        b_fb,
        memory.initial_weights,
        config,
    )
