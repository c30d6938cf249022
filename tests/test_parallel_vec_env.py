"""``ParallelVecEnv``: the same episodes as ``DummyVecEnv``, every ``VecEnv`` call across the
groups, worker failures raised as ``EnvWorkerError`` (never a hang), and training with it."""

from __future__ import annotations

import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from mnm_rl.parallel_vec_env import INFO_BYTES, EnvWorkerError, ParallelVecEnv


def minigrid_env() -> gym.Env:
    """MiniGrid's Memory task with our symbolic Dict observation, monitored (episode infos)."""
    import minigrid  # noqa: F401  (registers the MiniGrid ids)

    from mnm_rl.envs.minigrid import SymbolicMiniGrid

    return Monitor(SymbolicMiniGrid(gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3)))


def cartpole_env() -> gym.Env:
    return gym.make("CartPole-v1")


class FailingEnv(gym.Env):
    """Raises at its ``fail_at``-th step; its info at every step carries ``info_size`` bytes."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, fail_at: int | None = None, info_size: int = 0):
        self.fail_at, self.info_size, self.steps = fail_at, info_size, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {"options": options}

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at:
            raise ValueError(f"env broke at step {self.steps}")
        obs = np.full(2, action, np.float32)
        info = {"blob": b"x" * self.info_size, "step": self.steps}
        return obs, float(action), self.steps % 5 == 0, False, info


class TupleObsEnv(FailingEnv):
    """A Tuple observation: a Box and a Discrete."""

    observation_space = gym.spaces.Tuple(
        (gym.spaces.Box(-1.0, 1.0, (2,), np.float32), gym.spaces.Discrete(3))
    )

    def reset(self, *, seed=None, options=None):
        box, info = super().reset(seed=seed, options=options)
        return (box, int(self.np_random.integers(3))), info

    def step(self, action):
        box, reward, terminated, truncated, info = super().step(action)
        return (box, self.steps % 3), reward, terminated, truncated, info


def tuple_env() -> gym.Env:
    return TupleObsEnv()


def failing_env(fail_at: int | None = None, info_size: int = 0) -> gym.Env:
    return FailingEnv(fail_at, info_size)


def broken_constructor() -> gym.Env:
    raise RuntimeError("cannot build this env")


def assert_same(a, b) -> None:
    """Equal observations or infos, recursively, dtypes included; Monitor's episode wall time
    ``t`` aside."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            if key != "t":
                assert_same(a[key], b[key])
    elif isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize(
    ("make", "n_envs", "n_workers", "steps", "spin"),
    [
        (minigrid_env, 5, 2, 400, None),
        (cartpole_env, 4, 1, 300, None),
        (tuple_env, 3, 1, 50, None),
        (cartpole_env, 4, 1, 300, False),
    ],
    ids=["minigrid-dict-obs", "cartpole-box-obs", "tuple-obs", "pipes-only"],
)
def test_same_episodes_as_dummy_vec_env(
    make, n_envs: int, n_workers: int, steps: int, spin: bool | None
):
    """Same seeds and actions: the same observations, rewards, dones and infos (terminal
    observations and episode statistics included) as one ``DummyVecEnv``, through auto-resets
    and a second seeded reset; also when the processes wait on pipes only (other processors
    than x86)."""
    dummy = DummyVecEnv([make] * n_envs)
    with ParallelVecEnv([make] * n_envs, n_workers=n_workers, spin=spin) as parallel:
        assert [len(g) for g in parallel.groups] == {5: [1, 2, 2], 4: [2, 2], 3: [1, 2]}[n_envs]
        assert parallel.num_envs == n_envs and parallel.render_mode is None
        rng = np.random.default_rng(0)
        episodes = 0
        for seed in (3, 11):
            dummy.seed(seed)
            parallel.seed(seed)
            assert_same(dummy.reset(), parallel.reset())
            assert_same(dummy.reset_infos, parallel.reset_infos)
            for _ in range(steps):
                actions = rng.integers(0, dummy.action_space.n, n_envs)
                expected, got = dummy.step(actions), parallel.step(actions)
                assert_same(expected[0], got[0])
                np.testing.assert_array_equal(expected[1], got[1])
                np.testing.assert_array_equal(expected[2], got[2])
                assert got[1].dtype == np.float32 and got[2].dtype == bool
                assert_same(expected[3], got[3])
                episodes += int(got[2].sum())
        assert episodes >= n_envs  # auto-resets in every group were compared
    dummy.close()


