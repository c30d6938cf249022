"""The policy's action and value heads as compiled calls (``csrc/action_heads.cpp``): for one
rollout step, with the actions drawn, and over a training minibatch, forward and backward.

At every rollout step :class:`~mnm_rl.agent.policy.RecurrentMemoryPolicy` runs its two heads on
the core's output, draws the actions and takes their log-probabilities: in PyTorch about fifteen
small operators (two MLPs, the log-softmax and exponential race of
:meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.sample`, a gather, a finiteness check), each a
few microseconds at a batch of 8 envs, whatever its size. :func:`heads_step` does the same in
one call: the heads' layers through ATen's ``addmm``, the rest in one loop over the batch. It
draws the race from torch's default generator as ``sample`` does, so the same seed gives the
same actions. (Where the whole step is one call, :mod:`mnm_rl.agent.policy_step`, that call runs
the heads itself.)

In training, :func:`train_heads` runs both heads over a minibatch in one call forward and one
backward, instead of about twenty operators and their autograd nodes; its tanh is the kernels'
own (a few float ulps from ``torch.tanh``, which on an AMD CPU goes through MKL's generic code at
2.4 ns a float, 8x ``torch.sigmoid``'s). ``tests/test_action_heads.py`` compares both with the
PyTorch code.

Used on CPU float tensors, for heads whose activation is ``nn.Tanh`` or ``nn.ReLU``: the step
without gradients (rollouts and ``predict``), the training heads with them; otherwise the
PyTorch code runs, and also with ``MNM_RL_COMPILED_HEADS=0`` in the environment (only these
heads) or ``MNM_RL_FUSED=0`` (every compiled kernel).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mnm_rl import native
from mnm_rl.memory import fused
from mnm_rl.memory.base import Gradients

#: The kernel's C++ source, built into its own extension.
SOURCES = [Path(__file__).with_name("csrc") / "action_heads.cpp"]
#: The extension, built on first use.
EXTENSION = native.LazyExtension("mnm_rl_action_heads", SOURCES, "the compiled action heads")
#: Environment variable: ``0`` runs the heads in PyTorch, whatever the other kernels do.
SWITCH_VARIABLE = "MNM_RL_COMPILED_HEADS"
#: The activations the kernel runs between a head's layers, and its code for each.
ACTIVATION_CODES: dict[type[nn.Module], int] = {nn.Tanh: 0, nn.ReLU: 1}


def load_extension() -> ModuleType | None:
    """The compiled heads, built on first use; ``None`` (with one warning) if they cannot be
    built, and ``None`` without building them under ``MNM_RL_COMPILED_HEADS=0`` or
    ``MNM_RL_FUSED=0``."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    return EXTENSION.load()


def layer_tensors(head: nn.Sequential) -> list[Tensor]:
    """``[W_0, b_0, W_1, b_1, ...]``: the weights and biases of a head's ``Linear`` layers."""
    return [t for layer in head if isinstance(layer, nn.Linear) for t in (layer.weight, layer.bias)]


def applies(latent: Tensor, activation_fn: type[nn.Module]) -> bool:
    """Whether the kernel can run heads with ``activation_fn`` on ``latent``: a CPU float tensor,
    no gradient wanted."""
    return (
        activation_fn in ACTIVATION_CODES
        and latent.device.type == "cpu"
        and latent.dtype in (torch.float32, torch.float64)
        and not torch.is_grad_enabled()
    )


