"""Sweeps on Ray Tune: a grid (or a random search) of env x agent x seed x ``--set`` overrides.

Every trial is an ordinary run under the runs root, made by the ``train`` command itself (called
in-process, not through a shell): TensorBoard events, checkpoints, the final held-out
``eval.json``. Ray schedules the trials: on this machine by default (one trial per CPU, as many at
once as there are cores), or unchanged on a Ray cluster given ``--address`` (the runs root must
then be a folder every node can write). A trial's run folder is a fixed name derived from its
settings, so an interrupted sweep resumes (``--resume``): finished trials are kept, a trial with a
checkpoint continues from it (``train --resume``), the others start again.

A sweep spec (YAML) names lists and a grid; command-line flags replace its entries::

    name: recall
    envs: [KeyValueRecall-Hard, DelayedCueRecall-Long]
    agents: [mnm-p, lstm, gru]
    seeds: [0, 1, 2]
    timesteps: 100000
    set: [train.eval_every=10000]           # applied to every trial
    grid:                                   # every combination
      agent.ppo.learning_rate: [5.0e-4, 1.0e-3]
    search:                                 # sampled num_samples times (random search)
      agent.ppo.ent_coef: {loguniform: [1.0e-3, 3.0e-2]}
    num_samples: 1

Ray is an optional extra: ``pip install 'mnm-rl[sweep]'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnm_rl.config import ConfigError, load_yaml

SUMMARY_FILE = "summary.json"
SEARCH_KINDS = ("uniform", "loguniform", "choice", "randint")
_SPEC_KEYS = {
    "name",
    "envs",
    "agents",
    "seeds",
    "timesteps",
    "n_envs",
    "set",
    "grid",
    "search",
    "num_samples",
}


@dataclass
class SweepSpec:
    """What a sweep runs: every combination of envs, agents, seeds and grid values."""

    name: str = "sweep"
    envs: list[str] = field(default_factory=lambda: ["MiniGrid-Memory"])
    agents: list[str] = field(default_factory=lambda: ["mnm-p"])
    seeds: list[int] = field(default_factory=lambda: [0])
    timesteps: int | None = None
    n_envs: int | None = None
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    search: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 1

    @classmethod
    def from_file(cls, path: Path) -> SweepSpec:
        """Read a sweep spec; :class:`ConfigError` on unknown keys or bad types."""
        data = load_yaml(Path(path))
        unknown = sorted(set(data) - _SPEC_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown sweep keys {unknown}; known: {sorted(_SPEC_KEYS)}")
        spec = cls()
        for key in ("name", "envs", "agents", "seeds", "timesteps", "n_envs", "num_samples"):
            if key in data:
                setattr(spec, key, data[key])
        spec.overrides = list(data.get("set") or [])
        spec.grid = dict(data.get("grid") or {})
        spec.search = dict(data.get("search") or {})
        spec.check(str(path))
        return spec

    def check(self, source: str = "sweep") -> None:
        """:class:`ConfigError` unless every field has the right shape."""
        for key in ("envs", "agents"):
            value = getattr(self, key)
            if not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {key} must be a non-empty list of names")
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise ConfigError(f"{source}: seeds must be a non-empty list of integers >= 0")
        for key in ("timesteps", "n_envs"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{source}: {key} must be a positive integer")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError(f"{source}: num_samples must be a positive integer")
        if not isinstance(self.name, str) or not self.name.replace("-", "").replace("_", ""):
            raise ConfigError(f"{source}: name must be a non-empty string")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: grid {key} must be a non-empty list of values")
        for key, dist in self.search.items():
            if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in SEARCH_KINDS):
                raise ConfigError(
                    f"{source}: search {key} must be one of {{kind: [args]}} with kind in "
                    f"{list(SEARCH_KINDS)}"
                )
        for text in self.overrides:
            if "=" not in str(text):
                raise ConfigError(f"{source}: set entry {text!r} is not KEY=VALUE")

    def n_trials(self) -> int:
        n = len(self.envs) * len(self.agents) * len(self.seeds) * self.num_samples
        for values in self.grid.values():
            n *= len(values)
        return n

    def validate_presets(self) -> None:
        """Resolve every (env, agent) with the fixed overrides now, before Ray starts."""
        from mnm_rl.presets import resolve_run_config

        for env in self.envs:
            for agent in self.agents:
                resolve_run_config(env, agent, self._train(self.seeds[0]), self.overrides)

    def _train(self, seed: int) -> dict[str, Any]:
        train: dict[str, Any] = {"seed": seed}
        if self.timesteps is not None:
            train["timesteps"] = self.timesteps
        if self.n_envs is not None:
            train["n_envs"] = self.n_envs
        return train


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def trial_run_dir(root: Path, params: dict[str, Any]) -> Path:
    """The fixed run folder of a trial: ``root/<env>/<agent>/<seed>-<sweep>-<hash>``."""
    from mnm_rl.runs import slug

    settings = json.dumps(
        {k: params[k] for k in ("timesteps", "n_envs", "overrides", "hparams")}, sort_keys=True
    )
    digest = hashlib.sha1(settings.encode()).hexdigest()[:8]
    name = f"{params['seed']}-{slug(params['sweep'])}-{digest}"
    return Path(root) / slug(params["env"]) / slug(params["agent"]) / name


def train_args(params: dict[str, Any], run_dir: Path) -> list[str]:
    """The ``mnm-rl`` arguments that run a trial, fresh or resumed, in ``run_dir``."""
    from mnm_rl.runs import EVAL_FILE, MODEL_FILE, checkpoints

    if (run_dir / MODEL_FILE).exists() and not (run_dir / EVAL_FILE).exists():
        return ["eval", str(run_dir)]  # trained; stopped during the final evaluation
    if run_dir.exists() and checkpoints(run_dir):
        args = ["train", "--resume", str(run_dir), "--no-progress"]
        return args + (["--timesteps", str(params["timesteps"])] if params["timesteps"] else [])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # started, but nothing to continue from
    args = ["train", "--env", params["env"], "--agent", params["agent"]]
    args += ["--seed", str(params["seed"]), "--run-dir", str(run_dir), "--no-progress"]
    if params["timesteps"]:
        args += ["--timesteps", str(params["timesteps"])]
    if params["n_envs"]:
        args += ["--n-envs", str(params["n_envs"])]
    for text in params["overrides"]:
        args += ["--set", text]
    for key, value in sorted(params["hparams"].items()):
        args += ["--set", f"{key}={_yaml_value(value)}"]
    return args


def run_trial(params: dict[str, Any]) -> dict[str, Any]:
    """Run (or finish) one trial with the ``train`` command; its held-out results."""
    from mnm_rl.cli import main
    from mnm_rl.runs import EVAL_FILE

    run_dir = trial_run_dir(Path(params["root"]), params)
    if not (run_dir / EVAL_FILE).exists():
        status = main(train_args(params, run_dir))
        if status != 0:
            raise RuntimeError(f"mnm-rl {' '.join(train_args(params, run_dir))} exited {status}")
    report = json.loads((run_dir / EVAL_FILE).read_text())
    return {
        "heldout_success": float(report["success_rate"]),
        "env_steps": int(report["num_timesteps"]),
        "run_dir": str(run_dir),
    }


def _tune_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    tune.report(run_trial(config))


def _param_space(spec: SweepSpec, root: Path) -> dict[str, Any]:
    from ray import tune

    hparams: dict[str, Any] = {k: tune.grid_search(v) for k, v in spec.grid.items()}
    for key, dist in spec.search.items():
        kind, args = next(iter(dist.items()))
        hparams[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return {
        "sweep": spec.name,
        "root": str(root),
        "env": tune.grid_search(spec.envs),
        "agent": tune.grid_search(spec.agents),
        "seed": tune.grid_search(spec.seeds),
        "timesteps": spec.timesteps,
        "n_envs": spec.n_envs,
        "overrides": list(spec.overrides),
        "hparams": hparams,
    }


def import_ray():
    """``ray`` and ``ray.tune``; :class:`ConfigError` with the install hint when missing."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError(
            "mnm-rl sweep needs Ray Tune, an optional extra: pip install 'mnm-rl[sweep]'"
        ) from None
    return ray, tune


