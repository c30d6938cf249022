"""benchmarks/kernel_pairs.py: its whole-update phase times like against like."""

from __future__ import annotations

import argparse
import os
import types

import pytest
import torch
from benchmark_scripts import load_script

from mnm_rl.agent import MemoryPPO

#: The issue's setting, shrunk: 2 envs x 16 steps, one epoch of 8-step chunks.
SMALL = argparse.Namespace(
    env="MiniGrid-MemoryS7-v0", view_size=7, n_envs=2, n_steps=16, batch_size=16,
    n_epochs=1, seq_len=8, hidden=16,
)  # fmt: skip


def test_updates_alternate_and_each_starts_from_the_same_parameters(monkeypatch):
    """Every timed ``train()`` starts from the parameters the collected rollout was made with
    (the update before it is undone), and the two builds take turns, each going first in every
    other pair."""
    kernel_pairs = load_script("kernel_pairs")
    monkeypatch.setattr(kernel_pairs, "UPDATE_SETTING", SMALL)
    starts: list[torch.Tensor] = []
    original = MemoryPPO.train

    def recording_train(self):
        starts.append(torch.cat([p.detach().flatten() for p in self.policy.parameters()]))
        original(self)

    monkeypatch.setattr(MemoryPPO, "train", recording_train)
    order: list[str] = []
    runners = {"other": lambda: order.append("other"), "kernel": lambda: order.append("kernel")}
    times = kernel_pairs.time_updates(1, 1, runners, pairs=3)

    assert order == ["other", "kernel", "kernel", "other", "other", "kernel"]
    assert [len(v) for v in times.values()] == [3, 3]
    assert all(t > 0 for v in times.values() for t in v)
    warm_up, *timed = starts
    assert len(timed) == 6
    assert not torch.equal(timed[0], warm_up)  # the warm-up's update moved the parameters
    for start in timed[1:]:
        assert torch.equal(start, timed[0])


def test_pair_speedup_is_the_median_of_each_pairs_ratio():
    kernel_pairs = load_script("kernel_pairs")
    other, kernel = [3.0, 1.0, 10.0], [1.0, 2.0, 5.0]
    # the pairs' ratios are 3, 0.5 and 2: their median is 2, the medians' ratio 3 / 2
    assert kernel_pairs.pair_speedup(other, kernel) == 2.0
    with pytest.raises(ValueError):
        kernel_pairs.pair_speedup(other, kernel[:2])


def test_an_unknown_size_is_refused_before_anything_is_built(monkeypatch, capsys):
    kernel_pairs = load_script("kernel_pairs")
    monkeypatch.setattr(kernel_pairs.fused, "load_extension", lambda: pytest.fail("built"))
    monkeypatch.setattr("sys.argv", ["kernel_pairs.py", "--sizes", "4x3", "9x9"])
    with pytest.raises(SystemExit) as exit_info:
        kernel_pairs.main()
    assert exit_info.value.code == 2
    assert "--sizes: 9x9 not among 1x1, 2x2, 4x3" in capsys.readouterr().err


def test_off_needs_update_configs_and_is_refused_before_anything_is_built(monkeypatch, capsys):
    kernel_pairs = load_script("kernel_pairs")
    monkeypatch.setattr(kernel_pairs.fused, "load_extension", lambda: pytest.fail("built"))
    monkeypatch.setattr("sys.argv", ["kernel_pairs.py", "--off", "MNM_RL_COMPILED_OPTIMIZER"])
    with pytest.raises(SystemExit) as exit_info:
        kernel_pairs.main()
    assert exit_info.value.code == 2
    assert "--off goes with --update-configs" in capsys.readouterr().err


def test_off_times_each_update_with_and_without_the_variable(monkeypatch, capsys):
    """``--off VARIABLE --update-configs lstm``: the other side's updates run with VARIABLE=0,
    this side's without it; a row per config, and the variable unset at the end."""
    kernel_pairs = load_script("kernel_pairs")
    monkeypatch.setattr(kernel_pairs, "UPDATE_SETTING", SMALL)
    monkeypatch.delenv("MNM_RL_COMPILED_OPTIMIZER", raising=False)
    seen: list[str | None] = []
    original = MemoryPPO.train

    def recording_train(self):
        seen.append(os.environ.get("MNM_RL_COMPILED_OPTIMIZER"))
        original(self)

    monkeypatch.setattr(MemoryPPO, "train", recording_train)
    monkeypatch.setattr("sys.argv", ["kernel_pairs.py", "--off", "MNM_RL_COMPILED_OPTIMIZER",
                                     "--update-configs", "lstm", "--pairs", "2"])  # fmt: skip
    rows = kernel_pairs.main()
    assert [row["config"] for row in rows] == ["lstm"]
    assert rows[0]["other_ms"] > 0 and rows[0]["kernel_ms"] > 0
    # the warm-up learn() (this side), then pairs: other first, then this side first
    assert seen == [None, "0", None, None, "0"]
    assert "MNM_RL_COMPILED_OPTIMIZER" not in os.environ
    assert "MNM_RL_COMPILED_OPTIMIZER=0 ms" in capsys.readouterr().out


def test_an_older_build_takes_what_it_lacks_from_this_checkouts():
    """``--against`` an older commit: the other build's own functions where it has them, and
    this checkout's for those it does not have yet (``reconstruction_errors``)."""
    kernel_pairs = load_script("kernel_pairs")
    older = types.SimpleNamespace(lstm_forward="older lstm")
    current = types.SimpleNamespace(lstm_forward="current lstm", reconstruction_errors="current")
    other = kernel_pairs._TwelveOutputs(older, current)
    assert other.lstm_forward == "older lstm"
    assert other.reconstruction_errors == "current"
    with pytest.raises(AttributeError):
        other.no_such_function  # noqa: B018
