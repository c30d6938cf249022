"""Presets, run configs, ``--set`` overrides and the run folder helpers (in-process, fast)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from mnm_rl import presets
from mnm_rl.config import ConfigError, EnvSpec, RunConfig, SeedRange, parse_value
from mnm_rl.env_factory import make_env, resolve_env, train_base_seed
from mnm_rl.runs import (
    CheckpointError,
    atomic_write_bytes,
    checkpoint_path,
    checkpoint_steps,
    latest_model,
)

MINIGRID_SIZES = ("S7", "S9", "S11", "S13", "S13Random", "S17Random")


def test_expected_presets_exist():
    envs = set(presets.env_names())
    assert {"MiniGrid-Memory", "DelayedCueRecall", "KeyValueRecall"} <= envs
    assert {f"MiniGrid-Memory{size}" for size in MINIGRID_SIZES} <= envs
    assert set(presets.agent_names()) == {"mnm-p", "mnm-g", "lstm", "gru", "mlp"}
    assert presets.DEFAULT_AGENT == "mnm-p" and presets.DEFAULT_ENV in envs


@pytest.mark.parametrize("env", presets.env_names())
def test_env_preset_builds_and_resolves_with_every_agent(env: str):
    preset = presets.load_env_preset(env)
    assert preset.description and not preset.train_seeds.overlaps(preset.eval_seeds)
    for agent in presets.agent_names():
        config = presets.resolve_run_config(env, agent)
        assert config.agent.ppo.n_steps % config.agent.ppo.seq_len == 0
    spec = preset.spec()
    environment = make_env(spec)
    obs, _ = environment.reset(seed=spec.eval_seeds.start)
    assert environment.observation_space.contains(obs)
    environment.step(environment.action_space.sample())
    environment.close()


@pytest.mark.parametrize("size", MINIGRID_SIZES)
def test_minigrid_presets_use_a_3x3_view(size: str):
    preset = presets.load_env_preset(f"MiniGrid-Memory{size}")
    assert preset.id == f"MiniGrid-Memory{size}-v0"
    env = make_env(preset.spec())
    assert env.unwrapped.agent_view_size == 3
    assert env.observation_space["image"].shape == (3, 3, 3)
    assert env.action_space.n == 3


def test_any_registered_gym_id_works_as_env():
    minigrid = resolve_env("MiniGrid-MemoryS7-v0")
    assert [w.name for w in minigrid.wrappers] == ["symbolic_minigrid"]
    cartpole = resolve_env("CartPole-v1")
    assert cartpole.wrappers == [] and cartpole.name == "CartPole-v1"
    ours = resolve_env("mnm_rl/KeyValueRecall-v0")
    assert ours.name == "mnm_rl_KeyValueRecall-v0"
    with pytest.raises(ConfigError, match="did you mean 'KeyValueRecall'"):
        resolve_env("KeyValueRecal")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 1e-3),
        ("16", 16),
        ("-2", -2),
        ("0.5", 0.5),
        ("[64, 64]", [64, 64]),
        ("true", True),
        ("null", None),
        ("abc", "abc"),
        ("{a: 1}", {"a": 1}),
    ],
)
def test_set_values_are_parsed_as_yaml(text: str, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_overrides_are_nested_and_typed():
    config = presets.resolve_run_config(
        "DelayedCueRecall",
        "lstm",
        {"timesteps": 5000},
        ["agent.ppo.learning_rate=1e-4", "env.kwargs.delay=3", "agent.policy.net_arch=[32, 32]"],
    )
    assert config.agent.ppo.learning_rate == 1e-4
    assert config.env.kwargs == {"n_cues": 4, "delay": 3}
    assert config.agent.policy.net_arch == [32, 32]
    assert config.train.timesteps == 5000
    # The env preset's agent overrides sit between the agent preset and --set.
    assert (
        config.agent.ppo.n_steps
        == presets.load_env_preset("DelayedCueRecall").agent["ppo"]["n_steps"]
    )


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("agent.ppo.gama=0.9", "unknown key; did you mean 'agent.ppo.gamma'"),
        ("trian.seed=1", "unknown key"),
        ("agent.ppo.gamma=high", "valid number"),
        ("agent.ppo.gamma=1.5", "less than or equal to 1"),
        ("train.n_envs=true", "valid integer"),
        ("train.timesteps.x=1", "train.timesteps is not a section"),
        ("agent.core=transformer", "agent.core"),
        ("agent.policy.core_kwargs.n_heads=2", "takes only hidden_size"),
        ("=3", "key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(assignment: str, message: str):
    with pytest.raises(ConfigError, match=None) as err:
        presets.resolve_run_config("DelayedCueRecall", "lstm", None, [assignment])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_agent_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'mnm-g' or 'mnm-p'|did you mean 'mnm-p'"):
        presets.load_agent_preset("mnm_p")


def test_seed_ranges_must_be_disjoint():
    with pytest.raises(ValueError, match="overlap"):
        EnvSpec(
            name="x",
            id="CartPole-v1",
            train_seeds=SeedRange(start=0, stop=10),
            eval_seeds=SeedRange(start=5, stop=20),
        )


def test_training_seeds_stay_in_range_and_differ_on_resume():
    spec = presets.load_env_preset("DelayedCueRecall").spec()
    first = train_base_seed(spec, run_seed=3, n_envs=16)
    assert first == train_base_seed(spec, run_seed=3, n_envs=16)
    assert spec.train_seeds.start <= first and first + 16 <= spec.train_seeds.stop
    assert train_base_seed(spec, run_seed=3, n_envs=16, num_timesteps=4096) != first
    small = spec.model_copy(update={"train_seeds": SeedRange(start=0, stop=8)})
    with pytest.raises(ConfigError, match="exceeds"):
        train_base_seed(small, 0, 16)


def test_config_round_trips_through_yaml(tmp_path: Path):
    from mnm_rl.runs import load_config, save_config

    config = presets.resolve_run_config("MiniGrid-Memory", "mnm-g", {"seed": 7})
    save_config(tmp_path, config)
    assert load_config(tmp_path) == config
    assert isinstance(load_config(tmp_path), RunConfig)


def fake_checkpoint(path: Path, steps: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", f'{{"num_timesteps": {steps}}}')
        archive.writestr("policy.pth", b"weights")
    return path


def test_latest_model_is_the_one_with_most_steps(tmp_path: Path):
    fake_checkpoint(checkpoint_path(tmp_path, 100), 100)
    fake_checkpoint(checkpoint_path(tmp_path, 300), 300)
    assert latest_model(tmp_path).name == "step_0000000300.zip"
    fake_checkpoint(tmp_path / "model.zip", 300)
    assert latest_model(tmp_path).name == "model.zip"  # on a tie the final model wins
    broken = checkpoint_path(tmp_path, 500)
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert latest_model(tmp_path).name == "model.zip"  # a damaged file is passed over
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint_steps(broken)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path):
    target = tmp_path / "model.zip"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    blocked = tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)  # os.replace cannot put a file over a folder
    with pytest.raises(OSError):
        atomic_write_bytes(blocked, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "model.zip"]


def test_symbolic_minigrid_observations_are_integer_symbols():
    env = make_env(presets.load_env_preset("MiniGrid-Memory").spec())
    obs, _ = env.reset(seed=0)
    assert obs["image"].dtype == np.int64 and isinstance(env, gym.Env)


def test_plot_reads_exported_scalars_once_per_run(tmp_path: Path):
    from mnm_rl.plotting import load_sources, plot_curves, scalars_file_stem

    def write(name: str, rows: list[tuple[str, int, float]]) -> Path:
        path = tmp_path / name
        lines = ["tag,step,value"] + [f"{tag},{step},{value}" for tag, step, value in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    tag = "eval/success_rate"
    first = write("S9__mnm-p__0.csv", [(tag, 100, 0.5), (tag, 200, 0.6), ("loss", 100, 1.0)])
    resumed = write("S9__mnm-p__0__400.csv", [(tag, 100, 0.5), (tag, 200, 0.6), (tag, 400, 1.0)])
    other = write("S9__gru__1.csv", [(tag, 100, 0.25), (tag, 200, 0.75)])
    untagged = write("S9__lstm__0.csv", [("loss", 100, 1.0)])
    curves = load_sources([first, resumed, other, untagged], tag)
    runs = sorted((c.env, c.agent, c.seed) for c in curves)
    assert runs == [("S9", "gru", 1), ("S9", "mnm-p", 0)]
    mnm = next(c for c in curves if c.agent == "mnm-p")
    assert mnm.run_dir == resumed and mnm.steps.tolist() == [100, 200, 400]
    summary = plot_curves(curves, tmp_path / "curves.png", tag)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["S9"]["gru"] == {"seeds": 1, "final_mean": 0.75}
    bad = write("notes.csv", [(tag, 1, 0.0)])
    with pytest.raises(ConfigError, match="not a run's exported scalars"):
        load_sources([bad], tag)
    broken = tmp_path / "S9__gru__3.csv"
    broken.write_text("tag,step,value\neval/success_rate,1\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_sources([broken], tag)
    variant = scalars_file_stem("S9", "mnm-p [ppo.seq_len=64]", 2, 1_000_000)
    assert variant == "S9__mnm-p_ppo.seq_len_64__2__1000000"  # the name the export writes
    parsed = load_sources([write(f"{variant}.csv", [(tag, 100, 1.0)])], tag)
    assert [(c.agent, c.seed) for c in parsed] == [("mnm-p_ppo.seq_len_64", 2)]
    headless = tmp_path / "S9__gru__2.csv"
    headless.write_text("eval/success_rate,1,0.5\n")
    with pytest.raises(ConfigError, match="first line must be tag,step,value"):
        load_sources([headless], tag)


def test_plot_aggregates_mean_and_spread_over_seeds():
    from mnm_rl.plotting import Curve, aggregate

    def curve(seed: int, steps: list[float], values: list[float]) -> Curve:
        return Curve("env", "mnm-p", seed, Path("."), np.array(steps), np.array(values))

    runs = [
        curve(0, [0, 100], [0.0, 1.0]),
        curve(1, [0, 100], [0.2, 0.6]),
        curve(2, [0, 50], [0.4, 0.4]),
    ]
    grid, mean, low, high = aggregate(runs, points=3)
    assert grid.tolist() == [0, 50, 100]
    assert np.allclose(mean, [0.2, (0.5 + 0.4 + 0.4) / 3, 0.8])  # seed 2 stops at step 50
    assert np.allclose(low, [0.0, 0.4, 0.6]) and np.allclose(high, [0.4, 0.5, 1.0])


def test_agent_label_names_the_agent_settings_that_differ_from_the_presets():
    assert presets.agent_label(presets.resolve_run_config("MiniGrid-Memory", "mnm-p")) == "mnm-p"
    # train settings (seed, steps) are not agent settings
    seeded = presets.resolve_run_config("MiniGrid-Memory", "gru", {"seed": 3, "timesteps": 10})
    assert presets.agent_label(seeded) == "gru"
    variant = presets.resolve_run_config(
        "MiniGrid-Memory", "mnm-p", None, ["agent.ppo.seq_len=64", "agent.ppo.mem_coef=0.1"]
    )
    assert presets.agent_label(variant) == "mnm-p [ppo.seq_len=64, ppo.mem_coef=0.1]"
    nested = presets.resolve_run_config(
        "DelayedCueRecall", "mnm-p", None, ["agent.policy.core_kwargs.n_heads=3"]
    )
    assert presets.agent_label(nested) == "mnm-p [policy.core_kwargs.n_heads=3]"


def test_env_label_names_the_env_settings_that_differ_from_the_preset():
    plain = presets.resolve_run_config("MiniGrid-Memory", "mnm-p", {"seed": 2})
    assert presets.env_label(plain) == "MiniGrid-Memory"
    described = plain.model_copy(
        update={"env": plain.env.model_copy(update={"description": "edited since"})}
    )
    assert presets.env_label(described) == "MiniGrid-Memory"  # descriptions do not count
    curriculum = presets.resolve_run_config(
        "MiniGrid-Memory",
        "mnm-p",
        None,
        [
            'env.train_wrappers=[{"name":"start_direction","kwargs":{"direction":2}}]',
            "env.train_wrappers_until=400000",
            "env.kwargs.max_steps=96",
        ],
    )
    assert presets.env_label(curriculum) == (
        "MiniGrid-Memory [kwargs.max_steps=96, train_wrappers=[start_direction(direction=2)], "
        "train_wrappers_until=400000]"
    )
    assert presets.agent_label(curriculum) == "mnm-p"


def test_retention_lag_is_checked_against_the_sequence_length():
    config = presets.resolve_run_config(
        "DelayedCueRecall", "mnm-p", None, ["agent.policy.core_kwargs.retention_lag=4"]
    )
    assert config.agent.model_kwargs()["policy_kwargs"]["core_kwargs"]["retention_lag"] == 4
    seq_len = config.agent.ppo.seq_len
    with pytest.raises(ConfigError, match="must be smaller than ppo.seq_len") as err:
        presets.resolve_run_config(
            "DelayedCueRecall", "mnm-p", None, [f"agent.policy.core_kwargs.retention_lag={seq_len}"]
        )
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="takes only hidden_size"):
        presets.resolve_run_config(
            "DelayedCueRecall", "gru", None, ["agent.policy.core_kwargs.retention_lag=2"]
        )
