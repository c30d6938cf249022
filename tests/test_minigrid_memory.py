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
from minigrid.core.world_object import Ball, Key, Wall
from minigrid.envs import MemoryEnv
from minigrid_training import assert_same_parameters, trained_parameters

from mnm_rl.env_factory import make_env, resolve_env
from mnm_rl.envs.minigrid_memory import (
    SWITCH_VARIABLE,
    FastMemoryGrid,
    memory_walls,
    use_fast_memory_grid,
)

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
    # A walker that goes east to the split and then up or down, so that episodes end at both
    # objects, mixed with random moves.
    for _ in range(3000):
        base = plain.unwrapped
        at_split = int(base.agent_pos[0]) == base.success_pos[0]
        if rng.random() < 0.3:
            action = int(rng.integers(3))
        elif at_split and base.agent_dir == 0:
            action = int(rng.integers(2))  # turn north or south
        else:
            action = 2
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
    env = gym.make("MiniGrid-MemoryS7-v0")
    use_fast_memory_grid(env)
    env.reset(seed=0)
    twin = duplicate(env)
    assert twin.unwrapped._gen_grid.env is twin.unwrapped
    twin.reset(seed=4)
    plain = gym.make("MiniGrid-MemoryS7-v0")
    plain.reset(seed=4)
    assert episode_state(twin.unwrapped) == episode_state(plain.unwrapped)
    assert env.unwrapped.grid is not twin.unwrapped.grid


def test_env_builder_installs_the_fast_grid(monkeypatch) -> None:
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"), monitor=True, training=True)
    assert isinstance(env.unwrapped.__dict__.get("_gen_grid"), FastMemoryGrid)
    env = make_env(resolve_env("MiniGrid-Memory"), training=True)  # a preset with wrappers
    assert isinstance(env.unwrapped.__dict__.get("_gen_grid"), FastMemoryGrid)
    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"))
    assert "_gen_grid" not in env.unwrapped.__dict__


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
    for row in out["reset"]:
        assert row["minigrid_us"] > 0 and row["fast_us"] > 0 and row["speedup"] > 0
    assert [r["actions"] for r in out["step"]] == ["random", "walker"]
    for row in out["step"]:
        assert row["minigrid_sps"] > 0 and row["fast_sps"] > 0 and row["speedup"] > 0
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

    assert "MNM_RL_FAST_RESET=0" in build_parser().format_help()
