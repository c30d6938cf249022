"""benchmarks/throughput.py: the env it builds and what its JSON line records."""

from __future__ import annotations

import os

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def throughput():
    return load_script("throughput")


@pytest.mark.parametrize("view, cells", [(None, 3), ("3", 3), ("7", 7)])
def test_view_size_sets_what_both_agents_see(throughput, view, cells):
    """``--view-size`` is MiniGrid's ``agent_view_size`` for our env and sb3-contrib's alike;
    3 (our presets') unless given."""
    argv = ["--n-envs", "1"] + ([] if view is None else ["--view-size", view])
    args = throughput.parse_args(argv)
    ours = throughput.make_env(args)
    theirs = throughput.make_env(args, for_sb3_contrib=True)
    try:
        assert ours.observation_space["image"].shape == (cells, cells, 3)
        assert theirs.observation_space.shape == (cells, cells, 3)
        assert ours.reset()["image"].shape == (1, cells, cells, 3)
    finally:
        ours.close()
        theirs.close()


def test_summary_records_the_view_size(throughput):
    args = throughput.parse_args(["--view-size", "7", "--rounds", "1"])
    run = {"sps": 100.0, "cpu_sps": 90.0, "peak_mb": 300.0}
    out = throughput.summary(args, {"ceiling": [run], "lstm": [{**run, "sps": 40.0}]})
    assert out["view_size"] == 7
    assert out["ceiling_sps"] == 100.0 and out["sps"] == {"lstm": 40.0}


def test_rates_over_the_reference_are_taken_round_by_round(throughput, capsys):
    """Each config's rate is divided by the reference's of the same round (lstm/par by default
    when it was run, else lstm); the JSON line and the printed table carry them."""
    args = throughput.parse_args(["--configs", "ceiling", "lstm", "lstm/par", "mnm-p"])
    assert args.ratio_to == "lstm/par"
    assert throughput.parse_args(["--configs", "lstm", "mnm-p"]).ratio_to == "lstm"
    assert throughput.parse_args(["--configs", "ceiling", "mnm-p"]).ratio_to is None

    def runs(*rates):
        return [{"sps": r, "cpu_sps": r, "peak_mb": 300.0} for r in rates]

    results = {
        "ceiling": runs(1000.0, 900.0, 1100.0),
        "lstm": runs(100.0, 50.0, 80.0),
        "lstm/par": runs(200.0, 100.0, 160.0),
        "mnm-p": runs(100.0, 60.0, 72.0),
    }
    out = throughput.summary(args, results)
    assert out["ratio_to"] == "lstm/par"
    assert out["round_ratios"] == {"lstm": [0.5, 0.5, 0.5], "mnm-p": [0.5, 0.6, 0.45]}
    throughput.print_round_ratios(results, "lstm/par")
    printed = capsys.readouterr().out
    assert "rate over lstm/par's in the same round" in printed
    assert "mnm-p           0.50  0.60  0.45    0.50" in printed


def test_ratio_to_must_be_a_config_that_runs(throughput, capsys):
    with pytest.raises(SystemExit) as raised:
        throughput.parse_args(["--configs", "lstm", "mnm-p", "--ratio-to", "gru"])
    assert raised.value.code == 2
    assert "--ratio-to gru: not one of --configs" in capsys.readouterr().err


def test_saved_bytes_counts_each_saved_storage_once_and_keeps_them_apart(throughput):
    """A tensor saved by two ops, or twice by one, counts once; one saved by a part of the graph
    that is dropped while ``fn`` runs still counts, and does not let a later one take its
    address and its place (the total would then depend on the allocator's reuse)."""
    import torch

    x = torch.randn(256, requires_grad=True)  # 1 KB

    def squares():
        return x * x + x * 3  # x saved twice by the product (x * 3 saves nothing for x)

    assert throughput.saved_bytes(squares) == 1024

    def dropped_then_more():
        for _ in range(4):
            h = x * 2  # a new 1 KB tensor (a product with a number saves nothing)
            y = h * h  # saves h
            del h, y  # y's graph goes, and with it the saved h
        return [(x * 2) * (x * 2) for _ in range(3)]  # each saves two new 1 KB tensors

    assert throughput.saved_bytes(dropped_then_more) == 10 * 1024


def test_step_split_adds_up(capsys):
    """``benchmarks/step_split.py`` times env stepping, the rest of the rollout and the update
    of a whole ``learn()`` in a fresh process; the three parts fit in the total."""
    import json

    argv = "--env CartPole-v1 --n-envs 2 --n-steps 32 --batch-size 16 --seq-len 8 --n-epochs 1"
    out = load_script("step_split").main(
        [*argv.split(), "--rollouts", "2", "--rounds", "1", "--configs", "mlp"]
    )
    row = out["us_per_env_step"]["mlp"]
    assert all(row[part] > 0 for part in ("env", "policy+bookkeeping", "update"))
    parts = row["env"] + row["policy+bookkeeping"] + row["update"]
    assert parts <= row["total"] * 1.01 + 1.0, row
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


