"""``mnm-rl sweep`` on Ray Tune: a tiny local sweep of 2 trials, its resume, and the trial logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnm_rl.cli import main
from mnm_rl.sweep import SweepSpec, train_args, trial_run_dir

TINY = [
    "--env", "DelayedCueRecall", "--agent", "lstm", "--seeds", "0", "1",
    "--timesteps", "256", "--n-envs", "4",
    "--set", "agent.policy.core_kwargs.hidden_size=8",
    "--set", "agent.policy.features_dim=8",
    "--set", "agent.ppo.n_steps=64",
    "--set", "agent.ppo.batch_size=128",
    "--set", "train.eval_episodes=10",
    "--set", "train.checkpoint_every=128",
    "--set", "train.eval_every=128",
    "--set", "train.eval_every_episodes=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_tiny_local_sweep_runs_two_trials_and_resumes(ray_local, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["sweep", *TINY, "--root", str(root), "--name", "tiny"]) == 0
    summary_path = root / "sweeps" / "tiny" / "summary.json"
    rows = json.loads(summary_path.read_text())
    assert [(r["env"], r["agent"], r["seed"], r["status"]) for r in rows] == [
        ("DelayedCueRecall", "lstm", 0, "done"),
        ("DelayedCueRecall", "lstm", 1, "done"),
    ]
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert run_dir.parent == root / "DelayedCueRecall" / "lstm"
        report = json.loads((run_dir / "eval.json").read_text())
        assert report["num_timesteps"] == row["env_steps"] >= 256
        assert report["success_rate"] == row["heldout_success"]
        assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # Without --resume an existing sweep is not overwritten; with it, finished trials are kept.
    assert main(["sweep", *TINY, "--root", str(root), "--name", "tiny"]) == 2
    assert "--resume" in capsys.readouterr().err
    mtimes = {r["run_dir"]: (Path(r["run_dir"]) / "eval.json").stat().st_mtime for r in rows}
    assert main(["sweep", *TINY, "--root", str(root), "--name", "tiny", "--resume"]) == 0
    again = json.loads(summary_path.read_text())
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows]
    assert all((Path(d) / "eval.json").stat().st_mtime == t for d, t in mtimes.items())


def _params(root: Path) -> dict:
    return {
        "sweep": "s", "root": str(root), "env": "DelayedCueRecall", "agent": "gru", "seed": 3,
        "timesteps": 1000, "n_envs": 2, "overrides": ["train.eval_episodes=5"],
        "hparams": {"agent.ppo.learning_rate": 0.001},
    }  # fmt: skip


def test_trial_args_start_resume_or_finish_an_interrupted_trial(tmp_path):
    params = _params(tmp_path)
    run_dir = trial_run_dir(tmp_path, params)
    assert run_dir == trial_run_dir(tmp_path, dict(params))  # fixed: a resumed sweep finds it
    assert run_dir != trial_run_dir(tmp_path, {**params, "hparams": {}})
    fresh = train_args(params, run_dir)
    assert fresh[:5] == ["train", "--env", "DelayedCueRecall", "--agent", "gru"]
    assert "agent.ppo.learning_rate=0.001" in fresh and "train.eval_episodes=5" in fresh
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_0000000500.zip").write_bytes(b"PK")
    assert train_args(params, run_dir)[:3] == ["train", "--resume", str(run_dir)]
    (run_dir / "model.zip").write_bytes(b"PK")
    assert train_args(params, run_dir) == ["eval", str(run_dir)]


def test_spec_file_and_bad_spec(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: s\nenvs: [DelayedCueRecall]\nagents: [lstm, gru]\nseeds: [0, 1, 2]\n"
        "grid: {agent.ppo.learning_rate: [5.0e-4, 1.0e-3]}\n"
    )
    spec = SweepSpec.from_file(path)
    assert spec.n_trials() == 12
    path.write_text("envs: [DelayedCueRecall]\nseed: [0]\n")
    with pytest.raises(ValueError, match="unknown sweep keys"):
        SweepSpec.from_file(path)


def test_sweep_without_ray_exits_2_with_the_install_hint(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["sweep", "--env", "DelayedCueRecall"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'mnm-rl[sweep]'" in err
