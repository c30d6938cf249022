"""benchmarks/arithmetic.py: FLOP counts of the cores, and the fused kernel's rate."""

from __future__ import annotations

import json
import os

import pytest
import torch
from benchmark_scripts import load_script
from compiled import built

from mnm_rl import native
from mnm_rl.memory import fused


@pytest.fixture(scope="module")
def arithmetic():
    return load_script("arithmetic")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """main() runs on one torch thread, as the script does: put the count back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_mnm_cores_are_counted_in_their_pytorch_form(arithmetic, monkeypatch):
    built(fused.EXTENSION)  # with the kernel built, its calls would count as no work
    monkeypatch.delenv(native.SWITCH_VARIABLE, raising=False)
    forward, train = arithmetic.step_flops("mnm-p", {"n_heads": 1, "n_layers": 1}, 16, 8)
    assert native.SWITCH_VARIABLE not in os.environ  # put back as it was
    monkeypatch.setenv(native.SWITCH_VARIABLE, "0")
    eager = arithmetic.step_flops("mnm-p", {"n_heads": 1, "n_layers": 1}, 16, 8)
    assert os.environ[native.SWITCH_VARIABLE] == "0"
    assert (forward, train) == eager
    # the input gates' product alone is 2 * 4 * width * features per step
    assert forward > 2 * 4 * 16 * 8
    assert train > 2 * forward


def test_kernel_rates_in_the_table_and_json(arithmetic, capsys, monkeypatch):
    built(fused.EXTENSION)
    monkeypatch.delenv(native.SWITCH_VARIABLE, raising=False)
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    result = arithmetic.main(["--kernel-calls", "2", "--kernel-batch", "4"])
    assert os.environ[fused.KERNEL_THREADS_VARIABLE] == "2"  # put back as it was
    assert fused.kernel_threads() == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result
    assert result["kernel_batch"] == 4 and result["tile_gflops"] > 0
    cores = result["cores"]
    assert "kernel_gflops" not in cores["lstm"]
    for name in ("mnm-p", "mnm-g", "mnm-p:2x2", "mnm-p:1x1"):
        row = cores[name]
        assert row["kernel_forward_ms"] > 0 and row["kernel_backward_ms"] > 0
        seconds = (row["kernel_forward_ms"] + row["kernel_backward_ms"]) / 1e3
        work = row["forward_backward_mflop"] * 1e6 * arithmetic.SEQ_LEN * 4
        assert row["kernel_gflops"] == pytest.approx(work / seconds / 1e9)
        assert row["kernel_fraction_of_tiles"] == pytest.approx(
            row["kernel_gflops"] / result["tile_gflops"]
        )
    # a larger memory is more arithmetic for every step
    assert cores["mnm-p"]["learn_mflop_per_env_step"] > cores["mnm-p:2x2"][
        "learn_mflop_per_env_step"
    ] > cores["mnm-p:1x1"]["learn_mflop_per_env_step"] > 0  # fmt: skip


def test_counts_alone_without_kernel_calls(arithmetic, capsys):
    result = arithmetic.main(["--kernel-calls", "0"])
    assert "tile_gflops" not in result
    assert "kernel_gflops" not in result["cores"]["mnm-p"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_kernel_pass_on_one_thread(arithmetic, monkeypatch):
    monkeypatch.setenv(fused.KERNEL_THREADS_VARIABLE, "2")
    seen = []
    original = fused.explicit_sequence

    def spy(*args, **kwargs):
        seen.append(fused.kernel_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "explicit_sequence", spy)
    kernel = built(fused.EXTENSION)
    arithmetic.kernel_pass_ms(kernel, "mnm-p", {"n_heads": 1, "n_layers": 1}, 16, 8, 4, 1)
    assert seen == [1] * 4  # three warm-up calls and one timed
    assert fused.kernel_threads() == 2


def test_kernel_timings_without_the_kernel_exit_2(arithmetic, monkeypatch, capsys):
    monkeypatch.setenv(native.SWITCH_VARIABLE, "0")
    with pytest.raises(SystemExit) as exit_info:
        arithmetic.main(["--kernel-calls", "2"])
    assert exit_info.value.code == 2
    assert "--kernel-calls 0" in capsys.readouterr().err
    assert arithmetic.main(["--kernel-calls", "0"])["cores"]["mnm-p"]["forward_mflop"] > 0


def test_bad_arguments_exit_2(arithmetic):
    with pytest.raises(SystemExit) as exit_info:
        arithmetic.main(["--kernel-batch", "0"])
    assert exit_info.value.code == 2
