"""The fused LSTM kernel (``mnm_rl.memory.lstm_kernel``) computes what ``nn.LSTM`` computes.

Each comparison runs one ``LSTMCore`` twice on the same inputs, through the kernel and through
the PyTorch code (``MNM_RL_FUSED=0``: ``nn.LSTM`` span by span between episode resets), and
compares the outputs, the final state and the gradients of every parameter, of the inputs and of
the start state, with resets at the first step, inside the sequence, and several in one step.
"""

from __future__ import annotations

import pytest
import torch

from mnm_rl.memory import CoreState, LSTMCore, fused, lstm_kernel


@pytest.fixture(scope="module")
def kernel():
    ext = fused.load_extension()
    assert ext is not None, "the fused kernels did not build"
    return ext


def _inputs(steps: int, batch: int, size: int, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, size, generator=gen, dtype=dtype)
    starts = torch.zeros(steps, batch)
    starts[0, 0] = 1
    starts[2, 1:] = 1  # several sequences in one step
    starts[steps - 1, batch - 1] = 1
    h = torch.randn(batch, 7, generator=gen, dtype=dtype)
    c = torch.randn(batch, 7, generator=gen, dtype=dtype)
    return x, starts, CoreState({"h": h, "c": c})


def _run(core: LSTMCore, x, starts, state, monkeypatch, use_kernel: bool):
    monkeypatch.setenv("MNM_RL_FUSED", "1" if use_kernel else "0")
    core.zero_grad()
    x = x.clone().requires_grad_(True)
    start = CoreState({k: v.clone().requires_grad_(True) for k, v in state.items()})
    y, final, _ = core(x, start, starts)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weights).sum() + 2 * final["c"].pow(2).sum() + 3 * final["h"].sum()
    loss.backward()
    out = {"y": y, "final.h": final["h"], "final.c": final["c"], "grad.x": x.grad}
    out.update({f"grad.{n}": p.grad.clone() for n, p in core.named_parameters()})
    out.update({f"grad.state.{k}": v.grad for k, v in start.items()})
    return out


def test_kernel_matches_nn_lstm_in_float64(kernel, monkeypatch):
    torch.manual_seed(0)
    core = LSTMCore(5, hidden_size=7).double()
    x, starts, state = _inputs(steps=6, batch=4, size=5, dtype=torch.float64)
    calls = []
    original = lstm_kernel.FusedLSTMSequence.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lstm_kernel.FusedLSTMSequence, "apply", counting)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    assert len(calls) == 1
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    assert len(calls) == 1  # MNM_RL_FUSED=0 ran nn.LSTM
    assert fused_out.keys() == eager_out.keys()
    for name, expected in eager_out.items():
        assert expected is not None, name
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-10, atol=1e-12, msg=name)


def test_kernel_in_float32_is_as_accurate_as_nn_lstm(kernel, monkeypatch):
    """float32 at the agents' sizes: against the float64 result, the kernel (its own tanh and
    sigmoid) errs no more than nn.LSTM's float32 code does."""
    torch.manual_seed(1)
    core = LSTMCore(32, hidden_size=7)
    x, starts, state = _inputs(steps=32, batch=16, size=32, dtype=torch.float32, seed=1)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    state64 = CoreState({k: v.double() for k, v in state.items()})
    exact = _run(core.double(), x.double(), starts, state64, monkeypatch, use_kernel=False)
    for name, truth in exact.items():
        scale = truth.abs().max().item()
        fused_error = (fused_out[name].double() - truth).abs().max().item()
        eager_error = (eager_out[name].double() - truth).abs().max().item()
        assert fused_error <= 4 * eager_error + 1e-6 * scale, (name, fused_error, eager_error)


def test_kernel_gradients_pass_gradcheck(kernel):
    """Finite differences on the kernel's own autograd function, without nn.LSTM."""
    gen = torch.Generator().manual_seed(2)
    steps, batch, hidden = 5, 3, 4
    gates_x = torch.randn(steps, batch, 4 * hidden, generator=gen, dtype=torch.float64)
    keep = torch.ones(steps, batch, dtype=torch.float64)
    keep[1, 0] = keep[3, 2] = 0
    h0, c0 = (torch.randn(batch, hidden, generator=gen, dtype=torch.float64) for _ in range(2))
    w_hh = torch.randn(4 * hidden, hidden, generator=gen, dtype=torch.float64)

    def f(gates_x, h0, c0, w_hh):
        return lstm_kernel.FusedLSTMSequence.apply((kernel, True), gates_x, keep, h0, c0, w_hh)

    inputs = tuple(t.requires_grad_() for t in (gates_x, h0, c0, w_hh))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_single_steps_sequences_without_resets_and_the_switch_use_pytorch(kernel, monkeypatch):
    def refuse(*args):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(lstm_kernel.FusedLSTMSequence, "apply", refuse)
    core = LSTMCore(5, hidden_size=7)
    x, starts, state = _inputs(steps=4, batch=3, size=5, dtype=torch.float32)
    y, _, _ = core(x[:1], state, starts[:1])  # a rollout step: torch.lstm_cell
    assert y.shape == (1, 3, 7)
    no_resets_after_the_first_step = torch.zeros(4, 3)
    no_resets_after_the_first_step[0] = 1
    y, _, _ = core(x, state, no_resets_after_the_first_step)  # one nn.LSTM call
    assert y.shape == (4, 3, 7)
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    y, _, _ = core(x, state, starts)
    assert y.shape == (4, 3, 7)


def test_without_grad_the_kernel_stores_nothing_and_agrees(kernel, monkeypatch):
    torch.manual_seed(3)
    core = LSTMCore(5, hidden_size=7).double()
    x, starts, state = _inputs(steps=6, batch=4, size=5, dtype=torch.float64)
    monkeypatch.setenv("MNM_RL_FUSED", "1")
    with torch.inference_mode():
        y, final, _ = core(x, state, starts)
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    with torch.no_grad():
        y_ref, final_ref, _ = core(x, state, starts)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for k in ("h", "c"):
        torch.testing.assert_close(final[k], final_ref[k], rtol=1e-12, atol=1e-12)
