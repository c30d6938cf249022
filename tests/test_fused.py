"""The fused MNM kernel (``mnm_rl.memory.fused``) computes what the PyTorch code computes.

Each comparison runs one ``MNMCore`` twice on the same inputs, once through the kernel and once
through the PyTorch code (``MNM_RL_FUSED=0``), and compares the features, the final state, the
memory diagnostics and the gradients of every parameter and of the initial state, with
episode starts inside the sequence and a start state that is not the initial one.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from compiled import built
from kernel_accuracy import assert_as_accurate_as_pytorch

from mnm_rl.memory import CoreState, MNMCore, fused
from mnm_rl.memory.fast_weights import FastWeightMemory


@pytest.fixture(scope="module")
def kernel():
    return built(fused.EXTENSION)


def _core(
    rule: str,
    activation: str,
    heads: int,
    layers: int,
    dtype=torch.float64,
    seed=0,
    interaction_input: bool = False,
    memory_size: int = 4,
):
    torch.manual_seed(seed)
    core = MNMCore(
        5,
        hidden_size=6,
        memory_size=memory_size,
        n_heads=heads,
        n_layers=layers,
        write_rule=rule,
        activation=activation,
        interaction_input=interaction_input,
    ).to(dtype)
    with torch.no_grad():  # away from the initialisation's symmetries (identity BFPF block)
        for p in core.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return core


def _inputs(core: MNMCore, steps: int, batch: int, dtype=torch.float64):
    x = torch.randn(steps, batch, core.input_size, dtype=dtype)
    starts = torch.zeros(steps, batch)
    starts[0, batch - 1] = 1
    starts[steps // 2, 0] = 1
    starts[steps - 1, 1 % batch] = 1
    state = core.initial_state(batch)
    state = CoreState({k: (v + 0.2 * torch.randn_like(v)).detach() for k, v in state.items()})
    return x, starts, state


def _run(core: MNMCore, x, starts, state, monkeypatch, use_kernel: bool, final_weights=True):
    monkeypatch.setenv("MNM_RL_FUSED", "1" if use_kernel else "0")
    core.zero_grad()
    start = CoreState({k: v.clone().requires_grad_(True) for k, v in state.items()})
    y, final, aux = core(x, start, starts)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weights).sum() + aux["recon_after"].sum() + 2 * aux["recon_before"].sum()
    loss = loss + 3 * aux["beta"].sum() + final["c"].pow(2).sum() + final["h"].pow(2).sum()
    loss = loss + final["read"].sum()
    if final_weights:  # else, as in PPO's updates, the final weights get no gradient
        loss = loss + 0.3 * final["fast_weights"].sum()
    loss.backward()
    out = {"y": y, **{f"final.{k}": v for k, v in final.items()}}
    out.update({f"aux.{k}": v for k, v in aux.items()})
    out.update({f"grad.{n}": p.grad.clone() for n, p in core.named_parameters()})
    out.update({f"grad.state.{k}": v.grad for k, v in start.items()})
    return out


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("heads,layers", [(1, 1), (2, 3)])
@pytest.mark.parametrize("interaction_input", [False, True])
def test_kernel_matches_pytorch_in_float64(
    kernel, monkeypatch, rule, activation, heads, layers, interaction_input
):
    core = _core(rule, activation, heads, layers, interaction_input=interaction_input)
    x, starts, state = _inputs(core, steps=7, batch=3)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    assert fused_out.keys() == eager_out.keys()
    for name, expected in eager_out.items():
        assert expected is not None, name
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
@pytest.mark.parametrize("interaction_input", [False, True])
def test_kernel_matches_pytorch_when_the_final_weights_get_no_grad(
    kernel, monkeypatch, rule, interaction_input
):
    """As in PPO's updates, nothing after the sequence reads its final fast weights: the
    kernel's backward pass gets no gradient for them and starts their running gradient at
    zero. (The other comparisons put the final weights into the loss.)"""
    core = _core(rule, "tanh", 2, 3, interaction_input=interaction_input)
    x, starts, state = _inputs(core, steps=7, batch=3)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True, final_weights=False)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False, final_weights=False)
    for name, expected in eager_out.items():
        assert expected is not None, name
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
@pytest.mark.parametrize("interaction_input", [False, True])
def test_kernel_with_atens_products_matches_pytorch(kernel, monkeypatch, rule, interaction_input):
    """``MNM_RL_DENSE_PRODUCTS=0``: the kernel's products with the slow weights (the controller's
    gates, the interaction, the BFPF), which its step loop makes on raw pointers, go through
    ATen on views of the same memory instead of the hand-written tiles, with the same results."""
    monkeypatch.setenv("MNM_RL_DENSE_PRODUCTS", "0")
    core = _core(rule, "tanh", 2, 3, interaction_input=interaction_input)
    x, starts, state = _inputs(core, steps=7, batch=3)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    for name, expected in eager_out.items():
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_kernel_matches_pytorch_where_rows_fill_whole_vectors(kernel, monkeypatch, rule):
    """The kernel's hand-written products (csrc/row_products.h) work in 64-byte vectors along a
    row of the weights (8 doubles, 16 floats) and in groups of up to 4 rows of keys, with plain
    loops for what is left over. D = 20 is two whole vectors of doubles and 4 columns more (one
    vector of floats and 4 more); 3 heads are a group of 3 rows, their 6 keys a group of 4 and
    one of 2. float64 against PyTorch; float32 within float32's rounding, which at this odd
    size is looser than at the agents' sizes (next test): on an AVX-512 Xeon mnm-g's beta bias
    gradient erred 2.4e-6 of its scale here (PyTorch's 3.0e-7), over the agents' sizes' bound
    of 1e-6; on an AMD EPYC (AVX2) it stayed under it. A wrong lane or leftover column errs by
    the value's own size."""
    core = _core(rule, "tanh", 3, 2, memory_size=20)
    x, starts, state = _inputs(core, steps=6, batch=3)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    for name, expected in eager_out.items():
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-9, atol=1e-11, msg=name)
    core32 = copy.deepcopy(core).float()
    state32 = CoreState({k: v.float() for k, v in state.items()})
    fused32 = _run(core32, x.float(), starts, state32, monkeypatch, use_kernel=True)
    eager32 = _run(core32, x.float(), starts, state32, monkeypatch, use_kernel=False)
    assert_as_accurate_as_pytorch(fused32, eager32, eager_out, rounding=3e-5)


