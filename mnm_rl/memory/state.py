"""Recurrent state of a memory core: a flat mapping of batch-first tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor


class CoreState(dict[str, Tensor]):
    """The state a recurrent core carries from step to step.

    Every tensor has the batch (environment) dimension first, so a state can be indexed per
    environment, concatenated, moved and detached without knowing which core made it. An MNM state
    holds ``h, c, read`` of shape ``[B, D]`` and ``fast_weights`` of shape ``[B, L, D, D]``; an MLP
    core's state is empty apart from its batch size.
    """

    def __init__(self, tensors: Mapping[str, Tensor] | None = None, batch_size: int | None = None):
        super().__init__(tensors or {})
        sizes = {t.shape[0] for t in self.values()}
        if len(sizes) > 1:
            raise ValueError(f"state tensors disagree on batch size: {sorted(sizes)}")
        if sizes:
            (size,) = sizes
            if batch_size is not None and batch_size != size:
                raise ValueError(f"batch_size={batch_size} but tensors have batch size {size}")
            batch_size = size
        if batch_size is None:
            raise ValueError("an empty CoreState needs an explicit batch_size")
        self.batch_size = int(batch_size)

    def _map(self, fn) -> CoreState:
        return CoreState({k: fn(v) for k, v in self.items()}, batch_size=self.batch_size)

    def index(self, idx: int | slice | Sequence[int] | Tensor) -> CoreState:
        """Select environments along the batch dimension (keeps the dimension)."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, slice):
            size = len(range(*idx.indices(self.batch_size)))
        elif isinstance(idx, Tensor) and idx.dtype == torch.bool:
            size = int(idx.sum())
        else:
            size = len(idx)
        if isinstance(idx, Tensor) and not self:
            return CoreState(batch_size=size)
        if isinstance(idx, Tensor) and idx.dtype == torch.long:  # 4x faster than v[idx] on a CPU
            return CoreState({k: v.index_select(0, idx) for k, v in self.items()}, batch_size=size)
        return CoreState({k: v[idx] for k, v in self.items()}, batch_size=size)

    def to(self, device: torch.device | str) -> CoreState:
        """Move every tensor to ``device``."""
        return self._map(lambda v: v.to(device))

    def detach(self) -> CoreState:
        """Cut the autograd graph (truncated backpropagation through time) without resetting."""
        return self._map(Tensor.detach)

    def clone(self) -> CoreState:
        return self._map(Tensor.clone)

    @property
    def device(self) -> torch.device | None:
        for v in self.values():
            return v.device
        return None

    def numel(self) -> int:
        """Number of floats held per batch, all environments together."""
        return sum(v.numel() for v in self.values())

    @staticmethod
    def cat(states: Iterable[CoreState]) -> CoreState:
        """Concatenate states along the batch dimension."""
        states = list(states)
        if not states:
            raise ValueError("cannot concatenate zero states")
        keys = set(states[0])
        for s in states[1:]:
            if set(s) != keys:
                raise ValueError(f"states have different keys: {sorted(keys)} vs {sorted(s)}")
        return CoreState(
            {k: torch.cat([s[k] for s in states]) for k in states[0]},
            batch_size=sum(s.batch_size for s in states),
        )

    @staticmethod
    def stack(states: Sequence[CoreState]) -> CoreState:
        """Stack states along a new leading dimension: ``[N, B, ...]``, batch size ``N``."""
        return CoreState(
            {k: torch.stack([s[k] for s in states]) for k in states[0]}, batch_size=len(states)
        )

    def reset_where(self, reset: Tensor, initial: CoreState) -> CoreState:
        """Replace the state of environments where ``reset[b]`` is true by ``initial``.

        ``reset`` has shape ``[B]`` (bool or 0/1). Done by masking, never by branching per element,
        so it is differentiable and has no host-device synchronisation.
        """
        keep = (~reset.bool()) if reset.dtype == torch.bool else (reset == 0)
        out = {}
        for k, v in self.items():
            mask = keep.view(-1, *([1] * (v.dim() - 1)))
            out[k] = torch.where(mask, v, initial[k].to(v.dtype).expand_as(v))
        return CoreState(out, batch_size=self.batch_size)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.items())
        return f"CoreState(batch_size={self.batch_size}, {shapes})"
