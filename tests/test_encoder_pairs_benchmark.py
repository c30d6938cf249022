"""benchmarks/encoder_pairs.py: its two paths are the extractor's plain and compiled ones."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from benchmark_scripts import load_script

from mnm_rl.agent import MemoryPPO, grid_linear

SMALL = argparse.Namespace(
    env="MiniGrid-MemoryS7-v0", view_size=7, n_envs=2, n_steps=16, batch_size=16,
    n_epochs=1, seq_len=8, hidden=16,
)  # fmt: skip


def test_each_update_runs_the_path_it_is_timed_for(monkeypatch, capsys):
    """Plain updates never call the kernel, compiled ones do, in turns (each first in every
    other pair)."""
    if grid_linear.load_extension() is None:
        pytest.skip("the grid kernel cannot be built here")
    encoder_pairs = load_script("encoder_pairs")
    monkeypatch.setitem(encoder_pairs.time_train_calls.__globals__, "UPDATE_SETTING", SMALL)
    calls: list[int] = []
    kernel = grid_linear.grid_linear
    monkeypatch.setattr(grid_linear, "grid_linear", lambda *a: calls.append(1) or kernel(*a))
    compiled: list[bool] = []
    train = MemoryPPO.train

    def recording_train(self):
        calls.clear()
        train(self)
        compiled.append(bool(calls))

    monkeypatch.setattr(MemoryPPO, "train", recording_train)
    monkeypatch.delenv("MNM_RL_EXPLICIT_BACKWARD", raising=False)
    rows = encoder_pairs.main(["--configs", "lstm", "--pairs", "2"])
    # the warm-up, then plain/compiled turns, both through autograd (the grid Function's path)
    assert compiled == [True, False, True, True, False]
    assert "MNM_RL_EXPLICIT_BACKWARD" not in os.environ  # switched back after the run
    assert rows[0]["config"] == "lstm" and rows[0]["plain_ms"] > 0 and rows[0]["compiled_ms"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rows


def test_the_switches_turn_the_compiled_path_off_and_on_again():
    encoder_pairs = load_script("encoder_pairs")

    class Extractor:
        grid_layout = ("image", "layout")

    model = argparse.Namespace(policy=argparse.Namespace(features_extractor=Extractor()))
    encoder_pairs.use_plain(model)
    assert model.policy.features_extractor.grid_layout is None
    encoder_pairs.use_plain(model)  # twice: still off, and the layout still kept
    encoder_pairs.use_compiled(model)
    assert model.policy.features_extractor.grid_layout == ("image", "layout")
    model.policy.features_extractor = Extractor()
    model.policy.features_extractor.grid_layout = None
    with pytest.raises(RuntimeError, match="no grid"):
        encoder_pairs.use_compiled(model)
