"""The fast MiniGrid view (``mnm_rl.envs.minigrid_view``) against MiniGrid's own ``gen_obs``."""

from __future__ import annotations

import copy
import json
import pickle

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid ids)
import numpy as np
import pytest
from minigrid.core.grid import Grid
from minigrid.core.world_object import Ball, Door, Key
from minigrid.envs import MemoryEnv
from minigrid.minigrid_env import MiniGridEnv
from minigrid_training import assert_same_parameters, trained_parameters

from mnm_rl.env_factory import make_env, resolve_env
from mnm_rl.envs.minigrid_view import SWITCH_VARIABLE, FastGenObs, use_fast_view, view_image


def minigrid_image(env: MiniGridEnv) -> np.ndarray:
    """The image MiniGrid's own code gives, whatever is installed on ``env``."""
    return MiniGridEnv.gen_obs(env)["image"]


@pytest.mark.parametrize(
    "env_id,view",
    [
        ("MiniGrid-MemoryS7-v0", 3),
        ("MiniGrid-MemoryS7-v0", 7),
        ("MiniGrid-DoorKey-5x5-v0", 5),  # doors locked, closed and open; a carried key
        ("MiniGrid-KeyCorridorS3R3-v0", 7),
        ("MiniGrid-LavaCrossingS9N2-v0", 5),
        ("MiniGrid-ObstructedMaze-2Dlhb-v1", 7),  # boxes, balls, locked doors
        ("MiniGrid-Empty-8x8-v0", 3),  # see_through_walls=True
        ("MiniGrid-Dynamic-Obstacles-8x8-v0", 9),  # moving balls, a view larger than the room
    ],
)
def test_view_image_equals_minigrid_over_random_episodes(env_id: str, view: int) -> None:
    env = gym.make(env_id, agent_view_size=view)
    base = env.unwrapped
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    directions, carried, open_doors, hidden = set(), 0, 0, 0
    for step in range(1500):
        if step % 10 == 5:  # doors in every state, objects carried: more than a random walk does
            for cell in base.grid.grid:
                if isinstance(cell, Door):
                    cell.is_open = bool(rng.random() < 0.5)
                    cell.is_locked = not cell.is_open and bool(rng.random() < 0.5)
            base.carrying = [None, Key("yellow"), Ball("blue")][int(rng.integers(3))]
        expected = minigrid_image(base)
        image = view_image(base)
        assert image.dtype == np.uint8 and image.shape == (view, view, 3)
        assert image.flags.writeable and image.flags.c_contiguous
        np.testing.assert_array_equal(image, expected)
        directions.add(base.agent_dir)
        carried += base.carrying is not None
        open_doors += any(isinstance(c, Door) and c.is_open for c in base.grid.grid)
        hidden += int((expected[..., 0] == 0).any())
        _, _, terminated, truncated, _ = env.step(int(rng.integers(base.action_space.n)))
        if terminated or truncated:
            env.reset(seed=int(rng.integers(1 << 30)))
    assert directions == {0, 1, 2, 3}
    assert carried > 0
    if env_id.startswith(("MiniGrid-DoorKey", "MiniGrid-KeyCorridor", "MiniGrid-Obstructed")):
        assert open_doors > 0
    if base.see_through_walls:
        assert hidden == 0
    elif env_id.startswith("MiniGrid-Memory"):
        assert hidden > 0


def test_installed_view_gives_the_same_episodes() -> None:
    fast, plain = (gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3) for _ in range(2))
    assert use_fast_view(fast)
    assert isinstance(fast.unwrapped.gen_obs, FastGenObs)
    assert use_fast_view(fast)  # twice is harmless
    rng = np.random.default_rng(1)
    for episode in range(5):
        observations = [env.reset(seed=episode)[0] for env in (fast, plain)]
        done = False
        while not done:
            assert observations[0].keys() == observations[1].keys()
            np.testing.assert_array_equal(observations[0]["image"], observations[1]["image"])
            assert observations[0]["direction"] == observations[1]["direction"]
            assert observations[0]["mission"] == observations[1]["mission"]
            action = int(rng.integers(3))
            results = [env.step(action) for env in (fast, plain)]
            assert results[0][1:4] == results[1][1:4]
            observations = [r[0] for r in results]
            done = results[0][2] or results[0][3]


def test_fast_view_not_installed_where_it_does_not_apply(monkeypatch) -> None:
    assert not use_fast_view(gym.make("CartPole-v1"))

    class OwnView(MemoryEnv):
        def gen_obs(self):
            return super().gen_obs()

    assert not use_fast_view(OwnView(size=7))

    replaced = MemoryEnv(size=7)
    replaced.gen_obs = lambda: {}
    assert not use_fast_view(replaced)

    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    env = gym.make("MiniGrid-MemoryS7-v0")
    assert not use_fast_view(env)
    assert "gen_obs" not in env.unwrapped.__dict__


