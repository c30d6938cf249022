"""benchmarks/cue_gap.py: the same-chunk share and the per-episode gaps on a real run."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_script
from test_cli import TINY_AGENT, mnm_rl, ok, only_run


@pytest.fixture(scope="module")
def cue_gap():
    return load_script("cue_gap")  # it imports its sibling probe_cue


@pytest.mark.parametrize("gap", [0, 1, 7, 31, 32, 50])
def test_same_chunk_share_matches_enumerating_offsets(cue_gap, gap):
    seq_len = 32
    # Every offset of the sighting in the chunk grid: cue and choice share a chunk when the
    # choice, ``gap`` steps later, is still before the chunk's end.
    together = [(offset + gap) // seq_len == 0 for offset in range(seq_len)]
    assert cue_gap.same_chunk_share(np.array([gap]), seq_len) == pytest.approx(np.mean(together))


def test_same_chunk_share_averages_episodes(cue_gap):
    assert cue_gap.same_chunk_share(np.array([0, 16, 40]), 32) == pytest.approx((1 + 0.5 + 0) / 3)


def test_cue_gaps_on_a_trained_run(cue_gap, tmp_path):
    args = ["--env", "MiniGrid-MemoryS9-WestStart-Curriculum-800k", "--agent", "lstm"]
    ok(mnm_rl("train", *args, "--timesteps", "256", *TINY_AGENT, cwd=tmp_path))
    run = only_run(tmp_path)
    data = cue_gap.cue_gaps(run, 6, False, 0, True, None)
    gaps, lengths = data["gap"], data["length"]
    assert gaps.shape == lengths.shape == data["success"].shape == (6,)
    assert ((gaps >= -1) & (gaps < lengths)).all()
    assert (lengths >= 1).all() and (lengths <= 96).all()  # the preset's max_steps
    # the run's own env and the same preset by name play the same episodes
    again = cue_gap.cue_gaps(run, 6, False, 0, True, "MiniGrid-MemoryS9-WestStart-Curriculum-800k")
    assert (again["gap"] == gaps).all() and (again["length"] == lengths).all()
