"""Rollout steps on the compiled step's own thread (``policy_step.StepThread``,
``RecurrentMemoryPolicy.act_later``): the same steps, draws and stored rollouts as one step after
the other on the rollout's thread (``MNM_RL_STEP_THREAD=0``); and a rollout's steps through the
arguments gathered once for it (``policy_step.StepPlan``) as :meth:`act` takes them."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from compiled import built
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from test_agent import collect_one_rollout, small_model
from test_policy_step import MINIGRID, make_policy, random_obs, random_state

from mnm_rl.agent import MemoryPPO, policy_step
from mnm_rl.env_factory import make_vec_env, resolve_env
from mnm_rl.lean_vec_env import LeanDummyVecEnv


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.delenv(policy_step.SWITCH_VARIABLE, raising=False)
    monkeypatch.delenv(policy_step.THREAD_VARIABLE, raising=False)
    return built(policy_step.EXTENSION)


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p", "mnm-g"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_a_step_on_the_thread_is_the_step_here(kernel, core, deterministic):
    policy = make_policy(MINIGRID, core)
    obs = random_obs(MINIGRID, 8, seed=2)
    state = random_state(policy, 8, torch.float32)
    starts = torch.zeros(8)
    starts[3] = 1
    rollout = policy_step.rollout_steps(policy, kernel.StepThread())
    steps, after = [], []
    for later in (False, True):
        torch.manual_seed(7)
        with torch.inference_mode():
            if later:
                pending = policy.act_later(obs, state, starts, rollout, deterministic)
                step = pending()
                assert pending() is step  # waited for once
            else:
                step = policy.act(obs, state, starts, deterministic)
        steps.append(step)
        after.append(torch.rand(3))  # where the generator is after the step
    here, there = steps
    assert torch.equal(here.actions, there.actions)
    assert torch.equal(here.log_probs, there.log_probs)
    assert torch.equal(here.values, there.values)
    assert here.finite == there.finite
    assert here.state.keys() == there.state.keys()
    for key in here.state:
        assert torch.equal(here.state[key], there.state[key]), key
    assert torch.equal(after[0], after[1])


def test_the_thread_runs_one_step_at_a_time_and_reports_errors(kernel):
    policy = make_policy(MINIGRID, "lstm")
    obs = random_obs(MINIGRID, 4, seed=1)
    state = random_state(policy, 4, torch.float32)
    steps = policy_step.rollout_steps(policy, kernel.StepThread())
    with torch.inference_mode():
        pending = policy.act_later(obs, state, torch.zeros(4), steps)
        with pytest.raises(RuntimeError, match="has not been waited for"):
            policy.act_later(obs, state, torch.zeros(4), steps)
        pending()
        # an error inside the step (the state's rows do not match the inputs') is raised here
        wrong = random_state(policy, 4, torch.float32)
        wrong["h"] = wrong["h"][:, :3].contiguous()
        failing = policy.act_later(obs, wrong, torch.zeros(4), steps)
        with pytest.raises(RuntimeError):
            failing()
        # and the thread goes on
        assert policy.act_later(obs, state, torch.zeros(4), steps)().actions.shape == (4,)


def test_a_thread_for_mnm_cores_only_and_not_without_the_switch(kernel, monkeypatch):
    from mnm_rl.cli import build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "MNM_RL_STEP_THREAD=0" in help_text
    assert "MNM_RL_PART_POOL=0" in help_text
    assert policy_step.step_thread(make_policy(MINIGRID, "mnm-p")) is not None
    for core in ("lstm", "gru", "mlp"):  # their steps are too short to pay for the handover
        assert policy_step.step_thread(make_policy(MINIGRID, core)) is None
    monkeypatch.setenv(policy_step.THREAD_VARIABLE, "0")
    assert policy_step.step_thread(make_policy(MINIGRID, "mnm-p")) is None


def _rollout(env, core: str, thread: str, monkeypatch, **kwargs):
    monkeypatch.setenv(policy_step.THREAD_VARIABLE, thread)
    model = small_model(core, env=env, **kwargs)
    calls = []
    original = policy_step.launch_call
    monkeypatch.setattr(policy_step, "launch_call", lambda *a: calls.append(1) or original(*a))
    buffer = collect_one_rollout(model)
    return model, buffer, len(calls)


def _assert_same_rollouts(first, second):
    (model_a, a, _), (model_b, b, _) = first, second
    for name in ("actions", "rewards", "values", "log_probs", "episode_starts", "advantages",
                 "returns"):  # fmt: skip
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    obs_a = a.observations if isinstance(a.observations, dict) else {None: a.observations}
    obs_b = b.observations if isinstance(b.observations, dict) else {None: b.observations}
    for key in obs_a:
        assert torch.equal(obs_a[key], obs_b[key])
    assert len(a.chunk_states) == len(b.chunk_states)
    for sa, sb in zip(a.chunk_states, b.chunk_states, strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    for key in model_a._last_state:
        assert torch.equal(model_a._last_state[key], model_b._last_state[key])
    assert model_a.num_timesteps == model_b.num_timesteps


@pytest.mark.parametrize("core", ["mnm-p", "mnm-g"])
def test_a_rollout_with_the_thread_is_the_rollout_without(kernel, monkeypatch, core):
    """MiniGrid-Memory (a symbol grid and a direction), 4 envs, 32 steps in chunks of 8."""
    runs = []
    for thread in ("1", "0"):
        env = make_vec_env(resolve_env("MiniGrid-MemoryS7-v0"), n_envs=4, seed=0)
        runs.append(_rollout(env, core, thread, monkeypatch, n_steps=32, batch_size=32))
    assert runs[0][2] == 32 + 1  # every step and the last value on the thread
    assert runs[1][2] == 0
    _assert_same_rollouts(*runs)


def test_time_limits_bootstrap_after_the_step_under_way(kernel, monkeypatch):
    """Episodes cut by a time limit add the critic's value of their last observation (a step
    of its own) while the next step is under way on the thread: the same rewards."""

    def make(delay: int):
        return lambda: Monitor(
            gym.wrappers.TimeLimit(
                gym.make("mnm_rl/DelayedCueRecall-v0", n_cues=3, delay=delay),
                max_episode_steps=3,
            )
        )

    cut = []
    original = MemoryPPO._bootstrap_truncated

    def counting(self, rewards, dones, infos, state):
        cut.extend(i for i in np.flatnonzero(dones) if infos[i]["TimeLimit.truncated"])
        return original(self, rewards, dones, infos, state)

    monkeypatch.setattr(MemoryPPO, "_bootstrap_truncated", counting)
    runs = []
    for thread in ("1", "0"):
        env = LeanDummyVecEnv([make(d) for d in (2, 4, 6)])
        env.seed(0)
        runs.append(_rollout(env, "mnm-p", thread, monkeypatch))
        assert cut, "no episode was cut by the time limit"
        cut.clear()
    assert runs[0][2] == runs[0][0].n_steps + 1
    _assert_same_rollouts(*runs)


def test_a_callback_that_stops_the_rollout(kernel, monkeypatch):
    """A callback's ``on_step`` returning False ends the rollout at once, with the step under
    way on the thread waited for; training goes on from there."""

    class StopAtFive(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls < 5

    model = small_model("mnm-p")
    _, callback = model._setup_learn(model.n_steps * model.n_envs, StopAtFive())
    callback.on_training_start(locals(), globals())
    assert not model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    assert model.rollout_buffer.pos == 4
    model.learn(2 * model.n_steps * model.n_envs)
    assert model.num_timesteps >= 2 * model.n_steps * model.n_envs


@pytest.mark.parametrize("core", ["lstm", "gru", "mlp", "mnm-p"])
def test_a_rollouts_plan_sees_its_parameters_change_in_place(kernel, core):
    """The plan gathered for a rollout (``rollout_steps`` without a thread) gives the steps
    that ``act`` gives, after an in-place change of every parameter too (as an optimizer step
    or ``load_state_dict`` makes): the kernel reads the same tensors, and the grid's projected
    table is rebuilt."""
    policy = make_policy(MINIGRID, core)
    obs = random_obs(MINIGRID, 8, seed=3)
    state = random_state(policy, 8, torch.float32)
    starts = torch.zeros(8)
    starts[5] = 1
    steps = policy_step.rollout_steps(policy, None)
    assert steps is not None and steps.thread is None
    values = []
    for change in (False, True):
        if change:
            with torch.no_grad():
                for parameter in policy.parameters():
                    parameter.mul_(-0.5).add_(0.01)
        results = []
        for planned in (True, False):
            torch.manual_seed(11)
            with torch.inference_mode():
                if planned:
                    results.append(policy.act_later(obs, state, starts, steps)())
                else:
                    results.append(policy.act(obs, state, starts))
        planned_step, step = results
        assert torch.equal(planned_step.actions, step.actions)
        assert torch.equal(planned_step.log_probs, step.log_probs)
        assert torch.equal(planned_step.values, step.values)
        for key in step.state:
            assert torch.equal(planned_step.state[key], step.state[key]), key
        values.append(step.values)
    assert not torch.equal(*values)  # the change reached the kernel


def test_no_plan_where_the_compiled_step_is_off_and_pytorch_under_gradients(kernel, monkeypatch):
    """``rollout_steps`` gives nothing with the compiled step switched off; a plan's step under
    autograd is PyTorch's, whose outputs carry gradients."""
    policy = make_policy(MINIGRID, "lstm")
    obs = random_obs(MINIGRID, 4, seed=4)
    state = random_state(policy, 4, torch.float32)
    steps = policy_step.rollout_steps(policy)
    assert steps is not None and steps.thread is None  # no thread for an LSTM core
    step = policy.act_later(obs, state, torch.zeros(4), steps)()
    assert step.values.requires_grad
    monkeypatch.setenv(policy_step.SWITCH_VARIABLE, "0")
    assert policy_step.rollout_steps(policy) is None
