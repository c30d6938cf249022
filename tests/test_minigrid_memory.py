"""MiniGrid-Memory's grid from a kept wall plan (``mnm_rl.envs.minigrid_memory``) against
MiniGrid's own ``MemoryEnv._gen_grid``."""

from __future__ import annotations

import copy
import json
import pickle

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
import pytest
from minigrid.core.actions import Actions
from minigrid.core.world_object import Ball, Key, Wall
from minigrid.envs import MemoryEnv
from minigrid_training import assert_same_parameters, trained_parameters

from mnm_rl.env_factory import make_env, resolve_env
from mnm_rl.envs.minigrid_memory import (
    FAST_STEP_VARIABLE,
    KEPT_VIEWS_VARIABLE,
    SWITCH_VARIABLE,
    FastMemoryGrid,
    FastMemoryStep,
    KeptViews,
    memory_walls,
    use_fast_memory_grid,
)
from mnm_rl.envs.minigrid_view import FastGenObs, use_fast_view

MEMORY_IDS = [
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-MemoryS9-v0",
    "MiniGrid-MemoryS13-v0",
    "MiniGrid-MemoryS13Random-v0",
    "MiniGrid-MemoryS17Random-v0",
]


def episode_state(base: MemoryEnv) -> tuple:
    """Everything a MemoryEnv reset lays out, as plain values: every cell's encoding, the
    start, the targets, the mission and the generator's state."""
    return (
        base.grid.encode().tolist(),
        tuple(int(v) for v in base.agent_pos),
        type(base.agent_pos),
        base.agent_dir,
        base.success_pos,
        base.failure_pos,
        base.mission,
        base.np_random.bit_generator.state,
    )


@pytest.mark.parametrize("env_id", MEMORY_IDS)
def test_resets_lay_out_the_same_grids_as_minigrid(env_id: str) -> None:
    fast, plain = (gym.make(env_id, agent_view_size=3) for _ in range(2))
    assert use_fast_memory_grid(fast)
    for seed in range(150):
        observations = [env.reset(seed=seed)[0] for env in (fast, plain)]
        np.testing.assert_array_equal(observations[0]["image"], observations[1]["image"])
        assert episode_state(fast.unwrapped) == episode_state(plain.unwrapped)
        # an unseeded reset continues the generator's stream: the same draws on both sides
        for env in (fast, plain):
            env.reset()
        assert episode_state(fast.unwrapped) == episode_state(plain.unwrapped)
    if env_id.endswith("Random-v0"):  # hallways of several lengths, one plan each
        assert len(fast.unwrapped._gen_grid.plans) > 3


def test_installed_grid_gives_the_same_episodes() -> None:
    fast, plain = (gym.make("MiniGrid-MemoryS13Random-v0", agent_view_size=3) for _ in range(2))
    assert use_fast_memory_grid(fast)
    assert isinstance(fast.unwrapped._gen_grid, FastMemoryGrid)
    assert use_fast_memory_grid(fast)  # twice is harmless
    rng = np.random.default_rng(0)
    for env in (fast, plain):
        env.reset(seed=5)
    ends = {"success": 0, "failure": 0, "truncated": 0}
    for _ in range(3000):
        action = walker_action(plain.unwrapped, rng)
        results = [env.step(action) for env in (fast, plain)]
        np.testing.assert_array_equal(results[0][0]["image"], results[1][0]["image"])
        assert results[0][1:4] == results[1][1:4]
        _, reward, terminated, truncated, _ = results[1]
        if terminated or truncated:
            ends["truncated" if truncated else "success" if reward > 0 else "failure"] += 1
            for env in (fast, plain):
                env.reset()
            assert episode_state(fast.unwrapped) == episode_state(plain.unwrapped)
    assert ends["success"] > 10 and ends["failure"] > 10