@pytest.mark.parametrize("steps", [16, 128])
def test_kernel_in_float32_is_as_accurate_as_pytorch(kernel, monkeypatch, steps):
    """float32 at the agents' sizes (width 64, 2 heads, 2 layers): against the float64 result,
    the kernel (its own tanh and sigmoid, its summation order, and in the backward pass each
    step's weights recovered by undoing the writes from the last step's) errs no more than
    PyTorch's float32 code does, over a training sequence (16 steps) and a whole rollout
    (128)."""
    calls = []
    original = fused.FusedSequence.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused.FusedSequence, "apply", counting)
    torch.manual_seed(1)
    core = MNMCore(32, hidden_size=64, n_heads=2, n_layers=2)
    x, starts, state = _inputs(core, steps=steps, batch=8, dtype=torch.float32)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    assert len(calls) == 1
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    assert len(calls) == 1  # MNM_RL_FUSED=0 ran the PyTorch code
    state64 = CoreState({k: v.double() for k, v in state.items()})
    exact = _run(core.double(), x.double(), starts, state64, monkeypatch, use_kernel=False)
    assert_as_accurate_as_pytorch(fused_out, eager_out, exact)


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_many_resets_match_pytorch(kernel, monkeypatch, rule):
    """The backward pass undoes each step's write to recover the step's weights, except where
    a sequence's episode starts: there it takes the weights the forward pass kept. Episodes
    that start in several sequences at once, in one sequence at consecutive steps, and at
    the first and last steps."""
    core = _core(rule, "tanh", 2, 2)
    x, _, state = _inputs(core, steps=9, batch=4)
    starts = torch.zeros(9, 4)
    starts[0, 0] = starts[2, :3] = starts[3, 1] = starts[4, 1] = starts[5, 1] = 1
    starts[7, 2] = starts[8, 0] = starts[8, 3] = 1
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    for name, expected in eager_out.items():
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-9, atol=1e-11, msg=name)


