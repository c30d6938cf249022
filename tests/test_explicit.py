"""Explicit backward passes (``mnm_rl.agent.explicit``): a minibatch's loss and gradients by the
kernels' own backward passes, against autograd through ``forward_sequence`` and ``ppo_loss``."""

from __future__ import annotations

import weakref

import pytest
import torch
from compiled import built
from test_agent import collect_one_rollout, small_model
from test_policy_step import MINIGRID, MIXED, make_policy, random_obs, random_state
from torch import nn

from mnm_rl.agent import action_heads, explicit, gradient_step, grid_linear, ppo_loss
from mnm_rl.agent.ppo_loss import LossSettings, RolloutSteps
from mnm_rl.memory import fused, products
from mnm_rl.memory.base import memory_loss

T, B = 6, 4
SETTINGS = LossSettings(clip_range=0.2, clip_range_vf=0.3, ent_coef=0.01, vf_coef=0.5,
                        normalize_advantage=True)  # fmt: skip


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    monkeypatch.delenv(explicit.SWITCH_VARIABLE, raising=False)
    for extension in (fused.EXTENSION, grid_linear.EXTENSION, action_heads.EXTENSION,
                      ppo_loss.EXTENSION):  # fmt: skip
        built(extension)


def sequence_batch(policy, space, dtype, seed=0, B=B):
    """Observations ``[T, B, ...]``, a random state, resets inside the chunk, rollout steps."""
    flat = random_obs(space, T * B, seed)
    obs = (
        {k: v.reshape(T, B, *v.shape[1:]) for k, v in flat.items()}
        if isinstance(flat, dict)
        else flat.reshape(T, B, *flat.shape[1:])
    )
    gen = torch.Generator().manual_seed(seed + 1)
    starts = (torch.rand(T, B, generator=gen) < 0.3).to(dtype)
    starts[2, 1] = 1.0
    steps = RolloutSteps(
        actions=torch.randint(0, 5, (T, B), generator=gen),
        old_log_probs=-torch.rand(T, B, generator=gen, dtype=dtype) * 2,
        advantages=torch.randn(T, B, generator=gen, dtype=dtype),
        returns=torch.randn(T, B, generator=gen, dtype=dtype),
        old_values=torch.randn(T, B, generator=gen, dtype=dtype),
    )
    return obs, random_state(policy, B, dtype), starts, steps


MEMORY_WEIGHT = 0.7  # the memory loss's weight (mem_coef), for the MNM cores


def autograd_gradients(policy, obs, state, starts, steps, memory_weight=MEMORY_WEIGHT):
    policy.zero_grad(set_to_none=True)
    logits, values, _, aux = policy.forward_sequence(obs, state, starts)
    loss, stats = ppo_loss.ppo_loss(logits, values, steps, SETTINGS)
    if aux:
        loss = loss + memory_weight * memory_loss(aux)
    loss.backward()
    return loss.detach(), stats, {n: p.grad for n, p in policy.named_parameters()}


def explicit_gradients(policy, obs, state, starts, steps, memory_weight=MEMORY_WEIGHT):
    policy.zero_grad(set_to_none=True)
    passed = policy.explicit_forward_sequence(obs, state, starts, memory_weight)
    assert passed is not None
    logits, values, aux, backward = passed
    assert not logits.requires_grad and not values.requires_grad
    loss, stats, grad_logits, grad_values = ppo_loss.ppo_loss_explicit(logits, values, steps,
                                                                       SETTINGS)  # fmt: skip
    if aux:
        loss = loss + memory_weight * memory_loss(aux)
    explicit.apply_gradients(backward(grad_logits, grad_values))
    return loss, stats, {n: p.grad for n, p in policy.named_parameters()}


def assert_same_gradients(policy, space, dtype, tolerance, batch=B, memory_weight=MEMORY_WEIGHT):
    obs, state, starts, steps = sequence_batch(policy, space, dtype, B=batch)
    passes = (policy, obs, state, starts, steps, memory_weight)
    loss_a, stats_a, grads_a = autograd_gradients(*passes)
    loss_e, stats_e, grads_e = explicit_gradients(*passes)
    torch.testing.assert_close(loss_e, loss_a, **tolerance)
    torch.testing.assert_close(stats_e, stats_a, **tolerance)
    assert grads_e.keys() == grads_a.keys()
    for name, grad in grads_a.items():
        assert grad is not None and grads_e[name] is not None, name
        assert grads_e[name].dtype == grad.dtype and grads_e[name].shape == grad.shape, name
        torch.testing.assert_close(grads_e[name], grad, **tolerance, msg=name)
        assert grad.abs().max() > 0, name  # every parameter takes part in the loss


