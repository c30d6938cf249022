"""The ``mnm-rl`` command line, driven in subprocesses: train, eval, record, plot, resume, list and
every kind of bad input (one-line error, exit status 2, no traceback)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml

from mnm_rl.plotting import read_scalars

SCRIPT = Path(sys.executable).with_name("mnm-rl")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mnm_rl"]


def sets(*overrides: str) -> list[str]:
    """``--set`` flags: ``sets("a=1", "b=2")`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [flag for override in overrides for flag in ("--set", override)]


# A tiny agent (width 16, 4 envs x 32-step rollouts, 64-step minibatches), shared with
# test_robustness.py.
TINY_AGENT = [
    "--n-envs",
    "4",
    "--no-progress",
    *sets(
        "agent.policy.core_kwargs.hidden_size=16",
        "agent.policy.features_dim=16",
        "agent.policy.net_arch=[16]",
        "agent.ppo.n_steps=32",
        "agent.ppo.batch_size=64",
    ),
]
# The tiny agent on the DelayedCueRecall preset: a few seconds of training.
TINY = [
    "--env",
    "DelayedCueRecall",
    "--timesteps",
    "2048",
    *TINY_AGENT,
    *sets("train.checkpoint_every=1000", "train.eval_episodes=20"),
]


def mnm_rl(*args: str | Path, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*COMMAND, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def only_run(root: Path) -> Path:
    runs = [p.parent for p in root.rglob("config.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def tiny_memory_run(root: Path, timesteps: int, *overrides: str) -> Path:
    """A tiny gru run of ``timesteps`` env steps on the default MiniGrid-Memory preset, made in
    ``root`` with ``--set`` ``overrides``; its run folder."""
    args = ["--env", "MiniGrid-Memory", "--agent", "gru", "--timesteps", str(timesteps)]
    ok(mnm_rl("train", *args, *TINY_AGENT, *sets(*overrides), cwd=root))
    return only_run(root)


def optimizer_step(model_zip: Path) -> float:
    with zipfile.ZipFile(model_zip) as archive:
        state = torch.load(io.BytesIO(archive.read("policy.optimizer.pth")), weights_only=False)
    return float(next(iter(state["state"].values()))["step"])


def tb_steps(run_dir: Path, tag: str = "rollout/success_rate") -> list[int]:
    steps, _ = read_scalars(run_dir / "tb", tag)
    return [int(s) for s in steps]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def run_dir(workdir: Path) -> Path:
    result = ok(mnm_rl("train", *TINY, cwd=workdir))
    run = only_run(workdir / "runs")
    assert run.parent == workdir / "runs" / "DelayedCueRecall" / "mnm-p"
    assert run.name.startswith("0-")
    assert str(run.relative_to(workdir)) in result.stdout
    return run


def test_train_writes_the_run_layout(run_dir: Path):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["env"]["id"] == "mnm_rl/DelayedCueRecall-v0"
    assert config["agent"]["core"] == "mnm-p"
    assert config["agent"]["policy"]["core_kwargs"]["hidden_size"] == 16
    assert config["train"]["timesteps"] == 2048
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # Every 1000 steps with 4 envs (steps advance by 4), not at the end (the final model is).
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [
        "step_0000001000.pt",
        "step_0000001000.zip",
        "step_0000002000.pt",
        "step_0000002000.zip",
    ]
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert (run_dir / "model.zip").is_file() and (run_dir / "policy.pt").is_file()
    assert tb_steps(run_dir)[-1] >= 2048
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 20 == len(report["per_episode"])
    assert 0 <= report["success_rate"] <= 1
    # Held-out seeds: disjoint from the preset's training seeds.
    assert report["seeds"][0] >= config["env"]["train_seeds"]["stop"]
    assert {e["seed"] for e in report["per_episode"]} == set(range(*report["seeds"]))


def test_eval_prints_a_table_and_writes_reproducible_json(run_dir: Path, workdir: Path):
    first = ok(mnm_rl("eval", run_dir, "--episodes", "12", cwd=workdir))
    assert "success rate" in first.stdout and "mean return" in first.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 12 and report["deterministic"] is True
    ok(mnm_rl("eval", run_dir / "model.zip", "--episodes", "12", cwd=workdir))
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["per_episode"] == report["per_episode"]
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[0]
    ok(mnm_rl("eval", checkpoint, "--episodes", "5", "--stochastic", cwd=workdir))
    written = run_dir / f"eval-{checkpoint.stem}-DelayedCueRecall-stochastic.json"
    assert json.loads(written.read_text())["deterministic"] is False


def test_record_writes_video_and_memory_diagnostics(run_dir: Path, workdir: Path):
    result = ok(mnm_rl("record", run_dir, "--out", workdir / "ep.gif", cwd=workdir))
    frames = iio.imread(workdir / "ep.gif", index=None)
    # 2 episodes of 10 steps: a first frame and 10 step frames each.
    assert frames.shape[0] == 2 * (1 + 10)
    assert (workdir / "ep-memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (workdir / "ep-memory.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 1 + 20
    betas = [float(r.split(",")[header.index("beta")]) for r in rows[1:]]
    assert all(0 < b < 1 for b in betas)
    assert "beta" in result.stdout
    ok(mnm_rl("record", run_dir, "--out", workdir / "ep.mp4", "--episodes", "1", cwd=workdir))
    assert (workdir / "ep.mp4").stat().st_size > 1000


# Runs a command of mnm-rl as on a machine where no kernel is built yet, with the build itself
# left out (the test session built them all): prints which extension modules the command built
# before it ran, and which extensions it asked for while it ran.
KERNELS_ASKED = """
import json, sys
from mnm_rl import cli, native
asked, built = [], []
load = native.LazyExtension.load
native.LazyExtension.load = lambda self: asked.append(self.name) or load(self)
native.unbuilt_modules = lambda modules=None: list(modules or native.EXTENSION_MODULES)
native.build_in_parallel = lambda modules, jobs=None: built.extend(modules) or []
status = cli.main(sys.argv[1:])
built_names = [ext.name for ext in native.package_extensions(built).values()]
print(json.dumps({"status": status, "asked": sorted(set(asked)), "built": built_names}))
"""


@pytest.mark.parametrize("command", ["eval", "record"])
def test_eval_and_record_compile_the_kernel_they_use_first(
    run_dir: Path, workdir: Path, tmp_path: Path, command: str
):
    """Where kernels are not built yet, ``eval`` and ``record`` compile the one they use
    (:data:`mnm_rl.native.PREDICT_MODULES`, :data:`~mnm_rl.native.SEQUENCE_MODULES`), saying
    so, before they start, and no other: not the five that only training uses."""
    out = ["--out", str(tmp_path / "ep.gif")] if command == "record" else []
    runs = [run_dir, tiny_memory_run(tmp_path, 128)]  # an MNM core; a grid encoder and a gru
    for run in runs:
        result = subprocess.run(
            [sys.executable, "-c", KERNELS_ASKED, command, str(run), "--episodes", "2", *out],
            cwd=workdir, capture_output=True, text=True, timeout=240,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.splitlines()[-1])
        assert report["status"] == 0 and "mnm-rl: compiling 1 kernel (" in result.stdout
        assert report["asked"] == report["built"], report


def test_plot_reads_event_files_one_line_per_agent(run_dir: Path, workdir: Path):
    ok(mnm_rl("train", *TINY, "--agent", "lstm", "--seed", "1", cwd=workdir))
    out = workdir / "curves.png"
    result = ok(mnm_rl("plot", workdir / "runs", "--out", out, cwd=workdir))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(result.stdout.split(" runs: ", 1)[1])
    # TINY's --set values differ from the presets, so each line is labelled as a variant
    labels = set(summary["DelayedCueRecall"])
    assert {label.split(" [")[0] for label in labels} == {"mnm-p", "lstm"}
    assert all("policy.core_kwargs.hidden_size=16" in label for label in labels)


def test_resume_continues_steps_tensorboard_and_optimizer(run_dir: Path, workdir: Path):
    copy = workdir / "resumed"
    shutil.copytree(run_dir, copy)
    before = optimizer_step(copy / "model.zip")
    steps_before = tb_steps(copy)
    ok(mnm_rl("train", "--resume", copy, "--timesteps", "3072", "--no-progress", cwd=workdir))
    from mnm_rl.runs import checkpoint_steps

    assert checkpoint_steps(copy / "model.zip") == 3072
    # Adam's step count continues: 1024 more env steps = 8 rollouts x 4 epochs x 2 minibatches.
    assert optimizer_step(copy / "model.zip") == before + 64
    steps_after = tb_steps(copy)
    assert steps_after[: len(steps_before)] == steps_before
    assert steps_after[-1] == 3072 and len(steps_after) > len(steps_before)
    assert len(list((copy / "tb").glob("events.out.tfevents.*"))) == 2
    again = mnm_rl("train", "--resume", copy, "--no-progress", cwd=workdir)
    assert again.returncode == 2 and "already has 3072 env steps" in again.stderr


def test_list_shows_env_and_agent_presets(workdir: Path):
    result = ok(mnm_rl("list", cwd=workdir))
    for name in ("MiniGrid-Memory", "MiniGrid-MemoryS17Random", "DelayedCueRecall", "mnm-p"):
        assert name in result.stdout
    for name in ("mnm-g", "lstm", "gru", "mlp", "KeyValueRecall"):
        assert name in result.stdout


def bad_inputs(run: Path, tmp: Path) -> list[tuple[list, str]]:
    not_zip = tmp / "notes.zip"
    not_zip.write_text("hello")
    truncated = tmp / "truncated.zip"
    data = (run / "model.zip").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    loose = tmp / "loose.zip"
    shutil.copy(run / "model.zip", loose)
    shutil.copy(run / "policy.pt", tmp / "loose.pt")
    unsafe = tmp / "unsafe" / "model.zip"  # an SB3 zip without its tensor-only policy file
    unsafe.parent.mkdir()
    shutil.copy(run / "model.zip", unsafe)
    return [
        (["train", "--env", "DelayedCueRecal"], "did you mean 'DelayedCueRecall'"),
        (["train", "--agent", "lstn"], "did you mean 'lstm'"),
        (["train", "--set", "agent.ppo.learning_rat=1e-3"], "'agent.ppo.learning_rate'"),
        (["train", "--set", "agent.ppo.n_steps=abc"], "agent.ppo.n_steps"),
        (["train", "--set", "train.n_envs=2.5"], "train.n_envs"),
        (["train", "--set", "train.kernel_threads=0"], "train.kernel_threads"),
        (["build", "--jobs", "0"], "--jobs"),
        (["train", "--set", "train.env_workers=-1"], "train.env_workers"),
        (["train", "--n-envs", "2", "--set", "train.env_workers=2"], "below n_envs (2)"),
        (["train", "--set", "agent.ppo.n_steps=30"], "multiple of seq_len"),
        (["train", "--set", "nonsense"], "key=value"),
        (["train", "--timesteps", "0"], "--timesteps: must be a positive integer"),
        (["train", "--timesteps", "-5"], "--timesteps: must be a positive integer"),
        (["train", "--n-envs", "0"], "--n-envs: must be a positive integer"),
        (["train", "--env", "DelayedCueRecall", "--device", "bogus"], "--device"),
        (["train", "--env", "DelayedCueRecall", "--set", "env.kwargs.n_cues=1"], "n_cues"),
        (
            ["train", "--env", "DelayedCueRecall", "--set", "env.train_wrappers_until=100"],
            "no train_wrappers",
        ),
        (
            ["train", "--env", "DelayedCueRecall", "--set", "env.train_wrappers_until_success=0.9"],
            "train_wrappers_until_success is set but there are no train_wrappers",
        ),
        (
            [
                "train",
                "--env",
                "MiniGrid-MemoryS9-WestStart-Curriculum-Solved",
                "--set",
                "env.train_wrappers_until_success=1.5",
            ],
            "env.train_wrappers_until_success",
        ),
        (["train", "--resume", tmp / "missing"], "does not exist"),
        (["train", "--resume", run, "--agent", "lstm"], "--agent cannot change"),
        (["eval", tmp / "missing"], "does not exist"),
        (["eval", tmp], "not a run folder"),
        (["eval", not_zip], "not a readable checkpoint"),
        (["eval", truncated], "not a readable checkpoint"),
        (["eval", foreign], "not a mnm-rl checkpoint"),
        (["eval", loose], "not inside a run folder; pass --env"),
        (["eval", unsafe, "--env", "DelayedCueRecall"], "no safe policy file policy.pt"),
        (["eval", run, "--episodes", "0"], "--episodes: must be a positive integer"),
        (["eval", run, "--env", "MiniGrid-MemoryS7"], "does not match env"),
        (["record", run, "--out", tmp / "x.avi"], "must end in .gif or .mp4"),
        (["plot", tmp / "missing", "--out", tmp / "c.png"], "does not exist"),
        (["plot", tmp / "S9__gru__0.csv", "--out", tmp / "c.png"], "does not exist"),
    ]


def test_a_bad_kernel_thread_count_in_the_environment_is_one_line_and_leaves_no_run(
    tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("MNM_RL_KERNEL_THREADS", "two")
    result = mnm_rl("train", *TINY, "--run-dir", tmp_path / "run", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MNM_RL_KERNEL_THREADS='two'" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_input_is_one_line_and_exit_status_2(run_dir: Path, tmp_path: Path):
    for args, expected in bad_inputs(run_dir, tmp_path):
        result = mnm_rl(*args, cwd=tmp_path, timeout=60)
        where = f"mnm-rl {' '.join(map(str, args))}: {result.stderr!r}"
        assert result.returncode == 2, where
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mnm-rl: error: "), where
        assert expected in lines[0], where
        assert "Traceback" not in result.stderr + result.stdout, where
    assert not (tmp_path / "runs").exists()  # no run folder is created for bad input


def _train_with_curriculum(tmp_path: Path, env: str, *overrides: str) -> Path:
    """A tiny 640-step run (5 rollouts of 128 env steps) on a curriculum preset."""
    run = tmp_path / "run"
    args = ["--env", env, *TINY_AGENT, *sets(*overrides, "train.eval_episodes=0")]
    ok(mnm_rl("train", *args, "--run-dir", run, "--timesteps", "640", cwd=tmp_path))
    return run


def _assert_resumed_without_curriculum(run: Path, tmp_path: Path) -> None:
    ok(mnm_rl("train", "--resume", run, "--timesteps", "896", "--no-progress", cwd=tmp_path))
    steps, active = read_scalars(run / "tb", "train/train_wrappers")
    assert [int(s) for s in steps][-2:] == [768, 896] and [int(a) for a in active][-2:] == [0, 0]


def test_train_wrappers_until_ends_the_curriculum_at_that_step(tmp_path: Path):
    """``env.train_wrappers_until``: the curriculum shapes the rollouts before that env step and
    not after (``train/train_wrappers`` 1, then 0); a run resumed past it trains without it."""
    run = _train_with_curriculum(
        tmp_path, "MiniGrid-MemoryS9-FarStart-Curriculum", "env.train_wrappers_until=384"
    )
    steps, active = read_scalars(run / "tb", "train/train_wrappers")
    # logged at the end of each 128-step rollout: switched off when step 384 is reached
    assert [int(s) for s in steps] == [128, 256, 384, 512, 640]
    assert [int(a) for a in active] == [1, 1, 0, 0, 0]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["env"]["train_wrappers_until"] == 384
    _assert_resumed_without_curriculum(run, tmp_path)


def test_train_wrappers_until_success_is_saved_and_kept_on_resume(tmp_path: Path):
    """``env.train_wrappers_until_success``: the curriculum ends in the rollout where the
    training episodes first reach the threshold (here: one success in a window of one); the
    step is saved with the model, and a resumed run trains without the curriculum."""
    run = _train_with_curriculum(
        tmp_path,
        "MiniGrid-MemoryS9-WestStart-Curriculum-Solved",
        "env.train_wrappers_until_success=0.01",
        "env.train_wrappers_window=1",
    )
    steps, active = read_scalars(run / "tb", "train/train_wrappers")
    _, success = read_scalars(run / "tb", "rollout/success_rate")
    first_success = int(np.flatnonzero(success > 0)[0])
    assert [int(a) for a in active] == [1] * first_success + [0] * (len(steps) - first_success)
    with zipfile.ZipFile(run / "model.zip") as archive:
        ended_at = json.loads(archive.read("data"))["train_wrappers_ended_at"]
    assert steps[first_success] - 128 < ended_at <= steps[first_success]
    _assert_resumed_without_curriculum(run, tmp_path)


@pytest.mark.parametrize("script", ["evaluate_run.py", "step_by_hand.py"])
def test_examples_load_a_runs_policy(script: str, run_dir: Path, workdir: Path):
    example = Path(__file__).resolve().parents[1] / "examples" / script
    result = subprocess.run(
        [sys.executable, str(example), str(run_dir), "--episodes", "4"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert ("mean return" in result.stdout) or result.stdout.count("episode ") == 4


def test_recording_threads_the_state_like_predict(run_dir: Path):
    """The recorder steps the core itself (for the diagnostics); its actions must be those of
    ``predict`` with the state passed back and ``episode_start`` set on each first step."""
    import mnm_rl
    from mnm_rl.env_factory import make_env
    from mnm_rl.recording import record_episodes

    policy = mnm_rl.load_policy(run_dir, device="cpu")
    spec = mnm_rl.load_run_config(run_dir).env
    recorded = record_episodes(policy, spec, episodes=3)
    env = make_env(spec)
    for k in range(3):
        obs, _ = env.reset(seed=spec.eval_seeds.seed(k))
        state, start, done, actions = None, True, False, []
        while not done:
            action, state = policy.predict(obs, state, [start], deterministic=True)
            start = False
            obs, _, terminated, truncated, _ = env.step(int(action))
            done = terminated or truncated
            actions.append(int(action))
        steps = [s for s in recorded.steps if s.episode == k]
        assert actions == [s.action for s in steps]
        # Values are continuous in the state: the whole episode in one forward pass (as in
        # training) must give the values recorded step by step.
        observations = [env.reset(seed=spec.eval_seeds.seed(k))[0]]
        for step in steps[:-1]:
            observations.append(env.step(step.action)[0])
        core = policy.policy
        batch = torch.stack([core.obs_to_tensor(o)[0] for o in observations])
        starts = torch.zeros(len(steps), 1)
        starts[0] = 1
        with torch.no_grad():
            _, values, _, _ = core.forward_sequence(batch, core.initial_state(1), starts)
        assert torch.allclose(values[:, 0], torch.tensor([s.value for s in steps]), atol=1e-5)
