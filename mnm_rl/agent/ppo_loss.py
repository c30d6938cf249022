"""PPO's clipped loss of a minibatch, in PyTorch or as one compiled call (``csrc/ppo_loss.cpp``).

:func:`ppo_loss` takes the policy's logits and values over a minibatch and the rollout's
actions, log-probabilities, advantages, returns and values, and gives the loss that
:class:`~mnm_rl.agent.ppo.MemoryPPO` minimises (stable-baselines3's PPO loss: the clipped
surrogate, the entropy bonus, the optionally clipped value error) with its statistics.

In PyTorch (:func:`ppo_loss_torch`) that is about thirty small operators and as many in the
backward pass, each a few microseconds at a minibatch of 256 steps: about 0.35 ms per minibatch,
some 15% of an lstm agent's update. The compiled kernel computes the loss, the statistics and the
gradients with respect to the logits and values in one pass over the steps; its backward pass
only scales those gradients. It follows autograd's conventions where they choose (a tie of
``min``'s arguments, ``clamp`` at its bounds, probabilities of exactly 0), so both give the same
loss and gradients to rounding; ``tests/test_ppo_loss.py`` compares them.

The kernel runs on CPU float tensors; otherwise the PyTorch code does, and also with
``MNM_RL_COMPILED_LOSS=0`` in the environment (only this loss) or ``MNM_RL_FUSED=0`` (every
compiled kernel).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Categorical
from torch.nn import functional as F

from mnm_rl import native

#: The kernel's C++ source, built into its own extension.
SOURCES = [Path(__file__).with_name("csrc") / "ppo_loss.cpp"]
#: The extension, built on first use.
EXTENSION = native.LazyExtension("mnm_rl_ppo_loss", SOURCES, "the compiled PPO loss")
#: Environment variable: ``0`` computes the loss in PyTorch, whatever the other kernels do.
SWITCH_VARIABLE = "MNM_RL_COMPILED_LOSS"
#: What :func:`ppo_loss`'s statistics hold, in order (SB3's ``train/`` names).
STAT_NAMES = ("policy_gradient_loss", "value_loss", "entropy_loss", "approx_kl", "clip_fraction")


class LossSettings(NamedTuple):
    """PPO's coefficients for one update."""

    clip_range: float
    clip_range_vf: float | None
    ent_coef: float
    vf_coef: float
    normalize_advantage: bool


class RolloutSteps(NamedTuple):
    """What the rollout stored for the minibatch's steps, each ``[...]`` like the values."""

    actions: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    returns: Tensor
    old_values: Tensor


def load_extension() -> ModuleType | None:
    """The compiled loss, built on first use; ``None`` (with one warning) if it cannot be built,
    and ``None`` without building it under ``MNM_RL_COMPILED_LOSS=0`` or ``MNM_RL_FUSED=0``."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    return EXTENSION.load()


def applies(logits: Tensor) -> bool:
    """Whether the kernel can take ``logits``: a CPU float32 or float64 tensor."""
    return logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)


def ppo_loss(
    logits: Tensor, values: Tensor, steps: RolloutSteps, settings: LossSettings
) -> tuple[Tensor, Tensor]:
    """PPO's loss of a minibatch and its statistics.

    Args:
        logits: the policy's action logits ``[..., A]``.
        values: its values ``[...]``.
        steps: the rollout's actions, log-probabilities, advantages, returns and values ``[...]``.
        settings: the clip ranges and coefficients.

    Returns:
        ``(loss, stats)``: the scalar loss ``policy + ent_coef * entropy + vf_coef * value``, and
        ``stats [5]`` (no gradient) in the order of :data:`STAT_NAMES`. Through the compiled
        kernel where :func:`applies` and it loads, else :func:`ppo_loss_torch`.
    """
    _check_settings(settings)
    if applies(logits):
        kernel = load_extension()
        if kernel is not None:
            return _CompiledLoss.apply(logits, values, kernel, steps, settings)
    return ppo_loss_torch(logits, values, steps, settings)


def ppo_loss_explicit(
    logits: Tensor, values: Tensor, steps: RolloutSteps, settings: LossSettings
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """:func:`ppo_loss` by the kernel with the loss's gradients, for a backward pass without
    autograd (:mod:`mnm_rl.agent.explicit`): ``(loss, stats, grad_logits, grad_values)``, the
    gradients shaped as ``logits`` and ``values``. ``None`` where :func:`ppo_loss` would not
    take the kernel."""
    _check_settings(settings)
    kernel = load_extension() if applies(logits) else None
    if kernel is None:
        return None
    return _kernel_loss(kernel, logits, values, steps, settings)


def _check_settings(settings: LossSettings) -> None:
    for name in ("clip_range", "clip_range_vf"):
        value = getattr(settings, name)
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value}")


def _kernel_loss(
    kernel: ModuleType, logits: Tensor, values: Tensor, steps: RolloutSteps,
    settings: LossSettings,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    clip_range_vf = -1.0 if settings.clip_range_vf is None else settings.clip_range_vf
    return kernel.ppo_loss(
        logits, values, steps.actions, steps.old_log_probs, steps.advantages,
        steps.returns, steps.old_values, float(settings.clip_range), float(clip_range_vf),
        float(settings.ent_coef), float(settings.vf_coef), bool(settings.normalize_advantage),
    )  # fmt: skip


def ppo_loss_torch(
    logits: Tensor, values: Tensor, steps: RolloutSteps, settings: LossSettings
) -> tuple[Tensor, Tensor]:
    """:func:`ppo_loss` in PyTorch operators, on any device (stable-baselines3's PPO loss)."""
    dist = Categorical(logits=logits, validate_args=False)
    log_prob = dist.log_prob(steps.actions)
    advantages = steps.advantages
    if settings.normalize_advantage and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = log_prob - steps.old_log_probs
    ratio = torch.exp(log_ratio)
    clip_range = settings.clip_range
    policy_loss = -torch.min(
        advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    ).mean()
    if settings.clip_range_vf is not None:
        values = steps.old_values + torch.clamp(
            values - steps.old_values, -settings.clip_range_vf, settings.clip_range_vf
        )
    value_loss = F.mse_loss(steps.returns, values)
    entropy_loss = -dist.entropy().mean()
    loss = policy_loss + settings.ent_coef * entropy_loss + settings.vf_coef * value_loss
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_fraction = (torch.abs(ratio - 1) > clip_range).float().mean()
        stats = torch.stack(
            [policy_loss, value_loss, entropy_loss, approx_kl, clip_fraction.to(approx_kl)]
        )
    return loss, stats


class _CompiledLoss(torch.autograd.Function):
    """The kernel's loss; its gradient, computed with it, scaled by the incoming one."""

    @staticmethod
    def forward(ctx, logits, values, kernel, steps, settings):  # noqa: D102
        loss, stats, grad_logits, grad_values = _kernel_loss(kernel, logits, values, steps,
                                                             settings)  # fmt: skip
        ctx.save_for_backward(grad_logits, grad_values)
        ctx.values_dtype = values.dtype  # the kernel computes in the logits' dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):  # noqa: D102
        grad_logits, grad_values = ctx.saved_tensors
        grad_values = (grad_values * grad_loss).to(ctx.values_dtype)
        return grad_logits * grad_loss, grad_values, None, None, None