def test_each_episode_has_new_objects_and_the_env_plan_keeps_its_walls() -> None:
    env = gym.make("MiniGrid-MemoryS7-v0")
    use_fast_memory_grid(env)
    base = env.unwrapped
    env.reset(seed=0)
    first_grid, first_cells = base.grid, list(base.grid.grid)
    env.reset()
    assert base.grid is not first_grid and base.grid.grid is not first_grid.grid
    objects = [(i, c) for i, c in enumerate(base.grid.grid) if isinstance(c, Key | Ball)]
    assert len(objects) == 3
    for i, cell in objects:
        assert cell is not first_cells[i]
    walls = {id(c) for c in base.grid.grid if isinstance(c, Wall)}
    assert walls == {id(c) for c in first_cells if isinstance(c, Wall)}
    # the plan itself holds walls only, and an episode's objects do not get into it
    (plan,) = base._gen_grid.plans.values()
    assert all(c is None or isinstance(c, Wall) for c in plan)


def walker_action(base: MemoryEnv, rng: np.random.Generator) -> int:
    """East to the split, then north or south onto an object, mixed with random moves: episodes
    that end at both objects, and agents that stand in many cells facing every way."""
    at_split = int(base.agent_pos[0]) == base.success_pos[0]
    if rng.random() < 0.3:
        return int(rng.integers(3))
    if at_split and base.agent_dir == 0:
        return int(rng.integers(2))  # turn north or south
    return 2


def fast_env(
    env_id: str, view: int, kept_views: bool | None = None, fast_step: bool | None = None
) -> gym.Env:
    env = gym.make(env_id, agent_view_size=view)
    assert use_fast_view(env)
    assert use_fast_memory_grid(env, kept_views, fast_step)
    return env


def agent_state(base: MemoryEnv) -> tuple:
    """What a step changes, as plain values."""
    return (tuple(int(v) for v in base.agent_pos), base.agent_dir, base.step_count,
            base.carrying)  # fmt: skip


@pytest.mark.parametrize("env_id", ["MiniGrid-MemoryS7-v0", "MiniGrid-MemoryS13Random-v0"])
def test_fast_step_steps_as_minigrid(env_id: str) -> None:
    """Every action (as a Python int, a numpy integer and MiniGrid's enum) over episodes that
    end in success, failure and truncation: the same observations, rewards, ends and agent."""
    fast = fast_env(env_id, 3)
    plain = gym.make(env_id, agent_view_size=3)  # MiniGrid's own step, grid and view code
    assert isinstance(fast.unwrapped.step, FastMemoryStep)
    assert "step" not in plain.unwrapped.__dict__
    envs = (fast, plain)
    for env in envs:
        env.unwrapped.max_steps = 80  # some episodes end by truncation
        env.reset(seed=2)
    rng = np.random.default_rng(1)
    kinds = (int, np.int64, Actions)
    ends = {"success": 0, "failure": 0, "truncated": 0}
    for i in range(6000):
        if rng.random() < 0.5:
            action = walker_action(plain.unwrapped, rng)
        else:
            action = int(rng.integers(7))  # every action, pickup, drop, toggle and done too
        action = kinds[i % 3](action)
        results = [env.step(action) for env in envs]
        np.testing.assert_array_equal(results[0][0]["image"], results[1][0]["image"])
        assert results[0][0]["direction"] == results[1][0]["direction"]
        assert results[0][1:] == results[1][1:]
        assert type(results[0][1]) is type(results[1][1])  # an int 0, or a float reward
        assert agent_state(fast.unwrapped) == agent_state(plain.unwrapped)
        _, reward, terminated, truncated, _ = results[1]
        if terminated or truncated:
            ends["truncated" if truncated else "success" if reward > 0 else "failure"] += 1
            for env in envs:
                env.reset()
    assert min(ends.values()) >= 3, ends


def test_fast_step_leaves_the_rest_to_minigrid() -> None:
    fast = fast_env("MiniGrid-MemoryS7-v0", 3)
    plain = gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3)
    base, plain_base = fast.unwrapped, plain.unwrapped
    # an unknown action: MiniGrid's error, after its step count went up as MiniGrid's does
    for env in (base, plain_base):
        env.reset(seed=0)
        with pytest.raises(ValueError, match="Unknown action"):
            env.step(7)
    assert base.step_count == plain_base.step_count == 1
    for action in (2.0, True):  # not an int: MiniGrid's comparisons decide
        assert base.step(action)[1:] == plain_base.step(action)[1:]
        assert agent_state(base) == agent_state(plain_base)
    # an agent that carries something (not in MemoryEnv's own episodes): MiniGrid's step, which
    # drops it ahead
    for env in (base, plain_base):
        env.reset(seed=0)
        env.agent_dir = 0  # east, along the corridor: the cell ahead is empty
        env.carrying = Ball("red")
        env.step(4)
        assert env.carrying is None
    assert base.grid.encode().tolist() == plain_base.grid.encode().tolist()
    # a direction out of range: MiniGrid's assertion
    base.agent_dir = 4
    with pytest.raises(AssertionError, match="Invalid agent_dir"):
        base.step(0)