def test_start_weights_are_taken_as_they_come(kernel, monkeypatch):
    """The core's initial state holds the initial weights expanded over the batch (not copied),
    and the kernel returns its final weights as a layer-major view of the transposed matrices
    it works on: both go into the kernel as they are (each D x D matrix contiguous, as M or as
    M^T, is all it needs), and a second call from the first one's final state matches PyTorch,
    outputs and gradients, in float64."""
    core = _core("mnm-p", "tanh", 2, 2)
    x, starts, _ = _inputs(core, steps=6, batch=3)
    assert core.initial_state(3)["fast_weights"].stride(0) == 0

    def two_calls(use_kernel: bool):
        monkeypatch.setenv("MNM_RL_FUSED", "1" if use_kernel else "0")
        core.zero_grad()
        y1, mid, _ = core(x[:3], core.initial_state(3), starts[:3])
        y2, final, _ = core(x[3:], mid, starts[3:])
        (y1.sum() + 2 * y2.sum() + final["fast_weights"].pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in core.named_parameters()}
        return mid["fast_weights"], [y1, y2, final["fast_weights"]], grads

    mid, fused_out, fused_grads = two_calls(True)
    assert not mid.is_contiguous() and mid.stride()[-2:] == (1, mid.size(-1))
    _, eager_out, eager_grads = two_calls(False)
    for got, expected in zip(fused_out, eager_out, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    for name, expected in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], expected, rtol=1e-9, atol=1e-11, msg=name)


def test_the_kernel_leaves_its_inputs_and_what_it_kept_unchanged(kernel, monkeypatch):
    """The kernel writes the initial weights over a buffer of its own where an episode starts,
    and its backward pass undoes the writes from the forward pass's last weights into buffers
    of its own: the start state is left as it was, in training and in the rollout, even with
    every episode starting at step 0, and a second backward pass over the same graph
    (``retain_graph``) gets the same gradients as the first."""
    monkeypatch.setenv("MNM_RL_FUSED", "1")
    core = _core("mnm-p", "tanh", 2, 2)
    x, starts, state = _inputs(core, steps=6, batch=3)
    starts[0] = 1
    before = {k: v.clone() for k, v in state.items()}
    with torch.inference_mode():
        core(x[:1], state, starts[:1])
    for k, v in state.items():
        assert torch.equal(v, before[k]), k
    start = CoreState({k: v.clone().requires_grad_(True) for k, v in state.items()})
    y, final, _ = core(x, start, starts)
    loss = y.sum() + final["fast_weights"].pow(2).sum()
    first = torch.autograd.grad(loss, list(core.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(core.parameters()))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for k, v in start.items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 8, 4, 64), (3, 5, 2, 20), (7, 1, 1)])
def test_reconstruction_errors_are_the_memorys_losses(kernel, dtype, shape):
    """``[2, ...]``: ``reconstruction_loss`` of the answers after, then before the writes; widths
    that fill whole vectors and that leave a remainder, a sequence's and a step's shapes."""
    gen = torch.Generator().manual_seed(3)
    after, before, values = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    errors = fused.reconstruction_errors(kernel, after, before, values)
    loss = FastWeightMemory.reconstruction_loss
    assert errors.shape == (2, *shape[:-2]) and errors.dtype == dtype
    tolerance = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-13, atol=0)
    torch.testing.assert_close(errors[0], loss(after, values), **tolerance)
    torch.testing.assert_close(errors[1], loss(before, values), **tolerance)
    # transposed (non-contiguous) inputs are taken as their values
    t = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (after, before, values)]
    torch.testing.assert_close(fused.reconstruction_errors(kernel, *t), errors, rtol=0, atol=0)


