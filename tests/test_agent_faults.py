"""Numerical faults and determinism of the agent (the API level; the CLI level is elsewhere)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_agent import collect_one_rollout, small_model

from mnm_rl.agent import NonFiniteError


def snapshot(model):
    return copy.deepcopy(model.policy.state_dict()), copy.deepcopy(
        model.policy.optimizer.state_dict()
    )


def assert_unchanged(model, before):
    params, optim = before
    for key, value in model.policy.state_dict().items():
        assert torch.equal(value, params[key]), key
    assert model.policy.optimizer.state_dict()["state"].keys() == optim["state"].keys()


def test_nan_loss_stops_without_applying_the_update():
    model = small_model("mnm-p")
    buffer = collect_one_rollout(model)
    buffer.returns[3] = float("nan")  # step 3 of every env: every chunk starting at 0
    buffer.returns[11] = float("nan")  # and every chunk starting at 8
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match="non-finite value loss"):
        model.train()
    assert_unchanged(model, before)
    assert model.nonfinite_skips == 1


def test_nan_gradients_are_named_and_not_applied():
    model = small_model("lstm")
    collect_one_rollout(model)
    model.policy.action_net[0].weight.register_hook(lambda g: g * float("nan"))
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match="non-finite gradients"):
        model.train()
    assert_unchanged(model, before)


def test_non_finite_fast_weights_are_named():
    model = small_model("mnm-g")
    buffer = collect_one_rollout(model)
    buffer.chunk_states[0]["fast_weights"][0, 0, 0, 0] = float("inf")
    buffer.episode_starts[0, 0] = 0.0  # so the corrupted state is used, not reset
    with pytest.raises(NonFiniteError, match="fast weights"):
        model.train()


def test_skip_mode_counts_and_continues():
    model = small_model("mnm-p", on_nonfinite="skip")
    buffer = collect_one_rollout(model)
    buffer.returns[0, 0] = float("nan")
    params_before = copy.deepcopy(model.policy.state_dict())
    with pytest.warns(RuntimeWarning, match="non-finite value loss"):
        model.train()
    # the chunk holding the NaN is in one minibatch per epoch; the others are applied
    assert model.nonfinite_skips == model.n_epochs
    changed = [
        k for k, v in model.policy.state_dict().items() if not torch.equal(v, params_before[k])
    ]
    assert changed
    assert all(torch.isfinite(v).all() for v in model.policy.state_dict().values())
    with pytest.raises(ValueError, match="on_nonfinite"):
        small_model("mlp", on_nonfinite="ignore")


def test_same_seed_same_parameters():
    a = small_model("mnm-p").learn(96)
    b = small_model("mnm-p").learn(96)
    for (name, p), (_, q) in zip(
        a.policy.state_dict().items(), b.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    c = small_model("mnm-p", seed=1).learn(96)
    assert not torch.equal(a.policy.action_net[0].weight, c.policy.action_net[0].weight)