def test_grid_subclass_gets_minigrid_own_view() -> None:
    class WalledGrid(Grid):
        """A grid that shows nothing but walls when sliced."""

        def slice(self, top_x, top_y, width, height):
            grid = Grid(width, height)
            grid.wall_rect(0, 0, width, height)
            return grid

    env = gym.make("MiniGrid-MemoryS7-v0", agent_view_size=5)
    assert use_fast_view(env)
    env.reset(seed=0)
    base = env.unwrapped
    base.grid.__class__ = WalledGrid
    image = base.gen_obs()["image"]
    np.testing.assert_array_equal(image, minigrid_image(base))
    assert not np.array_equal(image, view_image(base))


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))])
def test_copies_of_an_env_view_their_own_grid(duplicate) -> None:
    env = gym.make("MiniGrid-MemoryS7-v0", agent_view_size=3)
    use_fast_view(env)
    env.reset(seed=0)
    twin = duplicate(env)
    assert twin.unwrapped.gen_obs.env is twin.unwrapped
    for action in (2, 2, 1, 2, 0):
        twin.step(action)
    np.testing.assert_array_equal(twin.unwrapped.gen_obs()["image"], minigrid_image(twin.unwrapped))
    assert tuple(twin.unwrapped.agent_pos) != tuple(env.unwrapped.agent_pos)


def test_env_builder_installs_the_view(monkeypatch) -> None:
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"), monitor=True, training=True)
    assert isinstance(env.unwrapped.__dict__.get("gen_obs"), FastGenObs)
    obs, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs["image"], minigrid_image(env.unwrapped).astype(np.int64))
    assert "gen_obs" not in make_env(resolve_env("mnm_rl/DelayedCueRecall-v0")).unwrapped.__dict__
    monkeypatch.setenv(SWITCH_VARIABLE, "0")
    env = make_env(resolve_env("MiniGrid-MemoryS7-v0"))
    assert "gen_obs" not in env.unwrapped.__dict__


def test_benchmark_prints_both_tables_and_a_json_last_line(capsys) -> None:
    from benchmark_scripts import load_script

    bench = load_script("minigrid_view")
    out = bench.main(
        ["--envs", "MiniGrid-MemoryS7-v0", "MiniGrid-DoorKey-5x5-v0", "--views", "3", "5",
         "--states", "5", "--n-envs", "2", "--steps", "5", "--rounds", "2"]
    )  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    assert [(r["env"], r["view"]) for r in out["gen_obs"]] == [
        ("MiniGrid-MemoryS7-v0", 3), ("MiniGrid-MemoryS7-v0", 5),
        ("MiniGrid-DoorKey-5x5-v0", 3), ("MiniGrid-DoorKey-5x5-v0", 5),
    ]  # fmt: skip
    assert [(r["view"], r["n_envs"]) for r in out["step"]] == [(3, 2), (5, 2)]
    for row in out["gen_obs"]:
        assert row["minigrid_us"] > 0 and row["fast_us"] > 0 and row["speedup"] > 0
    for row in out["step"]:
        assert min(row[k] for k in ("minigrid_sps", "fast_sps", "ints_sps")) > 0
        assert row["speedup"] > 0 and row["ints_speedup"] > 0 and row["total_speedup"] > 0
    assert any(line.startswith("env") and line.split()[-3:] == [
        "fast/MiniGrid", "ints/fast", "ints/MiniGrid"] for line in lines)  # fmt: skip
    assert any(line.startswith("MiniGrid-DoorKey-5x5-v0") for line in lines)


@pytest.mark.parametrize("argv", [["--views", "4"], ["--rounds", "0"]])
def test_benchmark_refuses_bad_arguments(argv, capsys) -> None:
    from benchmark_scripts import load_script

    with pytest.raises(SystemExit) as exit_info:
        load_script("minigrid_view").parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_training_is_the_same_with_either_view(monkeypatch) -> None:
    """The same seeds give the same policy, parameter for parameter, whichever code computes
    the observations (the fast view is installed by the env builder; the switch turns it off)."""
    policies = []
    for switch in ("1", "0"):
        monkeypatch.setenv(SWITCH_VARIABLE, switch)

        def check(envs, fast=switch == "1"):
            views = [e.unwrapped.__dict__.get("gen_obs") for e in envs]
            assert [isinstance(v, FastGenObs) for v in views] == [fast] * 2

        policies.append(trained_parameters(check))
    assert_same_parameters(*policies)
