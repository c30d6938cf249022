"""The fused LSTM and GRU kernels (``mnm_rl.memory.rnn_kernels``) compute what ``nn.LSTM`` and
``nn.GRU`` compute.

Each comparison runs one baseline core twice on the same inputs, through the kernel and through
the PyTorch code (``MNM_RL_FUSED=0``: the module span by span between episode resets), and
compares the outputs, the final state and the gradients of every parameter, of the inputs and of
the start state, with resets at the first step, inside the sequence, and several in one step.
"""

from __future__ import annotations

import pytest
import torch
from compiled import built
from kernel_accuracy import assert_as_accurate_as_pytorch

from mnm_rl.memory import CoreState, GRUCore, LSTMCore, fused, rnn_kernels

CORES = {"lstm": (LSTMCore, "FusedLSTMSequence"), "gru": (GRUCore, "FusedGRUSequence")}


@pytest.fixture(scope="module")
def kernel():
    return built(fused.EXTENSION)


def _core(kind: str, size: int, hidden: int, dtype=torch.float64):
    torch.manual_seed(0)
    return CORES[kind][0](size, hidden_size=hidden).to(dtype)


def _inputs(core, steps: int, batch: int, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, core.input_size, generator=gen, dtype=dtype)
    starts = torch.zeros(steps, batch)
    starts[0, 0] = 1
    starts[2, 1:] = 1  # several sequences in one step
    starts[steps - 1, batch - 1] = 1
    state = CoreState(
        {
            k: torch.randn(batch, core.hidden_size, generator=gen, dtype=dtype)
            for k in core.state_keys
        }
    )
    return x, starts, state


def _run(core, x, starts, state, monkeypatch, use_kernel: bool):
    monkeypatch.setenv("MNM_RL_FUSED", "1" if use_kernel else "0")
    core.zero_grad()
    x = x.clone().requires_grad_(True)
    start = CoreState({k: v.clone().requires_grad_(True) for k, v in state.items()})
    y, final, _ = core(x, start, starts)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weights).sum() + sum((i + 2) * v.pow(2).sum() for i, v in enumerate(final.values()))
    loss.backward()
    out = {"y": y, "grad.x": x.grad, **{f"final.{k}": v for k, v in final.items()}}
    out.update({f"grad.{n}": p.grad.clone() for n, p in core.named_parameters()})
    out.update({f"grad.state.{k}": v.grad for k, v in start.items()})
    return out


def _count_calls(monkeypatch, kind: str) -> list[int]:
    calls: list[int] = []
    function = getattr(rnn_kernels, CORES[kind][1])
    original = function.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(function, "apply", counting)
    return calls


@pytest.mark.parametrize("kind", CORES)
@pytest.mark.parametrize("own_products", [True, False], ids=["own-products", "aten-products"])
def test_kernel_matches_the_module_in_float64(kernel, monkeypatch, kind, own_products):
    """With the kernels' own products and with ATen's (``MNM_RL_DENSE_PRODUCTS=0``)."""
    monkeypatch.setenv("MNM_RL_DENSE_PRODUCTS", "1" if own_products else "0")
    core = _core(kind, 5, 7)
    x, starts, state = _inputs(core, steps=6, batch=4, dtype=torch.float64)
    calls = _count_calls(monkeypatch, kind)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    assert len(calls) == 1
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    assert len(calls) == 1  # MNM_RL_FUSED=0 ran the module
    assert fused_out.keys() == eager_out.keys()
    for name, expected in eager_out.items():
        assert expected is not None, name
        torch.testing.assert_close(fused_out[name], expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", CORES)
def test_kernel_in_float32_is_as_accurate_as_the_module(kernel, monkeypatch, kind):
    """float32 at the agents' sizes: against the float64 result, the kernel (its own tanh and
    sigmoid) errs no more than the module's float32 code does."""
    core = _core(kind, 32, 64, dtype=torch.float32)
    x, starts, state = _inputs(core, steps=32, batch=16, dtype=torch.float32, seed=1)
    fused_out = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    eager_out = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    state64 = CoreState({k: v.double() for k, v in state.items()})
    exact = _run(core.double(), x.double(), starts, state64, monkeypatch, use_kernel=False)
    assert_as_accurate_as_pytorch(fused_out, eager_out, exact)


def test_kernel_gradients_pass_gradcheck(kernel):
    """Finite differences on the kernels' own autograd functions, without the modules."""
    gen = torch.Generator().manual_seed(2)
    steps, batch, hidden = 5, 3, 4

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    keep = torch.ones(steps, batch, dtype=torch.float64)
    keep[1, 0] = keep[3, 2] = 0
    lstm = rnn_kernels.FusedLSTMSequence.apply
    gru = rnn_kernels.FusedGRUSequence.apply
    assert torch.autograd.gradcheck(
        lambda g, h, c, w: lstm((kernel, True), g, keep, h, c, w),
        (randn(steps, batch, 4 * hidden), randn(batch, hidden), randn(batch, hidden),
         randn(4 * hidden, hidden)),
        eps=1e-6, atol=1e-7,
    )  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda g, h, w, b: gru((kernel, True), g, keep, h, w, b),
        (randn(steps, batch, 3 * hidden), randn(batch, hidden), randn(3 * hidden, hidden),
         randn(3 * hidden)),
        eps=1e-6, atol=1e-7,
    )  # fmt: skip


