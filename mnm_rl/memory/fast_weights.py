"""The fast-weight memory network: a small bias-free MLP whose weights are written at every step.

Shapes used throughout (``B`` batch, ``H`` heads, ``L`` layers, ``D`` width):

* fast weights ``M``: ``[B, L, D, D]``; layer ``l`` maps ``z^{l-1}`` to ``a^l = M^l z^{l-1}``;
* keys and values: ``[B, H, D]``; write strength ``beta``: ``[B]``.

The network is ``z^0 = k``, ``z^l = act(M^l z^{l-1})`` for hidden layers, ``z^L = M^L z^{L-1}``
(linear output). Keys are RMS-normalised (``k / rms(k)``) before they enter, so every key has the
same energy ``D`` whatever the controller emits; this is one of the three things that keep long
episodes bounded (see :mod:`mnm_rl.memory` and ``docs/memory.md``).

Write rules (both "normalised": each layer's step is divided by the energy of that layer's input,
``sum_h ||z^{l-1}_h||^2``, the normalised-least-mean-squares scaling):

* ``mnm-p`` (local, the seed's "perceptron" rule):
  ``M^l <- M^l - beta * sum_h (z^l_h - z'^l_h) (z^{l-1}_h)^T / (sum_h ||z^{l-1}_h||^2 + eps)``
  with ``z^l`` the activations under the pre-write weights and targets ``z'^l`` predicted from the
  write value by the learned backward-feedback prediction function (BFPF) of layer ``l``.
* ``mnm-g`` (the paper's gradient write): one inner gradient step on
  ``L_up = mean_h ||f_M(k^w_h) - v^w_h||^2``, written out analytically (no double backward), with
  the same per-layer normalisation as a diagonal step size.

Why NLMS scaling: for a linear layer and one head, ``beta = 1`` moves the layer's response to the
key exactly onto its target and ``0 < beta < 2`` never overshoots, whatever the key's norm. The
seed's fixed ``2 / (H * D)`` scale ties the effective step to the activations' magnitude instead,
which both under-writes small activations and lets large ones diverge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WriteRule = Literal["mnm-p", "mnm-g"]
Activation = Literal["tanh", "sigmoid"]

_ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _activation_derivative(name: str, z: Tensor) -> Tensor:
    """Derivative of the activation expressed through its output ``z``."""
    return 1.0 - z * z if name == "tanh" else z * (1.0 - z)


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Scale the last dimension to unit root-mean-square (``||x||^2 = D``).

    ``x * rsqrt(mean(x^2) + eps)``, computed by PyTorch's fused ``rms_norm`` (one kernel).
    """
    return F.rms_norm(x, x.shape[-1:], eps=eps)


def layer_apply(weight: Tensor, z: Tensor) -> Tensor:
    """``a_h = W z_h`` for every head: ``weight [B, D, D]``, ``z [B, H, D]`` -> ``[B, H, D]``.

    One batched matmul per layer covers every head and every environment.
    """
    return torch.bmm(z, weight.transpose(-1, -2))


def outer_sum(delta: Tensor, z: Tensor) -> Tensor:
    """``sum_h delta_h z_h^T``: ``[..., H, D] x [..., H, D] -> [..., D, D]`` in one batched matmul.

    With ``[B, L, H, D]`` inputs this is every layer's update at once.
    """
    return torch.matmul(delta.transpose(-1, -2), z)


