"""The recurrent PPO agent: rollout storage, re-runs, save/load, logging, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import mnm_rl  # noqa: F401  (registers the envs)
from mnm_rl.agent import MemoryPPO
from mnm_rl.memory import CORE_KINDS

DELAYS = (1, 3, 6)  # episodes of 3, 5 and 8 steps: resets at different steps per env


def staggered_env() -> DummyVecEnv:
    def make(delay: int):
        return lambda: Monitor(gym.make("mnm_rl/DelayedCueRecall-v0", n_cues=3, delay=delay))

    env = DummyVecEnv([make(d) for d in DELAYS])
    env.seed(0)
    return env


def small_model(core: str, env=None, **kwargs) -> MemoryPPO:
    params = dict(
        n_steps=16,
        batch_size=16,
        seq_len=8,
        n_epochs=2,
        seed=0,
        device="cpu",
        policy_kwargs=dict(core_kwargs=dict(hidden_size=16), features_dim=16),
    )
    params.update(kwargs)
    return MemoryPPO(env=env or staggered_env(), core=core, **params)


def collect_one_rollout(model: MemoryPPO):
    _, callback = model._setup_learn(model.n_steps * model.n_envs, None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


@pytest.mark.parametrize("core", CORE_KINDS)
def test_rerun_of_stored_chunks_reproduces_rollout(core):
    model = small_model(core)
    buffer = collect_one_rollout(model)
    assert len(buffer.chunk_states) == model.n_steps // model.seq_len
    seen = 0
    with torch.no_grad():
        for batch in buffer.minibatches(chunks_per_batch=4):
            logits, values, _, _ = model.policy.forward_sequence(
                batch.observations, batch.states, batch.episode_starts
            )
            log_probs = model.policy.distribution(logits).log_prob(batch.actions)
            torch.testing.assert_close(values, batch.old_values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(log_probs, batch.old_log_probs, rtol=1e-5, atol=1e-6)
            assert batch.actions.shape[0] == model.seq_len  # whole chunks, no padding
            seen += batch.actions.numel()
    assert seen == model.n_steps * model.n_envs  # every step exactly once


@pytest.mark.parametrize("core", ["mnm-p", "gru"])
def test_episode_starts_reset_exactly_the_right_env(core):
    model = small_model(core)
    buffer = collect_one_rollout(model)
    starts = buffer.episode_starts.cpu().numpy()
    for env_index, delay in enumerate(DELAYS):
        length = delay + 2
        expected = (np.arange(model.n_steps) % length == 0).astype(np.float32)
        np.testing.assert_array_equal(starts[:, env_index], expected)
    # Independent reference: run every episode alone from a fresh state. The rollout's values
    # must match, so no state leaks across an episode boundary or into another env.
    obs = buffer.observations
    policy = model.policy
    with torch.no_grad():
        for env_index in range(model.n_envs):
            begins = list(np.flatnonzero(starts[:, env_index])) + [model.n_steps]
            for begin, end in zip(begins[:-1], begins[1:], strict=True):
                episode_obs = obs[begin:end, env_index : env_index + 1]
                ep_starts = torch.zeros(end - begin, 1)
                _, values, _, _ = policy.forward_sequence(
                    episode_obs, policy.initial_state(1), ep_starts
                )
                torch.testing.assert_close(
                    values[:, 0], buffer.values[begin:end, env_index], rtol=1e-5, atol=1e-6
                )


def test_earlier_episode_does_not_leak_into_loss_inputs():
    """Changing the observations of episode k-1 leaves episode k's outputs unchanged."""
    model = small_model("mnm-p")
    buffer = collect_one_rollout(model)
    batch = next(buffer.minibatches(chunks_per_batch=buffer.n_chunks))
    starts = batch.episode_starts
    with torch.no_grad():
        _, values, _, aux = model.policy.forward_sequence(batch.observations, batch.states, starts)
        changed = batch.observations.clone()
        for chunk in range(starts.shape[1]):
            first = torch.nonzero(starts[:, chunk]).flatten()
            if len(first) and first[-1] > 0:
                changed[: first[-1], chunk] += 1.0
        _, values2, _, aux2 = model.policy.forward_sequence(changed, batch.states, starts)
    last_start = torch.zeros_like(starts, dtype=torch.bool)
    for chunk in range(starts.shape[1]):
        first = torch.nonzero(starts[:, chunk]).flatten()
        if len(first):
            last_start[first[-1] :, chunk] = True
    assert last_start.any() and (~last_start).any()
    torch.testing.assert_close(values2[last_start], values[last_start])
    torch.testing.assert_close(aux2["recon_after"][last_start], aux["recon_after"][last_start])
    assert not torch.allclose(values2[~last_start], values[~last_start])