def test_fast_step_toggles_the_object_ahead() -> None:
    env = fast_env("MiniGrid-MemoryS7-v0", 3)
    base = env.unwrapped
    env.reset(seed=0)
    calls = []

    class Recorder(Key):
        def toggle(self, env, pos):
            calls.append((env, pos.tolist(), type(pos)))
            return False

    x, y = (int(v) for v in base.agent_pos)
    base.agent_dir = 0
    base.grid.set(x + 1, y, Recorder("green"))
    env.step(5)  # pickup: MemoryEnv makes it toggle
    env.step(3)
    assert calls == [(base, [x + 1, y], np.ndarray)] * 2
    assert base.step_count == 2 and agent_state(base)[0] == (x, y)


def test_fast_step_not_installed_where_it_does_not_apply(monkeypatch) -> None:
    class OwnStep(MemoryEnv):
        def step(self, action):
            return super().step(action)

    own = OwnStep(size=7)
    assert use_fast_memory_grid(own)
    assert "step" not in own.__dict__
    assert "step" not in fast_env("MiniGrid-MemoryS7-v0", 3, fast_step=False).unwrapped.__dict__
    monkeypatch.setenv(FAST_STEP_VARIABLE, "0")
    assert "step" not in fast_env("MiniGrid-MemoryS7-v0", 3).unwrapped.__dict__
    assert isinstance(fast_env("MiniGrid-MemoryS7-v0", 3, fast_step=True).unwrapped.step,
                      FastMemoryStep)  # fmt: skip


@pytest.mark.parametrize("env_id", ["MiniGrid-MemoryS7-v0", "MiniGrid-MemoryS13Random-v0"])
@pytest.mark.parametrize("view", [3, 7])
def test_kept_views_are_the_views_minigrid_computes(env_id: str, view: int, monkeypatch) -> None:
    monkeypatch.setattr(KeptViews, "images", {})  # none kept by earlier tests
    kept, computed = fast_env(env_id, view), fast_env(env_id, view, kept_views=False)
    plain = gym.make(env_id, agent_view_size=view)  # MiniGrid's own grid and view code
    assert isinstance(kept.unwrapped.gen_obs, KeptViews)
    assert type(computed.unwrapped.gen_obs) is FastGenObs
    envs = (kept, computed, plain)
    observations = [env.reset(seed=1)[0] for env in envs]
    rng = np.random.default_rng(0)
    episodes = 0
    for _ in range(4000):
        for obs in observations[1:]:
            np.testing.assert_array_equal(observations[0]["image"], obs["image"])
            assert observations[0]["direction"] == obs["direction"]
        action = walker_action(plain.unwrapped, rng)
        results = [env.step(action) for env in envs]
        assert results[0][1:4] == results[1][1:4] == results[2][1:4]
        observations = [r[0] for r in results]
        if results[0][2] or results[0][3]:
            observations = [env.reset()[0] for env in envs]
            episodes += 1
    assert episodes > 40
    # views were kept, and most were met again (fewer kept than the 4000 steps' views)
    assert 0 < len(KeptViews.images) < 2000


def test_a_kept_view_is_a_copy_the_caller_may_change() -> None:
    env = fast_env("MiniGrid-MemoryS7-v0", 3)
    env.reset(seed=0)
    first = env.unwrapped.gen_obs()["image"]
    first[:] = 99
    again = env.unwrapped.gen_obs()["image"]
    assert again is not first and again.max() < 99
    np.testing.assert_array_equal(again, env.unwrapped.gen_obs()["image"])


