"""benchmarks/rollout_pieces.py: a rollout step's pieces, timed inside learn()."""

from __future__ import annotations

import json
import os

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def rollout_pieces():
    return load_script("rollout_pieces")


def test_times_each_piece_of_the_rollout_and_prints_a_json_last_line(rollout_pieces, capsys):
    before = dict(os.environ)
    out = rollout_pieces.main(["--configs", "mlp", "mnm-p:1x1/k2", "--rollouts", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    assert out["view"] == 3 and out["rollouts"] == 1
    assert list(out["us_per_step"]) == ["mlp", "mnm-p:1x1/k2"]
    mlp, mnm = out["us_per_step"]["mlp"], out["us_per_step"]["mnm-p:1x1/k2"]
    for pieces in (mlp, mnm):
        assert list(pieces) == rollout_pieces.PIECES
        assert pieces["rollout"] > pieces["env.step"] > 0
        assert pieces["act_later"] > pieces["  StepPlan.call"] > 0
        assert pieces["rest"] > 0
        assert sum(pieces[p] for p in (*rollout_pieces.TOP, "rest")) == pytest.approx(
            pieces["rollout"]
        )
        assert pieces["callbacks"] > 0  # every step calls them
        assert pieces["episode statistics"] >= 0 and pieces["bootstraps"] >= 0
    # an MLP policy's steps run here; an MNM policy's are begun on the thread and waited for
    assert mlp["  run_call"] > 0 and mlp["  launch_call"] == 0
    assert mnm["  launch_call"] > 0 and mnm["wait"] > mlp["wait"]
    assert dict(os.environ) == before  # /k2 set its variable for its config alone


@pytest.mark.parametrize(
    "argv", [["--rollouts", "0"], ["--view-size", "4"], ["--configs", "ceiling"]]
)
def test_bad_arguments_exit_with_status_2(rollout_pieces, argv):
    with pytest.raises(SystemExit) as exit_info:
        rollout_pieces.parse_args(argv)
    assert exit_info.value.code == 2


def test_nested_calls_of_a_piece_are_timed_once(rollout_pieces):
    from collections import defaultdict

    seconds, depth = defaultdict(float), defaultdict(int)
    calls = []

    def callback(children: int) -> None:
        calls.append(children)
        for _ in range(children):
            timed(0)  # a callback list calling its callbacks' own on_step

    timed = rollout_pieces._timed(callback, seconds, "callbacks", depth)
    clock = iter([0.0, 10.0])  # the outer call's start and end: the inner ones read no clock
    original = rollout_pieces.time.perf_counter
    rollout_pieces.time.perf_counter = lambda: next(clock)
    try:
        timed(2)
    finally:
        rollout_pieces.time.perf_counter = original
    assert calls == [2, 0, 0]
    assert seconds["callbacks"] == 10.0 and depth["callbacks"] == 0
