"""Tests for the memory-demanding environments in ``mnm_rl.envs``."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import mnm_rl  # noqa: F401  (registers the gymnasium ids)
from mnm_rl.envs import ENV_IDS, DelayedCueRecallEnv, KeyValueRecallEnv, register_envs

CUE_ID = "mnm_rl/DelayedCueRecall-v0"
KV_ID = "mnm_rl/KeyValueRecall-v0"


def run_episode(env: gym.Env, answer, seed: int | None = None):
    """Play one episode; ``answer(env, obs)`` picks every action. Returns (steps, rewards, info)."""
    obs, _ = env.reset(seed=seed)
    rewards, steps, terminated, info = [], 0, False, {}
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(answer(env, obs))
        assert not truncated
        rewards.append(reward)
        steps += 1
    return steps, rewards, info


# ---- delayed cue recall ---------------------------------------------------------------------


@pytest.mark.parametrize("n_cues,delay", [(2, 0), (4, 8), (7, 3)])
def test_cue_episode_length_and_correct_answer(n_cues: int, delay: int) -> None:
    env = DelayedCueRecallEnv(n_cues=n_cues, delay=delay)
    for seed in range(20):
        steps, rewards, info = run_episode(env, lambda e, o: e.unwrapped.cue, seed=seed)
        assert steps == delay + 2
        assert rewards == [0.0] * (delay + 1) + [1.0]
        assert info["is_success"] is True
        assert info["target"] == env.cue


def test_cue_wrong_answer_scores_zero() -> None:
    env = DelayedCueRecallEnv(n_cues=5, delay=2)
    for seed in range(20):
        steps, rewards, info = run_episode(env, lambda e, o: (e.cue + 1) % e.n_cues, seed=seed)
        assert steps == 4
        assert rewards == [0.0] * 4
        assert info["is_success"] is False


def test_cue_observation_layout() -> None:
    env = DelayedCueRecallEnv(n_cues=4, delay=3)
    obs, info = env.reset(seed=3)
    assert info == {}
    assert env.observation_space.shape == (6,)
    assert obs.dtype == np.float32
    expected = np.zeros(6, dtype=np.float32)
    expected[env.cue] = 1.0
    expected[4] = 1.0  # cue-phase flag
    np.testing.assert_array_equal(obs, expected)
    for _ in range(3):  # delay: all zeros whatever the action
        obs, reward, terminated, _, info = env.step(env.cue)
        np.testing.assert_array_equal(obs, np.zeros(6))
        assert (reward, terminated, info) == (0.0, False, {})
    obs, reward, terminated, _, _ = env.step(0)
    np.testing.assert_array_equal(obs, [0, 0, 0, 0, 0, 1])  # query-phase flag only
    assert (reward, terminated) == (0.0, False)
    obs, _, terminated, _, _ = env.step(env.cue)
    assert terminated
    np.testing.assert_array_equal(obs, np.zeros(6))


def test_cue_solvable_from_observations_alone() -> None:
    """A policy that memorises the cue from the first observation always wins."""
    env = gym.make(CUE_ID, n_cues=6, delay=5)
    for seed in range(30):
        obs, _ = env.reset(seed=seed)
        remembered = int(np.argmax(obs[:6]))
        terminated = False
        while not terminated:
            action = remembered if obs[7] == 1.0 else 0
            obs, reward, terminated, _, info = env.step(action)
        assert reward == 1.0 and info["is_success"]


@pytest.mark.parametrize("n_cues", [2, 4])
def test_cue_random_policy_at_chance(n_cues: int) -> None:
    env = DelayedCueRecallEnv(n_cues=n_cues, delay=2)
    env.reset(seed=0)
    env.action_space.seed(0)
    episodes = 2000
    wins = sum(
        run_episode(env, lambda e, o: e.action_space.sample())[2]["is_success"]
        for _ in range(episodes)
    )
    assert abs(wins / episodes - 1 / n_cues) < 0.04


def test_cue_cues_are_uniform() -> None:
    env = DelayedCueRecallEnv(n_cues=4, delay=0)
    env.reset(seed=1)
    counts = np.bincount([env.reset()[0][:4].argmax() for _ in range(4000)], minlength=4)
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.04)


# ---- key-value recall -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_pairs,n_keys,n_values,delay", [(1, 1, 2, 0), (4, 8, 4, 0), (5, 5, 3, 6)]
)
def test_kv_episode_length_and_correct_answer(
    n_pairs: int, n_keys: int, n_values: int, delay: int
) -> None:
    env = KeyValueRecallEnv(n_pairs=n_pairs, n_keys=n_keys, n_values=n_values, delay=delay)
    for seed in range(20):
        steps, rewards, info = run_episode(env, lambda e, o: e.target, seed=seed)
        assert steps == n_pairs + delay + 1
        assert rewards == [0.0] * (n_pairs + delay) + [1.0]
        assert info["is_success"] is True
        keys = [k for k, _ in env.pairs]
        assert len(set(keys)) == n_pairs and all(0 <= k < n_keys for k in keys)
        assert all(0 <= v < n_values for _, v in env.pairs)
        assert env.query_key in keys
        assert env.pairs[env.query_position][0] == env.query_key


def test_kv_distinct_values_never_repeat_and_cover_all_values() -> None:
    env = KeyValueRecallEnv(n_pairs=4, n_keys=8, n_values=4, distinct_values=True)
    seen_orders = set()
    for seed in range(200):
        env.reset(seed=seed)
        values = [v for _, v in env.pairs]
        assert sorted(values) == [0, 1, 2, 3]  # 4 pairs, 4 values: a permutation
        seen_orders.add(tuple(values))
    assert len(seen_orders) > 20  # of the 24 permutations
    repeated = KeyValueRecallEnv(n_pairs=4, n_keys=8, n_values=4)
    repeats = 0
    for seed in range(200):
        repeated.reset(seed=seed)
        repeats += len({v for _, v in repeated.pairs}) < 4
    assert repeats > 150  # with repetition allowed, 1 - 4!/4^4 = 91% of episodes repeat one


def test_kv_distinct_values_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="distinct_values"):
        KeyValueRecallEnv(distinct_values="yes")


def test_kv_wrong_answer_scores_zero() -> None:
    env = KeyValueRecallEnv(n_pairs=3, n_keys=6, n_values=4, delay=1)
    for seed in range(20):
        steps, rewards, info = run_episode(env, lambda e, o: (e.target + 1) % 4, seed=seed)
        assert steps == 5
        assert rewards == [0.0] * 5
        assert info["is_success"] is False


def test_kv_observation_layout() -> None:
    n_keys, n_values = 6, 3
    env = KeyValueRecallEnv(n_pairs=3, n_keys=n_keys, n_values=n_values, delay=2)
    assert env.observation_space.shape == (n_keys + n_values + 3,)
    flags = n_keys + n_values
    obs, _ = env.reset(seed=11)
    for t, (key, value) in enumerate(env.pairs):
        expected = np.zeros(flags + 3, dtype=np.float32)
        expected[key] = 1.0
        expected[n_keys + value] = 1.0
        expected[flags] = 1.0  # store flag
        assert obs.dtype == np.float32
        np.testing.assert_array_equal(obs, expected, err_msg=f"store step {t}")
        obs, *_ = env.step(0)
    for _ in range(2):
        np.testing.assert_array_equal(obs, np.eye(flags + 3)[flags + 1])  # delay flag only
        obs, *_ = env.step(0)
    expected = np.zeros(flags + 3, dtype=np.float32)
    expected[env.query_key] = 1.0
    expected[flags + 2] = 1.0  # query flag, value zeroed
    np.testing.assert_array_equal(obs, expected)


def test_kv_solvable_from_observations_alone() -> None:
    """A policy that memorises every shown pair always wins."""
    n_keys, n_values = 8, 4
    env = gym.make(KV_ID, n_pairs=4, n_keys=n_keys, n_values=n_values, delay=3)
    flags = n_keys + n_values
    for seed in range(30):
        obs, _ = env.reset(seed=seed)
        memory: dict[int, int] = {}
        terminated = False
        while not terminated:
            action = 0
            if obs[flags] == 1.0:
                memory[int(obs[:n_keys].argmax())] = int(obs[n_keys:flags].argmax())
            elif obs[flags + 2] == 1.0:
                action = memory[int(obs[:n_keys].argmax())]
            obs, reward, terminated, _, info = env.step(action)
        assert reward == 1.0 and info["is_success"]


def test_kv_random_policy_at_chance() -> None:
    env = KeyValueRecallEnv(n_pairs=3, n_keys=5, n_values=4)
    env.reset(seed=0)
    env.action_space.seed(0)
    episodes = 2000
    wins = sum(
        run_episode(env, lambda e, o: e.action_space.sample())[2]["is_success"]
        for _ in range(episodes)
    )
    assert abs(wins / episodes - 1 / 4) < 0.04


# ---- shared behaviour -----------------------------------------------------------------------


def trajectory(env: gym.Env, seed: int, episodes: int = 5) -> list[np.ndarray]:
    """Observations of ``episodes`` consecutive episodes after seeding once."""
    observations = [env.reset(seed=seed)[0]]
    for i in range(episodes):
        if i:
            observations.append(env.reset()[0])
        terminated = False
        while not terminated:
            obs, _, terminated, _, _ = env.step(0)
            observations.append(obs)
    return observations


@pytest.mark.parametrize(
    "make", [lambda: DelayedCueRecallEnv(n_cues=8, delay=2), lambda: KeyValueRecallEnv()]
)
def test_seeding_is_reproducible(make) -> None:
    first, second = trajectory(make(), seed=42), trajectory(make(), seed=42)
    assert len(first) == len(second)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    other = trajectory(make(), seed=43)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (DelayedCueRecallEnv, {"n_cues": 1}, "n_cues"),
        (DelayedCueRecallEnv, {"n_cues": 0}, "n_cues"),
        (DelayedCueRecallEnv, {"delay": -1}, "delay"),
        (DelayedCueRecallEnv, {"delay": 2.5}, "delay"),
        (DelayedCueRecallEnv, {"n_cues": True}, "n_cues"),
        (DelayedCueRecallEnv, {"render_mode": "human"}, "render_mode"),
        (KeyValueRecallEnv, {"n_pairs": 0}, "n_pairs"),
        (KeyValueRecallEnv, {"n_pairs": 9, "n_keys": 8}, "must not exceed n_keys"),
        (KeyValueRecallEnv, {"n_values": 1}, "n_values"),
        (KeyValueRecallEnv, {"n_keys": 0}, "n_keys"),
        (KeyValueRecallEnv, {"delay": -3}, "delay"),
        (KeyValueRecallEnv, {"render_mode": "rgb"}, "render_mode"),
        (KeyValueRecallEnv, {"n_pairs": 5, "n_values": 4, "distinct_values": True}, "n_values"),
    ],
)
def test_bad_constructor_args_raise(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_numpy_integer_args_accepted() -> None:
    env = DelayedCueRecallEnv(n_cues=np.int64(3), delay=np.int32(1))
    assert env.action_space.n == 3 and env.episode_length == 3


@pytest.mark.parametrize("cls", [DelayedCueRecallEnv, KeyValueRecallEnv])
def test_step_misuse_raises(cls) -> None:
    env = cls()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="invalid action"):
        env.step(env.action_space.n)
    run_episode(env, lambda e, o: 0, seed=0)
    with pytest.raises(RuntimeError, match="terminated"):
        env.step(0)


@pytest.mark.parametrize(
    "env_id,kwargs",
    [(CUE_ID, {"n_cues": 4, "delay": 8}), (KV_ID, {"n_pairs": 3, "delay": 2})],
)
def test_gymnasium_env_checker(env_id: str, kwargs: dict) -> None:
    env = gym.make(env_id, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports soft problems as warnings
        check_env(env.unwrapped)
    env.close()


def test_registration() -> None:
    assert set(ENV_IDS) == {CUE_ID, KV_ID}
    register_envs()  # idempotent: no error, no override
    env = gym.make(CUE_ID, n_cues=4, delay=8)
    assert isinstance(env.unwrapped, DelayedCueRecallEnv)
    assert (env.unwrapped.n_cues, env.unwrapped.delay) == (4, 8)
    assert isinstance(gym.make(KV_ID).unwrapped, KeyValueRecallEnv)


def test_module_colon_id_from_fresh_interpreter() -> None:
    code = (
        "import sys, gymnasium as gym\n"
        "assert 'mnm_rl' not in sys.modules\n"
        "env = gym.make('mnm_rl:mnm_rl/DelayedCueRecall-v0', n_cues=3, delay=1)\n"
        "obs, _ = env.reset(seed=0)\n"
        "print(type(env.unwrapped).__name__, obs.shape[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == ["DelayedCueRecallEnv", "5"]


@pytest.mark.parametrize("env_id", [CUE_ID, KV_ID])
def test_render_modes(env_id: str) -> None:
    assert gym.make(env_id).unwrapped.metadata["render_modes"] == ["ansi", "rgb_array"]
    assert DelayedCueRecallEnv().render() is None  # no render mode

    ansi = gym.make(env_id, render_mode="ansi")
    ansi.reset(seed=0)
    lines = [ansi.render()]
    terminated = False
    while not terminated:
        _, _, terminated, _, _ = ansi.step(0)
        lines.append(ansi.render())
    assert all(isinstance(line, str) and line and "\n" not in line for line in lines)
    assert ("cue" in lines[0]) or ("store" in lines[0])
    assert "query" in lines[-2] and "done" in lines[-1]

    rgb = gym.make(env_id, render_mode="rgb_array")
    rgb.reset(seed=0)
    frames = [rgb.render()]
    terminated = False
    while not terminated:
        _, _, terminated, _, _ = rgb.step(0)
        frames.append(rgb.render())
    for frame in frames:
        assert isinstance(frame, np.ndarray)
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    # first (symbol shown), a blank/store step, the query and the answer all look different
    assert not np.array_equal(frames[0], frames[-2])
    assert not np.array_equal(frames[-2], frames[-1])


def test_rgb_frame_shows_symbol_and_outcome() -> None:
    env = DelayedCueRecallEnv(n_cues=4, delay=1, render_mode="rgb_array")
    centres = {}
    for seed in range(40):
        env.reset(seed=seed)
        centres.setdefault(env.cue, env.render()[32, 32].tolist())
    assert len(centres) == 4
    assert len({tuple(c) for c in centres.values()}) == 4  # each cue has its own colour

    env.reset(seed=0)
    env.step(0)
    env.step(0)
    env.step(env.cue)
    right = env.render()
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    env.step((env.cue + 1) % 4)
    wrong = env.render()
    # border pixel just outside the panel: green when correct, red when wrong
    assert right[32, 5, 1] > right[32, 5, 0]
    assert wrong[32, 5, 0] > wrong[32, 5, 1]


def test_start_direction_curriculum_changes_training_starts_only():
    """``train_wrappers`` apply to the training envs (``make_vec_env``), not to evaluation
    (``make_env``); ``start_direction`` turns the agent at the start of a seeded share of the
    episodes, the same share for the same seeds."""
    from mnm_rl.env_factory import make_env, make_vec_env
    from mnm_rl.envs.minigrid import StartDirection
    from mnm_rl.presets import load_env_preset

    spec = load_env_preset("MiniGrid-MemoryS9-Curriculum").spec()
    plain = load_env_preset("MiniGrid-MemoryS9").spec()
    assert spec.eval_seeds == plain.eval_seeds and spec.wrappers == plain.wrappers

    def directions(env, seeds):
        return [int(env.reset(seed=s)[0]["direction"]) for s in seeds]

    seeds = range(200)
    evaluation = directions(make_env(spec), seeds)
    assert evaluation == directions(make_env(plain), seeds) == [0] * 200
    training = make_vec_env(spec, n_envs=1).envs[0]
    turned = directions(training, seeds)
    assert set(turned) == {0, 2} and 70 < turned.count(2) < 130  # about half, of 200
    assert directions(training, seeds) == turned  # seeded
    always = StartDirection(gym.make("MiniGrid-MemoryS9-v0", agent_view_size=3), 2, 1.0)
    obs, _ = always.reset(seed=0)
    assert always.unwrapped.agent_dir == 2 and obs["direction"] == 2
    never = StartDirection(gym.make("MiniGrid-MemoryS9-v0", agent_view_size=3), 2, 0.0)
    assert never.reset(seed=0)[0]["direction"] == 0
    with pytest.raises(ValueError, match="direction must be"):
        StartDirection(gym.make("MiniGrid-MemoryS9-v0"), 5, 0.5)
    with pytest.raises(ValueError, match="probability must be"):
        StartDirection(gym.make("MiniGrid-MemoryS9-v0"), 2, 1.5)


def test_min_start_column_moves_training_starts_away_from_the_cue():
    """``MiniGrid-MemoryS9-FarStart`` trains without the starts in column 1 (cue in view) and
    evaluates on plain S9; the redrawn starts are uniform over columns 2-6 and seeded."""
    from collections import Counter

    from mnm_rl.env_factory import make_env, make_vec_env
    from mnm_rl.envs.minigrid import MinStartColumn
    from mnm_rl.presets import load_env_preset

    spec = load_env_preset("MiniGrid-MemoryS9-FarStart").spec()
    plain = load_env_preset("MiniGrid-MemoryS9").spec()
    assert spec.eval_seeds == plain.eval_seeds and spec.wrappers == plain.wrappers

    def columns(env, seeds):
        out = []
        for s in seeds:
            env.reset(seed=s)
            out.append(int(env.unwrapped.agent_pos[0]))
        return out

    seeds = range(600)
    evaluation = columns(make_env(spec), seeds)
    assert evaluation == columns(make_env(plain), seeds) and set(evaluation) == set(range(1, 7))
    training_env = make_vec_env(spec, n_envs=1).envs[0]
    training = columns(training_env, seeds)
    counts = Counter(training)
    assert set(counts) == set(range(2, 7)) and min(counts.values()) > 80  # ~120 each of 600
    assert columns(training_env, seeds) == training  # seeded
    # starts east of column 1 are kept as MemoryEnv drew them
    assert all(t == e for t, e in zip(training, evaluation, strict=True) if e >= 2)
    obs, _ = training_env.reset(seed=0)
    grid = training_env.unwrapped
    assert obs["direction"] == 0 and grid.grid.get(*grid.agent_pos) is None

    small = MinStartColumn(gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3), 4)
    assert set(columns(small, range(50))) == {4}  # S7's last start column is 4
    with pytest.raises(ValueError, match="beyond the corridor"):
        columns(MinStartColumn(gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3), 5), range(50))
    with pytest.raises(ValueError, match="at most 4"):  # caught when built, before any reset
        MinStartColumn(gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3), 5)
    with pytest.raises(ValueError, match="at least 1"):
        MinStartColumn(gym.make("MiniGrid-MemoryS7-v0"), 0)
    with pytest.raises(ValueError, match="probability must be"):
        MinStartColumn(gym.make("MiniGrid-MemoryS7-v0"), 2, 1.5)


def test_min_start_column_probability_keeps_a_share_of_the_starts():
    """``probability`` moves only that share of the column-1 starts; the presets' order applies
    ``start_direction`` after it, so some kept column-1 starts face east, next to the cue."""
    from collections import Counter

    from mnm_rl.env_factory import make_vec_env
    from mnm_rl.envs.minigrid import MinStartColumn
    from mnm_rl.presets import load_env_preset

    def starts(env, seeds):
        out = Counter()
        for s in seeds:
            obs, _ = env.reset(seed=s)
            out[(int(env.unwrapped.agent_pos[0]), int(obs["direction"]))] += 1
        return out

    seeds = range(1200)
    plain = gym.make("MiniGrid-MemoryS9-v0", agent_view_size=3)
    in_column_1 = sum(n for (x, _), n in starts(plain, seeds).items() if x == 1)  # ~200
    kept = starts(
        MinStartColumn(gym.make("MiniGrid-MemoryS9-v0", agent_view_size=3), 2, 0.8), seeds
    )
    kept_1 = sum(n for (x, _), n in kept.items() if x == 1)
    assert 0.1 * in_column_1 < kept_1 < 0.3 * in_column_1  # about a fifth stays
    none = starts(
        MinStartColumn(gym.make("MiniGrid-MemoryS9-v0", agent_view_size=3), 2, 0.0), seeds
    )
    assert none == starts(plain, seeds)

    spec = load_env_preset("MiniGrid-MemoryS9-MostlyFarStart-Curriculum").spec()
    training = starts(make_vec_env(spec, n_envs=1).envs[0], seeds)
    assert training[(1, 0)] > 0 and training[(1, 2)] > 0  # column 1 facing east and west
    assert sum(n for (x, _), n in training.items() if x == 1) < 0.3 * in_column_1


def test_train_wrappers_until_switches_the_curriculum_off_between_episodes():
    """With ``train_wrappers_until`` the training envs get a gate: ``end_train_wrappers`` sends
    every later episode to the plain task (the same starts as evaluation for the same seeds),
    and an episode under way finishes first. Without it there is no gate to switch."""
    from mnm_rl.config import EnvSpec
    from mnm_rl.env_factory import end_train_wrappers, make_env, make_vec_env
    from mnm_rl.presets import load_env_preset

    spec = load_env_preset("MiniGrid-MemoryS9-FarStart-Curriculum-800k").spec()
    assert spec.train_wrappers_until == 800_000
    plain = make_env(load_env_preset("MiniGrid-MemoryS9").spec())

    def starts(env, seeds):
        out = []
        for s in seeds:
            obs, _ = env.reset(seed=s)
            out.append((int(env.unwrapped.agent_pos[0]), int(obs["direction"])))
        return out

    seeds = range(300)
    vec_env = make_vec_env(spec, n_envs=2)
    training = starts(vec_env.envs[0], seeds)
    assert min(x for x, _ in training) == 2 and {d for _, d in training} == {0, 2}
    vec_env.envs[1].reset(seed=7)
    assert end_train_wrappers(vec_env) == 2
    vec_env.envs[1].step(2)  # the episode under way goes on
    assert starts(vec_env.envs[0], seeds) == starts(plain, seeds)
    assert {x for x, _ in starts(vec_env.envs[1], seeds)} == set(range(1, 7))
    # no until, no gate: the curriculum stays for the whole run
    always = make_vec_env(load_env_preset("MiniGrid-MemoryS9-FarStart-Curriculum").spec(), 1)
    assert end_train_wrappers(always) == 0
    assert min(x for x, _ in starts(always.envs[0], seeds)) == 2
    with pytest.raises(ValueError, match="no train_wrappers"):
        EnvSpec(name="x", id="MiniGrid-MemoryS9-v0", train_wrappers_until=10)


class _StubModel:
    """What :class:`mnm_rl.training.EndTrainWrappers` uses of a model: its env, its step count,
    its logger and the saved switch step."""

    def __init__(self, vec_env, ended_at: int | None = None):
        from stable_baselines3.common.logger import Logger

        self.vec_env, self.num_timesteps, self.train_wrappers_ended_at = vec_env, 0, ended_at
        self.logger = Logger(folder=None, output_formats=[])

    def get_env(self):
        return self.vec_env


def _gates(vec_env) -> list[bool]:
    from mnm_rl.wrappers import TrainWrapperGate

    out = []
    for env in vec_env.envs:
        while not isinstance(env, TrainWrapperGate):
            env = env.env
        out.append(env.enabled)
    return out


def test_train_wrappers_end_once_the_training_episodes_succeed():
    """``train_wrappers_until_success``: the curriculum ends once the share of successes among
    the last ``train_wrappers_window`` finished training episodes reaches the threshold (not
    before the window is full), at ``until`` steps if that comes first, and at once for a model
    saved after the switch."""
    from mnm_rl.config import EnvSpec
    from mnm_rl.env_factory import make_vec_env
    from mnm_rl.presets import load_env_preset
    from mnm_rl.training import EndTrainWrappers

    spec = load_env_preset("MiniGrid-MemoryS9-WestStart-Curriculum-Solved").spec()
    assert (spec.train_wrappers_until_success, spec.train_wrappers_window) == (0.9, 100)
    model = _StubModel(make_vec_env(spec, n_envs=2))
    callback = EndTrainWrappers(until_success=0.5, window=4)
    callback.init_callback(model)
    callback.on_training_start({}, {})
    # env 0 finishes an episode at every step: success, then failures, then successes
    for step, success in enumerate([1, 0, 0, 0, 1, 1], start=1):
        model.num_timesteps = 2 * step
        callback.update_locals(
            {"dones": np.array([True, False]), "rewards": np.array([success, 0.0])}
        )
        callback.on_step()
        # window [1,0,0] not full; [1,0,0,0] and [0,0,0,1] at 1/4; [0,0,1,1] at 2/4: switch
        assert _gates(model.vec_env) == ([False, False] if step == 6 else [True, True]), step
    assert model.train_wrappers_ended_at == 12
    # by env steps, whichever comes first
    model = _StubModel(make_vec_env(spec, n_envs=1))
    callback = EndTrainWrappers(until=10, until_success=0.9, window=100)
    callback.init_callback(model)
    callback.on_training_start({}, {})
    for steps, enabled in [(9, True), (10, False)]:
        model.num_timesteps = steps
        callback.update_locals({"dones": np.array([False]), "rewards": np.array([0.0])})
        callback.on_step()
        assert _gates(model.vec_env) == [enabled]
    assert model.train_wrappers_ended_at == 10
    # a model saved after the switch (a resumed run) trains without the curriculum from the start
    model = _StubModel(make_vec_env(spec, n_envs=1), ended_at=5000)
    callback = EndTrainWrappers(until_success=0.9)
    callback.init_callback(model)
    callback.on_training_start({}, {})
    assert _gates(model.vec_env) == [False]
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="train_wrappers_until_success"):
            EnvSpec(
                name="x",
                id="MiniGrid-MemoryS9-v0",
                train_wrappers=spec.train_wrappers,
                train_wrappers_until_success=bad,
            )
    with pytest.raises(ValueError, match="train_wrappers_until_success is set but there are no"):
        EnvSpec(name="x", id="MiniGrid-MemoryS9-v0", train_wrappers_until_success=0.9)
