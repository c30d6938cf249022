"""The interface every recurrent core implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from mnm_rl.memory.state import CoreState

#: Per-step diagnostics a core returns, each of shape ``[T, B]``. MNM cores fill every key
#: (``recon_retained`` is zero unless the core has a retention lag); cores without an external
#: memory return an empty dict.
AUX_KEYS = ("recon_after", "recon_before", "recon_retained", "beta", "fast_weight_norm")

#: Parameters' gradients as an explicit backward pass gives them: ``(parameter, gradient)`` pairs.
Gradients = list[tuple[nn.Parameter, Tensor]]
#: The backward pass of :meth:`RecurrentCore.explicit_forward`: the outputs' gradient
#: ``[T, B, output_size]`` in; the inputs' gradient ``[T, B, input_size]`` and the parameters'
#: gradients out.
CoreBackward = Callable[[Tensor], tuple[Tensor, Gradients]]


def memory_loss(aux: Mapping[str, Tensor]) -> Tensor:
    """The memory's meta-loss from a core's diagnostics ``aux`` (:data:`AUX_KEYS`): the mean
    post-write reconstruction error plus the mean retention error, a scalar."""
    return aux["recon_after"].mean() + aux["recon_retained"].mean()


def diagnostics_summary(aux: Mapping[str, Tensor]) -> dict[str, float]:
    """What a training log reads of a core's diagnostics ``aux`` (:data:`AUX_KEYS`, each ``[T,
    B]``), as host numbers in one pass: the mean of each key, ``memory_loss`` (the value of
    :func:`memory_loss`) and ``max_fast_weight_norm`` (NaN if any norm is). Without gradients;
    on a CPU by one call of the compiled kernels (``summary_statistics``, sums in double), else
    by one stacked reduction, so the means may differ from each key's own ``mean()`` in the
    last bits. (A dozen separate reductions and host reads cost an MNM core's PPO update about
    2%.)"""
    from mnm_rl.memory import fused  # which imports this module

    tensors = [aux[key] for key in AUX_KEYS]
    kernel = fused.load_extension() if all(t.device.type == "cpu" for t in tensors) else None
    if kernel is not None and all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        *values, largest = kernel.summary_statistics(tensors)
        means = dict(zip(AUX_KEYS, values, strict=True))
    else:
        with torch.no_grad():
            stacked = torch.stack(tensors)
            means = dict(zip(AUX_KEYS, stacked.mean(dim=(1, 2)).tolist(), strict=True))
            largest = stacked[AUX_KEYS.index("fast_weight_norm")].max().item()
    return {
        **means,
        "memory_loss": means["recon_after"] + means["recon_retained"],
        "max_fast_weight_norm": largest,
    }


class LazyDiagnostics(Mapping[str, Tensor]):
    """The diagnostics of :data:`AUX_KEYS`, computed from ``compute()`` on first access.

    A rollout step does not read them, and at one step of a few environments their dozen small
    ops cost about a tenth of an MNM core's step. They are computed in the autograd mode they
    were created in (so a loss built from them in training backpropagates as if they had been
    computed at once), and only once.
    """

    def __init__(self, compute: Callable[[], dict[str, Tensor]]):
        self._compute: Callable[[], dict[str, Tensor]] | None = compute
        self._values: dict[str, Tensor] = {}
        self._inference = torch.is_inference_mode_enabled()
        self._grad = torch.is_grad_enabled()

    def _computed(self) -> dict[str, Tensor]:
        if self._compute is not None:
            with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
                self._values = self._compute()
            self._compute = None
        return self._values

    def __getitem__(self, key: str) -> Tensor:
        return self._computed()[key]

    def __contains__(self, key: object) -> bool:
        return key in AUX_KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(AUX_KEYS)

    def __len__(self) -> int:
        return len(AUX_KEYS)


class RecurrentCore(nn.Module, ABC):
    """A recurrent feature extractor over time-major sequences.

    Subclasses set ``input_size`` and ``output_size`` and implement :meth:`initial_state` and
    :meth:`forward`.
    """

    input_size: int
    output_size: int
    #: Whether the core returns the memory diagnostics in ``aux`` (and thus a meta-loss).
    has_memory_loss: bool = False
    #: Whether :meth:`explicit_forward` can give a pass (where its kernels apply).
    has_explicit_backward: bool = False

    @abstractmethod
    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> CoreState:
        """The state at the start of an episode for ``batch_size`` environments."""

    @abstractmethod
    def forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor
    ) -> tuple[Tensor, CoreState, Mapping[str, Tensor]]:
        """Run the core over a sequence.

        Args:
            x: inputs, ``[T, B, input_size]``.
            state: the state before step 0, batch size ``B``.
            episode_starts: ``[T, B]``, nonzero where environment ``b`` starts a new episode at step
                ``t``: its state is reset to the initial state *before* step ``t`` is processed.

        Returns:
            ``(features [T, B, output_size], final_state, aux)`` where ``aux`` maps names in
            :data:`AUX_KEYS` to ``[T, B]`` tensors (empty for cores without external memory; an
            MNM core's computes them on first access, :class:`LazyDiagnostics`).
        """

    def explicit_forward(
        self, x: Tensor, state: CoreState, episode_starts: Tensor, memory_weight: float = 0.0
    ) -> tuple[Tensor, Mapping[str, Tensor], CoreBackward] | None:
        """:meth:`forward`'s features and diagnostics without autograd, and the backward pass
        that maps the features' gradient to the gradients of ``x`` and of the parameters, by
        the compiled kernels' own backward passes (training without the autograd engine:
        :mod:`mnm_rl.agent.explicit`). The backward pass adds the gradient of
        ``memory_weight * memory_loss(aux)`` (:func:`memory_loss`; cores with a memory).

        Arguments as for :meth:`forward`; call it and the backward pass under
        ``torch.no_grad()``. The final state gets no gradient (a PPO minibatch does not use
        it). ``None`` where the core has no such pass here (then train through
        :meth:`forward`); a core that may have one sets :attr:`has_explicit_backward`.
        """
        return None

    def memory_parameters(self) -> list[nn.Parameter]:
        """The parameters that decide how an external memory is written and read (empty for
        cores without one); an optimizer may give them their own learning rate."""
        return []

    def _check_inputs(self, x: Tensor, state: CoreState, episode_starts: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"x must be [T, B, {self.input_size}], got {tuple(x.shape)}")
        if tuple(episode_starts.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"episode_starts must be [T, B] = {tuple(x.shape[:2])}, "
                f"got {tuple(episode_starts.shape)}"
            )
        if state.batch_size != x.shape[1]:
            raise ValueError(f"state has batch size {state.batch_size}, x has {x.shape[1]}")