def test_views_are_computed_where_the_grid_is_not_the_episodes_own() -> None:
    env = fast_env("MiniGrid-MemoryS7-v0", 3)
    env.reset(seed=0)
    base = env.unwrapped
    base.agent_dir = 0  # facing east along the corridor: the cell ahead is in view
    before = base.gen_obs()["image"].copy()
    # another grid in the env's place (a copy with a wall ahead of the agent): computed
    grid = copy.deepcopy(base.grid)
    x, y = (int(v) for v in base.agent_pos)
    grid.set(x + 1, y, Wall())
    base.grid = grid
    after = base.gen_obs()["image"]
    np.testing.assert_array_equal(after, MemoryEnv.gen_obs(base)["image"])
    assert not np.array_equal(after, before)
    # the agent carrying something: computed (it shows in the agent's own cell)
    env.reset(seed=0)
    base.carrying = Key("green")
    np.testing.assert_array_equal(base.gen_obs()["image"], MemoryEnv.gen_obs(base)["image"])


def test_views_are_not_kept_where_they_may_change(monkeypatch) -> None:
    class OwnStep(MemoryEnv):
        def step(self, action):
            return super().step(action)

    own = OwnStep(size=7)
    assert use_fast_view(own) and use_fast_memory_grid(own)
    assert type(own.gen_obs) is FastGenObs
    without_fast_view = gym.make("MiniGrid-MemoryS7-v0")
    assert use_fast_memory_grid(without_fast_view)
    assert "gen_obs" not in without_fast_view.unwrapped.__dict__
    monkeypatch.setenv(KEPT_VIEWS_VARIABLE, "0")
    switched_off = fast_env("MiniGrid-MemoryS7-v0", 3)
    assert type(switched_off.unwrapped.gen_obs) is FastGenObs
    assert isinstance(fast_env("MiniGrid-MemoryS7-v0", 3, kept_views=True).unwrapped.gen_obs,
                      KeptViews)  # fmt: skip
    assert use_fast_view(switched_off)  # the fast view's install sees its own


@pytest.mark.parametrize("size,hallway_end", [(7, 4), (9, 6), (13, 4), (13, 10), (17, 7)])
def test_wall_plan_is_minigrid_walls(size: int, hallway_end: int) -> None:
    """The plan's walls are where MiniGrid's code puts them, for any hallway length."""
    env = MemoryEnv(size=size, random_length=True)
    env.reset(seed=0)
    # MiniGrid's draws made to give this hallway: the first draw is the hallway's end
    draws = iter([hallway_end])
    env._rand_int = lambda low, high: next(draws, low)
    env._rand_elem = lambda items: list(items)[0]
    MemoryEnv._gen_grid(env, size, size)
    expected = [isinstance(c, Wall) for c in env.grid.grid]
    assert [isinstance(c, Wall) for c in memory_walls(size, size, hallway_end)] == expected


def test_fast_grid_not_installed_where_it_does_not_apply(monkeypatch) -> None:
    assert not use_fast_memory_grid(gym.make("CartPole-v1"))
    assert not use_fast_memory_grid(gym.make("MiniGrid-DoorKey-5x5-v0"))

    class OwnGrid(MemoryEnv):
        def _gen_grid(self, width, height):
            super()._gen_grid(width, height)

    assert not use_fast_memory_grid(OwnGrid(size=7))

    replaced = MemoryEnv(size=7)
    replaced._gen_grid = lambda width, height: None
    assert not use_fast_memory_grid(replaced)

    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    env = gym.make("MiniGrid-MemoryS7-v0")
    assert not use_fast_memory_grid(env)
    assert "_gen_grid" not in env.unwrapped.__dict__


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))])
def test_copies_of_an_env_lay_out_their_own_grid(duplicate) -> None:
    env = fast_env("MiniGrid-MemoryS7-v0", 7)
    env.reset(seed=0)
    twin = duplicate(env)
    assert twin.unwrapped._gen_grid.env is twin.unwrapped
    # the copy's kept views look at the copy's env and grid
    views = twin.unwrapped.gen_obs
    assert views.env is twin.unwrapped and views.grids is twin.unwrapped._gen_grid
    assert twin.unwrapped.step.env is twin.unwrapped  # and its step steps the copy
    for _ in range(5):
        np.testing.assert_array_equal(twin.step(2)[0]["image"],
                                      MemoryEnv.gen_obs(twin.unwrapped)["image"])  # fmt: skip
    twin.reset(seed=4)
    plain = gym.make("MiniGrid-MemoryS7-v0")
    plain.reset(seed=4)
    assert episode_state(twin.unwrapped) == episode_state(plain.unwrapped)
    assert env.unwrapped.grid is not twin.unwrapped.grid


