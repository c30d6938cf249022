"""The end of a PPO minibatch's update, clipping the gradients and Adam's step, as two compiled
calls (``csrc/gradient_step.cpp``), and the gradients' reset before the next one without
torch.optim's wrappers (:func:`zero_grad`).

``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.Adam(fused=True).step()`` on a CPU dispatch
one operator per parameter tensor for the norms, the scaling and the step counters, around the
optimizer's Python bookkeeping: with ``zero_grad`` about a fifth of an lstm agent's update in
py-spy, for 17 tensors and some 60 us of arithmetic a minibatch. :func:`clip_grad_norm` and
:func:`adam_step` do the same work in one call each where they can and call PyTorch's
otherwise (an lstm agent's ``train()`` 1.23x faster, mnm-p's 1.08x: docs/benchmarks.md).

:func:`adam_step` runs the optimizer's own state (``exp_avg``, ``exp_avg_sq``, ``step``) through
ATen's fused Adam kernel, the kernel ``torch.optim.Adam(fused=True)`` runs: the same update, and
the optimizer's ``state_dict`` is untouched in form, and its step post-hooks run after it as
after ``optimizer.step()``. It applies to a plain ``torch.optim.Adam`` with ``fused=True``
(:class:`~mnm_rl.agent.policy.RecurrentMemoryPolicy`'s default), no step pre-hooks, no AMSGrad
and every parameter with a gradient and a state; anything else is ``optimizer.step()``.
:func:`clip_grad_norm` sums the squares in double precision, so its norm can differ from
PyTorch's in the last bits.

``MNM_RL_COMPILED_OPTIMIZER=0`` (or ``MNM_RL_FUSED=0``) in the environment runs PyTorch's.
``tests/test_gradient_step.py`` compares both.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from mnm_rl import native
from mnm_rl.memory import fused

#: The kernels' C++ source, built into their own extension.
SOURCES = [Path(__file__).with_name("csrc") / "gradient_step.cpp"]
#: The extension, built on first use.
EXTENSION = native.LazyExtension("mnm_rl_gradient_step", SOURCES, "the compiled optimizer step")
#: Environment variable: ``0`` clips and steps with PyTorch's code, whatever the other kernels do.
SWITCH_VARIABLE = "MNM_RL_COMPILED_OPTIMIZER"
#: Parameter group options under which a fused Adam step is ATen's ``_fused_adam_`` alone.
_PLAIN_GROUP = {"fused": True, "amsgrad": False, "capturable": False, "differentiable": False}
#: The fewest parameter elements for which Adam's step splits its tensors between two threads,
#: where the kernels have two (:func:`mnm_rl.memory.fused.kernel_threads`): the step is bound by
#: memory traffic, seven floats per element, and a second core brings its own. The mnm-p
#: agent's parameters at the benchmark's width have more; a small model's few would only pay
#: for the threads.
MIN_THREAD_ELEMENTS = 65536
#: Environment variable: ``0`` keeps Adam's step on one thread (its wall time side by side:
#: ``benchmarks/update_pieces.py``'s Adam piece with and without it).
THREADS_VARIABLE = "MNM_RL_ADAM_THREADS"


def adam_threads(elements: int) -> int:
    """On how many threads (1 or 2) :func:`adam_step` runs for parameters of ``elements``
    elements in all: two with two kernel threads and :data:`MIN_THREAD_ELEMENTS` or more (one
    under ``MNM_RL_ADAM_THREADS=0``)."""
    if elements < MIN_THREAD_ELEMENTS or os.environ.get(THREADS_VARIABLE) == "0":
        return 1
    return 2 if fused.kernel_threads() >= 2 else 1


def load_extension() -> ModuleType | None:
    """The compiled kernels, built on first use; ``None`` (with one warning) if they cannot be
    built, and ``None`` without building them under ``MNM_RL_COMPILED_OPTIMIZER=0`` or
    ``MNM_RL_FUSED=0``."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    return EXTENSION.load()


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``: every gradient scaled by
    ``min(1, max_norm / (norm + 1e-6))``, where ``norm`` is their global 2-norm, which it returns
    as a float. Parameters without a gradient are left out."""
    grads = [g for g in (p.grad for p in params) if g is not None]
    kernel = load_extension() if grads else None
    norm = None if kernel is None else kernel.clip_grad_norm(grads, float(max_norm))
    if norm is None:  # no kernel, or a gradient it does not take (not on the CPU, sparse, ...)
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return norm


def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, as one compiled call where it is a plain fused ``torch.optim.Adam``
    (see the module's docstring)."""
    kernel = load_extension()
    lists = _adam_state(optimizer) if kernel is not None else None
    if lists is not None:
        params, exp_avgs, exp_avg_sqs, steps, sizes, elements = lists
        grads = [p.grad for p in params]
        # Adam skips a tensor without a gradient: its own step does that
        if not any(g is None for g in grads) and kernel.adam_step(
            params, grads, exp_avgs, exp_avg_sqs, steps, sizes,
            [_settings(group) for group in optimizer.param_groups], adam_threads(elements),
        ):  # fmt: skip
            # the step's post-hooks, as torch.optim runs them after its own step (the policy's
            # marks the parameters changed: RecurrentMemoryPolicy)
            for hook in chain(optimizer._optimizer_step_post_hooks.values(),
                              torch_optimizer._global_optimizer_post_hooks.values()):  # fmt: skip
                hook(optimizer, (optimizer,), {})  # torch.optim's arguments: step's own
            return
    optimizer.step()


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad()``: every parameter's gradient set to ``None``, as its default
    ``set_to_none=True`` does, without the wrappers torch.optim puts around the call (a dynamo
    guard and a profiler range: about 3% of an lstm agent's update in py-spy). An optimizer
    with a ``zero_grad`` of its own runs that, and every one does under
    ``MNM_RL_COMPILED_OPTIMIZER=0``."""
    if (
        os.environ.get(SWITCH_VARIABLE, "1") == "0"
        or type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad
        or "zero_grad" in vars(optimizer)
    ):
        optimizer.zero_grad()
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _settings(group: dict) -> list[float]:
    beta1, beta2 = group["betas"]
    return [float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"]),
            float(group["eps"]), float(bool(group["maximize"]))]  # fmt: skip


#: Each optimizer's state tensors per group, made once its state is complete (see _adam_state).
_STATE_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StateLists(NamedTuple):
    state: dict  # the optimizer's ``state`` they come from
    param_lists: list[tuple[list[Tensor], int]]  # each group's ``params`` list and its length
    tensors: tuple  # (params, exp_avgs, exp_avg_sqs, steps, group sizes, elements in all)


def _adam_state(optimizer: torch.optim.Optimizer) -> tuple | None:
    """Every group's parameters, ``exp_avg``, ``exp_avg_sq`` and ``step`` tensors, groups one
    after another, the groups' sizes and the parameters' elements in all; ``None`` where the
    compiled step does not apply. The
    lists are made once every parameter has its state (Adam's first step makes it, in place),
    and made again when the optimizer's ``state`` or a group's parameter list changes
    (``load_state_dict`` replaces the one, ``add_param_group`` adds a group)."""
    if (
        type(optimizer) is not torch.optim.Adam
        or "step" in vars(optimizer)  # wrapped on the instance (an LR scheduler's counter)
        or optimizer._optimizer_step_pre_hooks  # (they may change the step's arguments)
        or torch_optimizer._global_optimizer_pre_hooks
        or getattr(optimizer, "grad_scale", None) is not None
        or getattr(optimizer, "found_inf", None) is not None
    ):
        return None
    for group in optimizer.param_groups:
        if group.get("decoupled_weight_decay", False) or any(
            group.get(k) != v for k, v in _PLAIN_GROUP.items()
        ):
            return None
    cached = _STATE_LISTS.get(optimizer)
    if (
        cached is not None
        and cached.state is optimizer.state
        and len(cached.param_lists) == len(optimizer.param_groups)
        and all(
            group["params"] is params and len(params) == n
            for group, (params, n) in zip(optimizer.param_groups, cached.param_lists, strict=True)
        )
    ):
        return cached.tensors
    params = [p for group in optimizer.param_groups for p in group["params"]]
    entries = [optimizer.state.get(p) for p in params]
    if not all(entries) or any(p.is_complex() for p in params):
        return None  # the first step makes the state
    tensors = (
        params,
        *([s[k] for s in entries] for k in ("exp_avg", "exp_avg_sq", "step")),
        [len(group["params"]) for group in optimizer.param_groups],
        sum(p.numel() for p in params),
    )
    param_lists = [(group["params"], len(group["params"])) for group in optimizer.param_groups]
    _STATE_LISTS[optimizer] = _StateLists(optimizer.state, param_lists, tensors)
    return tensors
