"""Learning curves from the TensorBoard event files of runs, or from their exported scalars
(``<env>__<agent>__<seed>.csv``, as ``benchmarks/export_results.py`` writes them under
``docs/results/``): mean and spread over seeds, a line per agent, a panel per env."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnm_rl.config import ConfigError
from mnm_rl.presets import agent_label, env_label
from mnm_rl.runs import CONFIG_FILE, TB_DIR, check_run_dir, is_run_dir, load_config, slug

DEFAULT_TAG = "rollout/success_rate"
SCALARS_HEADER = ["tag", "step", "value"]  # the columns of a run's exported scalars


def scalars_file_stem(env: str, agent: str, seed: int, env_steps: int | None = None) -> str:
    """The name (without ``.csv``) of a run's exported scalars, ``<env>__<agent>__<seed>``,
    with ``__<env_steps>`` when given; env and agent labels made folder-safe."""
    stem = f"{slug(env)}__{slug(agent)}__{seed}"
    return stem if env_steps is None else f"{stem}__{env_steps}"


@dataclass
class Curve:
    env: str
    agent: str
    seed: int
    run_dir: Path
    steps: np.ndarray
    values: np.ndarray


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders named directly or found below the given folders."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"run folder {path} does not exist")
        if is_run_dir(path):
            runs.append(path)
            continue
        if not path.is_dir():
            raise ConfigError(f"{path} is not a run folder")
        found = sorted(p.parent for p in path.rglob(CONFIG_FILE))
        if not found:
            check_run_dir(path)  # raises: no config.yaml
        runs += found
    return list(dict.fromkeys(runs))


def read_scalars(tb_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``tag`` from every event file in ``tb_dir`` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                points[int(event.step)] = float(event.value)
    return _sorted_arrays(points)


def _sorted_arrays(points: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array(sorted(points), dtype=float)
    return steps, np.array([points[int(s)] for s in steps])


def exported_curve(path: Path, tag: str = DEFAULT_TAG) -> Curve | None:
    """The curve of ``tag`` in a run's exported scalars: a CSV of ``tag,step,value`` rows named
    ``<env>__<agent>__<seed>.csv`` or ``<env>__<agent>__<seed>__<env steps>.csv`` (env and agent
    as in the file name); ``None`` if it has no ``tag``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scalars file {path} does not exist")
    parts = path.stem.split("__")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts[2:]):
        raise ConfigError(
            f"{path}: not a run's exported scalars (<env>__<agent>__<seed>[__<steps>].csv)"
        )
    with path.open(newline="") as handle:
        rows = csv.reader(handle)
        if next(rows, None) != SCALARS_HEADER:
            raise ConfigError(f"{path}: the first line must be tag,step,value")
        try:
            points = {int(step): float(value) for name, step, value in rows if name == tag}
        except ValueError as error:  # a row that is not tag,step,value
            raise ConfigError(f"{path}: line {rows.line_num}: {error}") from None
    if not points:
        return None
    return Curve(parts[0], parts[1], int(parts[2]), path, *_sorted_arrays(points))


def load_sources(paths: list[Path], tag: str = DEFAULT_TAG) -> list[Curve]:
    """The curves of ``tag`` from run folders (or folders holding runs) and exported ``.csv``
    scalars, in any mix; sources without ``tag`` are skipped with a warning. A run given twice
    (the same env, agent and seed: a folder and its CSV, or the CSVs of a run and of its resumed
    continuation) counts once, with its longest curve."""
    files = [Path(p) for p in paths if Path(p).suffix == ".csv"]
    folders = [Path(p) for p in paths if Path(p).suffix != ".csv"]
    curves = load_curves(find_runs(folders), tag) if folders else []
    for path in files:
        curve = exported_curve(path, tag)
        if curve is None:
            print(f"mnm-rl: warning: {path} has no {tag!r}; skipped", file=sys.stderr)
        else:
            curves.append(curve)
    longest: dict[tuple[str, str, int], Curve] = {}
    for curve in curves:
        key = (slug(curve.env), slug(curve.agent), curve.seed)  # CSV names hold slugs
        kept = longest.setdefault(key, curve)
        if kept is curve:
            continue
        if curve.steps[-1] > kept.steps[-1]:
            longest[key], kept, curve = curve, curve, kept
        print(
            f"mnm-rl: warning: {kept.agent} seed {key[2]} on {kept.env} is in both {kept.run_dir} "
            f"and {curve.run_dir}; plotted only {kept.run_dir}",
            file=sys.stderr,
        )
    return list(longest.values())


def load_curves(run_dirs: list[Path], tag: str = DEFAULT_TAG) -> list[Curve]:
    """The curves of ``tag`` from run folders' TensorBoard logs."""
    curves = []
    for run_dir in run_dirs:
        config = load_config(run_dir)
        steps, values = read_scalars(run_dir / TB_DIR, tag)
        if len(steps) == 0:
            print(f"mnm-rl: warning: {run_dir} has no {tag!r} yet; skipped", file=sys.stderr)
            continue
        curves.append(
            Curve(env_label(config), agent_label(config), config.train.seed, run_dir, steps, values)
        )
    return curves


def aggregate(
    curves: list[Curve], points: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs on a common step grid (each run counts where it has data)."""
    end = max(c.steps[-1] for c in curves)
    start = min(c.steps[0] for c in curves)
    grid = np.linspace(start, end, points)
    table = np.full((len(curves), points), np.nan)
    for i, c in enumerate(curves):
        inside = (grid >= c.steps[0]) & (grid <= c.steps[-1])
        table[i, inside] = np.interp(grid[inside], c.steps, c.values)
    covered = ~np.all(np.isnan(table), axis=0)
    table = table[:, covered]
    with np.errstate(all="ignore"):
        return (
            grid[covered],
            np.nanmean(table, axis=0),
            np.nanmin(table, axis=0),
            np.nanmax(table, axis=0),
        )


def plot_curves(curves: list[Curve], out: Path, tag: str = DEFAULT_TAG) -> dict:
    """Draw one panel per env, one line per agent (mean over seeds, shaded min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ConfigError(f"no run has {tag!r} data to plot")
    by_env: dict[str, dict[str, list[Curve]]] = defaultdict(lambda: defaultdict(list))
    for curve in curves:
        by_env[curve.env][curve.agent].append(curve)
    fig, axes = plt.subplots(
        1, len(by_env), figsize=(6 * len(by_env), 4), squeeze=False, sharey=True
    )
    summary: dict = {}
    for ax, (env, agents) in zip(axes[0], sorted(by_env.items()), strict=True):
        for agent, runs in sorted(agents.items()):
            grid, mean, low, high = aggregate(runs)
            line = ax.plot(grid, mean, label=f"{agent} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            ax.fill_between(grid, low, high, color=line[0].get_color(), alpha=0.2)
            summary.setdefault(env, {})[agent] = {"seeds": len(runs), "final_mean": mean[-1]}
        ax.set_title(f"{env}: mean over seeds, shaded min to max", fontsize=10)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
        # Below the panel: labels of tuning variants (``mnm-p [ppo.ent_coef=0.05, ...]``) are
        # long, and inside the axes they would hide the curves or be cut at the figure's edge.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8, frameon=False)
    axes[0][0].set_ylabel(tag)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return summary


__all__ = [
    "DEFAULT_TAG",
    "SCALARS_HEADER",
    "Curve",
    "exported_curve",
    "find_runs",
    "load_curves",
    "load_sources",
    "plot_curves",
    "read_scalars",
    "scalars_file_stem",
]
