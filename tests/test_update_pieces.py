"""benchmarks/update_pieces.py: an update's wall time split into pieces."""

from __future__ import annotations

import json
import os
import time

import pytest
from benchmark_scripts import load_script

from mnm_rl.agent import gradient_step
from mnm_rl.memory import fused
from mnm_rl.memory.fast_weights import FastWeightMemory


@pytest.fixture(scope="module")
def update_pieces():
    return load_script("update_pieces")


def test_pieces_and_rest_add_up_to_the_update(update_pieces, capsys, monkeypatch):
    monkeypatch.delenv(fused.KERNEL_THREADS_VARIABLE, raising=False)
    originals = (fused._kernel_forward, gradient_step.adam_step,
                 FastWeightMemory.__dict__["reconstruction_loss"])  # fmt: skip
    rows = update_pieces.main(["--configs", "lstm", "mnm-p:1x1/k2", "--updates", "1",
                               "--view-size", "3"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == rows
    assert [row["config"] for row in rows] == ["lstm", "mnm-p:1x1/k2"]
    glue = {
        "core glue forward",
        "core glue backward",
        "policy glue forward",
        "policy glue backward",
        "minibatch loss glue",
    }
    expected = {
        "lstm": {"LSTM kernel forward", "LSTM kernel backward", "projections forward",
                 "extractor backward", "heads forward", "Adam", "minibatch gathers", "rest"},
        "mnm-p:1x1/k2": {"MNM kernel forward", "MNM kernel backward", "reconstruction losses",
                         "projections backward", "PPO loss", "clip", "rest"},
    }  # fmt: skip
    for row in rows:
        pieces = row["pieces"]
        assert expected[row["config"]] | glue <= set(pieces), row
        assert all(ms > 0 for name, ms in pieces.items() if name != "rest")
        assert "MNM kernel forward" not in pieces or row["config"] != "lstm"
        # one update: the pieces, each without the pieces it calls, and the rest are its time
        assert sum(pieces.values()) == pytest.approx(row["update_ms"], rel=1e-9)
        assert 0 <= pieces["rest"] < row["update_ms"]
    # the wrappers are gone and /k2's variable is not left set
    assert (fused._kernel_forward, gradient_step.adam_step,
            FastWeightMemory.__dict__["reconstruction_loss"]) == originals  # fmt: skip
    assert fused.KERNEL_THREADS_VARIABLE not in os.environ


def test_nested_pieces_are_counted_once(update_pieces):
    """A piece's time is its own: without that of the pieces it calls."""
    watch = update_pieces.Stopwatch()
    inner = watch.timed("inner", lambda: time.sleep(0.03))

    def outer_body():
        inner()
        time.sleep(0.01)

    watch.timed("outer", outer_body)()
    assert set(watch.seconds) == {"inner", "outer"}
    assert watch.seconds["inner"] >= 0.03
    assert 0.01 <= watch.seconds["outer"] < 0.03  # 40 ms in all, 30 of them inner's


@pytest.mark.parametrize("argv", [["--updates", "0"], ["--configs", "lstm/par"],
                                  ["--configs", "sb3-contrib"]])  # fmt: skip
def test_bad_arguments_exit_with_status_2(update_pieces, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        update_pieces.parse_args(argv)
    assert exit_info.value.code == 2
    assert "--" in capsys.readouterr().err
