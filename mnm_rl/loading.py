"""Loading trained policies for evaluation scripts."""

from __future__ import annotations

from pathlib import Path

from mnm_rl.config import RunConfig
from mnm_rl.runs import (
    CheckpointError,
    load_config,
    policy_file_for,
    resolve_model,
    run_dir_of,
)
from mnm_rl.safe_policy import LoadedPolicy, load_policy_file


def resolve_policy(path: str | Path) -> tuple[Path, Path | None]:
    """``(safe policy file, run folder or None)`` for a run folder, a policy file or an SB3 model
    file that has its policy file next to it; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if path.suffix == ".pt" and not path.is_dir():
        if not path.is_file():
            raise CheckpointError(f"policy file {path} does not exist")
        return path, run_dir_of(path)
    model_path, run_dir = resolve_model(path)
    policy_path = policy_file_for(model_path)
    if not policy_path.is_file():
        raise CheckpointError(
            f"{model_path} has no safe policy file {policy_path.name} next to it; load_policy "
            "reads only tensor files (use MemoryPPO.load only for a zip you trust)"
        )
    return policy_path, run_dir


def load_policy(path: str | Path, device: str = "auto", env=None) -> LoadedPolicy:
    """Load a policy from a run folder (its latest), a policy file (``policy.pt``,
    ``checkpoints/step_<N>.pt``) or a model zip with its policy file next to it.

    Only tensors and a JSON description are read (``torch.load(weights_only=True)``): a file
    carrying any other pickled object is refused with :class:`mnm_rl.runs.CheckpointError` (a
    ``ValueError``) and nothing in it runs. Returns a :class:`~mnm_rl.safe_policy.LoadedPolicy`,
    whose ``predict(obs, state, episode_start, deterministic) -> (action, state)`` follows
    sb3-contrib's RecurrentPPO, so it works with SB3's ``evaluate_policy``. With ``env``, its
    spaces are checked: :class:`~mnm_rl.safe_policy.SpaceMismatchError` names both on a mismatch.
    To resume training (optimiser state), use ``MemoryPPO.load`` on trusted files only.
    """
    policy_path, _ = resolve_policy(path)
    policy = load_policy_file(policy_path, device=device)
    if env is not None:
        policy.check_env(env)
    return policy


def load_run_config(path: str | Path) -> RunConfig | None:
    """The config of the run a folder or model file belongs to (``None`` for a bare model)."""
    path = Path(path)
    run_dir = run_dir_of(path) if path.suffix == ".pt" else resolve_model(path)[1]
    return None if run_dir is None else load_config(run_dir)


def make_run_env(path: str | Path, render_mode: str | None = None):
    """A fresh (unseeded) env built like the one the run at ``path`` was trained on."""
    from mnm_rl.config import ConfigError
    from mnm_rl.env_factory import make_env

    config = load_run_config(path)
    if config is None:
        raise ConfigError(f"{path} is not inside a run folder; build the env yourself")
    return make_env(config.env, render_mode=render_mode)


__all__ = ["load_policy", "load_run_config", "make_run_env", "resolve_policy"]
