"""benchmarks/export_results.py: the results table's grouping and ``--merge``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from benchmark_scripts import BENCHMARKS, load_script
from test_cli import TINY, mnm_rl, ok, only_run

from mnm_rl.presets import agent_label
from mnm_rl.runs import load_config, slug


@pytest.fixture(scope="module")
def export_results():
    return load_script("export_results")


def _row(agent: str, seed: int, steps: int, success: float, to_90: int | None = None) -> dict:
    return {
        "env": "MiniGrid-Memory",
        "agent": agent,
        "seed": seed,
        "env_steps": steps,
        "heldout_success": success,
        "steps_to_90": to_90,
    }


def test_budget_rounds_to_two_significant_digits(export_results):
    assert export_results.budget(1_001_472) == 1_000_000
    assert export_results.budget(1_200_128) == 1_200_000
    assert export_results.budget(40_960) == 41_000


def test_table_separates_budgets_of_one_agent(export_results):
    rows = [
        _row("mnm-p", 0, 1_200_128, 0.5),
        _row("mnm-p", 1, 1_200_128, 1.0, 500_000),
        _row("mnm-p", 0, 3_000_064, 1.0, 900_000),
    ]
    lines = export_results.table(rows).splitlines()[2:]
    assert len(lines) == 2
    assert "| 0,1 | 1,200,128 | 0.750 ± 0.354 [0.500, 1.000] | 1/2 | 500,000 |" in lines[0]
    assert "| 0 | 3,000,064 | 1.000 ± 0.000 [1.000, 1.000] | 1/1 | 900,000 |" in lines[1]


def test_merge_keeps_rows_without_runs(export_results, tmp_path):
    old = [_row("lstm", 0, 1_200_128, 1.0, 600_000), _row("gru", 2, 1_200_128, 0.79)]
    (tmp_path / "results.json").write_text(json.dumps(old))
    rows = export_results.export([], tmp_path, merge=True)
    assert sorted(r["agent"] for r in rows) == ["gru", "lstm"]
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert "| MiniGrid-Memory | gru | 2 |" in (tmp_path / "results" / "table.md").read_text()


def test_without_merge_the_rows_are_replaced(export_results, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([_row("lstm", 0, 1_200_128, 1.0)]))
    assert export_results.export([], tmp_path) == []
    assert json.loads((tmp_path / "results.json").read_text()) == []


def test_merge_gives_a_run_at_another_budget_its_own_csv(export_results, tmp_path):
    """A new run whose (env, agent, seed) a kept row has at another budget is exported next to
    it: both rows stay, and the kept run's CSV is not overwritten."""
    ok(mnm_rl("train", *TINY, "--agent", "mlp", cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    out = tmp_path / "docs"
    (out / "results").mkdir(parents=True)
    label = agent_label(load_config(run))  # "mlp [policy..., ppo...]": the tiny agent's sizes
    kept = {**_row(label, 0, 40_960, 0.25), "env": "DelayedCueRecall"}
    (out / "results.json").write_text(json.dumps([kept]))
    (out / "results" / f"DelayedCueRecall__{slug(label)}__0.csv").write_text("tag,step,value\n")
    rows = export_results.export([run], out, merge=True)
    assert [(r["env_steps"], r["agent"]) for r in rows] == [(2048, label), (40_960, label)]
    name = f"DelayedCueRecall__{slug(label)}__0"
    assert (out / "results" / f"{name}.csv").read_text() == "tag,step,value\n"
    fresh = (out / "results" / f"{name}__2000.csv").read_text()
    assert fresh.startswith("tag,step,value\n") and "rollout/success_rate" in fresh


def test_a_run_with_env_overrides_is_not_labelled_as_the_preset(export_results, tmp_path):
    """``--set env.*`` runs get their own (env) label: never averaged with the preset's runs."""
    ok(mnm_rl("train", *TINY, "--agent", "mlp", "--set", "env.kwargs.delay=4", cwd=tmp_path))
    run = only_run(tmp_path / "runs")
    (tmp_path / "docs").mkdir()
    old = {**_row(agent_label(load_config(run)), 0, 2048, 1.0), "env": "DelayedCueRecall"}
    (tmp_path / "docs" / "results.json").write_text(json.dumps([old]))
    rows = export_results.export([run], tmp_path / "docs", merge=True)
    envs = sorted(r["env"] for r in rows)
    assert envs == ["DelayedCueRecall", "DelayedCueRecall [kwargs.delay=4]"]
    table = (tmp_path / "docs" / "results" / "table.md").read_text()
    assert "| DelayedCueRecall [kwargs.delay=4] | mlp [" in table


def test_rename_env_renames_the_rows_and_their_csvs(export_results, tmp_path):
    """``--rename-env``: rows of a preset made before it changed move to a new env name, with
    their CSVs (both budgets of one seed); other envs' rows and files stay."""
    csv_dir = tmp_path / "results"
    csv_dir.mkdir()
    rows = [
        _row("mnm-p", 0, 1_200_128, 0.5),
        _row("mnm-p", 0, 3_000_320, 1.0, 900_000),
        {**_row("mnm-p", 0, 1_001_472, 0.6), "env": "MiniGrid-MemoryS9"},
    ]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    names = ["MiniGrid-Memory__mnm-p__0", "MiniGrid-Memory__mnm-p__0__3000000"]
    for name in [*names, "MiniGrid-MemoryS9__mnm-p__0"]:
        (csv_dir / f"{name}.csv").write_text(f"tag,step,value\n{name},0,0\n")
    assert export_results.rename_env(tmp_path, "MiniGrid-Memory", "MiniGrid-Memory-Old") == 2
    renamed = json.loads((tmp_path / "results.json").read_text())
    assert [r["env"] for r in renamed] == [
        "MiniGrid-Memory-Old",
        "MiniGrid-Memory-Old",
        "MiniGrid-MemoryS9",
    ]
    assert sorted(p.name for p in csv_dir.glob("*.csv")) == [
        "MiniGrid-Memory-Old__mnm-p__0.csv",
        "MiniGrid-Memory-Old__mnm-p__0__3000000.csv",
        "MiniGrid-MemoryS9__mnm-p__0.csv",
    ]
    # the contents moved with the names
    assert names[1] in (csv_dir / "MiniGrid-Memory-Old__mnm-p__0__3000000.csv").read_text()
    assert "| MiniGrid-Memory-Old | mnm-p | 0 | 1,200,128 |" in (csv_dir / "table.md").read_text()


def test_rename_env_refuses_to_overwrite_a_csv(export_results, tmp_path):
    csv_dir = tmp_path / "results"
    csv_dir.mkdir()
    (tmp_path / "results.json").write_text(json.dumps([_row("gru", 1, 1_200_128, 0.5)]))
    for env in ("MiniGrid-Memory", "Taken"):
        (csv_dir / f"{env}__gru__1.csv").write_text(f"{env}\n")
    with pytest.raises(SystemExit, match="would overwrite"):
        export_results.rename_env(tmp_path, "MiniGrid-Memory", "Taken")
    assert (csv_dir / "Taken__gru__1.csv").read_text() == "Taken\n"
    assert json.loads((tmp_path / "results.json").read_text())[0]["env"] == "MiniGrid-Memory"


def test_first_reaching_counts_90_of_100_read_back_from_float32(export_results):
    """TensorBoard stores 90/100 as float32 0.89999998: it reaches 0.9; 89/100 does not."""
    import numpy as np

    curve = [(100, float(np.float32(0.89))), (200, float(np.float32(0.9))), (300, 1.0)]
    assert export_results.first_reaching(curve) == 200
    assert export_results.first_reaching(curve, 0.95) == 300
    assert export_results.first_reaching(curve[:1]) is None


def test_replace_env_drops_the_kept_rows_of_that_env_and_their_csvs(export_results, tmp_path):
    """``--replace-env``: a changed preset's runs, exported again under new labels, must not stay
    next to their rows under the old labels; the rows of other envs are kept."""
    old = [
        _row("mnm-p [ppo.ent_coef=0.05]", 0, 1_001_472, 1.0, 300_000),
        _row("mnm-p [ppo.ent_coef=0.05]", 0, 2_000_896, 1.0, 300_000),
        {**_row("lstm", 1, 1_200_128, 0.5), "env": "MiniGrid-MemoryS9"},
    ]
    (tmp_path / "results.json").write_text(json.dumps(old))
    csv_dir = tmp_path / "results"
    csv_dir.mkdir()
    names = [
        f"MiniGrid-Memory__{slug('mnm-p [ppo.ent_coef=0.05]')}__0.csv",
        f"MiniGrid-Memory__{slug('mnm-p [ppo.ent_coef=0.05]')}__0__2000000.csv",
        "MiniGrid-MemoryS9__lstm__1.csv",
    ]
    for name in names:
        (csv_dir / name).write_text("tag,step,value\n")
    rows = export_results.export(
        [], tmp_path, merge=True, replace_envs=frozenset({"MiniGrid-Memory"})
    )
    assert rows == [old[2]]
    assert json.loads((tmp_path / "results.json").read_text()) == [old[2]]
    assert sorted(p.name for p in csv_dir.glob("*.csv")) == ["MiniGrid-MemoryS9__lstm__1.csv"]


def test_replace_env_without_merge_is_exit_status_2(tmp_path):
    script = BENCHMARKS / "export_results.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--out", str(tmp_path), "--replace-env", "A"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--replace-env only applies with --merge" in result.stderr


def test_rename_env_without_results_json_is_exit_status_2(tmp_path):
    script = BENCHMARKS / "export_results.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--rename-env", "A=B"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "there is no" in result.stderr and "results.json to rename in" in result.stderr
    assert not (tmp_path / "results").exists()


def test_replace_env_of_an_env_without_rows_is_exit_status_2(tmp_path):
    """A misspelt ``--replace-env`` would silently keep the old rows: refused, nothing changed."""
    rows = [_row("lstm", 0, 1_200_128, 1.0)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    script = BENCHMARKS / "export_results.py"
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "config.yaml").write_text("{}\n")  # refused before it is read
    command = [sys.executable, str(script), str(tmp_path / "runs"), "--out", str(tmp_path)]
    result = subprocess.run(
        [*command, "--merge", "--replace-env", "MiniGrid-Memroy"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--replace-env: no rows of MiniGrid-Memroy in" in result.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == rows
