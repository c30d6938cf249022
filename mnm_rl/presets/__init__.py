"""Finding and reading the env presets (``envs/*.yaml``) and agent presets (``agents/*.yaml``).

The top-level ``envs/`` and ``agents/`` folders of the source tree are the only copy. A wheel
ships them as ``mnm_rl/presets/envs`` and ``mnm_rl/presets/agents`` (mapped in ``pyproject.toml``).
In a source checkout (also an editable install) the top-level folders are read directly.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from mnm_rl.config import (
    AgentPreset,
    ConfigError,
    EnvPreset,
    RunConfig,
    TrainConfig,
    apply_overrides,
    deep_merge,
    did_you_mean,
    load_yaml,
    validate,
)

#: The agent used when ``--agent`` is not given.
DEFAULT_AGENT = "mnm-p"
#: The env used in the README's first command.
DEFAULT_ENV = "MiniGrid-Memory"

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _source_checkout() -> Path | None:
    """The repository root when running from a source checkout, else ``None``."""
    root = _SOURCE_ROOT
    pyproject = root / "pyproject.toml"
    if (root / "envs").is_dir() and (root / "agents").is_dir() and pyproject.is_file():
        if 'name = "mnm-rl"' in pyproject.read_text(errors="replace"):
            return root
    return None


def preset_dir(kind: str) -> Traversable:
    """The folder of ``kind`` presets: ``"envs"`` or ``"agents"``."""
    if kind not in ("envs", "agents"):
        raise ValueError(f"kind must be 'envs' or 'agents', got {kind!r}")
    root = _source_checkout()
    if root is not None:
        return root / kind
    return importlib.resources.files(__name__) / kind


def _files(kind: str) -> dict[str, Traversable]:
    folder = preset_dir(kind)
    if not folder.is_dir():
        raise ConfigError(f"preset folder {folder} is missing; reinstall mnm-rl")
    return {
        f.name.removesuffix(".yaml"): f
        for f in folder.iterdir()
        if f.name.endswith(".yaml") and f.is_file()
    }


def env_names() -> list[str]:
    """Names of the env presets, sorted."""
    return sorted(_files("envs"))


def agent_names() -> list[str]:
    """Names of the agent presets, sorted."""
    return sorted(_files("agents"))


def _read(kind: str, name: str) -> tuple[dict, str]:
    files = _files(kind)
    if name not in files:
        raise KeyError(name)
    file = files[name]
    data = load_yaml(Path(str(file))) if isinstance(file, Path) else _load_traversable(file)
    data.setdefault("name", name)
    if data["name"] != name:
        raise ConfigError(f"{kind}/{name}.yaml: name {data['name']!r} differs from the file name")
    return data, f"{kind}/{name}.yaml"


def _load_traversable(file: Traversable) -> dict:
    with importlib.resources.as_file(file) as path:
        return load_yaml(path)


def load_env_preset(name: str) -> EnvPreset:
    """The env preset ``name``; :class:`KeyError` if there is none."""
    data, source = _read("envs", name)
    return validate(EnvPreset, data, source)


def load_agent_preset(name: str) -> AgentPreset:
    """The agent preset ``name``; :class:`ConfigError` naming the closest presets if unknown."""
    try:
        data, source = _read("agents", name)
    except KeyError:
        names = agent_names()
        raise ConfigError(
            f"unknown agent {name!r}{did_you_mean(name, names)} (agents: {', '.join(names)})"
        ) from None
    return validate(AgentPreset, data, source)


def resolve_run_config(
    env: str | None = None,
    agent: str | None = None,
    train: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> RunConfig:
    """The run config for an env (preset or gymnasium id) and an agent preset.

    Layers, later wins: the agent preset, the env preset's ``agent`` and ``agents[<agent>]``
    overrides; the env preset's ``train`` defaults, ``train`` (the command-line flags); then
    ``overrides`` (``--set`` items).
    """
    from mnm_rl import __version__
    from mnm_rl.env_factory import resolve_env

    env_preset = resolve_env(env or DEFAULT_ENV)
    agent_preset = load_agent_preset(agent or DEFAULT_AGENT)
    agent_data = deep_merge(agent_preset.model_dump(), env_preset.agent)
    agent_data = deep_merge(agent_data, env_preset.agents.get(agent_preset.name, {}))
    train_data = {**env_preset.train, **(train or {})}
    config = validate(
        RunConfig,
        {
            "env": env_preset.spec().model_dump(),
            "agent": agent_data,
            "train": validate(TrainConfig, train_data, "train settings").model_dump(),
            "version": __version__,
        },
        f"agent {agent_preset.name!r} with env preset {env_preset.name!r}",
    )
    return apply_overrides(config, overrides)


def _show(value: Any) -> str:
    """A setting's value as labels show it; wrapper lists as ``name(key=value, ...)`` items."""
    if isinstance(value, list) and all(isinstance(v, Mapping) and "name" in v for v in value):
        items = [
            f"{v['name']}({', '.join(f'{k}={a}' for k, a in (v.get('kwargs') or {}).items())})"
            for v in value
        ]
        return f"[{', '.join(items)}]"
    return str(value)


def _changed(preset: Mapping[str, Any], run: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key=value`` for every leaf of ``run`` that differs from ``preset`` (dotted keys)."""
    changed = []
    for key, value in run.items():
        base = preset.get(key)
        if isinstance(value, Mapping) and isinstance(base, Mapping):
            changed += _changed(base, value, f"{prefix}{key}.")
        elif value != base:
            changed.append(f"{prefix}{key}={_show(value)}")
    return changed


def _label(name: str, preset: Mapping[str, Any] | None, run: Mapping[str, Any]) -> str:
    changed = _changed(preset, run) if preset is not None else []
    return f"{name} [{', '.join(changed)}]" if changed else name


def _preset_config(config: RunConfig) -> RunConfig | None:
    """What the presets give today for the run's env and agent (``None``: one no longer exists)."""
    try:
        return resolve_run_config(config.env.name, config.agent.name)
    except ConfigError:
        return None


def agent_label(config: RunConfig) -> str:
    """The run's agent preset name, plus the agent settings in which the run differs from what
    the presets give for its env: ``"mnm-p"``, or ``"mnm-p [ppo.seq_len=64, ppo.mem_coef=0.1]"``
    for a tuning variant (``--set``, ``mnm-rl sweep --grid``). Plots and result tables group
    runs by it, so variants are never averaged with the preset."""
    preset = _preset_config(config)
    base = preset.agent.model_dump() if preset else None
    return _label(config.agent.name, base, config.agent.model_dump())


def env_label(config: RunConfig) -> str:
    """The run's env preset name, plus the env settings in which the run differs from the
    preset (its description aside): ``"MiniGrid-Memory"``, or
    ``"MiniGrid-Memory [train_wrappers_until=400000]"`` for a run with an ``env.*`` override or
    one made before the preset changed. Result tables and plots group runs by it."""
    preset = _preset_config(config)
    base = preset.env.model_dump(exclude={"description"}) if preset else None
    return _label(config.env.name, base, config.env.model_dump(exclude={"description"}))


__all__ = [
    "agent_label",
    "env_label",
    "DEFAULT_AGENT",
    "DEFAULT_ENV",
    "agent_names",
    "env_names",
    "load_agent_preset",
    "load_env_preset",
    "preset_dir",
    "resolve_run_config",
]