@pytest.mark.parametrize("core", ["mnm-p", "lstm", "mlp"])
def test_save_load_predict_identical(tmp_path, core):
    model = small_model(core)
    model.learn(96)
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = MemoryPPO.load(path, device="cpu")
    env = staggered_env()
    obs = env.reset()
    state_a = state_b = None
    starts = np.ones(env.num_envs, dtype=bool)
    for _ in range(12):
        act_a, state_a = model.predict(obs, state_a, starts, deterministic=True)
        act_b, state_b = loaded.predict(obs, state_b, starts, deterministic=True)
        np.testing.assert_array_equal(act_a, act_b)
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)
        obs, _, dones, _ = env.step(act_a)
        starts = dones
    for (name, p), (_, q) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    # evaluate_policy threads the recurrent state through the loaded model
    mean_reward, _ = evaluate_policy(loaded, staggered_env(), n_eval_episodes=9)
    assert 0.0 <= mean_reward <= 1.0


def test_predict_single_observation_and_state_threading():
    model = small_model("mnm-g")
    env = gym.make("mnm_rl/DelayedCueRecall-v0", n_cues=3, delay=3)
    obs, _ = env.reset(seed=0)
    action, state = model.predict(obs)
    assert np.asarray(action).shape == () and state.batch_size == 1
    action2, state2 = model.predict(obs, state, np.array([False]))
    assert not torch.equal(state2["fast_weights"], state["fast_weights"])
    with pytest.raises(ValueError, match="state is for 1 envs"):
        model.predict(np.stack([obs, obs]), state, np.array([False, False]))


def test_tensorboard_scalars_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = small_model("mnm-p", tensorboard_log=str(tmp_path))
    model.learn(16 * 3 * 3, tb_log_name="run")
    (run_dir,) = list(tmp_path.iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "rollout/ep_rew_mean",
        "rollout/ep_len_mean",
        "rollout/success_rate",
        "train/policy_gradient_loss",
        "train/value_loss",
        "train/entropy_loss",
        "train/memory_loss",
        "train/loss",
        "train/explained_variance",
        "train/approx_kl",
        "train/clip_fraction",
        "memory/beta_mean",
        "memory/write_gain",
        "memory/fast_weight_norm",
        "time/fps",
    }
    assert expected <= tags, expected - tags
    steps = [e.step for e in events.Scalars("rollout/success_rate")]
    assert steps == [48, 96, 144]
    success = [e.value for e in events.Scalars("rollout/success_rate")]
    assert all(0.0 <= s <= 1.0 for s in success)


def test_success_is_counted_per_finished_episode_from_its_final_reward():
    # DelayedCueRecall pays only on the query step, which ends the episode: an episode succeeded
    # exactly when its return (Monitor's "r") is positive, one entry per finished episode.
    model = small_model("mlp", n_steps=64)
    collect_one_rollout(model)
    returns = [episode["r"] for episode in model.ep_info_buffer]
    assert len(returns) >= 2 * len(DELAYS)
    assert list(model.ep_success_buffer) == [float(r > 0) for r in returns]
    assert 0 < sum(model.ep_success_buffer) < len(returns)  # both outcomes occur


def test_separate_critic_core():
    model = small_model(
        "lstm", policy_kwargs=dict(core_kwargs=dict(hidden_size=8), shared_core=False)
    )
    state = model.policy.initial_state(3)
    assert set(state) == {"h", "c", "critic/h", "critic/c"}
    buffer = collect_one_rollout(model)
    batch = next(buffer.minibatches(chunks_per_batch=2))
    with torch.no_grad():
        _, values, _, _ = model.policy.forward_sequence(
            batch.observations, batch.states, batch.episode_starts
        )
    torch.testing.assert_close(values, batch.old_values, rtol=1e-5, atol=1e-6)


