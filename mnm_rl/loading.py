"""Loading trained policies for evaluation scripts."""

from __future__ import annotations

from pathlib import Path

from mnm_rl.config import RunConfig
from mnm_rl.runs import load_config, resolve_model


def load_policy(path: str | Path, device: str = "auto"):
    """Load a policy from a run folder (its latest model) or a model file.

    Returns the trained :class:`mnm_rl.agent.MemoryPPO`, whose
    ``predict(obs, state, episode_start, deterministic) -> (action, state)`` follows
    sb3-contrib's RecurrentPPO, so it works with SB3's ``evaluate_policy``. Raises
    :class:`mnm_rl.runs.CheckpointError` (a ``ValueError``) for a file that is not a checkpoint
    and :class:`mnm_rl.config.ConfigError` for a folder that is not a run.
    """
    from mnm_rl.agent import MemoryPPO

    model_path, _ = resolve_model(Path(path))
    return MemoryPPO.load(model_path, device=device)


def load_run_config(path: str | Path) -> RunConfig | None:
    """The config of the run a folder or model file belongs to (``None`` for a bare model)."""
    _, run_dir = resolve_model(Path(path))
    return None if run_dir is None else load_config(run_dir)


def make_run_env(path: str | Path, render_mode: str | None = None):
    """A fresh (unseeded) env built like the one the run at ``path`` was trained on."""
    from mnm_rl.config import ConfigError
    from mnm_rl.env_factory import make_env

    config = load_run_config(path)
    if config is None:
        raise ConfigError(f"{path} is not inside a run folder; build the env yourself")
    return make_env(config.env, render_mode=render_mode)


__all__ = ["load_policy", "load_run_config", "make_run_env"]
