"""benchmarks/learn_pairs.py: agents in one process take turns; ratios are taken turn by turn."""

from __future__ import annotations

import json
import os

import pytest
import torch
from benchmark_scripts import load_script

SMALL = ["--n-envs", "2", "--n-steps", "16", "--batch-size", "16", "--n-epochs", "1",
         "--seq-len", "8", "--hidden", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def learn_pairs():
    return load_script("learn_pairs")


@pytest.mark.parametrize(
    "config, agent, kernel_threads, env_workers, off",
    [
        ("lstm", "lstm", 1, 0, set()),
        ("mnm-p/k2/par", "mnm-p", 2, 1, set()),
        ("mnm-p:2x2/par", "mnm-p:2x2", 1, 1, set()),
        ("mnm-g/k2", "mnm-g", 2, 0, set()),
        ("ceiling/mgview", "ceiling", 1, 0, {"fast_view"}),
        ("mnm-p/k2/mgview/par", "mnm-p", 2, 1, {"fast_view"}),
        ("mnm-p/mgview/k2", "mnm-p", 2, 0, {"fast_view"}),
        ("ceiling/npact", "ceiling", 1, 0, {"int_actions"}),
        ("lstm/mgview/npact/par", "lstm", 1, 1, {"fast_view", "int_actions"}),
        ("mnm-p/npact/eager", "mnm-p/eager", 1, 0, {"int_actions"}),
        ("mnm-p/eager", "mnm-p/eager", 1, 0, set()),
        ("lstm/pyheads/par", "lstm", 1, 1, {"compiled_heads"}),
        ("mnm-p/k2/pyheads/npact", "mnm-p", 2, 0, {"int_actions", "compiled_heads"}),
        ("lstm/pyloss/par", "lstm", 1, 1, {"compiled_loss"}),
        ("mnm-p/k2/pyloss/pyheads", "mnm-p", 2, 0, {"compiled_heads", "compiled_loss"}),
        ("lstm/pystep/par", "lstm", 1, 1, {"compiled_step"}),
        ("gru/pystep/pyheads", "gru", 1, 0, {"compiled_heads", "compiled_step"}),
        ("lstm/atenmm/par", "lstm", 1, 1, {"dense_products"}),
        ("mnm-p/pyopt/par", "mnm-p", 1, 1, {"compiled_optimizer"}),
        ("ceiling/mgreset", "ceiling", 1, 0, {"fast_reset"}),
        ("lstm/mgreset/mgview/par", "lstm", 1, 1, {"fast_view", "fast_reset"}),
        ("lstm/viewcalc/par", "lstm", 1, 1, {"kept_views"}),
        ("ceiling/mgstep", "ceiling", 1, 0, {"fast_step"}),
        ("mnm-p/k2/mgstep/viewcalc", "mnm-p", 2, 0, {"kept_views", "fast_step"}),
        ("lstm/autograd/par", "lstm", 1, 1, {"explicit_backward"}),
    ],
)  # fmt: skip
def test_configs_name_threads_workers_view_actions_heads_loss_step(
    learn_pairs, config, agent, kernel_threads, env_workers, off
):
    """``off``: the switches the config's suffixes turn off; every other one is on."""
    switches = learn_pairs.Config._fields[3:]
    assert off <= set(switches)
    expected = learn_pairs.Config(
        agent, kernel_threads, env_workers, *(name not in off for name in switches)
    )
    assert learn_pairs.parse_config(config) == expected


@pytest.mark.parametrize(
    "configs, message",
    [
        (["lstm"], "give at least two configs"),
        (["lstm", "lstm"], "each config once"),
        (["lstm", "lsmt"], "'lsmt' is not one of lstm, gru"),
        (["lstm", "ceiling/k2"], "'ceiling/k2' /k2 is for our agents"),
        (["lstm", "sb3-contrib/k2/par"], "'sb3-contrib/k2/par' /k2 is for our agents"),
        (["lstm", "ceiling/pyheads"], "'ceiling/pyheads' /pyheads is for our agents"),
        (["lstm", "sb3-contrib/pyloss"], "'sb3-contrib/pyloss' /pyloss is for our agents"),
        (["lstm", "ceiling/pystep"], "'ceiling/pystep' /pystep is for our agents"),
        (["lstm", "ceiling/atenmm"], "'ceiling/atenmm' /atenmm is for our agents"),
        (["lstm", "sb3-contrib/pyopt"], "'sb3-contrib/pyopt' /pyopt is for our agents"),
        (["lstm", "ceiling/autograd"], "'ceiling/autograd' /autograd is for our agents"),
        (["lstm", "mnm-p/eager"], "'mnm-p/eager' holds for a whole process"),
        (["lstm", "lstm@2"], "'lstm@2' holds for a whole process"),
        (["lstm", "gru", "--ratio-to", "mlp"], "--ratio-to mlp: not one of --configs"),
    ],
)
def test_what_cannot_run_in_turns_is_refused(learn_pairs, configs, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        learn_pairs.parse_args(["--configs", *configs])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "variable",
    [
        "MNM_RL_KERNEL_THREADS",
        "MNM_RL_FAST_VIEW",
        "MNM_RL_INT_ACTIONS",
        "MNM_RL_COMPILED_HEADS",
        "MNM_RL_COMPILED_LOSS",
    ],
)
def test_the_variables_it_sets_by_agent_are_refused(learn_pairs, monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, "2")
    with pytest.raises(SystemExit) as exit_info:
        learn_pairs.parse_args([])
    assert exit_info.value.code == 2
    assert f"unset {variable}" in capsys.readouterr().err


def test_the_setting_options_reach_every_agent(learn_pairs):
    args = learn_pairs.parse_args(["--view-size", "7", *SMALL])
    s = args.setting
    assert (s.view_size, s.n_envs, s.n_steps, s.batch_size, s.n_epochs) == (7, 2, 16, 16, 1)
    assert (s.seq_len, s.hidden, s.env) == (8, 16, "MiniGrid-MemoryS7-v0")
    assert learn_pairs.parse_args([]).setting.view_size == 3  # throughput.py's default


@pytest.mark.parametrize(
    "configs, default",
    [(["gru", "lstm", "lstm/par"], ["lstm/par"]), (["gru", "lstm"], ["lstm"]),
     (["gru", "mlp"], ["gru"])],
)  # fmt: skip
def test_the_default_reference_is_the_fastest_lstm_run(learn_pairs, configs, default):
    assert learn_pairs.parse_args(["--configs", *configs]).ratio_to == default


def test_ratios_are_taken_turn_by_turn(learn_pairs):
    args = learn_pairs.parse_args(
        ["--configs", "lstm", "mlp", "sb3-contrib", "--ratio-to", "lstm", "sb3-contrib"]
    )
    # the rates swing 2x between turns; mlp is half of lstm and 5x sb3-contrib in every turn
    rates = {
        "lstm": [100.0, 200.0, 100.0],
        "mlp": [50.0, 100.0, 50.0],
        "sb3-contrib": [10.0, 20.0, 10.0],
    }
    episodes = {config: [None, 4.0, 5.0] for config in rates}
    out = learn_pairs.summary(args, learn_pairs.Turns(rates, rates, episodes))
    by_lstm, by_sb3 = out["ratio_to"]["lstm"], out["ratio_to"]["sb3-contrib"]
    assert by_lstm["median"] == {"mlp": 0.5, "sb3-contrib": 0.1}
    assert by_lstm["quartiles"]["mlp"] == [0.5, 0.5] and by_lstm["ci95"]["mlp"] == [0.5, 0.5]
    assert by_lstm["range"] == {"mlp": [0.5, 0.5], "sb3-contrib": [0.1, 0.1]}
    assert by_sb3["median"] == {"lstm": 10.0, "mlp": 5.0}
    assert out["sps"] == {"lstm": 100.0, "mlp": 50.0, "sb3-contrib": 10.0}
    assert out["rates"] == rates and out["episode_steps"] == episodes


def test_turns_alternate_and_the_warm_up_is_not_counted(learn_pairs):
    seen: list[str] = []

    class Recording:
        """Ends two episodes of 3 steps at every turn (lstm), or one of 20 at every other."""

        def __init__(self, config):
            self.config, self.steps, self.turns = config, 10, 0

        def take_turn(self):
            seen.append(self.config)
            self.turns += 1
            return 0.5, 0.25

        def episodes(self):
            if self.config == "lstm":
                return 2 * self.turns, 6 * self.turns
            return self.turns // 2, 20 * (self.turns // 2)

    agents = {"lstm": Recording("lstm"), "mnm-p/k2": Recording("mnm-p/k2")}
    timed = learn_pairs.run_pairs(agents, pairs=3, warm_up=1)
    assert seen == ["lstm", "mnm-p/k2", "mnm-p/k2", "lstm"] * 2
    assert timed.rates == {"lstm": [20.0] * 3, "mnm-p/k2": [20.0] * 3}  # warm-up not counted
    assert timed.cpu_rates == {"lstm": [40.0] * 3, "mnm-p/k2": [40.0] * 3}
    assert timed.episode_steps == {"lstm": [3.0] * 3, "mnm-p/k2": [20.0, None, 20.0]}


def test_an_agent_sets_its_kernel_threads_only_while_it_learns(learn_pairs, monkeypatch):
    from mnm_rl.memory import fused

    monkeypatch.delenv("MNM_RL_KERNEL_THREADS", raising=False)
    args = learn_pairs.parse_args(SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel's threads follow torch's unless an agent sets them
    agent = learn_pairs.Agent("mnm-p:1x1/k2", args.setting)
    during: list[int] = []
    original = agent.model.learn
    monkeypatch.setattr(
        agent.model,
        "learn",
        lambda *a, **k: during.append(fused.kernel_threads()) or original(*a, **k),
    )
    try:
        wall, cpu = agent.take_turn()
        assert wall > 0 and cpu > 0
        assert during == [2]
        assert fused.kernel_threads() == 1  # torch's again
    finally:
        agent.env.close()
        torch.set_num_threads(threads)
    assert agent.model.num_timesteps == 2 * 16


@pytest.mark.parametrize("config", ["mlp", "mnm-p:1x1/k2", "sb3-contrib"])
@pytest.mark.parametrize(("phase", "rollouts", "updates"), [("rollout", 3, 0), ("update", 0, 3)])
def test_a_phase_turn_times_the_rollout_or_the_update_alone(
    learn_pairs, monkeypatch, config, phase, rollouts, updates
):
    """``--phase rollout``: each turn one ``collect_rollouts`` of the agent's rollout and no
    update; ``--phase update``: each turn one ``train()`` and no env step (after one untimed
    ``learn()`` of one rollout); the agent's kernel threads hold during the phase."""
    from mnm_rl.memory import fused

    agent = learn_pairs.Agent(config, learn_pairs.parse_args(SMALL).setting, phase)
    try:
        model = agent.model
        calls = {"rollout": 0, "update": 0}
        threads = []
        original_rollout, original_train = model.collect_rollouts, model.train

        def rollout(*args):
            calls["rollout"] += 1
            threads.append(fused.kernel_threads())
            return original_rollout(*args)

        def train():
            calls["update"] += 1
            threads.append(fused.kernel_threads())
            return original_train()

        monkeypatch.setattr(model, "collect_rollouts", rollout)
        monkeypatch.setattr(model, "train", train)
        start = model.num_timesteps
        assert start == agent.steps  # the untimed learn() of one rollout
        for _ in range(3):
            wall, cpu = agent.take_turn()
            assert wall > 0 and cpu > 0
        assert (calls["rollout"], calls["update"]) == (rollouts, updates)
        assert model.num_timesteps == start + rollouts * agent.steps
        assert threads == [2 if config.endswith("/k2") else 1] * 3
    finally:
        agent.env.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--phase", "update", "--configs", "lstm", "ceiling"], "the ceiling has no update"),
        (["--phase", "fast"], "invalid choice"),
    ],
)
def test_a_phase_that_cannot_run_is_refused(learn_pairs, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        learn_pairs.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, steps, heads, losses, explicit_passes",
    [("lstm", 17, 0, 2, 2), ("lstm/pystep", 0, 17, 2, 2), ("lstm/pystep/pyheads", 0, 0, 2, 0),
     ("lstm/pyheads", 17, 0, 2, 0), ("lstm/pyloss", 17, 0, 0, 0), ("lstm/autograd", 17, 0, 2, 0),
     ("mnm-p:1x1", 17, 0, 2, 2), ("mnm-p:1x1/pystep", 0, 17, 2, 2),
     ("mnm-p:1x1/pystep/pyheads/pyloss", 0, 0, 0, 0)],
)  # fmt: skip
def test_an_agent_runs_pytorch_code_only_where_its_suffixes_say(
    learn_pairs, monkeypatch, config, steps, heads, losses, explicit_passes
):
    """How many compiled policy steps, heads, losses and explicit backward passes an agent's
    turn calls; SMALL: 2 envs x 16 steps (16 rollout steps and one for the last observation's
    value) in chunks of 8, 2 chunks a minibatch, 1 epoch; the compiled steps run on the
    rollout's thread (``run_call``: the rollout's and ``policy_step``'s) or, an MNM policy's,
    on the step thread (``launch_call``). A policy step runs the heads itself:
    with it, the heads' own kernel is not called. The explicit pass needs the compiled loss
    and heads (not with ``/pyloss``, ``/pyheads``)."""
    from mnm_rl.agent import action_heads, explicit, policy_step, ppo_loss

    if None in (action_heads.load_extension(), ppo_loss.load_extension(),
                policy_step.load_extension()):  # fmt: skip
        pytest.skip("a compiled piece cannot be built here")
    switches = ("MNM_RL_COMPILED_HEADS", "MNM_RL_COMPILED_LOSS", "MNM_RL_COMPILED_STEP",
                "MNM_RL_EXPLICIT_BACKWARD")  # fmt: skip
    for variable in switches:
        monkeypatch.delenv(variable, raising=False)
    calls: dict[str, int] = {"steps": 0, "heads": 0, "losses": 0, "explicit": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)

        return call

    monkeypatch.setattr(policy_step, "run_call", counted("steps", policy_step.run_call))
    # an MNM policy's rollout steps, begun on the compiled step's own thread
    monkeypatch.setattr(policy_step, "launch_call", counted("steps", policy_step.launch_call))
    monkeypatch.setattr(action_heads, "heads_step", counted("heads", action_heads.heads_step))
    monkeypatch.setattr(ppo_loss, "_kernel_loss", counted("losses", ppo_loss._kernel_loss))
    monkeypatch.setattr(explicit, "apply_gradients", counted("explicit", explicit.apply_gradients))
    agent = learn_pairs.Agent(config, learn_pairs.parse_args(SMALL).setting)
    try:
        agent.take_turn()
    finally:
        agent.env.close()
    assert calls == {"steps": steps, "heads": heads, "losses": losses,
                     "explicit": explicit_passes}  # fmt: skip
    assert not any(v in os.environ for v in switches)  # set only while that agent learned


