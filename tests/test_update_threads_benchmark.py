"""benchmarks/update_threads.py: whole PPO updates on one kernel thread against two."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load_script

SMALL = ["--n-envs", "2", "--n-steps", "16", "--batch-size", "16", "--n-epochs", "1",
         "--seq-len", "8", "--hidden", "16"]  # fmt: skip


def test_it_prints_a_table_and_a_json_last_line(capsys):
    bench = load_script("update_threads")
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--configs", "lstm", "mnm-p:1x1", "--pairs", "2", *SMALL])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == rows
    assert [r["config"] for r in rows] == ["lstm", "mnm-p:1x1"]
    for row in rows:
        assert row["threads"] == 2 and row["one_thread_ms"] > 0 and row["split_ms"] > 0
        low, high = row["ci95"]
        assert low <= row["speedup"] <= high
    assert any(line.startswith("mnm-p:1x1") for line in lines)


@pytest.mark.parametrize("argv", [["--threads", "1"], ["--pairs", "0"]])
def test_it_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("update_threads").parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err