def test_env_builder_installs_the_fast_grid(monkeypatch) -> None:
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"), monitor=True, training=True)
    assert isinstance(env.unwrapped.__dict__.get("_gen_grid"), FastMemoryGrid)
    assert isinstance(env.unwrapped.__dict__.get("gen_obs"), KeptViews)
    assert isinstance(env.unwrapped.__dict__.get("step"), FastMemoryStep)
    env = make_env(resolve_env("MiniGrid-Memory"), training=True)  # a preset with wrappers
    assert isinstance(env.unwrapped.__dict__.get("_gen_grid"), FastMemoryGrid)
    assert isinstance(env.unwrapped.__dict__.get("gen_obs"), KeptViews)
    monkeypatch.setenv(KEPT_VIEWS_VARIABLE, "0")
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"))
    assert isinstance(env.unwrapped.__dict__.get("_gen_grid"), FastMemoryGrid)
    assert type(env.unwrapped.__dict__.get("gen_obs")) is FastGenObs
    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"))
    assert "_gen_grid" not in env.unwrapped.__dict__
    assert type(env.unwrapped.__dict__.get("gen_obs")) is FastGenObs


def test_training_is_the_same_with_either_grid(monkeypatch) -> None:
    """The same seeds give the same policy, parameter for parameter, whichever code lays out
    the grids (the env builder installs the fast grid; the switch turns it off)."""
    policies = []
    for switch in ("1", "0"):
        monkeypatch.setenv(SWITCH_VARIABLE, switch)

        def check(envs, fast=switch == "1"):
            grids = [e.unwrapped.__dict__.get("_gen_grid") for e in envs]
            assert [isinstance(g, FastMemoryGrid) for g in grids] == [fast] * 2

        policies.append(trained_parameters(check))
    assert_same_parameters(*policies)


def test_benchmark_prints_its_table_and_a_json_last_line(capsys) -> None:
    from benchmark_scripts import load_script

    bench = load_script("minigrid_reset")
    out = bench.main(
        ["--envs", "MiniGrid-MemoryS7-v0", "MiniGrid-MemoryS13Random-v0", "--resets", "5",
         "--n-envs", "2", "--steps", "20", "--rounds", "2"]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    envs = ["MiniGrid-MemoryS7-v0", "MiniGrid-MemoryS13Random-v0"]
    assert [r["env"] for r in out["reset"]] == envs
    variants = ("minigrid", "plan", "kept", "step")
    speedups = ("plan_speedup", "kept_speedup", "step_speedup")
    for row in out["reset"]:
        assert all(row[f"{v}_us"] > 0 for v in variants)
        assert all(row[name] > 0 for name in speedups)
    assert [r["actions"] for r in out["step"]] == ["random", "walker"]
    for row in out["step"]:
        assert all(row[f"{v}_sps"] > 0 for v in variants)
        assert all(row[name] > 0 for name in speedups)
        assert row["steps_per_episode"] > 0
    walker, random_row = out["step"][1], out["step"][0]
    assert walker["steps_per_episode"] < random_row["steps_per_episode"]
    assert any(line.startswith("MiniGrid-MemoryS13Random-v0") for line in lines)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--envs", "MiniGrid-DoorKey-5x5-v0"]])
def test_benchmark_refuses_bad_arguments(argv, capsys) -> None:
    from benchmark_scripts import load_script

    with pytest.raises(SystemExit) as exit_info:
        load_script("minigrid_reset").parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_cli_help_names_the_switch():
    from mnm_rl.cli import build_parser

    help_text = " ".join(build_parser().format_help().split())  # argparse wraps at the width
    assert "MNM_RL_FAST_RESET=0" in help_text and "MNM_RL_KEPT_VIEWS=0" in help_text
    assert "MNM_RL_FAST_STEP=0" in help_text