def test_unsupported_inputs_raise_precise_errors():
    with pytest.raises(ValueError, match="Discrete action spaces only"):
        MemoryPPO(env=DummyVecEnv([lambda: gym.make("Pendulum-v1")]), core="lstm")
    with pytest.raises(ValueError, match="multiple of seq_len"):
        small_model("lstm", n_steps=20)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        small_model("lstm", batch_size=12)
    with pytest.raises(ValueError, match="unknown core"):
        small_model("transformer")
    with pytest.raises(ValueError, match="total_timesteps must be positive"):
        small_model("mlp").learn(0)


def test_grid_pooling_policy_round_trips_through_the_safe_policy_file(tmp_path):
    from mnm_rl.env_factory import make_env
    from mnm_rl.loading import load_policy
    from mnm_rl.presets import load_env_preset
    from mnm_rl.safe_policy import save_policy_file

    spec = load_env_preset("MiniGrid-MemoryS7").spec()
    env = DummyVecEnv([lambda: make_env(spec)])
    kwargs = dict(core_kwargs=dict(hidden_size=16), features_dim=16, grid_pooling=True)
    model = small_model("gru", env=env, policy_kwargs=kwargs)
    encoder = model.policy.features_extractor.encoders["image"]
    assert encoder.pooling and encoder.output_dim == (3 * 3 + 1) * 3 * 8
    save_policy_file(model, tmp_path / "policy.pt")
    loaded = load_policy(tmp_path / "policy.pt", device="cpu")
    assert loaded.policy.grid_pooling is True
    for (name, p), (_, q) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


