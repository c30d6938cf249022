"""Build docs/results.json, the per-run scalar CSVs and the markdown table from run folders.

    python benchmarks/export_results.py runs/KeyValueRecall runs/KeyValueRecall-Hard \
        runs/MiniGrid-Memory --out docs

For every run folder with a final ``eval.json`` (runs still training are skipped):

* ``heldout_success``, ``env_steps``: the final held-out evaluation (``eval.json``);
* ``steps_to_90``: the first env step at which the held-out success rate reached 0.9, from the
  run's ``eval/success_rate`` TensorBoard curve (``train.eval_every``), or, for runs trained
  without it, from held-out evaluations of its checkpoints (``eval-step_<N>-<env>.json``, written
  by ``mnm-rl eval CHECKPOINT``) and the final ``eval.json``; ``null`` when never reached;
* ``agent``: the agent preset's name, followed by ``[key=value, ...]`` for the settings in which
  the run differs from the presets (a tuning variant from ``mnm-rl sweep --grid`` or ``--set``);
* ``env``: the env preset's name, likewise followed by the env settings in which the run differs
  from the preset (``--set env.*``, or a run made before the preset changed);
* ``docs/results/<env>__<agent>__<seed>.csv``: every TensorBoard scalar of the run
  (``tag,step,value``), plus the checkpoint evaluations as ``checkpoint_eval/success_rate``;
  ``<env>__<agent>__<seed>__<budget>.csv`` when a kept row (``--merge``) of the same env, agent
  and seed at another budget has the plain name;
* ``docs/results/table.md``: mean, standard deviation and min-max over seeds per (env, agent,
  budget), the budget being the env steps rounded to two significant digits.

``runs/`` is not in git, so a later session may no longer have the runs behind the rows already
in ``results.json``: ``--merge`` keeps those rows and replaces only the ones whose (env, agent,
seed, env steps) a run given now also has. When a preset changes, ``--rename-env OLD=NEW``
first renames the env of the rows (and their CSVs) made with the old one, e.g.
``--rename-env MiniGrid-Memory=MiniGrid-Memory-NoCurriculum``, so new runs of the preset are not
mixed with them. When instead all of a changed preset's runs are exported again (their labels
now name what differs from the new preset), ``--replace-env ENV`` drops the kept rows of ENV and
their CSVs, so the rows under the old labels do not stay next to them.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from mnm_rl.plotting import SCALARS_HEADER, find_runs, scalars_file_stem
from mnm_rl.presets import agent_label, env_label
from mnm_rl.runs import EVAL_FILE, TB_DIR, load_config, slug

THRESHOLD = 0.9
EVAL_TAG = "eval/success_rate"


def all_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of every event file in ``tb_dir`` (later files win on equal steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, float]] = defaultdict(dict)
    for events in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                points[tag][int(event.step)] = float(event.value)
    return {tag: sorted(values.items()) for tag, values in points.items()}


def checkpoint_evals(run_dir: Path, env_name: str) -> list[tuple[int, float]]:
    """(env steps, held-out success) of the run's checkpoint evaluations and its final eval."""
    points = {}
    for path in sorted(run_dir.glob(f"eval-step_*-{slug(env_name)}.json")):
        report = json.loads(path.read_text())
        points[int(report["num_timesteps"])] = float(report["success_rate"])
    final = json.loads((run_dir / EVAL_FILE).read_text())
    points[int(final["num_timesteps"])] = float(final["success_rate"])
    return sorted(points.items())


def first_reaching(curve: list[tuple[int, float]], threshold: float = THRESHOLD) -> int | None:
    """The first step whose value reaches ``threshold``. TensorBoard stores float32, in which
    90 successes of 100 read back as 0.89999998: compare with a tolerance below float32's
    resolution of such rates."""
    return next((step for step, value in curve if value >= threshold - 1e-6), None)