class FastWeightMemory(nn.Module):
    """An ``L``-layer bias-free MLP of width ``D`` with per-sequence fast weights.

    Holds the slow (meta-learned) parameters: the initial fast weights ``initial_weights``
    ``[L, D, D]`` and, for ``mnm-p``, the backward-feedback prediction functions.
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 3,
        write_rule: WriteRule = "mnm-p",
        activation: Activation = "tanh",
        eps: float = 1e-3,
    ):
        super().__init__()
        if write_rule not in ("mnm-p", "mnm-g"):
            raise ValueError(f"write_rule must be 'mnm-p' or 'mnm-g', got {write_rule!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.dim = dim
        self.n_layers = n_layers
        self.write_rule = write_rule
        self.activation = activation
        self.eps = eps
        # Meta-learned initial fast weights: orthogonal so that a fresh memory preserves the keys'
        # energy through every layer.
        init = torch.stack([nn.init.orthogonal_(torch.empty(dim, dim)) for _ in range(n_layers)])
        self.initial_weights = nn.Parameter(init)
        if write_rule == "mnm-p":
            # One BFPF per layer, computed as one Linear(D, L*D). The output layer's block starts
            # as the identity so that an untrained memory already stores the value itself.
            self.feedback = nn.Linear(dim, n_layers * dim)
            with torch.no_grad():
                self.feedback.weight[-dim:].copy_(torch.eye(dim))
                self.feedback.bias[-dim:].zero_()
        else:
            self.feedback = None

    def _act(self, a: Tensor) -> Tensor:
        return _ACTIVATIONS[self.activation](a)

    def initial(self, batch_size: int) -> Tensor:
        """The initial fast weights for ``batch_size`` sequences, ``[B, L, D, D]`` (a view)."""
        return self.initial_weights.unsqueeze(0).expand(batch_size, -1, -1, -1)

    def activations(
        self, weights: Tensor | Sequence[Tensor], keys: Tensor, normalized: bool = False
    ) -> list[Tensor]:
        """``[z^0, ..., z^L]`` for RMS-normalised ``keys`` ``[B, H, D]`` under ``weights``.

        ``normalized=True`` says ``keys`` are already RMS-normalised (``z^0 = keys``).

        ``weights`` is ``[B, L, D, D]`` or its ``L`` layers ``[B, D, D]``. It is split into layers
        with one ``unbind`` rather than indexed per layer: the gradient of ``unbind`` is one
        ``stack``, while each ``weights[:, l]`` would cost a zero-filled ``[B, L, D, D]`` gradient
        plus an accumulation in the backward pass.
        """
        layers = weights.unbind(1) if isinstance(weights, Tensor) else weights
        zs = [keys if normalized else rms_normalize(keys)]
        for layer in range(self.n_layers):
            a = layer_apply(layers[layer], zs[-1])
            zs.append(a if layer == self.n_layers - 1 else self._act(a))
        return zs

    def read(
        self, weights: Tensor | Sequence[Tensor], keys: Tensor, normalized: bool = False
    ) -> Tensor:
        """The memory's answer to each key, ``[B, H, D]`` (callers average over heads)."""
        return self.activations(weights, keys, normalized)[-1]

    def write(
        self,
        weights: Tensor | Sequence[Tensor],
        keys: Tensor,
        values: Tensor,
        beta: Tensor,
        normalized: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Write ``keys -> values`` with strength ``beta [B]``.

        Returns the new fast weights and the memory's pre-write answer to the keys ``[B, H, D]``
        (computed on the way, for the pre-write reconstruction loss). ``weights`` is
        ``[B, L, D, D]`` or a list of its ``L`` layers ``[B, D, D]``; the new weights come back in
        the same form (a recurrent loop keeps the list, so no step splits or stacks the ``L * D^2``
        floats per sequence). ``normalized``: as for :meth:`activations`. Fully differentiable:
        the outer loss trains the write rule through this function.
        """
        stacked = isinstance(weights, Tensor)
        layers = weights.unbind(1) if stacked else weights
        zs = self.activations(layers, keys, normalized)
        if self.write_rule == "mnm-p":
            targets = self.targets(values)
            deltas = [zs[layer + 1] - targets[layer] for layer in range(self.n_layers)]
        else:
            deltas = self._backprop(layers, zs, values)
        # M^l <- M^l - scale^l * sum_h delta^l_h (z^{l-1}_h)^T with
        # scale^l = beta / (sum_h ||z^{l-1}_h||^2 + eps). The scale is constant over h, so it is
        # folded into delta, and the subtraction is fused into the outer product (baddbmm with
        # alpha=-1): one [B, D, D] result per layer, no separate product or negated gradient.
        energy = torch.stack(zs[:-1], dim=1).pow(2).sum(dim=(2, 3)) + self.eps  # [B, L]
        scales = (beta.unsqueeze(1) / energy).unsqueeze(-1).unsqueeze(-1).unbind(1)  # [B, 1, 1]
        new_layers = [
            torch.baddbmm(
                layers[layer], (delta * scales[layer]).transpose(1, 2), zs[layer], alpha=-1
            )
            for layer, delta in enumerate(deltas)
        ]
        return (torch.stack(new_layers, dim=1) if stacked else new_layers), zs[-1]

    def targets(self, values: Tensor) -> list[Tensor]:
        """mnm-p's target activations ``z'^l = BFPF^l(v)``, ``L`` tensors of ``[B, H, D]``.

        Hidden-layer targets pass through the layer's activation so they lie in its range (a
        target the activation cannot reach would grow the weights without bound); the output
        layer's target is linear, as the output layer is.
        """
        assert self.feedback is not None
        raw = self.feedback(values).split(self.dim, dim=-1)
        return [t if layer == self.n_layers - 1 else self._act(t) for layer, t in enumerate(raw)]

    def _backprop(
        self, weights: Tensor | Sequence[Tensor], zs: list[Tensor], values: Tensor
    ) -> list[Tensor]:
        """Per-layer output errors of ``mean_h ||f(k_h) - v_h||^2``, up to the factor ``2 / H``.

        Returns ``delta^l`` with ``dL/dM^l = (2 / H) * sum_h delta^l_h (z^{l-1}_h)^T``.
        """
        layers = weights.unbind(1) if isinstance(weights, Tensor) else weights
        delta = zs[-1] - values
        deltas = [delta]
        for layer in range(self.n_layers - 1, 0, -1):
            delta = torch.matmul(delta, layers[layer]) * _activation_derivative(
                self.activation, zs[layer]
            )
            deltas.append(delta)
        return deltas[::-1]

    def reconstruction_grad(self, weights: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Analytic ``d/dM mean_h ||f_M(k_h) - v_h||^2``, ``[B, L, D, D]`` (summed over ``D``)."""
        zs = self.activations(weights, keys)
        n_heads = keys.shape[1]
        deltas = self._backprop(weights, zs, values)
        return torch.stack(
            [(2.0 / n_heads) * outer_sum(d, zs[layer]) for layer, d in enumerate(deltas)], dim=1
        )

    @staticmethod
    def reconstruction_loss(prediction: Tensor, values: Tensor) -> Tensor:
        """Mean squared error per sequence, averaged over heads and dimensions (the last two
        dimensions): ``[B, H, D] -> [B]``, or ``[T, B, H, D] -> [T, B]`` for a whole sequence."""
        return (prediction - values).pow(2).mean(dim=(-2, -1))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_layers={self.n_layers}, write_rule={self.write_rule!r}, "
            f"activation={self.activation!r}"
        )


def fast_weight_norm(weights: Tensor | Sequence[Tensor]) -> Tensor:
    """Frobenius norm of all fast weights per sequence, divided by ``sqrt(L * D)``: ``[B]``.

    ``weights`` is ``[B, L, D, D]`` or a list of its layers. The orthogonal initialisation has
    norm 1 on this scale.
    """
    layers = weights.unbind(1) if isinstance(weights, Tensor) else weights
    per_layer = torch.stack([torch.linalg.vector_norm(w, dim=(1, 2)) for w in layers], dim=1)
    return torch.linalg.vector_norm(per_layer, dim=1) / math.sqrt(len(layers) * layers[0].shape[-1])
