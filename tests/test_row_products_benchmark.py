"""benchmarks/row_products.py: the kernel's hand-written products alone, against a revision."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def row_products():
    return load_script("row_products")


def test_times_every_product_and_prints_a_json_last_line(row_products, capsys):
    out = row_products.main(["--rounds", "1", "--repeats", "2", "--batch", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    assert [row["product"] for row in out["rows"]] == [s[0] for s in row_products.SHAPES]
    assert out["rows"][0]["shape"] == "3 x [8 x 64] x [64 x 64]"
    assert out["rows"][2]["shape"] == "1 x [3 x 256] x [256 x 128]"
    assert all(row["gflops"] > 0 and "speedup" not in row for row in out["rows"])


def test_a_revision_that_git_does_not_know_is_refused(row_products, capsys):
    with pytest.raises(SystemExit) as exit_info:
        row_products.main(["--against", "no-such-revision", "--rounds", "1"])
    assert "--against no-such-revision" in str(exit_info.value)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--batch", "0"], ["--repeats", "-1"]])
def test_bad_numbers_exit_with_status_2(row_products, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        row_products.parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be positive" in capsys.readouterr().err


def test_the_header_is_read_from_git_with_its_namespace_renamed(row_products):
    text = row_products.header_at("HEAD")
    assert "namespace mnm_rl_other {" in text and "namespace mnm_rl {" not in text
    assert "rank_update" in text
