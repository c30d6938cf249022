"""Per run of a curriculum preset: when it learned the curriculum, when the curriculum ended and
when held-out success followed; the numbers behind docs/results.md's curriculum tables.

For each run folder: the first env step at which the training success rate
(``rollout/success_rate``, the last 100 training episodes) reached 0.9, the env step of the
switch saved with the final model (``train_wrappers_ended_at``), the first held-out
evaluation at >= 0.9 and >= 0.95 (``eval/success_rate``), the held-out evaluations at 800k, 900k
and 1M steps, and the final ``eval.json`` success rate.

    python benchmarks/curriculum_runs.py runs/s9west/* runs/s9solved/*mnm-p*

Prints a table and a JSON last line. A folder without a final model (a run still training) is
skipped with a note; exit status 2 if no run is left.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from export_results import first_reaching

from mnm_rl.plotting import read_scalars


def _saved(model_zip: Path) -> dict:
    """The attributes SB3 saved with a model (its ``data`` entry)."""
    with zipfile.ZipFile(model_zip) as archive:
        return json.loads(archive.read("data"))


def _first(steps: np.ndarray, values: np.ndarray, at_least: float) -> int | None:
    """The first step whose value reaches ``at_least`` (as the results table counts it: with
    float32's tolerance, so 90 of 100 reaches 0.9)."""
    return first_reaching(list(zip(steps.astype(int).tolist(), values, strict=True)), at_least)


def run_summary(run: Path) -> dict:
    tb = run / "tb"
    train_steps, train_success = read_scalars(tb, "rollout/success_rate")
    eval_steps, eval_success = read_scalars(tb, "eval/success_rate")
    at = {str(s): float(v) for s, v in zip(eval_steps.astype(int), eval_success, strict=True)}
    eval_file = run / "eval.json"
    return {
        "train_0.9": _first(train_steps, train_success, 0.9),
        "curriculum_off": _saved(run / "model.zip").get("train_wrappers_ended_at"),
        "heldout_0.9": _first(eval_steps, eval_success, 0.9),
        "heldout_0.95": _first(eval_steps, eval_success, 0.95),
        "heldout_800k": at.get("800000"),
        "heldout_900k": at.get("900000"),
        "heldout_1M": at.get("1000000"),
        "final": json.loads(eval_file.read_text())["success_rate"] if eval_file.exists() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    finished = [run for run in args.runs if (run / "model.zip").exists()]
    for run in sorted(set(args.runs) - set(finished)):
        print(f"skipped {run}: no model.zip (still training?)", file=sys.stderr)
    if not finished:
        parser.error("none of the runs has a final model.zip")
    rows = {str(run): run_summary(run) for run in finished}
    keys = list(next(iter(rows.values())))
    print(f"{'run':60s} " + " ".join(f"{k:>13s}" for k in keys))
    for run, row in rows.items():
        cells = " ".join(f"{'-' if row[k] is None else f'{row[k]:g}':>13s}" for k in keys)
        print(f"{run[-60:]:60s} {cells}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