def test_reconstruction_errors_of_nothing_and_of_mismatched_shapes(kernel):
    empty = torch.zeros(3, 2, 4, 0)
    assert torch.isnan(fused.reconstruction_errors(kernel, empty, empty, empty)).all()
    assert fused.reconstruction_errors(kernel, empty, empty, empty).shape == (2, 3, 2)
    x = torch.zeros(3, 2, 4, 8)
    with pytest.raises(RuntimeError, match="one shape"):
        fused.reconstruction_errors(kernel, x, x, torch.zeros(3, 2, 4, 7))
    with pytest.raises(RuntimeError, match="one dtype"):
        fused.reconstruction_errors(kernel, x, x.double(), x)


def test_kernel_gradients_pass_gradcheck(kernel):
    """Finite differences, independently of the PyTorch implementation."""
    for rule, interaction_input in (("mnm-p", False), ("mnm-g", False), ("mnm-p", True)):
        core = _core(rule, "tanh", 2, 2, interaction_input=interaction_input)
        x, starts, state = _inputs(core, steps=4, batch=2)
        params = [core.recurrent_gates.weight, core.interaction.weight, core.memory.initial_weights]
        if interaction_input:
            params.append(core.input_interaction.weight)

        def f(x, h, weights, *_params, core=core, starts=starts, state=state):
            start = CoreState({**state, "h": h, "fast_weights": weights})
            y, final, aux = core(x, start, starts)
            return y, final["fast_weights"], aux["recon_before"]

        inputs = (
            x.requires_grad_(),
            state["h"].clone().requires_grad_(),
            state["fast_weights"].clone().requires_grad_(),
            *params,
        )
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_stepping_without_grad_equals_one_call(kernel):
    """The rollout's path (no autograd, weights ping-ponged in two buffers) over 1 and 5 steps
    at a time gives the training path's features and final state."""
    core = _core("mnm-p", "tanh", 2, 2)
    x, starts, state = _inputs(core, steps=10, batch=3)
    y_all, final_all, _ = core(x, state, starts)
    with torch.inference_mode():
        for chunk in (1, 5):
            current, ys = state, []
            for t in range(0, 10, chunk):
                y, current, _ = core(x[t : t + chunk], current, starts[t : t + chunk])
                ys.append(y)
            torch.testing.assert_close(torch.cat(ys), y_all.detach(), rtol=1e-12, atol=1e-12)
            for k, v in final_all.items():
                torch.testing.assert_close(current[k], v.detach(), rtol=1e-12, atol=1e-12)


def test_options_the_kernel_lacks_use_pytorch(kernel, monkeypatch):
    def refuse(*args):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(fused.FusedSequence, "apply", refuse)
    for kwargs in ({"retention_lag": 2}, {"read_before_write": True}):
        core = MNMCore(5, hidden_size=6, n_heads=1, n_layers=1, **kwargs)
        x = torch.randn(4, 2, 5)
        y, _, _ = core(x, core.initial_state(2), torch.zeros(4, 2))
        assert y.shape == (4, 2, 6)