FLOAT64 = dict(rtol=1e-10, atol=1e-12)
FLOAT32 = dict(rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p", "mnm-g"])
@pytest.mark.parametrize("shared_core", [True, False])
def test_explicit_gradients_match_autograd_grid_float64(core, shared_core):
    policy = make_policy(MINIGRID, core, torch.float64, shared_core=shared_core)
    assert_same_gradients(policy, MINIGRID, torch.float64, FLOAT64)


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p"])
@pytest.mark.parametrize("shared_core", [True, False])
def test_explicit_gradients_match_autograd_without_grid(core, shared_core):
    """Box, Discrete and MultiBinary inputs (float32: preprocessing gives float32 inputs)."""
    policy = make_policy(MIXED, core, shared_core=shared_core)
    assert_same_gradients(policy, MIXED, torch.float32, FLOAT32)


@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_explicit_gradients_match_autograd_float32_relu_pooling(core):
    policy = make_policy(MINIGRID, core, activation_fn=nn.ReLU, grid_pooling=True,
                         net_arch=(16, 16))  # fmt: skip
    assert_same_gradients(policy, MINIGRID, torch.float32, FLOAT32)


@pytest.mark.parametrize("core", ["mnm-p", "mnm-g"])
def test_mnm_explicit_gradients_with_the_kernel_in_two_parts(core, monkeypatch):
    """Two kernel threads split a batch of 8 sequences into two parts (``forward_parts``)."""
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    assert fused.batch_parts(T, 8) == 2
    policy = make_policy(MINIGRID, core, torch.float64, core_kwargs=dict(activation="sigmoid"))
    assert_same_gradients(policy, MINIGRID, torch.float64, FLOAT64, batch=8)


@pytest.mark.parametrize("core", ["mnm-p", "mnm-g"])
def test_mnm_explicit_aux_is_autograds(core):
    """Every diagnostic the explicit pass reports (the reconstruction errors after and before
    the writes by the kernel's own pass) is what the autograd pass reports."""
    policy = make_policy(MINIGRID, core, torch.float64)
    obs, state, starts, _ = sequence_batch(policy, MINIGRID, torch.float64)
    with torch.no_grad():
        _, _, _, aux_a = policy.forward_sequence(obs, state, starts)
        _, _, aux_e, _ = policy.explicit_forward_sequence(obs, state, starts, MEMORY_WEIGHT)
    assert aux_e.keys() == aux_a.keys()
    for key, value in aux_a.items():
        torch.testing.assert_close(aux_e[key], value, **FLOAT64, msg=key)
    assert (aux_a["recon_before"] > 0).all() and (aux_a["recon_after"] > 0).all()


def test_mnm_without_the_memory_loss():
    """``memory_weight`` 0 (``mem_coef=0``): the kernel gets no gradient for its answers."""
    policy = make_policy(MINIGRID, "mnm-p", torch.float64)
    assert_same_gradients(policy, MINIGRID, torch.float64, FLOAT64, memory_weight=0.0)


def test_lstm_float32_gradients_are_autograds_bit_for_bit():
    """The same kernels in the same order: not only close, equal."""
    policy = make_policy(MINIGRID, "lstm")
    assert_same_gradients(policy, MINIGRID, torch.float32, dict(rtol=0, atol=0))


def test_frozen_parameters_get_no_gradient():
    policy = make_policy(MINIGRID, "lstm", torch.float64)
    policy.core.rnn.bias_hh_l0.requires_grad_(False)
    obs, state, starts, steps = sequence_batch(policy, MINIGRID, torch.float64)
    _, _, grads_a = autograd_gradients(policy, obs, state, starts, steps)
    _, _, grads_e = explicit_gradients(policy, obs, state, starts, steps)
    assert grads_a["core.rnn.bias_hh_l0"] is None and grads_e["core.rnn.bias_hh_l0"] is None
    torch.testing.assert_close(grads_e["core.rnn.bias_ih_l0"], grads_a["core.rnn.bias_ih_l0"],
                               **FLOAT64)  # fmt: skip


def test_apply_gradients_adds_to_existing_gradients():
    param = nn.Parameter(torch.ones(3))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    explicit.apply_gradients([(param, torch.full((3,), 2.0)), (frozen, torch.ones(2))])
    explicit.apply_gradients([(param, torch.full((3,), 0.5))])
    assert param.grad.tolist() == [2.5, 2.5, 2.5] and frozen.grad is None
    with pytest.raises(RuntimeError):  # a gradient of the wrong shape is refused, as autograd's
        explicit.apply_gradients([(nn.Parameter(torch.ones(3)), torch.ones(4))])


def test_no_explicit_pass_where_a_piece_has_none(monkeypatch):
    obs, state, starts, _ = sequence_batch(make_policy(MINIGRID, "lstm"), MINIGRID, torch.float32)
    lstm = make_policy(MINIGRID, "lstm")
    assert lstm.explicit_forward_sequence(obs, state, starts) is not None
    for options in (dict(retention_lag=2), dict(interaction_input=True)):  # not in the kernel's
        mnm = make_policy(MINIGRID, "mnm-p", core_kwargs=options)
        mnm_state = random_state(mnm, B, torch.float32)
        assert not mnm.core.has_explicit_backward
        assert mnm.explicit_forward_sequence(obs, mnm_state, starts) is None
    elu = make_policy(MINIGRID, "lstm", activation_fn=nn.ELU)  # heads the kernel has not
    assert elu.explicit_forward_sequence(obs, state, starts) is None
    monkeypatch.setenv(explicit.SWITCH_VARIABLE, "0")
    assert lstm.explicit_forward_sequence(obs, state, starts) is None


@pytest.mark.parametrize("core", ["lstm", "mlp", "mnm-p"])
def test_train_takes_the_explicit_pass_and_updates_as_autograd(core, monkeypatch):
    """A whole ``train()`` (two epochs of minibatches, clipping, Adam) from the same rollout:
    the same parameters and the same logged losses either way."""
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv(explicit.SWITCH_VARIABLE, switch)
        model = small_model(core)
        collect_one_rollout(model)
        taken = []
        original = model.policy.explicit_forward_sequence

        def counted(*args, original=original, taken=taken):
            passed = original(*args)
            taken.append(passed is not None)
            return passed

        monkeypatch.setattr(model.policy, "explicit_forward_sequence", counted)
        model.train()
        # every minibatch of both epochs through the explicit pass unless switched off
        assert len(taken) >= 4 and set(taken) == {switch == "1"}
        logged = dict(model.logger.name_to_value)
        results.append(({n: p.detach().clone() for n, p in model.policy.named_parameters()},
                        logged))  # fmt: skip
    (explicit_params, explicit_log), (autograd_params, autograd_log) = results
    for name, value in autograd_params.items():
        torch.testing.assert_close(explicit_params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert explicit_log.keys() == autograd_log.keys()
    for key in autograd_log:
        assert explicit_log[key] == pytest.approx(autograd_log[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("hook", ["register_hook", "register_post_accumulate_grad_hook"])
def test_a_gradient_hook_sends_train_through_autograd(hook, monkeypatch):
    model = small_model("lstm")
    collect_one_rollout(model)
    seen = []
    getattr(model.policy.action_net[0].weight, hook)(lambda g: seen.append(1))
    assert explicit.has_gradient_hooks(model.policy.parameters())
    applied = []
    monkeypatch.setattr(explicit, "apply_gradients", lambda g: applied.append(1))
    model.train()
    assert seen and not applied  # the hook ran on every minibatch; no explicit pass


def test_a_core_without_an_explicit_pass_costs_no_extractor_pass(monkeypatch):
    mnm = make_policy(MINIGRID, "mnm-p", core_kwargs=dict(retention_lag=1))
    assert not mnm.core.has_explicit_backward
    obs, state, starts, _ = sequence_batch(mnm, MINIGRID, torch.float32)
    monkeypatch.setattr(mnm.features_extractor, "explicit_forward", lambda *_: pytest.fail())
    assert mnm.explicit_forward_sequence(obs, state, starts) is None


@pytest.mark.parametrize("products_switch", ["1", "0"], ids=["compiled", "aten"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_explicit_is_autograds_linear(monkeypatch, products_switch, with_bias):
    """``products.linear_explicit`` by the compiled products and by ATen's
    (``MNM_RL_DENSE_PRODUCTS=0``): the output and every gradient of ``F.linear``."""
    monkeypatch.setenv(products.SWITCH_VARIABLE, products_switch)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = bias if with_bias else None
    grad = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, weight, bias)
    expected.backward(grad)
    with torch.no_grad():
        y, backward = products.linear_explicit(x, weight, bias)
        g_x, g_weight, g_bias = backward(grad, True)
        assert backward(grad, False)[0] is None
    torch.testing.assert_close(y, expected.detach(), **FLOAT64)
    torch.testing.assert_close(g_x, x.grad, **FLOAT64)
    torch.testing.assert_close(g_weight, weight.grad, **FLOAT64)
    if with_bias:
        torch.testing.assert_close(g_bias, bias.grad, **FLOAT64)
    else:
        assert g_bias is None


def test_a_minibatchs_explicit_pass_is_freed_after_its_backward(monkeypatch):
    """What the pass saved goes once its gradients are stored, as a graph's buffers go in
    ``backward()``: not held while the next minibatch runs (twice the peak memory)."""
    model = small_model("mnm-p")
    collect_one_rollout(model)
    passes, alive_at_clip = [], []
    original = model.policy.explicit_forward_sequence

    def recorded(*args):
        passed = original(*args)
        passes.append(weakref.ref(passed[3]))
        return passed

    clip = gradient_step.clip_grad_norm

    def checked_clip(params, max_norm):
        alive_at_clip.append(passes[-1]() is not None)
        return clip(params, max_norm)

    monkeypatch.setattr(model.policy, "explicit_forward_sequence", recorded)
    monkeypatch.setattr(gradient_step, "clip_grad_norm", checked_clip)
    model.train()
    assert len(alive_at_clip) >= 4 and not any(alive_at_clip)


def test_relu_backward_is_autograds():
    """Zero where ReLU's output is zero (and only there: a NaN output passes its gradient, as
    autograd's does), the gradient elsewhere."""
    from mnm_rl.agent.extractors import relu_backward

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    out = torch.relu(x)
    out.backward(grad)
    assert torch.equal(relu_backward(grad, out.detach()), x.grad)
    output = torch.tensor([0.0, 1.0, float("nan"), 2.5])
    assert torch.equal(relu_backward(torch.ones(4), output), torch.tensor([0.0, 1.0, 1.0, 1.0]))