def test_a_run_prints_a_table_and_a_json_last_line(learn_pairs, capsys, tmp_path):
    threads = torch.get_num_threads()
    try:  # main() runs with one torch thread, as throughput.py's workers do
        configs = ["mlp", "mnm-p:1x1/par", "ceiling", "sb3-contrib"]
        out = learn_pairs.main(["--configs", *configs, "--pairs", "2", "--warm-up", "0", *SMALL])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == out
    assert set(out["sps"]) == {"mlp", "mnm-p:1x1/par", "ceiling", "sb3-contrib"}
    assert all(v > 0 for v in out["sps"].values())
    assert [len(r) for r in out["rates"].values()] == [2, 2, 2, 2]
    assert [len(r) for r in out["cpu_rates"].values()] == [2, 2, 2, 2]
    assert set(out["ratio_to"]["mlp"]["median"]) == {"mnm-p:1x1/par", "ceiling", "sb3-contrib"}
    assert any(line.startswith("mnm-p:1x1/par") for line in lines)
    # 2 envs x 16 steps a turn on MiniGrid-MemoryS7 (at most 245 steps an episode): a turn
    # may end no episode, and any that ended took at least a step
    assert [len(e) for e in out["episode_steps"].values()] == [2, 2, 2, 2]
    assert all(e is None or e >= 1 for es in out["episode_steps"].values() for e in es)
    assert any("steps per episode that ended" in line for line in lines)
    # the saved output summarised again against another reference, running nothing
    saved = tmp_path / "run.txt"
    saved.write_text("\n".join(lines) + "\n")
    again = learn_pairs.main(["--from-json", str(saved), "--ratio-to", "ceiling", "sb3-contrib"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == again
    assert again["rates"] == out["rates"] and again["sps"] == out["sps"]
    assert list(again["ratio_to"]) == ["ceiling", "sb3-contrib"]
    mlp, ceiling = out["rates"]["mlp"], out["rates"]["ceiling"]
    assert again["ratio_to"]["ceiling"]["median"]["mlp"] == pytest.approx(
        (mlp[0] / ceiling[0] + mlp[1] / ceiling[1]) / 2
    )
    assert learn_pairs.main(["--from-json", str(saved)])["ratio_to"] == out["ratio_to"]


RATES = {"a": [2.0, 4.0, 6.0], "b": [1.0, 2.0, 2.0]}
SAVED = {"rates": RATES, "cpu_rates": RATES, "ratio_to": {"a": {}}}


def test_a_saved_json_line_alone_is_summarised_again(learn_pairs, tmp_path, capsys):
    saved = tmp_path / "line.json"
    saved.write_text("turn 10/10 ...\n{not json\n" + json.dumps(SAVED) + "\n")
    out = learn_pairs.main(["--from-json", str(saved), "--ratio-to", "b"])
    assert out["ratio_to"]["b"]["median"] == {"a": 2.0}  # ratios 2, 2, 3
    assert out["ratio_to"]["b"]["range"] == {"a": [2.0, 3.0]}
    assert "rate over b's in the same turn" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, ratio_to, message",
    [
        (None, [], "No such file"),
        ("lstm 5000 steps/s\n", [], "no JSON line of learn_pairs.py"),
        (json.dumps({"sps": {"a": 1.0}}), [], "no JSON line of learn_pairs.py"),
        (json.dumps(SAVED), ["--ratio-to", "c"], "--ratio-to c: not one of the saved run's"),
        (json.dumps(SAVED), ["--configs", "a", "b"], "takes only --ratio-to, not --configs"),
        (json.dumps(SAVED), ["--phase", "update"], "takes only --ratio-to, not --phase"),
        (
            json.dumps(SAVED),
            ["--pairs", "9", "--view-size", "7"],
            "takes only --ratio-to, not --pairs --view-size",
        ),
    ],
)
def test_a_saved_run_that_cannot_be_read_is_refused(
    learn_pairs, tmp_path, capsys, content, ratio_to, message
):
    saved = tmp_path / "run.txt"
    if content is not None:
        saved.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        learn_pairs.parse_args(["--from-json", str(saved), *ratio_to])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_median_interval_takes_the_binomial_order_statistics(learn_pairs):
    values = [float(v) for v in range(100)]  # shuffled order does not matter
    values.reverse()
    # n = 100: k = floor((100 - 1.96 * 10) / 2) = 40, so the 41st and 60th smallest
    assert learn_pairs.median_interval(values) == [40.0, 59.0]
    assert learn_pairs.median_interval([3.0, 1.0, 2.0]) == [1.0, 3.0]  # too few: min and max
    assert learn_pairs.median_interval([7.0]) == [7.0, 7.0]


def test_an_agent_steps_minigrid_view_only_with_mgview_and_numpy_actions_with_npact(learn_pairs):
    from stable_baselines3.common.env_util import is_wrapped

    from mnm_rl.envs.minigrid_actions import IntActions
    from mnm_rl.envs.minigrid_memory import FastMemoryGrid, FastMemoryStep, KeptViews
    from mnm_rl.envs.minigrid_view import FastGenObs

    args = learn_pairs.parse_args(SMALL)
    for config, fast, ints, grid, kept, step in (
        ("ceiling", True, True, True, True, True),
        ("ceiling/mgview", False, True, True, False, True),
        ("ceiling/npact", True, False, True, True, True),
        ("ceiling/mgreset", True, True, False, False, False),
        ("ceiling/viewcalc", True, True, True, False, True),
        ("ceiling/mgstep", True, True, True, True, False),
        ("sb3-contrib", True, True, True, True, True),
        ("sb3-contrib/mgview/npact/mgreset", False, False, False, False, False),
    ):
        agent = learn_pairs.Agent(config, args.setting)
        try:
            views = [env.unwrapped.__dict__.get("gen_obs") for env in agent.env.envs]
            assert [isinstance(v, FastGenObs) for v in views] == [fast] * args.setting.n_envs
            assert [is_wrapped(env, IntActions) for env in agent.env.envs] == [ints] * len(views)
            grids = [env.unwrapped.__dict__.get("_gen_grid") for env in agent.env.envs]
            assert [isinstance(g, FastMemoryGrid) for g in grids] == [grid] * len(views)
            assert [isinstance(v, KeptViews) for v in views] == [kept] * len(views)
            steps = [env.unwrapped.__dict__.get("step") for env in agent.env.envs]
            assert [isinstance(s, FastMemoryStep) for s in steps] == [step] * len(views)
            assert agent.take_turn()[0] > 0
        finally:
            agent.env.close()


def test_against_adds_a_twin_of_each_of_our_agents(learn_pairs):
    args = learn_pairs.parse_args(["--configs", "lstm/par", "ceiling", "mnm-p/k2", "--against",
                                   "HEAD"])  # fmt: skip
    assert args.twins == {"lstm/par@HEAD": "lstm/par", "mnm-p/k2@HEAD": "mnm-p/k2"}
    assert args.configs == ["lstm/par", "ceiling", "mnm-p/k2", "lstm/par@HEAD", "mnm-p/k2@HEAD"]
    assert args.ratio_to == ["lstm/par@HEAD"]
    assert len(args.against_commit) == 40


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "lstm", "--against", "no-such-revision"], "--against no-such-revision"),
        (["--configs", "ceiling", "sb3-contrib", "--against", "HEAD"], "our agents' configs"),
    ],
)
def test_against_refuses_what_it_cannot_pair(learn_pairs, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        learn_pairs.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("phase", ["learn", "rollout"])
def test_against_runs_the_other_commit_in_a_process_of_its_own(
    learn_pairs, monkeypatch, capsys, phase
):
    # the PyTorch code on both sides: no kernel builds for the other commit in a test
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    threads = torch.get_num_threads()
    try:
        out = learn_pairs.main(["--configs", "mlp", "--against", "HEAD", "--pairs", "2",
                                "--warm-up", "1", "--phase", phase, *SMALL])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert out["phase"] == phase
    assert set(out["sps"]) == {"mlp", "mlp@HEAD"}
    assert [len(r) for r in out["rates"].values()] == [2, 2]
    assert all(rate > 0 for rates in out["rates"].values() for rate in rates)
    assert list(out["ratio_to"]) == ["mlp@HEAD"]
    # the same seeds and code on both sides: the same episodes end in the same turns
    assert out["episode_steps"]["mlp"] == out["episode_steps"]["mlp@HEAD"]
    assert "against: HEAD = " in capsys.readouterr().out


def test_the_other_process_must_import_the_checkout_it_is_given(learn_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("MNM_RL_FUSED", "0")  # no kernel builds in the other process
    with pytest.raises(RuntimeError, match="imported mnm_rl from"):
        learn_pairs.RemoteAgent("mlp", SMALL, tmp_path, "0" * 40, "learn")  # no mnm_rl there


def test_agents_in_one_process_draw_from_random_generators_of_their_own(learn_pairs):
    """Two agents of one seed taking turns with a third in between train alike: the same
    episodes and parameters (mlp and mlp/k2: the heads on two threads give the same results),
    and the process's own generators are as they were."""
    args = learn_pairs.parse_args(["--view-size", "3", *SMALL])
    agents = {c: learn_pairs.Agent(c, args.setting) for c in ("mlp", "lstm", "mlp/k2")}
    try:
        before = torch.get_rng_state()
        timed = learn_pairs.run_pairs(agents, pairs=3, warm_up=1)
        assert torch.equal(torch.get_rng_state(), before)
        assert timed.episode_steps["mlp"] == timed.episode_steps["mlp/k2"]
        twins = [agents[c].model.policy.state_dict() for c in ("mlp", "mlp/k2")]
        assert all(torch.equal(twins[0][k], twins[1][k]) for k in twins[0])
        lstm = agents["lstm"].model.policy.state_dict()
        assert not torch.equal(twins[0]["action_net.0.weight"], lstm["action_net.0.weight"])
    finally:
        for agent in agents.values():
            agent.close()
