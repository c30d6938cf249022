"""Observation encoders that turn one observation into a flat feature vector."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import Tensor, nn


def is_symbolic_grid(space: spaces.Space) -> bool:
    """An integer ``[H, W, C]`` Box: a grid of symbols (MiniGrid's encoded image), not pixels."""
    return (
        isinstance(space, spaces.Box)
        and len(space.shape) == 3
        and np.issubdtype(space.dtype, np.integer)
        and space.dtype != np.uint8
    )


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
        self.register_buffer(
            "offsets", torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.long), persistent=False
        )

    def forward(self, grid: Tensor) -> Tensor:
        # Equivalent to ``cat([embeddings[i](grid[..., i]) for i], -1).flatten(1)``: one
        # index_select in the concatenated tables, with channel i's symbols shifted by its offset,
        # gives the same rows in the same order. One lookup instead of one per channel, and on a
        # CPU index_select's backward (index_add) is several times cheaper than embedding's.
        table = torch.cat([emb.weight for emb in self.embeddings])
        rows = (grid.long() + self.offsets).flatten()
        cells = table.index_select(0, rows).view(grid.shape[0], self.cells, self.cell_dim)
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
        total = 0
        for key, space in subspaces.items():
            name = "obs" if key is None else str(key)
            if is_symbolic_grid(space):
                encoder = SymbolicGridEncoder(space, embedding_dim, grid_pooling)
                total += encoder.output_dim
            else:
                encoder = nn.Flatten()
                total += _flat_dim(space)
            encoders[name] = encoder
        self.encoders = nn.ModuleDict(encoders)
        self.linear = nn.Sequential(nn.Linear(total, features_dim), nn.ReLU())

    def forward(self, observations: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(observations, dict):
            parts = [self.encoders[str(k)](observations[k]) for k in self.keys]
        else:
            parts = [self.encoders["obs"](observations)]
        return self.linear(torch.cat(parts, dim=-1))