def test_entropy_bonus_follows_its_schedule(tmp_path):
    """A config's ``ent_coef_final`` becomes a linear schedule of the remaining progress: the
    logged coefficient falls from ``ent_coef`` to the final value over ``ent_coef_fraction`` of
    the run, and a loaded model keeps the schedule."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mnm_rl.config import AgentPreset

    preset = AgentPreset.model_validate(
        {
            "name": "x",
            "core": "gru",
            "ppo": {"ent_coef": 0.1, "ent_coef_final": 0.02, "ent_coef_fraction": 0.5},
        }
    )
    schedule = preset.model_kwargs()["ent_coef"]
    assert [round(schedule(p), 6) for p in (1.0, 0.75, 0.5, 0.0)] == [0.1, 0.06, 0.02, 0.02]
    model = small_model("gru", ent_coef=schedule, tensorboard_log=str(tmp_path))
    model.learn(48 * 4, tb_log_name="run")
    (run_dir,) = list(tmp_path.iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [round(e.value, 6) for e in events.Scalars("train/ent_coef")]
    # progress remaining at the updates: 0.75, 0.5, 0.25 (48 of 192 steps per rollout; SB3
    # writes an update's scalars with the next rollout's, so the last one is not in the file)
    assert logged == [0.06, 0.02, 0.02]
    model.save(tmp_path / "model.zip")
    loaded = MemoryPPO.load(tmp_path / "model.zip", device="cpu")
    assert round(loaded.ent_coef_schedule(0.75), 6) == 0.06
    constant = AgentPreset.model_validate({"name": "y", "core": "gru", "ppo": {"ent_coef": 0.03}})
    assert constant.model_kwargs()["ent_coef"] == 0.03
    with pytest.raises(ValueError, match="ent_coef_fraction needs ent_coef_final"):
        AgentPreset.model_validate({"name": "z", "core": "gru", "ppo": {"ent_coef_fraction": 0.5}})


def test_learning_rate_decays_late_in_the_run(tmp_path):
    """``learning_rate_final`` with ``learning_rate_decay_from``: the optimizer's rate stays at
    ``learning_rate`` until that share of the run, then falls linearly to the final value; the
    logged rate follows it and a loaded model keeps the schedule."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mnm_rl.config import AgentPreset

    ppo = {"learning_rate": 1e-3, "learning_rate_final": 1e-4, "learning_rate_decay_from": 0.5}
    preset = AgentPreset.model_validate({"name": "x", "core": "gru", "ppo": ppo})
    schedule = preset.model_kwargs()["learning_rate"]
    assert [round(schedule(p), 9) for p in (1.0, 0.75, 0.5, 0.25, 0.0)] == [
        1e-3, 1e-3, 1e-3, 5.5e-4, 1e-4,
    ]  # fmt: skip
    model = small_model("gru", learning_rate=schedule, tensorboard_log=str(tmp_path))
    model.learn(48 * 4, tb_log_name="run")
    # the last update ran at progress remaining 0: the final rate
    assert [g["lr"] for g in model.policy.optimizer.param_groups] == pytest.approx([1e-4])
    (run_dir,) = list(tmp_path.iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [round(e.value, 9) for e in events.Scalars("train/learning_rate")]
    assert logged == [1e-3, 1e-3, 5.5e-4]  # progress remaining 0.75, 0.5, 0.25
    model.save(tmp_path / "model.zip")
    loaded = MemoryPPO.load(tmp_path / "model.zip", device="cpu")
    assert loaded.lr_schedule(0.25) == pytest.approx(5.5e-4)
    constant = AgentPreset.model_validate({"name": "y", "core": "gru", "ppo": {}})
    assert constant.model_kwargs()["learning_rate"] == 3e-4
    with pytest.raises(ValueError, match="learning_rate_decay_from needs learning_rate_final"):
        AgentPreset.model_validate(
            {"name": "z", "core": "gru", "ppo": {"learning_rate_decay_from": 0.5}}
        )
    with pytest.raises(ValueError, match="decay_from must be in"):
        type(schedule)(1e-3, 0.0, 1.0)


def test_memory_lr_scale_gives_the_memory_its_own_learning_rate(tmp_path):
    """``memory_lr_scale``: the MNM core's interaction and fast-weight parameters form a second
    optimizer group whose learning rate stays that multiple of the scheduled one through
    updates and save/load; the rest of the policy keeps the full rate. A core without a memory
    keeps one group, and a non-positive scale is refused."""
    from mnm_rl.config import AgentPreset

    model = small_model(
        "mnm-p",
        learning_rate=lambda progress: 1e-3 * progress,
        policy_kwargs=dict(core_kwargs=dict(hidden_size=16), features_dim=16, memory_lr_scale=0.25),
    )
    rest, memory = model.policy.optimizer.param_groups
    core = model.policy.core
    expected = {
        id(p) for m in (core.interaction, core.beta_gate, core.memory) for p in m.parameters()
    }
    assert {id(p) for p in memory["params"]} == expected
    assert len(rest["params"]) + len(memory["params"]) == len(list(model.policy.parameters()))
    before = [p.detach().clone() for p in memory["params"]]
    model.learn(48 * 2)
    progress = model._current_progress_remaining
    assert rest["lr"] == pytest.approx(1e-3 * progress)
    assert memory["lr"] == pytest.approx(0.25e-3 * progress)
    assert any(not torch.equal(b, p) for b, p in zip(before, memory["params"], strict=True))
    model.save(tmp_path / "model.zip")
    loaded = MemoryPPO.load(tmp_path / "model.zip", device="cpu")
    assert [g["lr_scale"] for g in loaded.policy.optimizer.param_groups] == [1.0, 0.25]
    gru = small_model("gru", policy_kwargs=dict(features_dim=16, memory_lr_scale=0.25))
    assert len(gru.policy.optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="memory_lr_scale must be positive"):
        small_model("mnm-p", policy_kwargs=dict(memory_lr_scale=0.0))
    preset = AgentPreset.model_validate(
        {"name": "x", "core": "mnm-p", "policy": {"memory_lr_scale": 0.3}}
    )
    assert preset.model_kwargs()["policy_kwargs"]["memory_lr_scale"] == 0.3


def test_minibatches_hold_each_chunk_once_per_epoch_and_follow_a_new_rollout():
    """Chunk ``c * n_envs + e`` is steps ``c * seq_len ..`` of env ``e``, in every epoch (the
    chunked observations are kept between epochs), and a new rollout replaces them."""
    model = small_model("gru")

    def check_epoch(buffer) -> None:
        ids = torch.arange(buffer.values.numel(), dtype=torch.float32).view_as(buffer.values)
        buffer.values = ids  # a step's id, to find each chunk's steps
        seen = 0
        for batch in buffer.minibatches(chunks_per_batch=2):
            for j in range(batch.actions.shape[1]):
                step, env = divmod(int(batch.old_values[0, j]), model.n_envs)
                assert step % model.seq_len == 0
                steps = slice(step, step + model.seq_len)
                torch.testing.assert_close(batch.old_values[:, j], ids[steps, env])
                stored = buffer.observations[steps, env]
                torch.testing.assert_close(batch.observations[:, j], stored, rtol=0, atol=0)
                start_state = buffer.chunk_states[step // model.seq_len]
                for key, value in batch.states.items():
                    torch.testing.assert_close(value[j], start_state[key][env], rtol=0, atol=0)
                seen += 1
        assert seen == buffer.n_chunks

    buffer = collect_one_rollout(model)
    first = buffer.observations.clone()
    check_epoch(buffer)
    check_epoch(buffer)  # a second epoch, from the kept chunks
    buffer = collect_one_rollout(model)  # the next rollout, into the same buffer
    assert not torch.equal(buffer.observations, first)
    check_epoch(buffer)


def bootstrap_by_forward_sequence(model: MemoryPPO, calls: list[int]):
    """The reference bootstrap: ``gamma * V`` of each truncated episode's terminal observation
    through ``forward_sequence`` (one more step of the core), counting its truncations."""

    def bootstrap(rewards, dones, infos, state):
        truncated = [i for i in np.flatnonzero(dones) if infos[i].get("TimeLimit.truncated", False)]
        calls.append(len(truncated))
        if not truncated:
            return rewards
        rewards = rewards.astype(np.float32, copy=True)
        terminal = np.stack([infos[i]["terminal_observation"] for i in truncated])
        with torch.no_grad():
            _, values, _, _ = model.policy.forward_sequence(
                torch.as_tensor(terminal).unsqueeze(0),
                state.index(truncated),
                torch.zeros(1, len(truncated)),
            )
        rewards[truncated] += model.gamma * values[0].numpy()
        return rewards

    return bootstrap


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_time_limits_bootstrap_the_value_of_the_terminal_observation(core):
    def env():
        make = lambda: gym.make("mnm_rl/DelayedCueRecall-v0", n_cues=3, delay=8,  # noqa: E731
                                max_episode_steps=5)  # fmt: skip
        vec = DummyVecEnv([make, make])
        vec.seed(0)
        return vec

    got = collect_one_rollout(small_model(core, env=env(), n_steps=32, batch_size=32))
    reference = small_model(core, env=env(), n_steps=32, batch_size=32)  # the same seed
    calls: list[int] = []
    reference._bootstrap_truncated = bootstrap_by_forward_sequence(reference, calls)
    expected = collect_one_rollout(reference)
    assert sum(calls) >= 10  # every fifth step of each env is cut by the time limit
    assert torch.equal(got.actions, expected.actions)
    torch.testing.assert_close(got.rewards, expected.rewards)
    assert (got.rewards != 0).sum() >= 10  # the bootstrapped values (the env pays only at the end)


@pytest.mark.parametrize("core", ["lstm", "mnm-p"])
def test_the_last_step_bootstraps_the_value_of_the_next_observation(core):
    model = small_model(core)
    buffer = collect_one_rollout(model)
    obs = model.policy.obs_to_tensor(model._last_obs)[0]
    starts = torch.as_tensor(model._last_episode_starts, dtype=torch.float32)
    with torch.no_grad():
        _, values, _, _ = model.policy.forward_sequence(
            obs.unsqueeze(0), model._last_state, starts.unsqueeze(0)
        )
    # the last step's advantage is its TD error alone: r + gamma V(next) (1 - done) - V
    next_value = (buffer.advantages[-1] + buffer.values[-1] - buffer.rewards[-1]) / model.gamma
    live = starts == 0
    assert live.any()
    torch.testing.assert_close(next_value[live], values[0][live], rtol=1e-4, atol=1e-5)
