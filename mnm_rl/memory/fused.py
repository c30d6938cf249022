"""The MNM recurrence as one compiled CPU kernel per sequence (``csrc/mnm_sequence.cpp``).

The same extension holds the baseline LSTM's and GRU's kernels (``csrc/lstm_sequence.cpp``,
``csrc/gru_sequence.cpp``, used by :mod:`mnm_rl.memory.rnn_kernels`).

Eager PyTorch runs an MNM step as about 200 small operators, and at the sizes RL uses (a
minibatch of 8-32 sequences, width 64) each costs microseconds of dispatch and allocation
whatever its size. The kernel does a whole sequence, forward and backward, in one call each:
every matrix product is one BLAS call per step (and fast-weight layer) for the whole batch,
everything elementwise is plain loops, and the backward pass recomputes each step's keys, values
and errors instead of storing them, and each step's fast weights by undoing the writes from the
last step's.

It computes what :class:`mnm_rl.memory.MNMCore` computes (``tests/test_fused.py`` compares
outputs, final states and every gradient in float64), for both write rules and activations, in
the paper's order (write, then read) and without the retention loss; :meth:`MNMCore.forward`
falls back to the PyTorch code for everything else (CUDA tensors, ``read_before_write``,
``retention_lag``). The extension is compiled with ``torch.utils.cpp_extension`` the first
time it is needed (about 30 s; cached under ``~/.cache/torch_extensions``). Without a C++
compiler, or with ``MNM_RL_FUSED=0`` in the environment, the PyTorch code runs instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from mnm_rl import native
from mnm_rl.memory.allocator import retain_freed_memory
from mnm_rl.memory.base import CoreBackward, Gradients

#: The kernels' C++ sources (the MNM recurrence, the baseline LSTM and GRU, the Python module),
#: built into one extension.
SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cpp"))
#: The extension, built on first use; its freed per-call buffers are kept for reuse instead of
#: faulting in new pages (:func:`~mnm_rl.memory.allocator.retain_freed_memory`).
EXTENSION = native.LazyExtension(
    "mnm_rl_sequence", SOURCES, "the fused CPU kernels (MNM, LSTM, GRU)",
    on_load=retain_freed_memory,
)  # fmt: skip


def load_extension() -> ModuleType | None:
    """The compiled kernels, built on first use; ``None`` (with one warning) if they cannot be,
    and ``None`` without building them under ``MNM_RL_FUSED=0``."""
    return EXTENSION.load()


#: The fewest sequences a thread gets when the kernel splits a batch between threads: for a
#: sequence of several steps (training), and for a single step (the rollout; ``None``: a single
#: step is never split). Until the thirty-ninth session a split step copied each part's fast
#: weights out of the batch's and joined the parts' new weights, every step:
#: ``benchmarks/kernel_threads.py`` had rollout steps of 8 to 64 sequences at 0.64-0.82x of one
#: part, and a single step was never split. Since the parts read and write the batch's tensors
#: in place, 0.95x at 8 sequences (2 x 2), 1.05x at 16, 1.16x at 32 and 1.27-1.34x at 64, and
#: at 4 x 3 1.19-1.21x, 1.35-1.37x and 1.51-1.54x at 16, 32 and 64
#: (docs/benchmark_runs/kernel_threads_39.txt): a step is split where each thread gets 16
#: sequences or more.
MIN_PART_ROWS = 4
MIN_STEP_PART_ROWS: int | None = 16
#: Environment variable: how many threads the kernel may split a training batch between.
KERNEL_THREADS_VARIABLE = "MNM_RL_KERNEL_THREADS"


_kernel_threads: int | None = None


def set_kernel_threads(threads: int | None) -> None:
    """Let the kernel split a training batch between ``threads`` threads (``None``: as many as
    torch's intra-op threads); ``MNM_RL_KERNEL_THREADS`` in the environment takes precedence."""
    global _kernel_threads
    if threads is not None and threads < 1:
        raise ValueError(f"kernel threads must be positive, got {threads}")
    _kernel_threads = threads


def kernel_threads() -> int:
    """Threads the kernel may split a training batch between: ``MNM_RL_KERNEL_THREADS`` if set,
    else :func:`set_kernel_threads`'s value, else torch's intra-op thread count
    (``torch.get_num_threads()``). The kernel starts its own threads, so with two kernel
    threads and one torch thread only the MNM recurrence runs on two cores."""
    value = os.environ.get(KERNEL_THREADS_VARIABLE, "").strip()
    if not value:
        return _kernel_threads or torch.get_num_threads()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{KERNEL_THREADS_VARIABLE}={value!r}: expected a positive integer")
    return int(value)


def batch_parts(steps: int, batch_size: int, threads: int | None = None) -> int:
    """Into how many parts the kernel splits a batch of ``batch_size`` sequences of ``steps``
    steps, each part run by its own thread: one per thread (:func:`kernel_threads`, or
    ``threads``), as long as each part keeps at least :data:`MIN_PART_ROWS` sequences
    (:data:`MIN_STEP_PART_ROWS` for a single step, the rollout's)."""
    threads = kernel_threads() if threads is None else threads
    min_rows = MIN_PART_ROWS if steps > 1 else MIN_STEP_PART_ROWS
    if min_rows is None:
        return 1
    return max(1, min(threads, batch_size // min_rows))


class FusedSequence(torch.autograd.Function):
    """``MNMCore``'s recurrence over ``[T, B]`` steps; see :func:`run_sequence`.

    ``apply(config, gates_x, keep, h0, c0, r0, m0, *params)`` with ``config = (kernel, options,
    store, parts)``, ``options = (n_heads, gradient_rule, tanh_act, eps)`` and ``params =
    (w_rec, w_int, b_int, w_beta, b_beta, w_fb, b_fb, m_init)``, in the kernel's argument order.
    With ``parts > 1`` the kernel runs the batch in that many parts in parallel
    (``forward_parts``/``backward_parts``): the same results, up to the order in which the
    weights' gradients are summed.
    """

    @staticmethod
    def forward(ctx, config, gates_x, keep, h0, c0, r0, m0, *params):  # noqa: D102
        kernel, options, store, parts = config
        outputs = _kernel_forward(kernel, parts, gates_x, keep, (h0, c0, r0, m0), params,
                                  options, store)  # fmt: skip
        # The nine outputs, then what the backward pass takes (per part: the last post-write
        # weights, u_in, c_in, the passes' activations, the writes' factors, the weights of
        # ended episodes, the controller's gates, the interaction's and the BFPF's outputs).
        hs, reads, after, before, values, beta, norm, c, weights = outputs[:9]
        if store:  # all through save_for_backward, so that saved-tensor hooks see them too
            ctx.config = config
            ctx.n_params = len(params)
            ctx.save_for_backward(gates_x, keep, m0, hs, *params, *outputs[9:])
        ctx.mark_non_differentiable(norm)
        ctx.set_materialize_grads(False)
        return hs, reads, after, before, values, beta, norm, c, weights

    @staticmethod
    def backward(ctx, *output_grads):  # noqa: D102
        kernel, options, _, parts = ctx.config
        gates_x, keep, m0, hs, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        grads = [torch.Tensor() if g is None else g.contiguous() for g in output_grads]
        del grads[6]  # an empty tensor stands for a zero gradient; the norm has none
        results = _kernel_backward(kernel, parts, grads, gates_x, keep, m0, saved, hs, params,
                                   options)  # fmt: skip
        g_gates, g_h, g_c0, g_r, g_m0, *g_params = results
        return None, g_gates, None, g_h, g_c0, g_r, g_m0, *g_params


def _kernel_forward(kernel, parts, gates_x, keep, start, params, options, store) -> list[Tensor]:
    """The kernel's forward call, whole (``parts == 1``) or in ``parts`` parallel parts."""
    if parts == 1:
        return kernel.forward(gates_x, keep, *start, *params, *options, store, True)
    return kernel.forward_parts(gates_x, keep, *start, *params, *options, store, True, parts)


def _kernel_backward(
    kernel, parts, grads, gates_x, keep, m0, saved, hs, params, options, recon_scale=0.0
):
    """The kernel's backward call for :func:`_kernel_forward`'s ``saved`` outputs (from the
    tenth on); ``grads``: those of the nine outputs but the norm, empty for zero; with
    ``recon_scale`` the kernel adds the gradient of ``recon_scale / 2 * sum((after -
    values)^2)`` to those of the answers and values itself."""
    if parts == 1:
        return kernel.backward(*grads, gates_x, keep, m0, *saved, hs, *params, *options,
                               recon_scale)  # fmt: skip
    return kernel.backward_parts(*grads, gates_x, keep, m0, saved, hs, *params, *options,
                                 recon_scale)  # fmt: skip


def _matrices_contiguous(weights: Tensor) -> bool:
    """Whether each ``D x D`` matrix of ``weights [..., D, D]`` is contiguous, as it is or as
    its transpose (how the kernel returns its final weights)."""
    rows, columns = weights.stride(-2), weights.stride(-1)
    size = weights.size(-1)
    return (columns == 1 and rows == size) or (rows == 1 and columns == size)


def kernel_weights(core, interaction_x: Tensor | None = None) -> tuple[Tensor, ...]:
    """``MNMCore``'s slow weights in the kernel's argument order: ``(w_rec, w_int, b_int, w_beta,
    b_beta, w_fb, b_fb, m_init)``; ``b_int`` plus ``interaction_x [T, B, E]`` per step where
    given (``interaction_input``), and empty ``w_fb, b_fb`` for mnm-g (no feedback functions)."""
    # Through the modules' own dicts, not nn.Module.__getattr__ (nineteen calls a rollout step),
    # as mnm_rl/agent/policy_step.py reads the policy's.
    modules = core._modules
    memory = modules["memory"]
    initial_weights = memory._parameters["initial_weights"]
    feedback = memory._modules.get("feedback")  # mnm-g: None (a plain attribute)
    if feedback is not None:
        w_fb, b_fb = feedback._parameters["weight"], feedback._parameters["bias"]
    else:  # mnm-g has no feedback functions: the kernel ignores these
        w_fb = b_fb = initial_weights.new_empty(0)
    interaction = modules["interaction"]._parameters
    interaction_bias = interaction["bias"]
    if interaction_x is not None:
        interaction_bias = (interaction_x + interaction_bias).contiguous()
    beta_gate = modules["beta_gate"]._parameters
    return (
        modules["recurrent_gates"]._parameters["weight"], interaction["weight"], interaction_bias,
        beta_gate["weight"].view(-1), beta_gate["bias"], w_fb, b_fb, initial_weights,
    )  # fmt: skip


def kernel_options(core) -> tuple[int, bool, bool, float]:
    """``MNMCore``'s options in the kernel's argument order: ``(n_heads, gradient_rule,
    tanh_act, eps)``."""
    memory = core.memory
    return core.n_heads, memory.write_rule == "mnm-g", memory.activation == "tanh", memory.eps


def _start(
    gates_x: Tensor, episode_starts: Tensor, state: dict[str, Tensor]
) -> tuple[Tensor, list[Tensor]]:
    """The kernel's reset mask ``keep [T, B]`` and start state ``[h, c, read, fast_weights]``."""
    dtype = gates_x.dtype
    keep = (episode_starts == 0).to(dtype).contiguous()
    start = [state[k].to(dtype).contiguous() for k in ("h", "c", "read")]
    # The kernel returns its final weights as a view with each D x D matrix stored transposed,
    # layers outermost; it takes them back as they are, without a copy per rollout step (and
    # any weights whose matrices are each contiguous, as M or as M^T).
    weights = state["fast_weights"].to(dtype)
    if not _matrices_contiguous(weights):
        weights = weights.contiguous()
    start.append(weights)
    return keep, start


def explicit_sequence(
    core, x: Tensor, episode_starts: Tensor, state: dict[str, Tensor], kernel: ModuleType,
    memory_weight: float,
) -> tuple[Tensor, dict[str, Tensor], CoreBackward]:  # fmt: skip
    """``MNMCore``'s forward pass over ``x [T, B, F]`` by the kernel without autograd: ``(y [T,
    B, output_size], aux, backward)`` (``MNMCore.explicit_forward``; not with an interaction
    input or a retention lag). ``backward(grad_y)`` runs the output layer's, the kernel's and
    the input gates' backward passes, with the gradient of ``memory_weight * memory_loss(aux)``
    (``mean(recon_after)``: the kernel has no retention loss), which the kernel's backward pass
    adds itself (its ``recon_scale``). Run both under ``torch.no_grad()``."""
    from mnm_rl.memory import products  # which imports this module

    steps, batch, _ = x.shape
    gates_x, gates_backward = products.linear_explicit(
        x.reshape(steps * batch, -1), core.input_gates.weight, core.input_gates.bias
    )
    gates_x = gates_x.view(steps, batch, -1)
    keep, start = _start(gates_x, episode_starts, state)
    params = kernel_weights(core)
    options = kernel_options(core)
    parts = batch_parts(steps, batch)
    outputs = _kernel_forward(kernel, parts, gates_x, keep, start, params, options, True)
    hs, reads, after, before, values, beta, norm = outputs[:7]
    saved = outputs[9:]
    hidden = hs.shape[-1]
    joined = torch.cat([hs, reads], dim=-1).view(steps * batch, -1)
    y, output_backward = products.linear_explicit(joined, core.output.weight, core.output.bias)
    recon = reconstruction_errors(kernel, after, before, values)
    # memory_weight * mean((after - values)^2) over every element: the backward pass adds its
    # gradient, 2 w / n (after - values), to the answers' and takes it from the values'
    recon_scale = 2.0 * memory_weight / after.numel()
    aux = {
        "recon_after": recon[0],
        "recon_before": recon[1],
        "recon_retained": torch.zeros_like(beta),
        "beta": beta,
        "fast_weight_norm": norm,
    }

    def backward(grad_y: Tensor) -> tuple[Tensor, Gradients]:
        g_joined, g_w_out, g_b_out = output_backward(grad_y.reshape(steps * batch, -1), True)
        g_joined = g_joined.view(steps, batch, -1)
        empty = torch.Tensor()  # a zero gradient
        # [h ; read]'s gradient's halves where they lie (the kernel reads rows a stride apart)
        grads = (g_joined[..., :hidden], g_joined[..., hidden:], *[empty] * 6)
        results = _kernel_backward(kernel, parts, grads, gates_x, keep, start[3], saved, hs,
                                   params, options, recon_scale)  # fmt: skip
        g_gates, _, _, _, _, *g_params = results
        g_x, g_w_in, g_b_in = gates_backward(g_gates.view(steps * batch, -1), True)
        gradients: Gradients = []
        grads = (g_w_in, g_b_in, g_w_out, g_b_out, *g_params)
        for param, grad in zip(_gradient_parameters(core), grads, strict=True):
            if param is not None:  # the kernel's flat w_beta gradient in the parameter's shape
                same = grad.shape == param.shape
                gradients.append((param, grad if same else grad.view_as(param)))
        return g_x.view(steps, batch, -1), gradients

    return y.view(steps, batch, -1), aux, backward


def reconstruction_errors(
    kernel: ModuleType, after: Tensor, before: Tensor, values: Tensor
) -> Tensor:
    """:meth:`FastWeightMemory.reconstruction_loss <mnm_rl.memory.fast_weights.FastWeightMemory.
    reconstruction_loss>` of the answers after the writes and of those before, ``[2, T, B]`` for
    ``[T, B, H, D]``, in one compiled pass without autograd (``csrc/reconstruction.cpp``)."""
    return kernel.reconstruction_errors(after, before, values)


def _gradient_parameters(core) -> list[nn.Parameter | None]:
    """The parameters of :func:`explicit_sequence`'s gradients, in its order: the input and
    output projections', then those behind :func:`kernel_weights`' tensors (``None`` for mnm-g's
    absent feedback functions). Through the modules' own dicts, as :func:`kernel_weights`."""
    modules = core._modules
    memory = modules["memory"]
    feedback = memory._modules.get("feedback")  # mnm-g: None
    fb = {} if feedback is None else feedback._parameters
    gates_in, gates_rec, out, interaction, beta_gate = (
        modules[name]._parameters
        for name in ("input_gates", "recurrent_gates", "output", "interaction", "beta_gate")
    )
    return [
        gates_in["weight"], gates_in["bias"], out["weight"], out["bias"], gates_rec["weight"],
        interaction["weight"], interaction["bias"], beta_gate["weight"], beta_gate["bias"],
        fb.get("weight"), fb.get("bias"), memory._parameters["initial_weights"],
    ]  # fmt: skip


def run_sequence(
    core,
    gates_x: Tensor,
    episode_starts: Tensor,
    state: dict[str, Tensor],
    kernel: ModuleType,
    interaction_x: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``MNMCore``'s recurrence over a sequence with the kernel.

    ``gates_x [T, B, 4 * hidden]`` is the input part of the controller's gates, ``state`` the
    core's start state, ``interaction_x [T, B, E]`` the input part ``U x_t`` of the interaction
    (``interaction_input``; the kernel then takes ``b_v + U x_t`` per step in place of the
    bias). Returns ``(hs [T, B, hidden], reads [T, B, D], answer_after,
    answer_before, values [T, B, H, D], beta [T, B], fast_weight_norm [T, B], c [B, hidden],
    fast_weights [B, L, D, D])``.
    """
    keep, start = _start(gates_x, episode_starts, state)
    params = kernel_weights(core, interaction_x)
    options = kernel_options(core)
    # Keep what the backward pass needs only when there will be one (not in the rollout).
    store = torch.is_grad_enabled() and any(t.requires_grad for t in (gates_x, *start, *params))
    parts = batch_parts(*gates_x.shape[:2])
    if not store:  # no backward pass: the kernel straight, without autograd's Function (~14 us)
        outputs = _kernel_forward(kernel, parts, gates_x.contiguous(), keep, start, params,
                                  options, False)  # fmt: skip
        return tuple(outputs[:9])
    config = (kernel, options, store, parts)
    return FusedSequence.apply(config, gates_x.contiguous(), keep, *start, *params)
