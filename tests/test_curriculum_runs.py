"""benchmarks/curriculum_runs.py: when a curriculum run's curriculum ended, and what followed."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from benchmark_scripts import BENCHMARKS, load_script
from test_cli import tiny_memory_run

from mnm_rl.plotting import read_scalars


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    return tiny_memory_run(
        root,
        512,
        "env.train_wrappers_until=256",
        "train.eval_every=256",
        "train.eval_every_episodes=10",
        "train.eval_episodes=10",
    )


def test_summary_reads_the_switch_and_the_evaluations(curriculum_run):
    summary = load_script("curriculum_runs").run_summary(curriculum_run)
    with zipfile.ZipFile(curriculum_run / "model.zip") as archive:
        saved = json.loads(archive.read("data"))["train_wrappers_ended_at"]
    assert summary["curriculum_off"] == saved == 256
    final = json.loads((curriculum_run / "eval.json").read_text())["success_rate"]
    assert summary["final"] == final
    steps, success = read_scalars(curriculum_run / "tb", "eval/success_rate")
    reached = [int(s) for s, v in zip(steps, success, strict=True) if v >= 0.9]
    assert summary["heldout_0.9"] == (reached[0] if reached else None)
    assert summary["heldout_800k"] is None  # a 512-step run has no evaluation there


def _script(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / "curriculum_runs.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


def test_a_run_still_training_is_skipped(curriculum_run, tmp_path):
    training = tmp_path / "training"
    (training / "tb").mkdir(parents=True)  # no model.zip yet
    result = _script(curriculum_run, training)
    assert result.returncode == 0, result.stderr
    assert f"skipped {training}: no model.zip" in result.stderr
    rows = json.loads(result.stdout.splitlines()[-1])
    assert list(rows) == [str(curriculum_run)]
    assert _script(training).returncode == 2