@pytest.mark.parametrize("kind", CORES)
def test_sequences_without_resets_take_the_kernel_and_the_switch_the_module(
    kernel, monkeypatch, kind
):
    calls = _count_calls(monkeypatch, kind)
    core = _core(kind, 5, 7, dtype=torch.float32)
    x, starts, state = _inputs(core, steps=4, batch=3, dtype=torch.float32)
    no_resets_after_the_first_step = torch.zeros(4, 3)
    no_resets_after_the_first_step[0] = 1
    y, _, _ = core(x, state, no_resets_after_the_first_step)
    assert y.shape == (4, 3, 7) and len(calls) == 1  # the kernel, faster than one oneDNN call
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    y, _, _ = core(x[:1], state, starts[:1])  # a rollout step: the cell op
    assert y.shape == (1, 3, 7)
    y, _, _ = core(x, state, starts)
    assert y.shape == (4, 3, 7) and len(calls) == 1


def _rollout_step_inputs(core):
    """One step of 4 sequences, two of which start an episode: the reset is the kernel's mask,
    where the cell op needs it applied around it (and a host read to know whether to)."""
    x, _, state = _inputs(core, steps=3, batch=4, dtype=torch.float64)
    return x[:1], torch.tensor([[1.0, 0.0, 0.0, 1.0]]), state