def heads_step(
    kernel: ModuleType,
    latent: Tensor,
    value_latent: Tensor,
    action_net: nn.Sequential,
    value_net: nn.Sequential,
    activation_fn: type[nn.Module],
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The heads on ``latent [B, F]`` (actor) and ``value_latent [B, F]`` (critic), through the
    compiled kernel (:func:`load_extension`).

    Returns ``(actions [B], log_probs [B], values [B], finite)``: the actions drawn from the
    logits as :meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.sample` draws them (the mode if
    ``deterministic``), their log-probabilities, the values, and whether every logit is finite.
    """
    return kernel.heads_step(
        latent.contiguous(),
        value_latent.contiguous(),
        layer_tensors(action_net),
        layer_tensors(value_net),
        ACTIVATION_CODES[activation_fn],
        deterministic,
    )


def trains(latent: Tensor, action_net: nn.Sequential, activation_fn: type[nn.Module]) -> bool:
    """Whether :func:`train_heads` can run the heads on ``latent`` with a backward pass to come:
    CPU float tensors, an activation the kernel has, gradients on."""
    return (
        activation_fn in ACTIVATION_CODES
        and latent.device.type == "cpu"
        and latent.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and action_net[0].weight.device.type == "cpu"
    )


#: The fewest rows for which the heads' training passes run the actor and the critic on a
#: thread each (with two kernel threads): a minibatch's 256 rows do, a few rows would not gain.
MIN_THREAD_ROWS = 64


def head_threads(rows: int) -> int:
    """On how many threads (1 or 2) the heads' training passes run for ``rows`` rows: the actor
    on one and the critic on the other where the kernels have two threads
    (:func:`mnm_rl.memory.fused.kernel_threads`) and there are :data:`MIN_THREAD_ROWS` rows or
    more. The results are the same bit for bit."""
    return 2 if fused.kernel_threads() >= 2 and rows >= MIN_THREAD_ROWS else 1


class _TrainHeads(torch.autograd.Function):
    """``apply(kernel, activation, n_actor, latent, value_latent, *actor, *critic)`` ->
    ``(logits [N, A], values [N])``, with the heads' backward pass in the kernel too; ``actor``
    is ``n_actor`` tensors ``[W_0, b_0, ...]``, ``critic`` the rest."""

    @staticmethod
    def forward(ctx, kernel, activation, n_actor, latent, value_latent, *params):  # noqa: D102
        actor, critic = list(params[:n_actor]), list(params[n_actor:])
        threads = head_threads(latent.shape[0])
        logits, values, actor_in, critic_in = kernel.heads_forward(
            latent, value_latent, actor, critic, activation, threads
        )
        ctx.kernel, ctx.activation, ctx.threads = kernel, activation, threads
        ctx.counts = (n_actor, len(critic), len(actor_in))
        ctx.save_for_backward(*params, *actor_in, *critic_in)
        ctx.set_materialize_grads(False)
        return logits, values

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logits, g_values):  # noqa: D102
        n_actor, n_critic, n_actor_in = ctx.counts
        saved = ctx.saved_tensors
        actor, critic = saved[:n_actor], saved[n_actor : n_actor + n_critic]
        inputs = saved[n_actor + n_critic :]
        empty = torch.Tensor()  # stands for a zero gradient
        d_latent, d_value_latent, d_actor, d_critic = ctx.kernel.heads_backward(
            empty if g_logits is None else g_logits,
            empty if g_values is None else g_values,
            list(actor), list(critic), list(inputs[:n_actor_in]), list(inputs[n_actor_in:]),
            ctx.activation, ctx.threads,
        )  # fmt: skip
        return None, None, None, d_latent, d_value_latent, *d_actor, *d_critic


def train_heads(
    kernel: ModuleType,
    latent: Tensor,
    value_latent: Tensor,
    action_net: nn.Sequential,
    value_net: nn.Sequential,
    activation_fn: type[nn.Module],
) -> tuple[Tensor, Tensor]:
    """The heads on ``latent [..., F]`` (actor) and ``value_latent [..., F]`` (critic) with a
    backward pass to come, through the kernel: ``(logits [..., A], values [...])``, what
    ``action_net(latent)`` and ``value_net(value_latent).squeeze(-1)`` give, their tanh the
    kernels' own (a few float ulps from ``torch.tanh``, several times faster on the CPU)."""
    lead = latent.shape[:-1]
    actor, critic = layer_tensors(action_net), layer_tensors(value_net)
    logits, values = _TrainHeads.apply(
        kernel, ACTIVATION_CODES[activation_fn], len(actor),
        latent.reshape(-1, latent.shape[-1]), value_latent.reshape(-1, value_latent.shape[-1]),
        *actor, *critic,
    )  # fmt: skip
    return logits.view(*lead, -1), values.view(lead)


#: The heads' backward pass in an explicit pass: the logits' and values' gradients in; the
#: latents' gradients and the heads' parameters' gradients out.
HeadsBackward = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Gradients]]


def explicit_heads(
    kernel: ModuleType,
    latent: Tensor,
    value_latent: Tensor,
    action_net: nn.Sequential,
    value_net: nn.Sequential,
    activation_fn: type[nn.Module],
) -> tuple[Tensor, Tensor, HeadsBackward]:
    """:func:`train_heads`'s ``(logits [N, A], values [N])`` for latents ``[N, F]`` without
    autograd, and their backward pass by the kernel's (:mod:`mnm_rl.agent.explicit`); run both
    under ``torch.no_grad()``. Where :func:`trains` holds but for the gradient mode."""
    actor, critic = layer_tensors(action_net), layer_tensors(value_net)
    code, threads = ACTIVATION_CODES[activation_fn], head_threads(latent.shape[0])
    logits, values, actor_in, critic_in = kernel.heads_forward(latent, value_latent, actor,
                                                               critic, code, threads)  # fmt: skip

    def backward(g_logits: Tensor, g_values: Tensor) -> tuple[Tensor, Tensor, Gradients]:
        d_latent, d_value_latent, d_actor, d_critic = kernel.heads_backward(
            g_logits, g_values, actor, critic, actor_in, critic_in, code, threads
        )
        pairs = list(zip(actor + critic, d_actor + d_critic, strict=True))
        return d_latent, d_value_latent, pairs

    return logits, values, backward
