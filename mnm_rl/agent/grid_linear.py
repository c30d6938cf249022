"""A linear layer over a symbol grid's per-channel embeddings, computed without the embeddings
(``csrc/grid_linear.cpp``).

:class:`~mnm_rl.agent.extractors.MemoryFeaturesExtractor` embeds each symbol of a grid
(MiniGrid's ``[7, 7, 3]`` view: 147 symbols of 8 dims each), flattens, and applies a
``Linear`` layer. Each output is linear in one embedding row per slot, so the kernel first
projects every table row through the weight columns of every cell (``[cells * R, O]``, a few
hundred kFLOP) and then sums, per sample, the projected rows its symbols pick: for a PPO
minibatch of 256 views at width 64, 2.4 M additions instead of a 19 M multiply-add matrix
product, with a backward pass to match and no ``[N, 1176]`` embedding tensor in between.
``tests/test_grid_linear.py`` checks outputs and gradients against the plain PyTorch code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mnm_rl import native

#: The encoder kernel's C++ source, built into its own extension.
SOURCES = [Path(__file__).with_name("csrc") / "grid_linear.cpp"]
#: The extension, built on first use.
EXTENSION = native.LazyExtension("mnm_rl_grid_linear", SOURCES, "the symbol-grid encoder kernel")


def load_extension() -> ModuleType | None:
    """The compiled encoder kernel, built on first use; ``None`` (with one warning) if it cannot
    be built, and ``None`` without building it under ``MNM_RL_FUSED=0``."""
    return EXTENSION.load()


class _GridLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: ModuleType, layout: GridLayout, grid: Tensor, table: Tensor,
                weight: Tensor, bias: Tensor | None, dense: Tensor) -> Tensor:  # fmt: skip
        out, rows, effective = kernel.grid_linear_forward(
            grid, table, weight, bias, dense, *layout.arguments()
        )
        ctx.save_for_backward(rows, table, effective, weight, dense)
        ctx.kernel, ctx.layout = kernel, layout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        rows, table, effective, weight, dense = ctx.saved_tensors
        grad_table, grad_weight, grad_bias, grad_dense = ctx.kernel.grid_linear_backward(
            grad_out,
            rows,
            table,
            effective,
            weight,
            dense,
            *ctx.layout.arguments(),
            ctx.needs_input_grad[6],
        )
        needs = ctx.needs_input_grad
        return (
            None, None, None,
            grad_table if needs[3] else None,
            grad_weight if needs[4] else None,
            grad_bias if needs[5] else None,
            grad_dense if needs[6] else None,
        )  # fmt: skip


@dataclass(frozen=True)
class GridLayout:
    """Where a Linear layer's input columns come from: a symbol grid's flat embeddings from
    ``grid_column`` on (``cells * channels * E`` columns), with ``pool_column >= 0`` their sums
    over the cells (``channels * E`` columns) from there, and ``dense_columns[j]`` the column of
    dense input ``j``. ``sizes``: the symbol count of each channel of the grid."""

    sizes: tuple[int, ...]
    grid_column: int
    pool_column: int = -1
    dense_columns: tuple[int, ...] = ()

    def arguments(self) -> tuple:
        return list(self.dense_columns), self.grid_column, self.pool_column, list(self.sizes)


def grid_linear(kernel: ModuleType, layout: GridLayout, grid: Tensor, table: Tensor,
                weight: Tensor, bias: Tensor | None, dense: Tensor) -> Tensor:  # fmt: skip
    """``F.linear(x, weight, bias)`` for the ``x`` that ``layout`` describes, through the
    compiled kernel.

    Args:
        kernel: the extension from :func:`load_extension`.
        layout: the columns of ``x`` (:class:`GridLayout`).
        grid: ``[N, S]`` symbols, slot ``s`` being channel ``s % C`` of cell ``s // C`` (a
            ``[N, H, W, C]`` grid flattened); any real or integer dtype, whole numbers.
        table: ``[R, E]``, the channels' embedding tables one after another (channel ``c``'s
            symbol ``v`` is row ``sum(sizes[:c]) + v``).
        weight: ``[O, in]``; bias: ``[O]`` or ``None``.
        dense: ``[N, D]``, the inputs of ``layout.dense_columns`` (``[N, 0]`` if none).

    Returns:
        ``[N, O]``. A symbol outside ``[0, sizes[c])`` raises ``RuntimeError``.
    """
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (table, weight, bias, dense)
    ):
        return _GridLinear.apply(kernel, layout, grid, table, weight, bias, dense)
    return kernel.grid_linear_forward(grid, table, weight, bias, dense, *layout.arguments())[0]