def test_calls_reach_every_group_in_index_order():
    """``get_attr``, ``set_attr``, ``env_method`` and ``env_is_wrapped`` reach the envs of every
    group, with results in the order of ``indices``; reset options go to the
    right envs."""
    with ParallelVecEnv([minigrid_env] * 5, n_workers=2) as env:
        assert env.get_attr("spec")[4].id == "MiniGrid-MemoryS7-v0"
        env.set_attr("marker", 7, indices=[0, 4])
        env.set_attr("marker", 9, indices=2)
        assert env.get_attr("marker", indices=[4, 2, 0]) == [7, 9, 7]
        assert env.env_method("get_wrapper_attr", "agent_view_size") == [3] * 5
        assert env.env_is_wrapped(Monitor) == [True] * 5
        assert env.env_is_wrapped(gym.wrappers.TimeLimit, indices=[3]) == [False]
        assert env.env_method("get_wrapper_attr", "marker", indices=[4, 0]) == [7, 7]
        with pytest.warns(UserWarning, match="render mode is None"):  # DummyVecEnv's warning
            assert env.get_images() == [None] * 5

    with ParallelVecEnv([failing_env] * 3, n_workers=1) as env:
        env.set_options([{"n": i} for i in range(3)])
        env.reset()
        assert [info["options"] for info in env.reset_infos] == [{"n": 0}, {"n": 1}, {"n": 2}]
        env.reset()  # options are used once, as in DummyVecEnv
        assert [info["options"] for info in env.reset_infos] == [None] * 3


def test_large_infos_come_through_the_pipe():
    """Infos bigger than the shared buffer still arrive whole."""
    size = 2 * INFO_BYTES
    with ParallelVecEnv([lambda: failing_env(info_size=size)] * 2, n_workers=1) as env:
        env.reset()
        infos = env.step(np.array([1, 0]))[3]
    assert [len(info["blob"]) for info in infos] == [size, size]


def test_an_env_error_in_a_worker_is_raised_with_its_traceback():
    env = ParallelVecEnv([failing_env, lambda: failing_env(fail_at=3)], n_workers=1)
    env.reset()
    env.step(np.array([0, 1]))
    env.step(np.array([0, 1]))
    with pytest.raises(EnvWorkerError, match=r"(?s)envs 1-1 failed.*env broke at step 3"):
        env.step(np.array([0, 1]))
    env.close()
    env.close()  # idempotent


def test_after_an_error_here_the_workers_stay_in_step():
    """An env of this process's group fails while the worker steps its group: the worker's
    result (infos sent through the pipe, here) is still taken, so the next step reads that
    step's results, not the abandoned one's."""
    big = 2 * INFO_BYTES
    fns = [lambda: failing_env(fail_at=2), lambda: failing_env(info_size=big)]
    with ParallelVecEnv(fns, n_workers=1) as env:
        env.reset()
        env.step(np.array([0, 0]))
        with pytest.raises(ValueError, match="env broke at step 2"):
            env.step(np.array([0, 0]))
        obs, _, _, infos = env.step(np.array([1, 1]))
        assert infos[1]["step"] == 3 and len(infos[1]["blob"]) == big
        np.testing.assert_array_equal(obs, [[1, 1], [1, 1]])


def test_a_dead_worker_is_an_error_not_a_hang():
    env = ParallelVecEnv([failing_env] * 2, n_workers=1)
    env.reset()
    os.kill(env._workers[0].process.pid, signal.SIGKILL)
    env._workers[0].process.join(5)
    start = time.perf_counter()
    with pytest.raises(EnvWorkerError, match="exited"):
        env.step(np.array([0, 1]))
    assert time.perf_counter() - start < 5
    with pytest.raises(EnvWorkerError, match="exited"):  # again, not a broken pipe
        env.step(np.array([0, 1]))
    env.close()


def test_bad_arguments_and_broken_envs_are_precise_errors():
    with pytest.raises(ValueError, match="n_workers must be between 1 and"):
        ParallelVecEnv([failing_env] * 2, n_workers=2)
    with pytest.raises(ValueError, match="n_workers must be between 1 and"):
        ParallelVecEnv([failing_env] * 2, n_workers=0)
    with pytest.raises(EnvWorkerError, match="(?s)could not make its envs.*cannot build this env"):
        ParallelVecEnv([failing_env, broken_constructor], n_workers=1)
    with pytest.raises(EnvWorkerError, match="spaces"):
        ParallelVecEnv([failing_env, cartpole_env], n_workers=1)
    with ParallelVecEnv([failing_env] * 2, n_workers=1) as env:
        env.reset()
        with pytest.raises(TypeError):  # float actions cannot go into a Discrete space's int64
            env.step(np.array([0.5, 1.5]))


