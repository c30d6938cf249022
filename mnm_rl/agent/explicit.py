"""A PPO minibatch's gradients without the autograd engine: every piece's compiled backward
pass, called in turn.

Every piece of an agent's training pass on a CPU is a compiled kernel with a backward pass of
its own: the grid encoder's linear layer (:mod:`mnm_rl.agent.grid_linear`), the cores' input
products and recurrences (:mod:`mnm_rl.memory.rnn_kernels`, :mod:`mnm_rl.memory.fused`), the
heads (:mod:`mnm_rl.agent.action_heads`) and the loss, which gives its gradients with its value
(:mod:`mnm_rl.agent.ppo_loss`). Through autograd each runs inside a Python
``autograd.Function``, between a dozen small PyTorch operators (the ReLU, the biases' sum, views,
the tables' concatenation, an MNM core's output layer and diagnostics) and the engine's own
work per node and per parameter. Here
:meth:`~mnm_rl.agent.policy.RecurrentMemoryPolicy.explicit_forward_sequence` runs the kernels'
forward passes under ``torch.no_grad()`` and returns a backward pass that calls
their backward passes in reverse order, from the loss's gradients (and an MNM core's memory
loss, :func:`mnm_rl.memory.base.memory_loss`) to every parameter's, which
:func:`apply_gradients` stores in ``.grad`` as ``loss.backward()`` would. The same kernels in the
same order give the same gradients as autograd, bit for bit for an lstm agent in float32 and to
rounding otherwise (``tests/test_explicit.py``); an lstm agent's ``train()`` takes about 0.8x
the time, an MNM agent's 0.93x (docs/benchmarks.md).

:class:`~mnm_rl.agent.ppo.MemoryPPO` trains this way where every piece has such a pass (CPU,
heads with ``nn.Tanh`` or ``nn.ReLU``, at most one symbol grid, the compiled loss, an MNM core
without an interaction input or retention lag, no gradient hooks on the parameters); everything
else trains through autograd. ``MNM_RL_EXPLICIT_BACKWARD=0`` in the environment (or
``MNM_RL_FUSED=0``) trains through autograd always.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from torch import Tensor

from mnm_rl.memory.base import Gradients

#: Environment variable: ``0`` trains through autograd, whatever the other kernels do.
SWITCH_VARIABLE = "MNM_RL_EXPLICIT_BACKWARD"


def enabled() -> bool:
    """Whether explicit backward passes may be used (not switched off by
    ``MNM_RL_EXPLICIT_BACKWARD=0``)."""
    return os.environ.get(SWITCH_VARIABLE, "1") != "0"


def has_gradient_hooks(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` has a hook that autograd runs on its gradient
    (``Tensor.register_hook``, ``register_post_accumulate_grad_hook``): an explicit pass would
    not run it, so :class:`~mnm_rl.agent.ppo.MemoryPPO` then trains through autograd."""
    return any(p._backward_hooks or p._post_accumulate_grad_hooks for p in params)


def apply_gradients(gradients: Gradients) -> None:
    """Store each gradient in its parameter's ``.grad`` (added to one already there), as
    ``loss.backward()`` does; parameters that do not require gradients are left alone."""
    for param, grad in gradients:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = grad
        else:
            param.grad += grad
