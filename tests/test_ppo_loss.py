"""The compiled PPO loss (``mnm_rl.agent.ppo_loss``) against the PyTorch code it stands in for:
the loss, its statistics and its gradients, and a MemoryPPO update with each."""

from __future__ import annotations

import math

import pytest
import torch
from compiled import built
from test_agent import collect_one_rollout, small_model

from mnm_rl.agent import explicit, ppo_loss
from mnm_rl.agent.ppo_loss import LossSettings, RolloutSteps

SETTINGS = LossSettings(
    clip_range=0.2, clip_range_vf=None, ent_coef=0.01, vf_coef=0.5, normalize_advantage=True
)


@pytest.fixture(scope="module")
def kernel():
    return built(ppo_loss.EXTENSION)


def minibatch(shape=(16, 8), actions=7, dtype=torch.float32, spread=0.3, seed=0):
    """Logits and values needing gradients, and rollout steps whose log-probabilities are the
    current ones moved by ``spread`` (so some ratios fall outside the clip range)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, actions, generator=g, dtype=dtype) * 2).requires_grad_()
    values = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    chosen = torch.randint(0, actions, shape, generator=g)
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, -1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        steps = RolloutSteps(
            actions=chosen,
            old_log_probs=log_probs + spread * torch.randn(*shape, generator=g, dtype=dtype),
            advantages=torch.randn(*shape, generator=g, dtype=dtype) * 3 + 1,
            returns=torch.randn(*shape, generator=g, dtype=dtype),
            old_values=values + 0.4 * torch.randn(*shape, generator=g, dtype=dtype),
        )
    return logits, values, steps


def loss_and_gradients(loss_fn, logits, values, steps, settings):
    loss, stats = loss_fn(logits, values, steps, settings)
    grads = torch.autograd.grad(loss, (logits, values))
    return loss.detach(), stats.double(), grads


def assert_same(got, expected, dtype):
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=0)
    loss, stats, (grad_logits, grad_values) = got
    torch.testing.assert_close(loss, expected[0], **tolerance)
    torch.testing.assert_close(stats, expected[1], **tolerance)
    torch.testing.assert_close(grad_logits, expected[2][0], **tolerance)
    torch.testing.assert_close(grad_values, expected[2][1], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_range_vf", [None, 0.2, 0.0])
@pytest.mark.parametrize("normalize_advantage", [True, False])
@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_the_kernel_gives_pytorchs_loss_and_gradients(
    kernel, dtype, clip_range_vf, normalize_advantage, ent_coef
):
    logits, values, steps = minibatch(dtype=dtype)
    settings = LossSettings(0.2, clip_range_vf, ent_coef, 0.5, normalize_advantage)
    expected = loss_and_gradients(ppo_loss.ppo_loss_torch, logits, values, steps, settings)
    got = loss_and_gradients(ppo_loss.ppo_loss, logits, values, steps, settings)
    assert_same(got, expected, dtype)
    clip_fraction = got[1][4].item()
    assert 0.1 < clip_fraction < 0.9  # both branches of the clipped surrogate taken
    assert got[2][0].abs().max() > 1e-4
    if clip_range_vf == 0.0:  # every value clipped to its old one: no value gradient
        assert torch.count_nonzero(got[2][1]) == 0
    else:
        assert got[2][1].abs().max() > 1e-4


def test_ratios_of_exactly_one_split_the_gradient_as_autograd_does(kernel):
    # the first minibatch of an update: the policy has not moved, every ratio is 1 (to rounding)
    # and both arguments of min are equal (as they are wherever clamp leaves the ratio alone)
    logits, values, steps = minibatch(spread=0.0)
    assert SETTINGS.clip_range > 0
    expected = loss_and_gradients(ppo_loss.ppo_loss_torch, logits, values, steps, SETTINGS)
    got = loss_and_gradients(ppo_loss.ppo_loss, logits, values, steps, SETTINGS)
    assert_same(got, expected, torch.float32)
    assert got[1][3].item() == pytest.approx(0.0, abs=1e-7)  # approx_kl
    assert got[1][4].item() == 0.0  # clip_fraction


@pytest.mark.parametrize("shape", [(1,), (5,), (3, 4)])
def test_any_batch_shape_and_a_single_step(kernel, shape):
    # a single step skips the advantage normalisation (its std is undefined)
    logits, values, steps = minibatch(shape=shape, actions=3)
    expected = loss_and_gradients(ppo_loss.ppo_loss_torch, logits, values, steps, SETTINGS)
    got = loss_and_gradients(ppo_loss.ppo_loss, logits, values, steps, SETTINGS)
    assert_same(got, expected, torch.float32)
    assert got[2][0].shape == (*shape, 3) and got[2][1].shape == shape


def test_values_in_another_dtype_get_their_gradient_in_theirs(kernel):
    logits, values, steps = minibatch(dtype=torch.float64)
    values = values.detach().float().requires_grad_()
    expected = loss_and_gradients(ppo_loss.ppo_loss_torch, logits, values, steps, SETTINGS)
    got = loss_and_gradients(ppo_loss.ppo_loss, logits, values, steps, SETTINGS)
    assert got[2][1].dtype == torch.float32 and got[2][0].dtype == torch.float64
    torch.testing.assert_close(got[2][1], expected[2][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2][0], expected[2][0], rtol=1e-5, atol=1e-6)


def test_impossible_actions_add_nothing(kernel):
    # a logit of -inf (an action masked out) has probability 0: no entropy, no gradient
    logits, values, steps = minibatch(actions=5)
    with torch.no_grad():
        logits[..., 0] = -math.inf
        steps = steps._replace(actions=steps.actions.clamp(min=1))
    expected = loss_and_gradients(ppo_loss.ppo_loss_torch, logits, values, steps, SETTINGS)
    got = loss_and_gradients(ppo_loss.ppo_loss, logits, values, steps, SETTINGS)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2][0]).all()
    assert_same(got, expected, torch.float32)
    assert torch.count_nonzero(got[2][0][..., 0]) == 0


def test_a_non_finite_logit_makes_the_statistics_non_finite(kernel):
    logits, values, steps = minibatch()
    with torch.no_grad():
        logits[3, 2, 1] = math.nan
    _, stats = ppo_loss.ppo_loss(logits, values, steps, SETTINGS)
    policy, value, entropy, *_ = stats.tolist()
    assert math.isnan(policy) and math.isnan(entropy) and math.isfinite(value)


def test_the_backward_pass_scales_by_the_incoming_gradient(kernel):
    logits, values, steps = minibatch()
    loss, _ = ppo_loss.ppo_loss(logits, values, steps, SETTINGS)
    once = torch.autograd.grad(loss, (logits, values), retain_graph=True)
    thrice = torch.autograd.grad(-3 * loss, (logits, values))
    for a, b in zip(once, thrice, strict=True):
        torch.testing.assert_close(b, -3 * a)


def test_bad_inputs_raise(kernel):
    logits, values, steps = minibatch(actions=4)
    with pytest.raises(ValueError, match="clip_range must be a number >= 0"):
        ppo_loss.ppo_loss(logits, values, steps, SETTINGS._replace(clip_range=-0.1))
    with pytest.raises(ValueError, match="clip_range_vf must be a number >= 0"):
        ppo_loss.ppo_loss(logits, values, steps, SETTINGS._replace(clip_range_vf=math.nan))
    bad_action = steps._replace(actions=steps.actions.clone().index_fill_(0, torch.tensor([0]), 4))
    with pytest.raises(RuntimeError, match="action 4 of step 0 is not in"):
        ppo_loss.ppo_loss(logits, values, bad_action, SETTINGS)
    short = steps._replace(returns=steps.returns[:-1])
    with pytest.raises(RuntimeError, match="returns has 120 elements, not 128"):
        ppo_loss.ppo_loss(logits, values, short, SETTINGS)


def test_it_applies_to_cpu_floats_only():
    assert ppo_loss.applies(torch.zeros(2, 3))
    assert ppo_loss.applies(torch.zeros(2, 3, dtype=torch.float64))
    assert not ppo_loss.applies(torch.zeros(2, 3, dtype=torch.float16))
    assert not ppo_loss.applies(torch.zeros(2, 3, device="meta"))


def test_the_switch_computes_the_loss_in_pytorch(kernel, monkeypatch):
    monkeypatch.setenv("MNM_RL_COMPILED_LOSS", "0")
    assert ppo_loss.load_extension() is None
    logits, values, steps = minibatch()
    loss, _ = ppo_loss.ppo_loss(logits, values, steps, SETTINGS)
    assert loss.grad_fn is not None and "Compiled" not in type(loss.grad_fn).__name__
    monkeypatch.delenv("MNM_RL_COMPILED_LOSS")
    loss, _ = ppo_loss.ppo_loss(logits, values, steps, SETTINGS)
    assert "CompiledLossBackward" in type(loss.grad_fn).__name__


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_an_update_gets_the_same_loss_and_gradients_either_way(kernel, monkeypatch, core):
    monkeypatch.setenv(explicit.SWITCH_VARIABLE, "0")  # the loss through autograd
    model = small_model(core, clip_range_vf=0.1)
    buffer = collect_one_rollout(model)
    batch = next(buffer.minibatches(chunks_per_batch=4))
    parameters = list(model.policy.parameters())

    def update_terms():
        records: dict[str, list[float]] = {}

        def record(**values):
            for key, value in values.items():
                records.setdefault(key, []).append(float(value))

        loss, approx_kl, checks, _ = model._loss(batch, 0.2, 0.1, 0.01, record)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        return loss.detach(), approx_kl, checks, records, grads

    compiled = update_terms()
    monkeypatch.setattr(ppo_loss, "load_extension", lambda: None)
    pytorch = update_terms()
    torch.testing.assert_close(compiled[0], pytorch[0], rtol=1e-5, atol=1e-6)
    assert compiled[1] == pytest.approx(pytorch[1], rel=1e-4, abs=1e-7)
    assert compiled[2].keys() == pytorch[2].keys()
    assert compiled[3].keys() == pytorch[3].keys()
    assert {"train/policy_gradient_loss", "train/clip_fraction"} <= compiled[3].keys()
    for key in compiled[3]:
        assert compiled[3][key] == pytest.approx(pytorch[3][key], rel=1e-4, abs=1e-6), key
    for a, b in zip(compiled[4], pytorch[4], strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