def export(
    run_dirs: list[Path], out: Path, merge: bool = False, replace_envs: frozenset[str] = frozenset()
) -> list[dict]:
    """Write the CSVs and results.json under ``out``; return the result rows. With ``merge``,
    the rows of the existing ``out/results.json`` that no run here replaces are kept, except
    those of an env in ``replace_envs``, which are dropped with their CSVs (``ValueError``,
    before any change, if such an env has no rows there)."""
    csv_dir = out / "results"
    csv_dir.mkdir(parents=True, exist_ok=True)
    existing = []
    if merge and (out / "results.json").exists():
        existing = json.loads((out / "results.json").read_text())
        unknown = sorted(replace_envs - {r["env"] for r in existing})
        if unknown:  # a misspelt env would leave the rows under the old labels in place
            names = ", ".join(unknown)
            raise ValueError(f"--replace-env: no rows of {names} in {out / 'results.json'}")
        dropped = [r for r in existing if r["env"] in replace_envs]
        for row in dropped:
            for path in _csv_paths(csv_dir, row["env"], row):
                path.unlink(missing_ok=True)
        existing = [r for r in existing if r["env"] not in replace_envs]
        if dropped:
            print(f"dropped {len(dropped)} rows of {', '.join(sorted(replace_envs))}")
    rows = []
    for run_dir in run_dirs:
        if not (run_dir / EVAL_FILE).exists():
            print(f"skipped {run_dir}: no {EVAL_FILE} yet")
            continue
        config = load_config(run_dir)
        env, agent, seed = env_label(config), agent_label(config), config.train.seed
        final = json.loads((run_dir / EVAL_FILE).read_text())
        scalars = all_scalars(run_dir / TB_DIR)
        if EVAL_TAG in scalars:
            curve, source = scalars[EVAL_TAG], EVAL_TAG
        else:
            curve = checkpoint_evals(run_dir, env)
            source = "checkpoint_eval/success_rate"
            scalars[source] = curve
        steps = int(final["num_timesteps"])
        name = scalars_file_stem(env, agent, seed)
        if any(
            (r["env"], r["agent"], r["seed"]) == (env, agent, seed)
            and budget(r["env_steps"]) != budget(steps)
            for r in existing
        ):  # a kept run of the same agent and seed at another budget owns the plain name
            name = scalars_file_stem(env, agent, seed, budget(steps))
        with (csv_dir / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(SCALARS_HEADER)
            for tag in sorted(scalars):
                writer.writerows([tag, step, f"{value:.6g}"] for step, value in scalars[tag])
        rows.append(
            {
                "env": env,
                "agent": agent,
                "seed": seed,
                "env_steps": steps,
                "heldout_success": float(final["success_rate"]),
                "steps_to_90": first_reaching(curve),
            }
        )
        print(f"{run_dir}: {rows[-1]} (steps_to_90 from {source})")
    if merge:
        fresh = {_key(r) for r in rows}
        kept = [r for r in existing if _key(r) not in fresh]
        print(f"kept {len(kept)} rows of {out / 'results.json'}")
        rows += kept
    rows.sort(key=lambda r: (r["env"], r["agent"], budget(r["env_steps"]), r["seed"]))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (csv_dir / "table.md").write_text(table(rows))
    return rows


def rename_env(out: Path, old: str, new: str) -> int:
    """Rename env ``old`` to ``new`` in ``out/results.json`` and in its rows' CSV names; return
    the number of rows renamed. Refuses (before changing anything) to overwrite a CSV."""
    path, csv_dir = out / "results.json", out / "results"
    rows = json.loads(path.read_text())
    moves, renamed = {}, 0
    for row in rows:
        if row["env"] == old:
            row["env"], renamed = new, renamed + 1
            for source, target in zip(
                _csv_paths(csv_dir, old, row), _csv_paths(csv_dir, new, row), strict=True
            ):
                if source.exists():
                    moves[source] = target
    taken = [str(target) for target in moves.values() if target.exists()]
    if taken:
        raise SystemExit(f"export_results.py: --rename-env would overwrite {', '.join(taken)}")
    for source, target in moves.items():
        source.rename(target)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    (csv_dir / "table.md").write_text(table(rows))
    return renamed


def _csv_paths(csv_dir: Path, env: str, row: dict) -> tuple[Path, Path]:
    """The two names a row's CSV may have under env ``env``: plain, and with its budget."""
    plain = scalars_file_stem(env, row["agent"], row["seed"])
    with_budget = scalars_file_stem(env, row["agent"], row["seed"], budget(row["env_steps"]))
    return csv_dir / f"{plain}.csv", csv_dir / f"{with_budget}.csv"


def _key(row: dict) -> tuple[str, str, int, int]:
    return row["env"], row["agent"], row["seed"], row["env_steps"]


def budget(env_steps: int) -> int:
    """``env_steps`` rounded to two significant digits: 1,001,472 and 1,001,504 -> 1,000,000."""
    return int(float(f"{env_steps:.2g}"))


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:{fmt}} ± {sd:{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def table(rows: list[dict]) -> str:
    """Markdown: per (env, agent, budget), final held-out success and env steps to 90% over
    seeds."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["env"], row["agent"], budget(row["env_steps"])].append(row)
    lines = [
        "| env | agent | seeds | env steps | final held-out success: mean ± sd [min, max] "
        "| steps to 90% held-out: reached | mean of those reached |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (env, agent, _), runs in sorted(groups.items()):
        success = [r["heldout_success"] for r in runs]
        reached = [r["steps_to_90"] for r in runs if r["steps_to_90"] is not None]
        steps = sorted({r["env_steps"] for r in runs})
        mean_reached = f"{statistics.fmean(reached):,.0f}" if reached else "-"
        lines.append(
            f"| {env} | {agent} | {','.join(str(r['seed']) for r in runs)} "
            f"| {'/'.join(f'{s:,}' for s in steps)} | {_spread(success, '.3f')} "
            f"| {len(reached)}/{len(runs)} | {mean_reached} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="*", help="run folders or folders of runs")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--merge", action="store_true", help="keep the rows of OUT/results.json not rerun here"
    )
    parser.add_argument(
        "--rename-env",
        metavar="OLD=NEW",
        action="append",
        default=[],
        help="first rename env OLD to NEW in OUT/results.json and its CSVs (repeatable)",
    )
    parser.add_argument(
        "--replace-env",
        metavar="ENV",
        action="append",
        default=[],
        help="with --merge: drop the kept rows of ENV and their CSVs (repeatable)",
    )
    args = parser.parse_args()
    if args.replace_env and not args.merge:
        parser.error("--replace-env only applies with --merge")
    if not args.runs and not args.rename_env:
        parser.error("give run folders, --rename-env, or both")
    if args.rename_env and not (args.out / "results.json").exists():
        parser.error(f"--rename-env: there is no {args.out / 'results.json'} to rename in")
    for item in args.rename_env:
        old, sep, new = item.partition("=")
        if not (sep and old and new):
            parser.error(f"--rename-env takes OLD=NEW, got {item!r}")
        print(f"renamed {rename_env(args.out, old, new)} rows: {old} -> {new}")
    if args.runs:
        replace = frozenset(args.replace_env)
        try:
            print(table(export(find_runs(args.runs), args.out, args.merge, replace)))
        except ValueError as err:  # a missing run folder, or --replace-env of an env without rows
            parser.error(str(err))


if __name__ == "__main__":
    main()
