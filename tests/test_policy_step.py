"""The compiled policy step (``mnm_rl.agent.policy_step``) against the PyTorch step it stands in
for: ``RecurrentMemoryPolicy.act`` with ``MNM_RL_COMPILED_STEP=0``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compiled import built
from gymnasium import spaces
from test_action_heads import policy_steps
from test_agent import collect_one_rollout, small_model
from torch import nn

from mnm_rl.agent import action_heads, policy_step
from mnm_rl.agent.policy import RecurrentMemoryPolicy
from mnm_rl.memory import CoreState, fused

#: MiniGrid's observation after SymbolicMiniGrid (a 3 x 3 view): a symbol grid and a direction.
MINIGRID = spaces.Dict(
    {
        "direction": spaces.Discrete(4),
        "image": spaces.Box(0, np.broadcast_to([10, 5, 2], (3, 3, 3)), dtype=np.int64),
    }
)
#: Observations without a grid: a Box vector (our own tasks'), Discrete and MultiBinary inputs.
MIXED = spaces.Dict(
    {
        "cue": spaces.Box(-1.0, 1.0, shape=(2, 3), dtype=np.float32),
        "room": spaces.Discrete(5),
        "flags": spaces.MultiBinary(3),
    }
)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.delenv(policy_step.SWITCH_VARIABLE, raising=False)
    return built(policy_step.EXTENSION)


def make_policy(space: spaces.Space, core: str, dtype=torch.float32, core_kwargs=None, **kwargs):
    torch.manual_seed(0)
    if core.startswith("mnm"):  # a small memory: 2 heads, 2 layers of 8 x 8
        core_kwargs = dict(memory_size=8, n_heads=2, n_layers=2, **(core_kwargs or {}))
    policy = RecurrentMemoryPolicy(
        space, spaces.Discrete(5), lambda _: 1e-3, core=core, features_dim=24,
        core_kwargs=dict(hidden_size=16, **(core_kwargs or {})), **kwargs,
    )  # fmt: skip
    return policy.to(dtype)


def random_obs(space: spaces.Space, batch: int, seed: int) -> torch.Tensor | dict:
    space.seed(seed)
    samples = [space.sample() for _ in range(batch)]
    if isinstance(space, spaces.Dict):
        return {k: torch.as_tensor(np.stack([s[k] for s in samples])) for k in space.spaces}
    return torch.as_tensor(np.stack(samples))


def random_state(policy, batch: int, dtype) -> CoreState:
    state = policy.initial_state(batch)
    gen = torch.Generator().manual_seed(5)
    return CoreState(
        {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in state.items()},
        batch_size=batch,
    )


def both_steps(policy, obs, state, starts, deterministic=False, seed=3):
    """``act`` through the compiled step and through PyTorch, from the same generator seed."""
    steps = []
    for switch in ("1", "0"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(policy_step.SWITCH_VARIABLE, switch)
            torch.manual_seed(seed)
            with torch.inference_mode():
                steps.append(policy.act(obs, state, starts, deterministic))
            steps.append(torch.rand(2))  # where the generator is after the step
    return steps[0], steps[2], steps[1], steps[3]


def assert_same_step(a, b, exact_actions=True):
    if exact_actions:
        assert torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.log_probs, b.log_probs)
    torch.testing.assert_close(a.values, b.values)
    assert a.finite == b.finite
    assert a.state.keys() == b.state.keys() and a.state.batch_size == b.state.batch_size
    for key in a.state:
        torch.testing.assert_close(a.state[key], b.state[key])


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p", "mnm-g"])
@pytest.mark.parametrize(
    "space, dtype",
    # not MIXED in float64: the PyTorch step feeds Box inputs as float32 (SB3's preprocess_obs)
    [(MINIGRID, torch.float32), (MINIGRID, torch.float64), (MIXED, torch.float32)],
    ids=["grid-float32", "grid-float64", "no-grid-float32"],
)
@pytest.mark.parametrize("batch", [1, 3, 8, 20])
@pytest.mark.parametrize("deterministic", [False, True])
def test_the_compiled_step_is_the_pytorch_step(kernel, core, space, dtype, batch, deterministic):
    policy = make_policy(space, core, dtype)
    assert policy._step_layout is not None
    obs = random_obs(space, batch, seed=batch)
    state = random_state(policy, batch, dtype)
    starts = (torch.arange(batch) % 3 == 1).float()  # some envs start an episode
    calls = []
    real = policy_step.policy_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(policy_step, "policy_step", lambda *a: calls.append(1) or real(*a))
        compiled, pytorch, rand_after_compiled, rand_after_pytorch = both_steps(
            policy, obs, state, starts, deterministic
        )
    assert len(calls) == 1  # switched off, act does not ask the kernel
    assert_same_step(compiled, pytorch)
    if space is MIXED or batch >= 8:  # below 8 envs the PyTorch extractor sums in another order
        for a, b in ((compiled.log_probs, pytorch.log_probs), (compiled.values, pytorch.values),
                     *((compiled.state[k], pytorch.state[k]) for k in compiled.state)):  # fmt: skip
            assert torch.equal(a, b)  # the same operators: bit for bit
    assert torch.equal(rand_after_compiled, rand_after_pytorch)  # the same draws taken
    assert compiled.actions.dtype == torch.int64 and compiled.actions.shape == (batch,)
    assert compiled.log_probs.dtype == dtype and compiled.values.shape == (batch,)


@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_grid_pooling_relu_heads_and_deep_heads(kernel, core):
    policy = make_policy(MINIGRID, core, grid_pooling=True, activation_fn=nn.ReLU, net_arch=(32, 8))
    obs = random_obs(MINIGRID, 8, seed=1)
    state = random_state(policy, 8, torch.float32)
    compiled, pytorch, _, _ = both_steps(policy, obs, state, torch.zeros(8))
    assert_same_step(compiled, pytorch)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.float64])
def test_episode_starts_of_any_dtype_reset_the_same_envs(kernel, dtype):
    policy = make_policy(MINIGRID, "lstm")
    obs = random_obs(MINIGRID, 8, seed=4)
    state = random_state(policy, 8, torch.float32)
    starts = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0])
    with torch.inference_mode():
        torch.manual_seed(2)
        expected = policy.act(obs, state, starts.float())
        torch.manual_seed(2)
        got = policy.act(obs, state, starts.to(dtype))
    for key in expected.state:
        assert torch.equal(got.state[key], expected.state[key])
    assert torch.equal(got.log_probs, expected.log_probs)
    # a reset env's state does not depend on the state it had
    with torch.inference_mode():
        other = CoreState({k: v * 2 for k, v in state.items()}, batch_size=8)
        torch.manual_seed(2)
        again = policy.act(obs, other, starts.to(dtype))
    reset = starts.bool()
    for key in expected.state:
        assert torch.equal(again.state[key][reset], expected.state[key][reset])
        assert not torch.equal(again.state[key][~reset], expected.state[key][~reset])


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_a_state_holding_nan_starts_from_zero_where_an_episode_starts(kernel, core):
    policy = make_policy(MINIGRID, core)
    obs = random_obs(MINIGRID, 4, seed=2)
    state = random_state(policy, 4, torch.float32)
    for key in state:
        state[key][1] = float("nan")
    starts = torch.tensor([0.0, 1.0, 0.0, 0.0])
    compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
    assert compiled.finite and torch.isfinite(compiled.state["h"]).all()
    assert_same_step(compiled, pytorch)


def test_the_projected_table_follows_every_change_of_the_weights(kernel):
    policy = make_policy(MINIGRID, "lstm")
    obs = random_obs(MINIGRID, 8, seed=4)
    state = random_state(policy, 8, torch.float32)
    starts = torch.zeros(8)
    first, _, _, _ = both_steps(policy, obs, state, starts)
    table = policy._projected_table.table
    # an optimizer step on the embeddings and the extractor's weight (in place)
    extractor = policy.features_extractor
    with torch.no_grad():
        extractor.encoders["image"].embeddings[1].weight.add_(0.5)
    compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
    assert_same_step(compiled, pytorch)
    assert not torch.allclose(compiled.values, first.values)
    assert policy._projected_table.table is not table  # rebuilt
    with torch.no_grad():
        extractor.linear[0].weight.mul_(1.5)
    compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
    assert_same_step(compiled, pytorch)
    # a step of the policy's own optimizer (fused Adam, which does not bump the parameters'
    # versions: the policy's step hook does)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    table = policy._projected_table.table
    policy.optimizer.step()
    compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
    assert_same_step(compiled, pytorch)
    assert policy._projected_table.table is not table
    # load_state_dict, copying into the parameters and replacing them
    other = make_policy(MINIGRID, "lstm")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for assign in (False, True):
        policy.load_state_dict(other.state_dict(), assign=assign)
        compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
        assert_same_step(compiled, pytorch)
        expected, _, _, _ = both_steps(other, obs, state, starts)
        assert_same_step(compiled, expected)
    # an unchanged policy keeps its table
    table = policy._projected_table.table
    both_steps(policy, obs, state, starts)
    assert policy._projected_table.table is table


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p"])
def test_the_kept_weight_transposes_follow_every_change_of_the_weights(kernel, core):
    """The compiled step keeps each weight's packed transpose between steps
    (``cached_packed_transpose``): after an in-place update, an optimizer's step, a replaced
    tensor and ``load_state_dict``, it is still the PyTorch step."""
    from mnm_rl.agent import gradient_step

    policy = make_policy(MINIGRID, core)
    obs = random_obs(MINIGRID, 8, seed=6)
    state = random_state(policy, 8, torch.float32)
    starts = torch.zeros(8)
    before, _, _, _ = both_steps(policy, obs, state, starts)
    params = [p for name, p in policy.named_parameters() if not name.startswith("features")]

    def changes():
        with torch.no_grad():  # in place, as an optimizer's step
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
        yield "in place"
        # the policy's fused Adam, which does not bump the versions itself (its hook does),
        # through torch.optim and through gradient_step's compiled call
        for p in policy.parameters():
            p.grad = torch.randn_like(p)
        policy.optimizer.param_groups[0]["lr"] = 0.05
        policy.optimizer.step()
        yield "optimizer.step()"
        gradient_step.adam_step(policy.optimizer)
        yield "gradient_step.adam_step"
        for p in params:  # replaced storage, same tensor
            p.data = p.data * 1.1
        yield ".data replaced"
        other = make_policy(MINIGRID, core)
        policy.load_state_dict(other.state_dict(), assign=True)
        yield "load_state_dict(assign=True)"

    for change in changes():
        compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
        assert_same_step(compiled, pytorch)
        assert not torch.equal(compiled.values, before.values), change
        before = compiled


@pytest.mark.parametrize(
    "core, kwargs",
    [
        ("lstm", {"shared_core": False}),
        ("gru", {"activation_fn": nn.ELU}),
        ("mnm-p", {"core_kwargs": {"retention_lag": 2}}),
        ("mnm-p", {"core_kwargs": {"read_before_write": True}}),
        ("mnm-g", {"core_kwargs": {"interaction_input": True}}),
    ],
)
def test_other_policies_take_the_pytorch_step(kernel, monkeypatch, core, kwargs):
    policy = make_policy(MINIGRID, core, **kwargs)
    assert policy._step_layout is None
    monkeypatch.setattr(policy_step, "policy_step", lambda *a: pytest.fail("kernel called"))
    with torch.inference_mode():
        step = policy.act(random_obs(MINIGRID, 3, 0), policy.initial_state(3), torch.zeros(3))
    assert step.finite and step.actions.shape == (3,)


@pytest.mark.parametrize(
    "space",
    [MINIGRID["image"], spaces.Box(-1.0, 1.0, shape=(6,), dtype=np.float32), spaces.Discrete(7)],
    ids=["grid", "box", "discrete"],
)
@pytest.mark.parametrize("core", ["lstm", "mlp"])
def test_observations_that_are_not_dicts(kernel, space, core):
    policy = make_policy(space, core)
    assert policy._step_layout is not None
    assert policy._step_layout.has_grid == (space is MINIGRID["image"])
    obs = random_obs(space, 5, seed=6)
    state = random_state(policy, 5, torch.float32)
    compiled, pytorch, _, _ = both_steps(policy, obs, state, torch.tensor([1.0, 0, 0, 1, 0]))
    assert_same_step(compiled, pytorch)


def test_two_grids_take_the_pytorch_step(kernel):
    grid = spaces.Box(0, 3, shape=(2, 2, 1), dtype=np.int64)
    policy = make_policy(spaces.Dict({"a": grid, "b": grid}), "lstm")
    assert policy._step_layout is None


def test_with_gradients_the_pytorch_step_runs(kernel, monkeypatch):
    policy = make_policy(MINIGRID, "lstm")
    calls = []
    real = policy_step.load_extension
    monkeypatch.setattr(action_heads, "heads_step", lambda *a: pytest.fail("heads called"))
    monkeypatch.setattr(policy_step, "load_extension", lambda: calls.append(1) or real())
    step = policy.act(random_obs(MINIGRID, 3, 0), policy.initial_state(3), torch.zeros(3))
    assert calls and step.values.requires_grad  # asked, declined: the PyTorch step's graph


def test_a_discrete_input_out_of_range_is_an_error(kernel):
    policy = make_policy(MINIGRID, "lstm")
    obs = random_obs(MINIGRID, 3, 0)
    obs["direction"][2] = 4
    with torch.inference_mode(), pytest.raises(RuntimeError, match="Discrete input 0 is 4"):
        policy.act(obs, policy.initial_state(3), torch.zeros(3))


def test_a_symbol_out_of_range_is_an_error(kernel):
    policy = make_policy(MINIGRID, "gru")
    obs = random_obs(MINIGRID, 3, 0)
    obs["image"][1, 0, 0, 0] = 11
    with torch.inference_mode(), pytest.raises(RuntimeError, match="symbol 11 of channel 0"):
        policy.act(obs, policy.initial_state(3), torch.zeros(3))


def test_a_state_of_another_batch_size_is_an_error(kernel):
    policy = make_policy(MINIGRID, "lstm")
    with torch.inference_mode(), pytest.raises(ValueError, match="state has batch size 4"):
        policy.act(random_obs(MINIGRID, 3, 0), policy.initial_state(4), torch.zeros(3))


def test_the_switch_is_read_at_every_step(kernel, monkeypatch):
    assert policy_step.load_extension() is not None
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "0")
    assert policy_step.load_extension() is None
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "1")
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    assert policy_step.load_extension() is None


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p", "mnm-g"])
def test_episodes_of_steps_are_the_same_with_and_without_the_kernel(kernel, monkeypatch, core):
    """Twelve steps on a real env, each fed the last one's state and the env's observations."""
    with_kernel = policy_steps(small_model(core))
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "0")
    without = policy_steps(small_model(core))
    for a, b in zip(with_kernel, without, strict=True):
        assert_same_step(a, b)


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_a_rollout_is_the_same_with_and_without_the_kernel(kernel, monkeypatch, core):
    with_kernel = collect_one_rollout(small_model(core))
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "0")
    without = collect_one_rollout(small_model(core))
    assert torch.equal(with_kernel.actions, without.actions)
    for name in ("log_probs", "values", "rewards", "episode_starts", "advantages"):
        torch.testing.assert_close(getattr(with_kernel, name), getattr(without, name))


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_a_rollout_after_an_update_is_the_same_with_and_without_the_kernel(
    kernel, monkeypatch, core
):
    """The update between two rollouts changes the weights in place (fused Adam, which does not
    bump their versions itself): the compiled step's kept weight transposes follow them."""

    def rollout_after_an_update():
        model = small_model(core)
        model.learn(model.n_steps * model.n_envs)  # one rollout, one update
        return collect_one_rollout(model)

    with_kernel = rollout_after_an_update()
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "0")
    without = rollout_after_an_update()
    assert torch.equal(with_kernel.actions, without.actions)
    for name in ("log_probs", "values", "rewards", "episode_starts", "advantages"):
        torch.testing.assert_close(getattr(with_kernel, name), getattr(without, name))


def test_an_mnm_step_split_between_two_kernel_threads(kernel, monkeypatch):
    """32 envs and two kernel threads, single steps allowed to split (by default they are not,
    ``fused.MIN_STEP_PART_ROWS``): the MNM kernel splits the step into two parts
    (``fused.batch_parts``), run without the GIL."""
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    monkeypatch.setattr(fused, "MIN_STEP_PART_ROWS", 16)
    assert fused.batch_parts(1, 32) == 2
    policy = make_policy(MINIGRID, "mnm-p")
    obs = random_obs(MINIGRID, 32, seed=8)
    state = random_state(policy, 32, torch.float32)
    starts = (torch.arange(32) % 5 == 0).float()
    compiled, pytorch, _, _ = both_steps(policy, obs, state, starts)
    assert_same_step(compiled, pytorch)
