"""benchmarks/heldout_failures.py: a run's final evaluation grouped by how episodes start."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_script
from test_cli import TINY, mnm_rl, ok, only_run, tiny_memory_run

from mnm_rl.env_factory import make_env, resolve_env


@pytest.fixture(scope="module")
def failures():
    return load_script("heldout_failures")


def test_start_case_reads_the_episode_layout(failures):
    env = make_env(resolve_env("MiniGrid-Memory"))
    cases = {failures.start_case(env, seed) for seed in range(100_000, 100_200)}
    assert {column for column, _, _ in cases} == {1, 2, 3, 4}  # MemoryS7's corridor
    assert {(cue, target) for _, cue, target in cases} == {
        (cue, target) for cue in ("key", "ball") for target in ("up", "down")
    }
    for seed in range(100_000, 100_020):
        column, cue, target = failures.start_case(env, seed)
        grid_env = env.unwrapped
        # the object next to the goal cell is the cue's kind
        x, y = grid_env.success_pos
        assert grid_env.grid.get(x, y + (-1 if target == "up" else 1)).type == cue
        assert tuple(grid_env.agent_pos) == (column, grid_env.height // 2)


def test_failure_cases_add_up_to_the_final_evaluation(failures, tmp_path):
    run = tiny_memory_run(tmp_path, 256, "train.eval_episodes=24")
    result = failures.failure_cases(run)
    report = json.loads((run / "eval.json").read_text())
    assert result["success"] == report["success_rate"]
    assert sum(c["episodes"] for c in result["cases"]) == 24
    failed = sum(not e["success"] for e in report["per_episode"])
    assert sum(c["failures"] for c in result["cases"]) == failed
    assert all(0 <= c["failures"] <= c["episodes"] for c in result["cases"])


def test_a_run_of_another_env_is_refused(failures, tmp_path):
    ok(mnm_rl("train", *TINY, "--agent", "gru", cwd=tmp_path))  # DelayedCueRecall
    with pytest.raises(ValueError, match="is not a MiniGrid-Memory run"):
        failures.failure_cases(only_run(tmp_path))