def test_a_kernel_that_cannot_build_falls_back_with_one_warning(monkeypatch, no_compiler):
    monkeypatch.setattr(fused.EXTENSION, "module", None)
    monkeypatch.setattr(fused.EXTENSION, "failed", False)
    core = MNMCore(5, hidden_size=6, n_heads=1, n_layers=1)
    x = torch.randn(3, 2, 5)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        y, _, _ = core(x, core.initial_state(2), torch.zeros(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        y2, _, _ = core(x, core.initial_state(2), torch.zeros(3, 2))
    torch.testing.assert_close(y, y2)


def test_cli_help_names_the_switch():
    from mnm_rl.cli import build_parser

    assert "MNM_RL_FUSED=0" in build_parser().format_help()
    assert "MNM_RL_RETAIN_MEMORY=0" in build_parser().format_help()
    assert "MNM_RL_KERNEL_THREADS=N" in build_parser().format_help()
    assert "MNM_RL_ADAM_THREADS=0" in build_parser().format_help()


def test_kernel_threads_come_from_the_environment_the_setter_or_torch(monkeypatch):
    monkeypatch.delenv(fused.KERNEL_THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(fused, "_kernel_threads", None)
    assert fused.kernel_threads() == torch.get_num_threads()
    fused.set_kernel_threads(3)
    assert fused.kernel_threads() == 3
    assert fused.batch_parts(16, 16) == 3
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    assert fused.kernel_threads() == 2  # the environment wins
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "two")
    with pytest.raises(ValueError, match="MNM_RL_KERNEL_THREADS='two'"):
        fused.kernel_threads()
    with pytest.raises(ValueError, match="positive"):
        fused.set_kernel_threads(0)
    fused.set_kernel_threads(None)
    monkeypatch.delenv(fused.KERNEL_THREADS_VARIABLE)
    assert fused.kernel_threads() == torch.get_num_threads()


def test_batch_parts_gives_each_thread_enough_sequences():
    assert fused.batch_parts(16, 16, threads=1) == 1
    assert fused.batch_parts(16, 16, threads=2) == 2
    assert fused.batch_parts(16, 16, threads=8) == 16 // fused.MIN_PART_ROWS
    assert fused.batch_parts(16, fused.MIN_PART_ROWS * 2 - 1, threads=2) == 1
    assert fused.batch_parts(16, 1, threads=4) == 1
    assert fused.batch_parts(1, 16, threads=2) == 1  # a rollout step of 16 envs
    assert fused.batch_parts(1, 32, threads=2) == 2  # of 32: 16 a thread
    assert fused.batch_parts(1, 256, threads=2) == 2


def test_a_single_step_splits_only_where_allowed(monkeypatch):
    monkeypatch.setattr(fused, "MIN_STEP_PART_ROWS", None)
    assert fused.batch_parts(1, 256, threads=2) == 1  # never
    monkeypatch.setattr(fused, "MIN_STEP_PART_ROWS", 16)
    assert fused.batch_parts(1, 31, threads=2) == 1
    assert fused.batch_parts(1, 32, threads=2) == 2
    assert fused.batch_parts(16, 32, threads=2) == 2  # sequences keep MIN_PART_ROWS


@pytest.mark.parametrize("rule,interaction_input", [("mnm-p", True), ("mnm-g", False)])
def test_batch_split_between_threads_matches_one_part(kernel, monkeypatch, rule, interaction_input):
    """The batch run in 3 uneven parts (3, 2, 2 sequences), in parallel on 3 kernel threads,
    gives what one call gives: outputs, final state and every gradient (float64); a rollout
    step split the same way gives what the first step of the training pass gives."""
    core = _core(rule, "tanh", 2, 2, interaction_input=interaction_input)
    x, starts, state = _inputs(core, steps=6, batch=7)
    one = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    calls = []
    original = kernel.forward_parts

    class Counting:  # the extension module, counting calls of forward_parts
        def __getattr__(self, name):
            return getattr(kernel, name)

        def forward_parts(self, *args):
            calls.append(args[-1])
            return original(*args)

    monkeypatch.setattr(fused, "MIN_PART_ROWS", 2)
    monkeypatch.setattr(fused, "MIN_STEP_PART_ROWS", 2)
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "3")  # its own threads; torch keeps its
    monkeypatch.setattr(fused, "load_extension", lambda: Counting())
    parts = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    with torch.inference_mode():  # a rollout step, without autograd, also in 3 parts
        y_rollout, final_rollout, _ = core(x[:1], state, starts[:1])
    assert calls == [3, 3]
    assert parts.keys() == one.keys()
    for name, expected in one.items():
        torch.testing.assert_close(parts[name], expected, rtol=1e-12, atol=1e-13, msg=name)
    y_first, final_first, _ = core(x[:1], state, starts[:1])
    torch.testing.assert_close(y_rollout, y_first.detach(), rtol=1e-12, atol=1e-13)
    for k, v in final_first.items():
        torch.testing.assert_close(final_rollout[k], v.detach(), rtol=1e-12, atol=1e-13)


def test_an_error_in_a_thread_of_the_split_is_raised_not_fatal(kernel, monkeypatch):
    """A check that fails inside a part (here a malformed interaction bias) comes back as the
    kernel's own RuntimeError from the calling thread, not a crash of the process."""
    core = _core("mnm-p", "tanh", 2, 2)
    x, starts, state = _inputs(core, steps=4, batch=8)
    options, gates_x, keep, (h0, c0, r0, m0), params = _captured_call(
        core, x, starts, state, monkeypatch
    )
    params[2] = params[2].view(1, -1)  # b_int must be [E] or [T, B, E]
    with pytest.raises(RuntimeError, match="b_int must be"):
        kernel.forward_parts(gates_x, keep, h0, c0, r0, m0, *params, *options, False, True, 2)


def test_start_weights_stored_transposed_go_into_a_split_batch(kernel, monkeypatch):
    """A training call split between threads, from the final state of an earlier call (its
    weights stored transposed, as the kernel returns them), matches the same call in one part:
    outputs, final weights and every gradient (float64, widths with remainders)."""
    core = _core("mnm-p", "tanh", 2, 2, memory_size=20)
    x, starts, state = _inputs(core, steps=6, batch=7)
    monkeypatch.setenv("MNM_RL_FUSED", "1")
    _, mid, _ = core(x[:3], state, starts[:3])
    assert mid["fast_weights"].stride()[-2:] == (1, 20)
    monkeypatch.setattr(fused, "MIN_PART_ROWS", 2)

    def second_call(threads: str):
        monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, threads)
        core.zero_grad()
        y, final, aux = core(x[3:], mid, starts[3:])
        loss = y.sum() + final["fast_weights"].pow(2).sum() + aux["recon_after"].sum()
        loss.backward(retain_graph=True)
        grads = {n: p.grad.clone() for n, p in core.named_parameters()}
        return y.detach(), final["fast_weights"].detach(), grads

    one, three = second_call("1"), second_call("3")
    torch.testing.assert_close(three[0], one[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(three[1], one[1], rtol=1e-12, atol=1e-13)
    for name, expected in one[2].items():
        torch.testing.assert_close(three[2][name], expected, rtol=1e-12, atol=1e-13, msg=name)


def test_a_split_batch_under_saved_tensor_hooks_does_not_hang(kernel):
    """Saved-tensor hooks (Python objects in the thread-local state each part's thread copies)
    around a training pass split between two kernel threads: forward and backward finish, in a
    child process given two minutes (the parts' threads once waited for the GIL forever)."""
    program = """
import torch
from mnm_rl.memory import MNMCore, fused
fused.MIN_PART_ROWS = 2
fused.set_kernel_threads(2)
core = MNMCore(5, hidden_size=8, memory_size=8, n_heads=2, n_layers=2)
x, starts = torch.randn(4, 6, 5), torch.zeros(4, 6)
seen = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(1) or t, lambda t: t):
    y, final, aux = core(x, core.initial_state(6), starts)
    assert fused.batch_parts(4, 6) == 2
(y.sum() + final["fast_weights"].sum()).backward()
print("done", len(seen) > 0, core.interaction.weight.grad.abs().sum().item() > 0)
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["done", "True", "True"]


def test_switched_off_the_kernels_are_not_even_built(monkeypatch):
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    monkeypatch.setattr(fused.EXTENSION, "module", None)
    monkeypatch.setattr(fused.native, "build_extension", lambda *a: pytest.fail("built"))
    assert fused.load_extension() is None


def _captured_call(core, x, starts, state, monkeypatch) -> tuple:
    """The kernel's arguments of one training call of ``core``: ``(options, gates_x, keep,
    start [h0, c0, r0, m0], params)``, detached."""
    captured = {}
    original = fused.FusedSequence.apply

    def capture(config, *args):
        captured["config"], captured["args"] = config, args
        return original(config, *args)

    with monkeypatch.context() as patched:
        patched.setattr(fused.FusedSequence, "apply", capture)
        core(x, state, starts)
    _, options, _, _ = captured["config"]
    gates_x, keep, *rest = (a.detach() for a in captured["args"])
    return options, gates_x, keep, rest[:4], rest[4:]


@pytest.mark.parametrize("rule", ["mnm-p", "mnm-g"])
def test_a_split_batch_writes_every_output_into_the_whole_batch(kernel, rule, monkeypatch):
    """The parts of a split batch (3 uneven parts, float64) write into the whole batch's
    tensors: every output of the forward call (the final c and weights too) and every gradient
    of the backward call (the start state's too) is one call's, with resets in both parts and
    the start weights stored transposed, as a rollout's come."""
    core = _core(rule, "tanh", 2, 2, memory_size=20)
    x, starts, state = _inputs(core, steps=5, batch=7)
    starts[2, 1] = starts[3, 5] = 1
    with torch.no_grad():
        _, state, _ = core(x[:2], state, starts[:2])  # weights stored transposed
    options, gates_x, keep, start, params = _captured_call(core, x, starts, state, monkeypatch)
    assert start[3].stride()[-2:] == (1, 20)
    split = kernel.forward_parts(gates_x, keep, *start, *params, *options, True, True, 3)
    one = kernel.forward(gates_x, keep, *start, *params, *options, True, True)
    for k in range(9):
        torch.testing.assert_close(split[k], one[k], rtol=1e-12, atol=1e-13, msg=str(k))
    grads = [torch.randn_like(one[k]) for k in (0, 1, 2, 3, 4, 5, 7, 8)]
    hs = one[0]
    from_split = kernel.backward_parts(*grads, gates_x, keep, start[3], split[9:], hs, *params,
                                       *options, 0.0)  # fmt: skip
    expected = kernel.backward(*grads, gates_x, keep, start[3], *one[9:], hs, *params, *options,
                               0.0)  # fmt: skip
    assert len(from_split) == len(expected)
    for k, value in enumerate(expected):
        torch.testing.assert_close(from_split[k], value, rtol=1e-12, atol=1e-13, msg=str(k))


@pytest.mark.parametrize(("rule", "heads", "layers"), [("mnm-p", 4, 3), ("mnm-g", 2, 2)])
def test_a_forward_pass_without_answers_gives_the_same_reads(kernel, rule, heads, layers,
                                                             monkeypatch):  # fmt: skip
    """Without the write keys' answers (a rollout step's call) the post-write pass takes the
    read keys alone: every output but ``after`` (then [T, B, 0, D]) is the same bit for bit,
    whole and split, float32 and float64; the backward pass's call (store) needs the answers."""
    for dtype in (torch.float64, torch.float32):
        core = _core(rule, "tanh", heads, layers, dtype=dtype, memory_size=20)
        x, starts, state = _inputs(core, steps=3, batch=5, dtype=dtype)
        options, gates_x, keep, start, params = _captured_call(core, x, starts, state,
                                                               monkeypatch)  # fmt: skip
        whole = kernel.forward(gates_x, keep, *start, *params, *options, False, True)
        for reads_only in (
            kernel.forward(gates_x, keep, *start, *params, *options, False, False),
            kernel.forward_parts(gates_x, keep, *start, *params, *options, False, False, 2),
        ):
            assert reads_only[2].shape == (3, 5, 0, core.memory_size)
            for k in (0, 1, 3, 4, 5, 6, 7, 8):
                assert torch.equal(reads_only[k], whole[k]), (dtype, k)
    with pytest.raises(RuntimeError, match="needs the answers"):
        kernel.forward(gates_x, keep, *start, *params, *options, True, False)


def test_per_step_inputs_are_read_where_they_lie(kernel, monkeypatch):
    """gates_x and the outputs' gradients as rows of a wider batch (each step contiguous, the
    steps further apart), and the gradients of hs and reads as the two halves of one [h ; read]
    gradient (rows a stride apart), give what their contiguous copies give, bit for bit, whole
    and split."""
    core = _core("mnm-p", "tanh", 2, 2)
    x, starts, state = _inputs(core, steps=4, batch=5)
    options, gates_x, keep, start, params = _captured_call(core, x, starts, state, monkeypatch)
    wider = torch.randn(4, 9, gates_x.shape[-1], dtype=gates_x.dtype)
    wider[:, 2:7] = gates_x
    rows = wider[:, 2:7]
    assert not rows.is_contiguous()
    out = kernel.forward(rows, keep, *start, *params, *options, True, True)
    copy = kernel.forward(gates_x, keep, *start, *params, *options, True, True)
    for a, b in zip(out, copy, strict=True):
        assert torch.equal(a, b)
    g_hs = torch.randn(4, 9, out[0].shape[-1], dtype=gates_x.dtype)[:, 2:7]
    empty = torch.Tensor()
    grads = (g_hs, empty, empty, empty, empty, empty, empty, empty)
    strided = kernel.backward(*grads, gates_x, keep, start[3], *out[9:], out[0], *params, *options,
                              0.0)  # fmt: skip
    grads = (g_hs.contiguous(), *grads[1:])
    dense = kernel.backward(*grads, gates_x, keep, start[3], *out[9:], out[0], *params, *options,
                            0.0)  # fmt: skip
    for a, b in zip(strided, dense, strict=True):
        assert torch.equal(a, b)
    hidden, width = out[0].shape[-1], out[1].shape[-1]
    g_joined = torch.randn(4, 5, hidden + width, dtype=gates_x.dtype)
    halves = (g_joined[..., :hidden], g_joined[..., hidden:])
    assert halves[0].stride(1) == halves[1].stride(1) == hidden + width
    split = kernel.forward_parts(gates_x, keep, *start, *params, *options, True, True, 2)
    for call in (
        lambda g: kernel.backward(*g, *[empty] * 6, gates_x, keep, start[3], *out[9:], out[0],
                                  *params, *options, 0.0),
        lambda g: kernel.backward_parts(*g, *[empty] * 6, gates_x, keep, start[3], split[9:],
                                        split[0], *params, *options, 0.0),
    ):  # fmt: skip
        for a, b in zip(call(halves), call([h.contiguous() for h in halves]), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rule", "heads", "layers"), [("mnm-p", 4, 3), ("mnm-g", 2, 2)])
def test_the_backward_pass_adds_the_reconstruction_gradient_itself(kernel, rule, heads, layers,
                                                                   dtype, monkeypatch):  # fmt: skip
    """With ``recon_scale`` s the backward pass adds s (after - values) to the answers'
    gradient and takes it from the values': the same gradients as when they are given as
    tensors, whole and split, with the other outputs' gradients given too; and with both, their
    sum. (Up to rounding: the compiler fuses the kernel's multiply and add.)"""
    core = _core(rule, "tanh", heads, layers, dtype=dtype, memory_size=20)
    x, starts, state = _inputs(core, steps=4, batch=5, dtype=dtype)
    starts[2, 3] = 1
    options, gates_x, keep, start, params = _captured_call(core, x, starts, state, monkeypatch)
    one = kernel.forward(gates_x, keep, *start, *params, *options, True, True)
    split = kernel.forward_parts(gates_x, keep, *start, *params, *options, True, True, 2)
    after, values, scale = one[2], one[4], 2.0 * 0.3 / one[2].numel()
    g_after = (after - values).mul_(scale)
    grads = [torch.randn_like(one[k]) for k in (0, 1, 2, 3, 4, 5, 7, 8)]

    def backward(grads, recon_scale, parts):
        if parts == 1:
            return kernel.backward(*grads, gates_x, keep, start[3], *one[9:], one[0], *params,
                                   *options, recon_scale)  # fmt: skip
        return kernel.backward_parts(*grads, gates_x, keep, start[3], split[9:], split[0],
                                     *params, *options, recon_scale)  # fmt: skip

    empty = torch.Tensor()
    for parts in (1, 2):
        given = [*grads[:2], g_after, grads[3], -g_after, *grads[5:]]
        inside = [*grads[:2], empty, grads[3], empty, *grads[5:]]
        expected = backward(given, 0.0, parts)
        for a, b in zip(backward(inside, scale, parts), expected, strict=True):
            torch.testing.assert_close(a, b, msg=str(parts))
        without = backward(inside, 0.0, parts)  # the reconstruction gradient is no rounding
        assert not all(torch.allclose(a, b) for a, b in zip(without, expected, strict=True))
        summed = [*grads[:2], grads[2] + g_after, grads[3], grads[4] - g_after, *grads[5:]]
        for a, b in zip(backward(grads, scale, parts), backward(summed, 0.0, parts), strict=True):
            torch.testing.assert_close(a, b, msg=str(parts))