@pytest.mark.parametrize("config", ["lstm/par", "sb3-contrib", "ceiling"])
def test_step_split_refuses_what_is_not_our_agent_in_one_process(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("step_split").parse_args(["--configs", config])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"step_split.py: error: {config!r} is not one of our agents in one process"


@pytest.mark.parametrize("view", ["1", "4", "0"])
def test_view_size_must_be_an_odd_number_of_at_least_3(throughput, view, capsys):
    """MiniGrid needs an odd view of at least 3 cells: anything else is a one-line usage error
    (exit status 2), not a traceback from inside the first env."""
    with pytest.raises(SystemExit) as exit_info:
        throughput.parse_args(["--view-size", view])
    assert exit_info.value.code == 2
    assert "--view-size must be an odd number of at least 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, base, variables",
    [
        ("mnm-p:2x2", "mnm-p:2x2", {}),
        ("mnm-p/k2/mgview", "mnm-p", {"MNM_RL_KERNEL_THREADS": "2", "MNM_RL_FAST_VIEW": "0"}),
        ("lstm/mgview", "lstm", {"MNM_RL_FAST_VIEW": "0"}),
        ("ceiling/mgview", "ceiling", {"MNM_RL_FAST_VIEW": "0"}),
        ("lstm/npact/mgview", "lstm", {"MNM_RL_FAST_VIEW": "0", "MNM_RL_INT_ACTIONS": "0"}),
        ("mnm-g/eager/unmap", "mnm-g", {"MNM_RL_FUSED": "0", "MNM_RL_RETAIN_MEMORY": "0"}),
        ("lstm/pyheads", "lstm", {"MNM_RL_COMPILED_HEADS": "0"}),
        ("mnm-p/pyopt", "mnm-p", {"MNM_RL_COMPILED_OPTIMIZER": "0"}),
        ("lstm/autograd", "lstm", {"MNM_RL_EXPLICIT_BACKWARD": "0"}),
        ("mnm-p/k2/omp", "mnm-p", {"MNM_RL_KERNEL_THREADS": "2", "MNM_RL_PART_POOL": "0"}),
        (
            "lstm/pyheads/pyloss",
            "lstm",
            {"MNM_RL_COMPILED_HEADS": "0", "MNM_RL_COMPILED_LOSS": "0"},
        ),  # fmt: skip
    ],
)
def test_stacked_suffixes_each_set_their_variable(throughput, monkeypatch, config, base, variables):
    for variable, _ in throughput.SUFFIXES.values():
        monkeypatch.setenv(variable, "")  # recorded, so that what apply_suffixes sets is undone
        monkeypatch.delenv(variable)
    assert throughput.split_config(config)[0] == base.partition(":")[0]
    assert throughput.split_suffixes(config)[0] == base
    throughput.apply_suffixes(config)
    assert {v: os.environ[v] for v, _ in throughput.SUFFIXES.values() if v in os.environ} == (
        variables
    )


def _has_fast_view(env) -> bool:
    """Whether the fast view is installed; nothing else may stand in for ``gen_obs``."""
    from mnm_rl.envs.minigrid_view import FastGenObs

    installed = env.unwrapped.__dict__.get("gen_obs")
    assert installed is None or isinstance(installed, FastGenObs)
    return installed is not None


def _has_int_actions(env) -> bool:
    from stable_baselines3.common.env_util import is_wrapped

    from mnm_rl.envs.minigrid_actions import IntActions

    return is_wrapped(env, IntActions)


@pytest.mark.parametrize(
    "option, variable, has_it",
    [("fast_view", "MNM_RL_FAST_VIEW", _has_fast_view),
     ("int_actions", "MNM_RL_INT_ACTIONS", _has_int_actions)],
)  # fmt: skip
def test_every_agent_gets_each_minigrid_speedup_unless_told_not_to(
    throughput, monkeypatch, option, variable, has_it
):
    """The fast view and the int actions: on for our agents and sb3-contrib alike, off with the
    make_env option or with the variable that /mgview and /npact set in their worker process."""
    args = throughput.parse_args(["--n-envs", "2"])
    monkeypatch.delenv(variable, raising=False)
    for kwargs, on in (
        ({}, True),
        ({"for_sb3_contrib": True}, True),
        ({option: False}, False),
        ({"for_sb3_contrib": True, option: False}, False),
    ):
        env = throughput.make_env(args, **kwargs)
        try:
            assert [has_it(e) for e in env.envs] == [on, on], kwargs
        finally:
            env.close()
    monkeypatch.setenv(variable, "0")
    env = throughput.make_env(args)
    assert not any(has_it(e) for e in env.envs)
    env.close()


@pytest.mark.parametrize("before", [None, "7"])
@pytest.mark.parametrize("inside", [None, "0"])
def test_environment_variable_inside_and_restored(throughput, monkeypatch, before, inside):
    name = "MNM_RL_TEST_ONLY_VARIABLE"
    if before is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, before)
    with pytest.raises(RuntimeError, match="inside"):
        with throughput.environment_variable(name, inside):
            assert os.environ.get(name) == inside
            raise RuntimeError("inside")  # restored on the way out of an error too
    assert os.environ.get(name) == before


def test_the_kernels_not_built_are_built_first_and_in_one_go(
    throughput, with_tiny_extensions, monkeypatch, capsys
):
    from mnm_rl import native

    monkeypatch.setattr(native, "EXTENSION_MODULES", ("tiny_kernel_a", "tiny_kernel_b"))
    native.build_in_parallel(["tiny_kernel_b"])  # built; a is not
    capsys.readouterr()
    assert throughput.build_kernels() == ["tiny_kernel_a"]
    assert capsys.readouterr().out == "compiling 1 kernels first (in parallel)\n"
    assert throughput.build_kernels() == [] and capsys.readouterr().out == ""
