"""Observation encoders that turn one observation into a flat feature vector."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn

from mnm_rl.agent import grid_linear
from mnm_rl.agent.grid_linear import GridLayout
from mnm_rl.memory import products
from mnm_rl.memory.base import Gradients

#: Below this many rows, and without a backward pass, the grid's linear layer runs as plain
#: PyTorch: the compiled kernel's fixed cost (projecting every table row through every cell's
#: weights) is then larger than what it saves. Measured on MiniGrid's 7 x 7 view with 64
#: features (a throwaway timing, plain against compiled): 24 against 37 us at 1 row, 34 against
#: 39 at 4, 45 against 42 at 8, 101 against 56 at 32.
COMPILED_MIN_ROWS = 8


def is_symbolic_grid(space: spaces.Space) -> bool:
    """An integer ``[H, W, C]`` Box: a grid of symbols (MiniGrid's encoded image), not pixels."""
    return (
        isinstance(space, spaces.Box)
        and len(space.shape) == 3
        and np.issubdtype(space.dtype, np.integer)
        and space.dtype != np.uint8
    )


def relu_backward(grad: Tensor, output: Tensor) -> Tensor:
    """ReLU's backward pass from its ``output``: ``grad`` where ``output > 0``, else 0, by the
    operator autograd runs for it (``aten.threshold_backward``: one pass, where a comparison and
    ``masked_fill`` took two and a mask)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


class SymbolicGridEncoder(nn.Module):
    """Per-channel embeddings of a symbol grid ``[N, H, W, C]``, flattened: ``[N, H*W*C*E]``.

    With ``pooling``, followed by their sum over the ``H*W`` cells, ``[N, C*E]``: what is in
    view, whatever the cell it is in. The flat part codes an object by where it is in the
    egocentric view, so the same object seen from another cell is a new input to learn.
    """

    def __init__(self, space: spaces.Box, embedding_dim: int = 8, pooling: bool = False):
        super().__init__()
        high = np.asarray(space.high).reshape(-1, space.shape[-1]).max(axis=0)
        self.embeddings = nn.ModuleList(nn.Embedding(int(h) + 1, embedding_dim) for h in high)
        self.cells = int(np.prod(space.shape[:-1]))
        self.cell_dim = space.shape[-1] * embedding_dim
        self.pooling = pooling
        self.output_dim = (self.cells + int(pooling)) * self.cell_dim
        # Row of channel i's symbol 0 in the concatenation of the channels' tables.
        sizes = [int(h) + 1 for h in high]
        self.sizes = tuple(sizes)
        self.register_buffer(
            "offsets", torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.long), persistent=False
        )

    def table(self) -> Tensor:
        """The channels' embedding tables one after another, ``[sum(sizes), E]``: channel ``i``'s
        symbol ``v`` is row ``sum(sizes[:i]) + v``."""
        return torch.cat([emb.weight for emb in self.embeddings])

    def forward(self, grid: Tensor) -> Tensor:
        # Equivalent to ``cat([embeddings[i](grid[..., i]) for i], -1).flatten(1)``: one
        # index_select in the concatenated tables, with channel i's symbols shifted by its offset,
        # gives the same rows in the same order. One lookup instead of one per channel, and on a
        # CPU index_select's backward (index_add) is several times cheaper than embedding's.
        rows = (grid.long() + self.offsets).flatten()
        cells = self.table().index_select(0, rows).view(grid.shape[0], self.cells, self.cell_dim)
        flat = cells.flatten(1)
        return torch.cat([flat, cells.sum(dim=1)], dim=1) if self.pooling else flat


def _flat_dim(space: spaces.Space) -> int:
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.MultiBinary | spaces.Box):
        return int(np.prod(space.shape))
    raise ValueError(
        f"observation space {space} is not supported: use Box, Discrete, MultiBinary, "
        "or a Dict of those"
    )


class MemoryFeaturesExtractor(BaseFeaturesExtractor):
    """Encode Box, Discrete or Dict observations into ``features_dim`` features.

    * integer ``[H, W, C]`` grids (MiniGrid's symbolic image after
      :class:`mnm_rl.envs.minigrid.SymbolicMiniGrid`): per-channel embeddings, and with
      ``grid_pooling`` also their sum over the cells (:class:`SymbolicGridEncoder`);
    * other Box and Discrete spaces (Discrete one-hot encoded by SB3's ``preprocess_obs``): flat;
    * Dict spaces: each key encoded as above, concatenated.

    Then one ``Linear + ReLU`` layer to ``features_dim``.

    With one grid among the inputs, on a CPU, the grid's part of that layer runs through a
    compiled kernel that never builds the flat embeddings (:mod:`mnm_rl.agent.grid_linear`:
    about 4x faster over a PPO minibatch of MiniGrid views, forward and backward); the same
    parameters, the same function. Small batches without gradients (a rollout step of a few
    envs) take the plain path, which is faster there.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        features_dim: int = 64,
        embedding_dim: int = 8,
        grid_pooling: bool = False,
    ):
        super().__init__(observation_space, features_dim)
        subspaces = (
            dict(observation_space.spaces)
            if isinstance(observation_space, spaces.Dict)
            else {None: observation_space}
        )
        self.keys = list(subspaces)
        encoders: dict[str, nn.Module] = {}
        widths: dict[str, int] = {}
        for key, space in subspaces.items():
            name = "obs" if key is None else str(key)
            if is_symbolic_grid(space):
                encoders[name] = SymbolicGridEncoder(space, embedding_dim, grid_pooling)
                widths[name] = encoders[name].output_dim
            else:
                encoders[name] = nn.Flatten()
                widths[name] = _flat_dim(space)
        self.encoders = nn.ModuleDict(encoders)
        self.linear = nn.Sequential(nn.Linear(sum(widths.values()), features_dim), nn.ReLU())
        #: The grid's key and the linear layer's columns, for the compiled kernel (``None``
        #: unless exactly one input is a grid).
        self.grid_layout = self._grid_layout(widths)

    def _grid_layout(self, widths: dict[str, int]) -> tuple[str, GridLayout] | None:
        grids = [name for name, e in self.encoders.items() if isinstance(e, SymbolicGridEncoder)]
        if len(grids) != 1:
            return None
        grid: SymbolicGridEncoder = self.encoders[grids[0]]
        column, grid_column, dense = 0, 0, []
        for name, width in widths.items():
            if name == grids[0]:
                grid_column = column
            else:
                dense.extend(range(column, column + width))
            column += width
        flat_width = grid.cells * grid.cell_dim
        layout = GridLayout(
            sizes=grid.sizes,
            grid_column=grid_column,
            pool_column=grid_column + flat_width if grid.pooling else -1,
            dense_columns=tuple(dense),
        )
        return grids[0], layout

    def forward(self, observations: Tensor | dict[str, Tensor]) -> Tensor:
        named = (
            {str(k): observations[k] for k in self.keys}
            if isinstance(observations, dict)
            else {"obs": observations}
        )
        kernel = self._grid_kernel(named)
        if kernel is not None:
            return self._forward_compiled(kernel, named)
        parts = [self.encoders[name](x) for name, x in named.items()]
        linear: nn.Linear = self.linear[0]  # by the kernels' products where they apply
        return self.linear[1](products.linear(torch.cat(parts, dim=-1), linear.weight, linear.bias))

    def explicit_forward(
        self, observations: Tensor | dict[str, Tensor]
    ) -> tuple[Tensor, Callable[[Tensor], Gradients]] | None:
        """:meth:`forward` without autograd, and its backward pass from the features' gradient
        to the parameters' (:mod:`mnm_rl.agent.explicit`); run both under ``torch.no_grad()``.
        With one grid, by the compiled grid kernel's forward and backward (``None`` on other
        devices or where it is not built); without a grid, by
        :func:`~mnm_rl.memory.products.linear_explicit`; ``None`` with several grids."""
        named = (
            {str(k): observations[k] for k in self.keys}
            if isinstance(observations, dict)
            else {"obs": observations}
        )
        linear: nn.Linear = self.linear[0]
        if self.grid_layout is None:
            if any(isinstance(e, SymbolicGridEncoder) for e in self.encoders.values()):
                return None
            x = torch.cat([self.encoders[name](x) for name, x in named.items()], dim=-1)
            out, linear_backward = products.linear_explicit(x, linear.weight, linear.bias)
            features = out.relu_()

            def backward(grad: Tensor) -> Gradients:
                grad = relu_backward(grad, features)
                _, g_weight, g_bias = linear_backward(grad, False)
                return [(linear.weight, g_weight), (linear.bias, g_bias)]

            return features, backward
        grid_name, layout = self.grid_layout
        grid = named[grid_name]
        kernel = (
            grid_linear.load_extension()
            if grid.device.type == "cpu" and linear.weight.device.type == "cpu"
            else None
        )
        if kernel is None:
            return None
        encoder: SymbolicGridEncoder = self.encoders[grid_name]
        grid, table, dense = self._grid_inputs(named)
        arguments = layout.arguments()
        out, symbol_rows, effective = kernel.grid_linear_forward(
            grid, table, linear.weight, linear.bias, dense, *arguments
        )
        features = out.relu_()

        def grid_backward(grad: Tensor) -> Gradients:
            grad = relu_backward(grad, features)
            g_table, g_weight, g_bias, _ = kernel.grid_linear_backward(
                grad, symbol_rows, table, effective, linear.weight, dense, *arguments, False
            )
            tables = [emb.weight for emb in encoder.embeddings]
            return [
                *zip(tables, g_table.split(encoder.sizes), strict=True),
                (linear.weight, g_weight), (linear.bias, g_bias),
            ]  # fmt: skip

        return features, grid_backward

    def _grid_kernel(self, named: dict[str, Tensor]) -> ModuleType | None:
        """The compiled grid kernel where it applies and pays: one grid, CPU tensors, and a
        backward pass to come or a batch of at least :data:`COMPILED_MIN_ROWS`."""
        if self.grid_layout is None:
            return None
        linear: nn.Linear = self.linear[0]
        grid = named[self.grid_layout[0]]
        if grid.device.type != "cpu" or linear.weight.device.type != "cpu":
            return None
        backward = torch.is_grad_enabled() and linear.weight.requires_grad
        if not backward and grid.shape[0] < COMPILED_MIN_ROWS:
            return None
        return grid_linear.load_extension()

    def _grid_inputs(self, named: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The grid kernel's inputs: the grid ``[N, S]``, the embedding tables one after
        another, and the other inputs ``[N, D]`` in the linear layer's dtype."""
        grid_name, _ = self.grid_layout
        encoder: SymbolicGridEncoder = self.encoders[grid_name]
        grid = named[grid_name]
        rows = grid.shape[0]
        dense = [x.reshape(rows, -1) for name, x in named.items() if name != grid_name]
        dense = torch.cat(dense, 1) if dense else grid.new_empty(rows, 0)
        return grid.reshape(rows, -1), encoder.table(), dense.to(self.linear[0].weight.dtype)

    def _forward_compiled(self, kernel: ModuleType, named: dict[str, Tensor]) -> Tensor:
        linear: nn.Linear = self.linear[0]
        grid, table, dense = self._grid_inputs(named)
        out = grid_linear.grid_linear(
            kernel, self.grid_layout[1], grid, table, linear.weight, linear.bias, dense
        )
        return self.linear[1](out)