def run_sweep(
    spec: SweepSpec,
    root: Path,
    storage: Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float = 1.0,
    max_concurrent: int | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run the sweep and return one summary row per trial (also written as ``summary.json``)."""
    ray, tune = import_ray()
    spec.check()
    spec.validate_presets()
    root = Path(root).resolve()
    storage = Path(storage).resolve() if storage is not None else root / "sweeps"
    experiment = storage / spec.name
    if experiment.exists() and not resume:
        raise ConfigError(
            f"sweep {experiment} exists; pass --resume to continue it or choose another --name"
        )
    if resume and not experiment.exists():
        raise ConfigError(f"--resume: no sweep at {experiment}")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
            )
    trainable = tune.with_resources(_tune_trainable, {"cpu": cpus_per_trial})
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"--resume: {experiment} is not a restorable Ray Tune experiment")
        tuner = tune.Tuner.restore(
            str(experiment), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec, root),
            tune_config=tune.TuneConfig(
                num_samples=spec.num_samples,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(storage), verbose=0, log_to_file=True
            ),
        )
    results = tuner.fit()
    rows = []
    for result in results:
        params = result.config or {}
        metrics = result.metrics or {}
        rows.append(
            {
                "env": params.get("env"),
                "agent": params.get("agent"),
                "seed": params.get("seed"),
                "hparams": params.get("hparams", {}),
                "status": "error" if result.error else "done",
                "error": str(result.error).splitlines()[0] if result.error else None,
                "heldout_success": metrics.get("heldout_success"),
                "env_steps": metrics.get("env_steps"),
                "run_dir": metrics.get("run_dir")
                or (str(trial_run_dir(root, params)) if params else None),
            }
        )
    rows.sort(key=lambda r: (str(r["env"]), str(r["agent"]), r["seed"] or 0, str(r["hparams"])))
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / SUMMARY_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


__all__ = ["SUMMARY_FILE", "SweepSpec", "import_ray", "run_sweep", "run_trial", "trial_run_dir"]
