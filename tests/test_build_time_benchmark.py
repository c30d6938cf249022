"""benchmarks/build_time.py on two small extensions (tests/test_native.py's)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_script


def test_it_times_both_ways_from_an_empty_cache_each(with_tiny_extensions, capsys):
    build_time = load_script("build_time")
    modules = ["tiny_kernel_a", "tiny_kernel_b"]
    result = build_time.main(["--modules", *modules])
    out = capsys.readouterr().out
    assert set(result["seconds"]) == {"one after another", "in parallel"}
    for way in build_time.WAYS:
        assert result["seconds"][way] > 0
        assert set(result["per_module"][way]) == set(modules)
        # built each time: from an empty cache a build takes seconds, a cached load far less
        assert min(result["per_module"][way].values()) > 0.5
    assert out.count("round 1: ") == 2 and out.splitlines()[-1].startswith("{")
    assert result["speedup"] == pytest.approx(
        result["seconds"]["one after another"] / result["seconds"]["in parallel"]
    )


def test_a_build_that_fails_ends_the_benchmark_with_its_error(with_tiny_extensions):
    build_time = load_script("build_time")
    with pytest.raises(SystemExit, match="the 'one after another' build failed"):
        build_time.main(["--modules", "broken_kernel"])
