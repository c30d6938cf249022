"""benchmarks/step_pieces.py: the compiled PPO loss and rollout core steps against PyTorch."""

from __future__ import annotations

import json
import os

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def step_pieces():
    return load_script("step_pieces")


def test_times_every_piece_both_ways_and_prints_a_json_last_line(step_pieces, capsys):
    before = os.environ.get("MNM_RL_FUSED"), os.environ.get("MNM_RL_COMPILED_STEP")
    out = step_pieces.main(["--rounds", "2", "--calls", "3", "--envs", "2", "--chunks", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    assert out["rounds"] == 2 and out["calls"] == 3
    assert list(out["pieces"]) == [
        "ppo loss", "lstm step", "gru step", "lstm policy", "gru policy", "mlp policy",
        "mnm-p policy", "training heads",
    ]  # fmt: skip
    for piece in out["pieces"].values():
        assert piece["compiled_us"] > 0 and piece["pytorch_us"] > 0
        assert piece["speedup"] == pytest.approx(piece["pytorch_us"] / piece["compiled_us"])
    # the switches are restored
    assert (os.environ.get("MNM_RL_FUSED"), os.environ.get("MNM_RL_COMPILED_STEP")) == before


@pytest.mark.parametrize(
    "argv", [["--rounds", "0"], ["--calls", "0"], ["--envs", "-1"], ["--view-size", "0"]]
)
def test_bad_numbers_exit_with_status_2(step_pieces, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step_pieces.parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_the_cell_op_runs_when_the_switch_is_off(step_pieces, monkeypatch):
    # time_calls sets MNM_RL_FUSED for the call only: the core takes the kernel with "1", the
    # cell op with "0"
    from mnm_rl.memory import rnn_kernels

    calls: list[int] = []
    apply = rnn_kernels.FusedLSTMSequence.apply
    monkeypatch.setattr(
        rnn_kernels.FusedLSTMSequence, "apply", lambda *a: calls.append(1) or apply(*a)
    )
    args = step_pieces.parse_args(["--envs", "3", "--hidden", "8"])
    step = step_pieces.core_step(step_pieces.LSTMCore, args)
    step_pieces.time_calls(step, 4, ("MNM_RL_FUSED", "0"))
    assert calls == []
    step_pieces.time_calls(step, 4, ("MNM_RL_FUSED", "1"))
    assert len(calls) == 5  # the warm-up call and four timed ones


def test_the_policy_steps_take_the_compiled_step_only_when_it_is_on(step_pieces, monkeypatch):
    from mnm_rl.agent import policy_step

    calls: list[int] = []
    real = policy_step.policy_step
    monkeypatch.setattr(policy_step, "policy_step", lambda *a: calls.append(1) or real(*a))
    args = step_pieces.parse_args(["--envs", "3", "--hidden", "8", "--view-size", "5"])
    act = step_pieces.policy_act("gru", args)
    step_pieces.time_calls(act, 4, ("MNM_RL_COMPILED_STEP", "0"))
    assert calls == []
    step_pieces.time_calls(act, 4, ("MNM_RL_COMPILED_STEP", "1"))
    assert len(calls) == 5


def test_the_training_heads_take_the_kernel_only_when_it_is_on(step_pieces, monkeypatch):
    from mnm_rl.agent import action_heads

    calls: list[int] = []
    real = action_heads.train_heads
    monkeypatch.setattr(action_heads, "train_heads", lambda *a: calls.append(1) or real(*a))
    args = step_pieces.parse_args(["--hidden", "8", "--chunks", "2", "--seq-len", "3"])
    heads = step_pieces.training_heads(args)
    step_pieces.time_calls(heads, 4, ("MNM_RL_COMPILED_HEADS", "0"))
    assert calls == []
    step_pieces.time_calls(heads, 4, ("MNM_RL_COMPILED_HEADS", "1"))
    assert len(calls) == 5