def test_training_on_it_matches_training_on_dummy_vec_env():
    """The same seed gives the same trained parameters with the envs in one process or two."""
    import torch

    from mnm_rl.agent import MemoryPPO

    def train(vec_env) -> dict[str, torch.Tensor]:
        vec_env.seed(0)
        model = MemoryPPO(
            env=vec_env,
            core="lstm",
            n_steps=32,
            batch_size=64,
            n_epochs=2,
            seq_len=8,
            seed=0,
            policy_kwargs=dict(core_kwargs=dict(hidden_size=16), features_dim=16),
        )
        model.learn(256)
        vec_env.close()
        return {k: v.clone() for k, v in model.policy.state_dict().items()}

    one = train(DummyVecEnv([minigrid_env] * 4))
    two = train(ParallelVecEnv([minigrid_env] * 4, n_workers=1))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_make_vec_env_with_workers_and_the_end_of_a_curriculum():
    """``make_vec_env(..., env_workers=1)`` steps the preset's envs in two processes, and
    ``end_train_wrappers`` switches off the curriculum gate of the envs in both."""
    from mnm_rl.config import ConfigError
    from mnm_rl.env_factory import end_train_wrappers, make_vec_env
    from mnm_rl.presets import load_env_preset

    spec = load_env_preset("MiniGrid-MemoryS9-FarStart-Curriculum-800k").spec()
    with make_vec_env(spec, n_envs=3, seed=5, env_workers=1) as env:
        assert isinstance(env, ParallelVecEnv) and [len(g) for g in env.groups] == [1, 2]
        dummy = make_vec_env(spec, n_envs=3, seed=5)
        assert_same(dummy.reset(), env.reset())
        assert env.get_attr("enabled") == [True] * 3  # the gate's flag, in each process
        assert end_train_wrappers(env) == 3
        assert env.get_attr("enabled") == [False] * 3
    plain = load_env_preset("MiniGrid-MemoryS9").spec()
    with make_vec_env(plain, n_envs=2, env_workers=1) as env:
        assert end_train_wrappers(env) == 0
    with pytest.raises(ConfigError, match=r"env_workers must be in \[0, 1\] for 2 envs"):
        make_vec_env(plain, n_envs=2, env_workers=2)


def test_ctrl_c_with_env_workers_saves_a_checkpoint_and_leaves_no_process(tmp_path):
    """Ctrl-C in a terminal signals the whole process group, workers included: the workers
    ignore it, training saves its checkpoint and exits 130, and no worker is left running."""
    import re
    import subprocess

    from test_cli import COMMAND, TINY_AGENT, sets

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*COMMAND, "train", "--env", "DelayedCueRecall", "--timesteps", "100000", *TINY_AGENT,
         *sets("train.checkpoint_every=256", "train.eval_episodes=0", "train.env_workers=1"),
         "--run-dir", str(run)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not list((run / "checkpoints").glob("step_*.zip")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert re.search(r"interrupted at \d+ env steps; saved \S+", err), err
    deadline = time.monotonic() + 10
    while True:  # the group is empty once the workers have gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the run is still alive"
        time.sleep(0.1)


def test_the_benchmarks_take_parallel_configs(capsys):
    """``benchmarks/vec_env_step.py`` runs its five vec envs and ends with its JSON line; the
    ``/par`` suffix of ``throughput.py`` names one env worker and leaves the rest of the
    config to the other suffixes."""
    import json

    from benchmark_scripts import load_script

    out = load_script("vec_env_step").main(
        ["--env", "CartPole-v1", "--n-envs", "2", "--steps", "20", "--rounds", "1"]
    )
    assert set(out["sps"]) == {"dummy", "lean", "parallel", "parallel/pipes", "subproc"}
    assert out["ratio_to_dummy"]["dummy"] == 1.0 and all(v > 0 for v in out["sps"].values())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out

    throughput = load_script("throughput")
    assert throughput.split_parallel("lstm/par") == ("lstm", 1)
    assert throughput.split_parallel("ceiling") == ("ceiling", 0)
    name, workers = throughput.split_parallel("mnm-p:2x2/k2/par")
    assert workers == 1 and throughput.split_config(name) == (
        "mnm-p",
        {"n_heads": 2, "n_layers": 2},
    )


def test_cli_help_names_env_workers():
    from mnm_rl.cli import build_parser

    # argparse wraps the help at the terminal's width, anywhere between words
    assert "--set train.env_workers=N" in " ".join(build_parser().format_help().split())
