"""``F.linear`` by the compiled kernels' own matrix products (``csrc/dense_products.h``).

On the CPU, ATen hands float32 products to MKL's sgemm, which on our AMD EPYC machines runs its
AVX2 code (70-95 GFLOP/s at the shapes a PPO update has); the kernels' hand-written products
use 64-byte vectors and run them at 210-230 (``benchmarks/dense_products.py``). :func:`linear`
is ``F.linear`` through them, forward and backward, for the cores' input projections over a
whole sequence. ``tests/test_dense_products.py`` checks it against ``F.linear``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mnm_rl.memory import fused

#: Environment variable: ``0`` runs ATen's products instead, here and in the kernels (timings
#: side by side; ``benchmarks/throughput.py``'s ``/atenmm`` configs).
SWITCH_VARIABLE = "MNM_RL_DENSE_PRODUCTS"


#: The fewest rows a thread gets when a product's rows are split between the kernel's threads.
MIN_PART_ROWS = 64


def row_parts(rows: int) -> int:
    """Into how many parts, one per thread, :func:`linear` splits the rows of its products: one
    per kernel thread (:func:`mnm_rl.memory.fused.kernel_threads`) while each keeps at least
    :data:`MIN_PART_ROWS` rows (a training minibatch's 256 rows in two parts; a rollout step's
    few in one). The results are the same bit for bit whatever the parts."""
    return max(1, min(fused.kernel_threads(), rows // MIN_PART_ROWS))


class _DenseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: D102
        ctx.kernel = kernel
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.parts = row_parts(x.shape[0])
        return kernel.linear_forward(x, weight, bias, ctx.parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g_x, g_weight, g_bias = ctx.kernel.linear_backward(
            grad, x, weight, needs[1], needs[2], ctx.has_bias and needs[3], ctx.parts
        )
        return None, g_x, g_weight, g_bias if ctx.has_bias else None


def _kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> ModuleType | None:
    """The compiled products where they take ``F.linear(x, weight, bias)``, else ``None``."""
    usable = (
        os.environ.get(SWITCH_VARIABLE) != "0"
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
    )
    return fused.load_extension() if usable else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for ``x [..., in]``: through the compiled products on the
    CPU in float32 and float64 when the kernels are built (and not switched off by
    ``MNM_RL_FUSED=0`` or ``MNM_RL_DENSE_PRODUCTS=0``), else ``F.linear`` itself."""
    kernel = _kernel(x, weight, bias)
    if kernel is None:
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    return _DenseLinear.apply(kernel, flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


#: :func:`linear_explicit`'s backward pass: ``(grad [N, out], needs_x) -> (grad_x or None,
#: grad_weight, grad_bias or None)``.
LinearBackward = Callable[[Tensor, bool], tuple[Tensor | None, Tensor, Tensor | None]]


def linear_explicit(
    x: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, LinearBackward]:
    """``F.linear(x, weight, bias)`` for ``x [N, in]`` without autograd, and its backward pass
    (:data:`LinearBackward`): ``(y [N, out], backward)``. By the compiled products where
    :func:`linear` takes them, else by ATen's; call both under ``torch.no_grad()``."""
    kernel = _kernel(x, weight, bias)
    if kernel is not None:
        parts = row_parts(x.shape[0])
        y = kernel.linear_forward(x, weight, bias, parts)

        def backward(grad: Tensor, needs_x: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
            g_x, g_weight, g_bias = kernel.linear_backward(
                grad, x, weight, needs_x, True, bias is not None, parts
            )
            return (g_x if needs_x else None), g_weight, (g_bias if bias is not None else None)

        return y, backward
    y = nn.functional.linear(x, weight, bias)

    def aten_backward(grad: Tensor, needs_x: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
        return (
            grad @ weight if needs_x else None,
            grad.t() @ x,
            grad.sum(0) if bias is not None else None,
        )

    return y, aten_backward
