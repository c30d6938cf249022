"""The compiled end of a minibatch's update (``mnm_rl.agent.gradient_step``): clipping the
gradients as ``torch.nn.utils.clip_grad_norm_`` does and ``torch.optim.Adam(fused=True)``'s step,
bit for bit, with PyTorch's code wherever the compiled step does not apply."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from compiled import built
from torch import nn

from mnm_rl.agent import gradient_step
from mnm_rl.memory import fused


@pytest.fixture(scope="module")
def kernel():
    return built(gradient_step.EXTENSION)


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _set_grads(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["clipped", "under-the-limit"])
def test_clip_grad_norm_scales_as_pytorch_does(kernel, dtype, scale):
    ours, theirs = _model(dtype), _model(dtype)
    _set_grads(ours, 1, scale)
    _set_grads(theirs, 1, scale)
    norm = gradient_step.clip_grad_norm(list(ours.parameters()), 0.5)
    expected = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 0.5)
    assert isinstance(norm, float)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    clipped = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ours.parameters()))
    assert clipped == pytest.approx(min(norm, 0.5), rel=1e-5)


def test_clip_grad_norm_skips_missing_gradients_and_scales_strided_ones(kernel):
    ours, theirs = _model(), _model()
    for model in (ours, theirs):
        _set_grads(model, 2, 10.0)
        model[0].bias.grad = None
        w = model[2].weight
        model[2].weight.grad = w.grad.t().contiguous().t()  # a transposed layout, same values
    assert not ours[2].weight.grad.is_contiguous()
    norm = gradient_step.clip_grad_norm(list(ours.parameters()), 1.0)
    expected = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 1.0)
    assert norm == pytest.approx(float(expected), rel=1e-6)
    assert ours[0].bias.grad is None
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_a_non_finite_norm_is_returned_and_changes_nothing(kernel):
    model = _model()
    _set_grads(model, 3)
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    assert math.isnan(gradient_step.clip_grad_norm(list(model.parameters()), 0.5))
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, b, equal_nan=True)


def _optimizers(**kwargs) -> tuple[nn.Module, torch.optim.Adam, nn.Module, torch.optim.Adam]:
    """Two copies of a model, each with its Adam: two groups, the second with other settings."""
    a = _model()
    b = copy.deepcopy(a)

    def adam(model):
        groups = [{"params": list(model[0].parameters())},
                  {"params": list(model[2].parameters()), "lr": 0.003, "weight_decay": 0.1,
                   "maximize": True}]  # fmt: skip
        return torch.optim.Adam(groups, lr=0.01, eps=1e-5, fused=True, **kwargs)

    return a, adam(a), b, adam(b)


def _assert_same(a: nn.Module, opt_a, b: nn.Module, opt_b) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k, state in sa["state"].items():
        assert state.keys() == sb["state"][k].keys()
        for name, value in state.items():
            assert torch.equal(value, sb["state"][k][name]), (k, name)


def _step_both(a: nn.Module, opt_a, b: nn.Module, opt_b, seed: int) -> None:
    """The same gradients into both models; a steps through adam_step, b through its own
    optimizer; then both must agree."""
    _set_grads(a, seed)
    _set_grads(b, seed)
    gradient_step.adam_step(opt_a)
    opt_b.step()
    _assert_same(a, opt_a, b, opt_b)


def test_adam_step_is_the_fused_adam_step_bit_for_bit(kernel, monkeypatch):
    a, opt_a, b, opt_b = _optimizers()
    calls, compiled = [], kernel.adam_step
    monkeypatch.setattr(kernel, "adam_step", lambda *args: calls.append(1) or compiled(*args))
    for step in range(5):
        _step_both(a, opt_a, b, opt_b, 10 + step)
    assert len(calls) == 4  # the first step makes the state: the optimizer's own step


def test_adam_step_in_two_threads_is_the_fused_adam_step_bit_for_bit(kernel, monkeypatch):
    """With two kernel threads each group's tensors are dealt between two threads: the same
    results as torch's fused step (and as one thread), every group's settings kept."""
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    monkeypatch.setattr(gradient_step, "MIN_THREAD_ELEMENTS", 0)
    a, opt_a, b, opt_b = _optimizers()
    threads, compiled = [], kernel.adam_step
    monkeypatch.setattr(
        kernel, "adam_step", lambda *args: threads.append(args[-1]) or compiled(*args)
    )
    for step in range(5):
        _step_both(a, opt_a, b, opt_b, 20 + step)
    assert threads == [2] * 4


def test_adam_threads_need_two_kernel_threads_and_enough_elements(monkeypatch):
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    assert gradient_step.adam_threads(gradient_step.MIN_THREAD_ELEMENTS) == 2
    assert gradient_step.adam_threads(gradient_step.MIN_THREAD_ELEMENTS - 1) == 1
    monkeypatch.setenv(gradient_step.THREADS_VARIABLE, "0")
    assert gradient_step.adam_threads(10**9) == 1
    monkeypatch.delenv(gradient_step.THREADS_VARIABLE)
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "1")
    assert gradient_step.adam_threads(10**9) == 1


def test_the_benchmarks_mnm_agent_steps_adam_on_two_threads_and_its_lstm_on_one(monkeypatch):
    """What docs/benchmarks.md says of throughput.py's agents (width 64) with two kernel
    threads: mnm-p has MIN_THREAD_ELEMENTS parameter elements or more, lstm fewer."""
    from benchmark_scripts import load_script

    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    throughput = load_script("throughput")
    setting = throughput.parse_args([])
    env = throughput.make_env(setting)
    try:
        for config, threads in (("mnm-p", 2), ("lstm", 1)):
            model = throughput.build_agent(config, setting, env, "cpu")
            elements = sum(p.numel() for p in model.policy.parameters())
            assert gradient_step.adam_threads(elements) == threads, (config, elements)
    finally:
        env.close()


def test_compiled_adam_step_refuses_no_threads(kernel):
    a, opt_a, _, _ = _optimizers()
    _set_grads(a, 0)
    opt_a.step()  # makes the state
    params, exp_avgs, exp_avg_sqs, steps, sizes, _ = gradient_step._adam_state(opt_a)
    settings = [gradient_step._settings(group) for group in opt_a.param_groups]
    grads = [p.grad for p in params]
    with pytest.raises(RuntimeError, match="threads must be positive"):
        kernel.adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, sizes, settings, 0)


def test_adam_step_after_load_state_dict_uses_the_loaded_state(kernel):
    a, opt_a, b, opt_b = _optimizers()
    for step in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            _set_grads(model, 20 + step)
            opt.step()
    # a fresh copy of b's state into a's optimizer: the cached state lists must follow it
    a.load_state_dict(b.state_dict())
    opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for step in range(3):
        _step_both(a, opt_a, b, opt_b, 30 + step)


@pytest.mark.parametrize("case", ["missing-gradient", "amsgrad", "hook", "switched-off"])
def test_adam_step_falls_back_to_the_optimizers_own_step(kernel, monkeypatch, case):
    a, opt_a, b, opt_b = _optimizers(amsgrad=case == "amsgrad")
    hooked = []
    if case == "hook":  # a pre-hook may change the step's arguments: the optimizer's own step
        opt_a.register_step_pre_hook(lambda *args: hooked.append(1))
    if case == "switched-off":
        monkeypatch.setenv(gradient_step.SWITCH_VARIABLE, "0")
    monkeypatch.setattr(kernel, "adam_step", lambda *args: pytest.fail("the compiled step ran"))
    for step in range(3):
        for model in (a, b):
            _set_grads(model, 40 + step)
            if case == "missing-gradient" and step > 0:
                model[2].bias.grad = None
        gradient_step.adam_step(opt_a)
        opt_b.step()
        _assert_same(a, opt_a, b, opt_b)
    assert len(hooked) == (3 if case == "hook" else 0)


def test_the_compiled_step_runs_the_optimizers_post_hooks(kernel, monkeypatch):
    a, opt_a, b, opt_b = _optimizers()
    calls, compiled = [], kernel.adam_step
    monkeypatch.setattr(kernel, "adam_step", lambda *args: calls.append(1) or compiled(*args))
    hooked = []
    opt_a.register_step_post_hook(lambda opt, args, kwargs: hooked.append((opt, args, kwargs)))
    for step in range(3):
        _step_both(a, opt_a, b, opt_b, 60 + step)
    assert len(calls) == 2  # the compiled step ran after the first
    assert hooked == [(opt_a, (opt_a,), {})] * 3  # as torch.optim calls them


def test_a_ppo_update_clips_and_steps_as_pytorchs_code_does(kernel, monkeypatch):
    """MemoryPPO.train() on one rollout: the compiled calls ran, and the parameters and the
    optimizer's state end where PyTorch's clip_grad_norm_ and Adam.step take them."""
    from test_agent import collect_one_rollout, small_model

    model = small_model("lstm", max_grad_norm=0.05)  # small enough to clip every minibatch
    collect_one_rollout(model)
    policy = copy.deepcopy(model.policy.state_dict())
    optimizer = copy.deepcopy(model.policy.optimizer.state_dict())
    rng = torch.get_rng_state()  # the minibatches' order
    calls = {"clip_grad_norm": 0, "adam_step": 0}
    for name in calls:
        compiled = getattr(kernel, name)

        def counted(*args, name=name, compiled=compiled):
            calls[name] += 1
            return compiled(*args)

        monkeypatch.setattr(kernel, name, counted)
    model.train()
    ours = [p.detach().clone() for p in model.policy.parameters()]
    our_state = copy.deepcopy(model.policy.optimizer.state_dict())
    updates = model.n_epochs * model.n_steps * model.n_envs // model.batch_size
    assert calls == {"clip_grad_norm": updates, "adam_step": updates - 1}  # first: state made

    monkeypatch.setenv(gradient_step.SWITCH_VARIABLE, "0")
    model.policy.load_state_dict(policy)
    model.policy.optimizer.load_state_dict(optimizer)
    torch.set_rng_state(rng)
    model.train()
    for a, b in zip(ours, model.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    theirs = model.policy.optimizer.state_dict()["state"]
    assert our_state["state"].keys() == theirs.keys()
    for k, state in our_state["state"].items():
        assert torch.equal(state["step"], theirs[k]["step"])
        torch.testing.assert_close(state["exp_avg"], theirs[k]["exp_avg"], rtol=1e-4, atol=1e-7)


def test_zero_grad_sets_every_gradient_to_none_or_runs_the_optimizers_own():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    _set_grads(model, 50)
    gradient_step.zero_grad(optimizer)
    assert all(p.grad is None for p in model.parameters())

    class Keeping(torch.optim.Adam):
        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none=False)

    keeping = Keeping(model.parameters())
    _set_grads(model, 51)
    gradient_step.zero_grad(keeping)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
