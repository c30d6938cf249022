"""benchmarks/dense_products.py: the kernels' dense products against ATen's, timed in C++."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def dense_products():
    return load_script("dense_products")


def test_times_every_shape_and_prints_a_json_last_line(dense_products, capsys):
    out = dense_products.main(["--rounds", "1", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    assert [row["product"] for row in out["rows"]] == [s[0] for s in dense_products.SHAPES]
    assert out["rows"][5]["shape"] == "[256 x 256]^T x [256 x 64]"
    for row in out["rows"]:
        assert row["aten_gflops"] > 0 and row["dense_gflops"] > 0 and row["speedup"] > 0
        assert row["max_rel_diff"] < 1e-4  # the same product, up to rounding


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--repeats", "0"]])
def test_bad_numbers_exit_with_status_2(dense_products, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dense_products.parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be positive" in capsys.readouterr().err