@pytest.mark.parametrize("kind", CORES)
def test_a_rollout_steps_gradients_through_the_kernel_are_the_cell_ops(kernel, monkeypatch, kind):
    core = _core(kind, 5, 7)
    x, starts, state = _rollout_step_inputs(core)
    calls = _count_calls(monkeypatch, kind)
    got = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    assert len(calls) == 1
    expected = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    assert len(calls) == 1  # not called again
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", CORES)
@pytest.mark.parametrize("steps", [6, 1])
def test_without_grad_the_kernel_stores_nothing_and_agrees(kernel, monkeypatch, kind, steps):
    # one step: a rollout step, which takes the kernel too
    core = _core(kind, 5, 7)
    if steps == 1:
        x, starts, state = _rollout_step_inputs(core)
    else:
        x, starts, state = _inputs(core, steps=steps, batch=4, dtype=torch.float64)
    monkeypatch.setenv("MNM_RL_FUSED", "1")
    calls = _count_calls(monkeypatch, kind)
    with torch.inference_mode():
        y, final, _ = core(x, state, starts)
    assert len(calls) == 1
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    with torch.no_grad():
        y_ref, final_ref, _ = core(x, state, starts)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for k in core.state_keys:
        torch.testing.assert_close(final[k], final_ref[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", CORES)
def test_without_a_built_kernel_the_module_runs(monkeypatch, kind):
    """No compiler: ``load_extension`` gives ``None`` and the core runs its module, with the
    same result as ``MNM_RL_FUSED=0``."""
    core = _core(kind, 5, 7)
    x, starts, state = _inputs(core, steps=6, batch=4, dtype=torch.float64)
    expected = _run(core, x, starts, state, monkeypatch, use_kernel=False)
    monkeypatch.setattr(fused, "load_extension", lambda: None)
    calls = _count_calls(monkeypatch, kind)
    got = _run(core, x, starts, state, monkeypatch, use_kernel=True)
    assert calls == []
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("own_products", [True, False], ids=["own-products", "aten-products"])
def test_lstm_passes_in_parts_equal_one_part_bit_for_bit(kernel, monkeypatch, dtype, own_products):
    """The batch split between threads (2, 3 or 5 parts, unequal ones included): every output
    and gradient the same as in one part, with resets: bit for bit with the kernels' own
    products, to rounding with ATen's (MKL blocks a product by its number of rows)."""
    monkeypatch.setenv("MNM_RL_DENSE_PRODUCTS", "1" if own_products else "0")
    steps, batch, hidden = 7, 11, 16
    gen = torch.Generator().manual_seed(3)
    gates_x = torch.randn(steps, batch, 4 * hidden, generator=gen, dtype=dtype)
    keep = (torch.rand(steps, batch, generator=gen) > 0.2).to(dtype)
    h0, c0, g_c = (torch.randn(batch, hidden, generator=gen, dtype=dtype) for _ in range(3))
    w_hh = 0.3 * torch.randn(4 * hidden, hidden, generator=gen, dtype=dtype)
    g_hs = torch.randn(steps, batch, hidden, generator=gen, dtype=dtype)

    def passes(parts):
        out = kernel.lstm_forward(gates_x, keep, h0, c0, w_hh, True, parts)
        grads = kernel.lstm_backward(g_hs, g_c, keep, h0, c0, w_hh, out[0], out[2], out[3], parts)
        return [*out, *grads]

    one = passes(1)
    assert keep.min() == 0  # some resets
    for parts in (2, 3, 5):
        for expected, got in zip(one, passes(parts), strict=True):
            if own_products:
                assert torch.equal(expected, got)
            else:
                torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="parts must be in"):
        kernel.lstm_forward(gates_x, keep, h0, c0, w_hh, True, batch + 1)
    with pytest.raises(RuntimeError, match="parts must be in"):
        kernel.lstm_backward(g_hs, g_c, keep, h0, c0, w_hh, *one[:1], *one[2:4], 0)


def test_lstm_core_trains_on_kernel_threads_as_on_one(kernel, monkeypatch):
    """With two kernel threads a training batch runs in two parts (fused.batch_parts): the
    outputs and every gradient are those of one thread, bit for bit."""
    core = _core("lstm", 5, 8, dtype=torch.float32)
    x, starts, state = _inputs(core, steps=6, batch=8, dtype=torch.float32)
    parts = []  # the parts each kernel call gets: its last argument
    for name in ("lstm_forward", "lstm_backward"):
        original = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _f=original: parts.append(a[-1]) or _f(*a))
    results = []
    for threads in (1, 2):
        fused.set_kernel_threads(threads)
        try:
            results.append(_run(core, x, starts, state, monkeypatch, use_kernel=True))
        finally:
            fused.set_kernel_threads(None)
    assert parts == [1, 1, 2, 2]  # forward and backward, one thread then two
    one, two = results
    assert one.keys() == two.keys() and "grad.rnn.weight_hh_l0" in one
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_an_lstm_agent_trains_the_same_on_two_kernel_threads(monkeypatch):
    """A seeded lstm agent's training on MiniGrid, with its updates' LSTM, input projection and
    heads split between two kernel threads (the small run's minibatches of 4 chunks of 8 steps
    split too: smaller minimum parts): the same parameters, bit for bit, as on one."""
    from minigrid_training import assert_same_parameters, trained_parameters

    from mnm_rl.agent import action_heads
    from mnm_rl.memory import products

    monkeypatch.delenv(fused.KERNEL_THREADS_VARIABLE, raising=False)
    monkeypatch.setattr(fused, "MIN_PART_ROWS", 2)
    monkeypatch.setattr(products, "MIN_PART_ROWS", 8)
    monkeypatch.setattr(action_heads, "MIN_THREAD_ROWS", 8)
    splits = []
    for module, name in ((fused, "batch_parts"), (products, "row_parts"),
                         (action_heads, "head_threads")):  # fmt: skip
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, f=original, n=name, **k: splits.append(
            (n, f(*a, **k))) or splits[-1][1])  # fmt: skip
    policies = []
    for threads in (1, 2):
        fused.set_kernel_threads(threads)
        try:
            policies.append(trained_parameters())
        finally:
            fused.set_kernel_threads(None)
    assert {(n, k) for n, k in splits if k > 1} == {
        ("batch_parts", 2),
        ("row_parts", 2),
        ("head_threads", 2),
    }
    assert_same_parameters(*policies)
