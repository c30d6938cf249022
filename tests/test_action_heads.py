"""The compiled action heads (``mnm_rl.agent.action_heads``) against the PyTorch code they stand
in for: the policy's heads, ``RecurrentMemoryPolicy.sample`` and the finiteness check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compiled import built
from stable_baselines3.common.callbacks import StopTrainingOnMaxEpisodes
from test_agent import collect_one_rollout, small_model
from torch import nn

from mnm_rl.agent import action_heads, explicit, policy_step
from mnm_rl.agent.policy import RecurrentMemoryPolicy, _mlp


@pytest.fixture
def kernel(monkeypatch):
    """The heads' kernel, with the whole policy's compiled step (which runs the heads itself,
    ``tests/test_policy_step.py``) switched off, so that a policy's steps take the heads."""
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "0")
    return built(action_heads.EXTENSION)


def pytorch_heads(latent, value_latent, action_net, value_net, deterministic):
    logits = action_net(latent)
    actions, log_probs = RecurrentMemoryPolicy.sample(logits, deterministic)
    return actions, log_probs, value_net(value_latent).squeeze(-1), bool(logits.isfinite().all())


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("hidden", [(64,), (32, 16), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_the_kernel_draws_the_same_actions_as_pytorch(
    kernel, activation, hidden, dtype, deterministic
):
    torch.manual_seed(0)
    action_net = _mlp(24, hidden, 7, activation).to(dtype)
    value_net = _mlp(24, hidden, 1, activation).to(dtype)
    latent, value_latent = torch.randn(2, 300, 24, dtype=dtype) * 3
    with torch.no_grad():
        torch.manual_seed(1)
        expected = pytorch_heads(latent, value_latent, action_net, value_net, deterministic)
        next_expected = torch.rand(3)
        torch.manual_seed(1)
        got = action_heads.heads_step(
            kernel, latent, value_latent, action_net, value_net, activation, deterministic
        )
        next_got = torch.rand(3)
    assert torch.equal(next_got, next_expected)  # the same draws taken from the generator
    actions, log_probs, values, finite = got
    assert actions.dtype == torch.int64 and actions.shape == (300,)
    assert torch.equal(actions, expected[0])
    torch.testing.assert_close(log_probs, expected[1])
    torch.testing.assert_close(values, expected[2])
    assert finite is True
    assert len(set(actions.tolist())) > 1  # not one action everywhere


def test_the_kernel_draws_from_the_softmax(kernel):
    torch.manual_seed(0)
    action_net, value_net = _mlp(4, (), 5, nn.Tanh), _mlp(4, (), 1, nn.Tanh)
    latent = torch.randn(1, 4).expand(20000, 4)
    with torch.no_grad():
        actions, log_probs, _, _ = action_heads.heads_step(
            kernel, latent, latent, action_net, value_net, nn.Tanh
        )
        probs = action_net(latent[:1]).softmax(-1)[0]
    freq = torch.bincount(actions, minlength=5).double() / actions.numel()
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)
    torch.testing.assert_close(log_probs, probs.log()[actions])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_logit_is_reported(kernel, bad):
    action_net, value_net = _mlp(3, (), 4, nn.Tanh), _mlp(3, (), 1, nn.Tanh)
    latent = torch.zeros(5, 3)
    with torch.no_grad():
        action_net[0].bias[2] = bad
        *_, finite = action_heads.heads_step(kernel, latent, latent, action_net, value_net, nn.Tanh)
        assert finite is False
        action_net[0].bias[2] = 0.0
        *_, finite = action_heads.heads_step(kernel, latent, latent, action_net, value_net, nn.Tanh)
        assert finite is True


def test_it_applies_only_without_gradients_on_cpu_floats_with_its_activations():
    latent = torch.zeros(2, 3)
    with torch.no_grad():
        assert action_heads.applies(latent, nn.Tanh)
        assert action_heads.applies(latent, nn.ReLU)
        assert action_heads.applies(latent.double(), nn.Tanh)
        assert not action_heads.applies(latent, nn.ELU)
        assert not action_heads.applies(latent.half(), nn.Tanh)
    with torch.inference_mode():
        assert action_heads.applies(latent, nn.Tanh)
    assert not action_heads.applies(latent, nn.Tanh)  # gradients on


def policy_steps(model, steps: int = 12, seed: int = 3):
    """Steps of ``model.policy.act`` on the model's env with random resets, from a fixed seed."""
    env, policy = model.env, model.policy
    obs = policy.obs_to_tensor(env.reset())[0]
    state = policy.initial_state(env.num_envs)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            starts = torch.as_tensor(rng.random(env.num_envs) < 0.2, dtype=torch.float32)
            step = policy.act(obs, state, starts)
            out.append(step)
            state = step.state
            obs = policy.obs_to_tensor(env.step(step.actions.numpy())[0])[0]
    return out


@pytest.mark.parametrize(
    "core, kwargs",
    [
        ("lstm", {}),
        ("mnm-p", {}),
        ("gru", {"policy_kwargs": dict(shared_core=False, net_arch=(16, 8), features_dim=16,
                                       core_kwargs=dict(hidden_size=16))}),
        ("mlp", {"policy_kwargs": dict(activation_fn=nn.ReLU, features_dim=16,
                                       core_kwargs=dict(hidden_size=16))}),
    ],
)  # fmt: skip
def test_policy_steps_are_the_same_with_and_without_the_kernel(kernel, monkeypatch, core, kwargs):
    calls = []
    real = action_heads.heads_step
    monkeypatch.setattr(action_heads, "heads_step", lambda *args: calls.append(1) or real(*args))
    with_kernel = policy_steps(small_model(core, **kwargs))
    assert len(calls) == len(with_kernel)
    monkeypatch.setattr(action_heads, "load_extension", lambda: None)
    without = policy_steps(small_model(core, **kwargs))
    assert len(calls) == len(with_kernel)  # not called again
    for a, b in zip(with_kernel, without, strict=True):
        assert torch.equal(a.actions, b.actions)
        torch.testing.assert_close(a.log_probs, b.log_probs)
        torch.testing.assert_close(a.values, b.values)
        assert a.finite and b.finite
        assert a.state.keys() == b.state.keys()
        for key in a.state.keys():
            torch.testing.assert_close(a.state[key], b.state[key])


def test_other_activations_take_the_pytorch_heads(kernel, monkeypatch):
    monkeypatch.setattr(action_heads, "heads_step", lambda *args: pytest.fail("kernel called"))
    model = small_model("lstm", policy_kwargs=dict(activation_fn=nn.ELU))
    steps = policy_steps(model, steps=3)
    assert all(s.finite and s.actions.shape == (model.n_envs,) for s in steps)


def test_a_rollout_is_the_same_with_and_without_the_kernel(kernel, monkeypatch):
    with_kernel = collect_one_rollout(small_model("mnm-p"))
    monkeypatch.setattr(action_heads, "load_extension", lambda: None)
    without = collect_one_rollout(small_model("mnm-p"))
    assert torch.equal(with_kernel.actions, without.actions)
    for name in ("log_probs", "values", "rewards", "episode_starts", "advantages"):
        torch.testing.assert_close(getattr(with_kernel, name), getattr(without, name))


def test_predict_refuses_non_finite_policy_output():
    model = small_model("lstm")
    obs = model.env.reset()
    with torch.no_grad():
        model.policy.action_net[-1].bias[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite policy output"):
        model.predict(obs)


def test_stable_baselines3_callbacks_find_the_rollouts_dones():
    # StopTrainingOnMaxEpisodes reads ``dones`` from the rollout's locals, as SB3 names them;
    # it stops after max_episodes per env, max_episodes * n_envs in all
    model = small_model("mlp", n_steps=64)
    stop = StopTrainingOnMaxEpisodes(max_episodes=4)
    model.learn(10_000, callback=stop)
    total = 4 * model.n_envs
    assert total <= stop.n_episodes < total + model.n_envs
    assert model.num_timesteps < 64 * model.n_envs


def test_the_switch_runs_the_pytorch_heads(kernel, monkeypatch):
    monkeypatch.setenv("MNM_RL_COMPILED_HEADS", "0")
    assert action_heads.load_extension() is None
    monkeypatch.setattr(action_heads, "heads_step", lambda *args: pytest.fail("kernel called"))
    steps = policy_steps(small_model("lstm"), steps=3)
    assert all(s.finite and s.actions.shape == (3,) for s in steps)


# ------------------------------------------------------------------------ the heads in training
def module_heads(latent, value_latent, action_net, value_net):
    return action_net(latent), value_net(value_latent).squeeze(-1)


def heads_and_grads(run, latent, value_latent, action_net, value_net, g_logits, g_values):
    """The heads' outputs and the gradients of ``(logits * g_logits).sum() + (values *
    g_values).sum()`` (a gradient of ``None`` leaves that output out) with respect to the
    latents and every parameter."""
    logits, values = run(latent, value_latent, action_net, value_net)
    outputs, grads = zip(
        *[(o, g) for o, g in ((logits, g_logits), (values, g_values)) if g is not None],
        strict=True,
    )
    inputs = [latent, value_latent, *action_net.parameters(), *value_net.parameters()]
    return logits, values, torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("hidden", [(64,), (32, 16), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["both", "logits", "values"])
def test_the_training_heads_give_the_modules_outputs_and_gradients(
    kernel, activation, hidden, dtype, which
):
    torch.manual_seed(0)
    action_net = _mlp(24, hidden, 7, activation).to(dtype)
    value_net = _mlp(24, hidden, 1, activation).to(dtype)
    latent = torch.randn(5, 6, 24, dtype=dtype, requires_grad=True)
    value_latent = torch.randn(5, 6, 24, dtype=dtype, requires_grad=True)
    g_logits = torch.randn(5, 6, 7, dtype=dtype) if which != "values" else None
    g_values = torch.randn(5, 6, dtype=dtype) if which != "logits" else None

    def compiled(*args):
        return action_heads.train_heads(kernel, *args, activation)

    assert action_heads.trains(latent, action_net, activation)
    args = (latent, value_latent, action_net, value_net, g_logits, g_values)
    got, expected = heads_and_grads(compiled, *args), heads_and_grads(module_heads, *args)
    # float32: the kernel's tanh is a few ulps from torch.tanh
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert got[0].shape == (5, 6, 7) and got[1].shape == (5, 6)
    torch.testing.assert_close(got[0], expected[0], **tolerance)
    torch.testing.assert_close(got[1], expected[1], **tolerance)
    for a, b in zip(got[2], expected[2], strict=True):
        if b is None:  # an input the chosen outputs do not depend on
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rollout_steps_heads_compute_what_the_training_heads_recompute(kernel, activation, dtype):
    # the same products and the same tanh (the kernels' own): a rollout's log-probabilities and
    # values are, bit for bit, what the update's first pass over the same latents gives
    torch.manual_seed(0)
    action_net = _mlp(24, (64, 64), 7, activation).to(dtype)
    value_net = _mlp(24, (64, 64), 1, activation).to(dtype)
    latent, value_latent = torch.randn(2, 8, 24, dtype=dtype) * 3
    with torch.inference_mode():
        actions, log_probs, values, _ = action_heads.heads_step(
            kernel, latent, value_latent, action_net, value_net, activation, False
        )
    logits, train_values = action_heads.train_heads(
        kernel, latent, value_latent, action_net, value_net, activation
    )
    assert torch.equal(values, train_values.detach())
    # log_softmax is torch's here, the draw's own in the kernel: equal up to its rounding
    expected = torch.log_softmax(logits.detach(), -1).gather(1, actions[:, None])[:, 0]
    torch.testing.assert_close(log_probs, expected, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_one_latent_for_both_heads_gets_both_gradients(kernel):
    torch.manual_seed(1)
    action_net, value_net = _mlp(16, (8,), 3, nn.Tanh), _mlp(16, (8,), 1, nn.Tanh)
    latent = torch.randn(4, 16, requires_grad=True)
    logits, values = action_heads.train_heads(
        kernel, latent, latent, action_net, value_net, nn.Tanh
    )
    (grad,) = torch.autograd.grad(logits.sum() + values.sum(), [latent])
    (expected,) = torch.autograd.grad(action_net(latent).sum() + value_net(latent).sum(), [latent])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_the_training_heads_apply_with_gradients_on_cpu_floats_only():
    action_net = _mlp(8, (8,), 3, nn.Tanh)
    latent = torch.randn(2, 8)
    assert action_heads.trains(latent, action_net, nn.Tanh)
    assert action_heads.trains(latent.double(), action_net, nn.ReLU)
    assert not action_heads.trains(latent, action_net, nn.ELU)
    assert not action_heads.trains(latent.half(), action_net, nn.Tanh)
    with torch.no_grad():
        assert not action_heads.trains(latent, action_net, nn.Tanh)


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_an_update_gets_the_same_loss_and_gradients_with_the_training_heads(
    kernel, monkeypatch, core
):
    monkeypatch.setenv(explicit.SWITCH_VARIABLE, "0")  # the heads through autograd
    model = small_model(core)
    buffer = collect_one_rollout(model)
    batch = next(buffer.minibatches(chunks_per_batch=4))
    parameters = list(model.policy.parameters())
    calls = []
    real = action_heads.train_heads
    monkeypatch.setattr(action_heads, "train_heads", lambda *a: calls.append(1) or real(*a))

    def loss_and_grads():
        loss, _, _, _ = model._loss(batch, 0.2, None, 0.01, lambda **_: None)
        return loss.detach(), torch.autograd.grad(loss, parameters, allow_unused=True)

    compiled = loss_and_grads()
    assert calls == [1]
    monkeypatch.setenv(action_heads.SWITCH_VARIABLE, "0")
    pytorch = loss_and_grads()
    assert calls == [1]  # switched off: the modules
    torch.testing.assert_close(compiled[0], pytorch[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[1], pytorch[1], strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_training_heads_on_two_threads_equal_one_bit_for_bit(kernel, monkeypatch, dtype):
    """With two kernel threads the actor and the critic run on a thread each
    (action_heads.head_threads): the same outputs and gradients as one after the other."""
    from mnm_rl.memory import fused

    torch.manual_seed(1)
    action_net = _mlp(24, (64,), 7, nn.Tanh).to(dtype)
    value_net = _mlp(24, (64,), 1, nn.Tanh).to(dtype)
    latent = torch.randn(128, 24, dtype=dtype)
    value_latent = torch.randn(128, 24, dtype=dtype)
    g_logits, g_values = torch.randn(128, 7, dtype=dtype), torch.randn(128, dtype=dtype)
    monkeypatch.delenv(fused.KERNEL_THREADS_VARIABLE, raising=False)
    results = []
    for threads in (1, 2):
        fused.set_kernel_threads(threads)
        try:
            assert action_heads.head_threads(128) == threads
            with torch.no_grad():
                logits, values, backward = action_heads.explicit_heads(
                    kernel, latent, value_latent, action_net, value_net, nn.Tanh
                )
                d_latent, d_value_latent, pairs = backward(g_logits, g_values)
            results.append([logits, values, d_latent, d_value_latent, *(g for _, g in pairs)])
        finally:
            fused.set_kernel_threads(None)
    assert len(results[0]) == 4 + 8  # two layers of weight and bias per head
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)
    fused.set_kernel_threads(2)
    try:
        assert action_heads.head_threads(8) == 1  # a few rows stay on one thread
    finally:
        fused.set_kernel_threads(None)
