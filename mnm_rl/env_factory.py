"""Build environments from an env preset, or from any registered gymnasium id.

``gymnasium.make(id, **kwargs)``, then (for training) the preset's ``train_wrappers``, then its
wrappers in order, then (for training) stable-baselines3's ``Monitor``; a ``DummyVecEnv`` holds
the parallel copies. A MiniGrid env computes its observations with
:func:`mnm_rl.envs.minigrid_view.use_fast_view` (the same arrays, 3.5-5x faster) and takes its
actions as Python ints, :func:`mnm_rl.envs.minigrid_actions.use_int_actions` (numpy integers make
MiniGrid's comparisons with its action enum slow); a MiniGrid-Memory env lays out each episode's
grid from a kept wall plan, :func:`mnm_rl.envs.minigrid_memory.use_fast_memory_grid` (the same
grid, resets 2.3-4.3x as fast: ``benchmarks/minigrid_reset.py``), and keeps the images of the
views it meets (:class:`~mnm_rl.envs.minigrid_memory.KeptViews`: the same images, raw stepping
1.65-1.77x as fast) and steps in plain integer arithmetic
(:class:`~mnm_rl.envs.minigrid_memory.FastMemoryStep`: the same steps, raw stepping another
1.3-1.6x as fast).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np

import mnm_rl.envs  # noqa: F401  (registers our ids)
from mnm_rl.config import ConfigError, EnvPreset, EnvSpec, WrapperConfig, closest


def _symbolic_minigrid(env: gym.Env, **kwargs: Any) -> gym.Env:
    from mnm_rl.envs.minigrid import SymbolicMiniGrid

    return SymbolicMiniGrid(env, **kwargs)


def _view_size(env: gym.Env, agent_view_size: int) -> gym.Env:
    from minigrid.wrappers import ViewSizeWrapper

    return ViewSizeWrapper(env, agent_view_size=agent_view_size)


def _action_subset(env: gym.Env, actions: list[int | str]) -> gym.Env:
    from mnm_rl.wrappers import ActionSubset

    return ActionSubset(env, actions)


def _time_limit(env: gym.Env, max_episode_steps: int) -> gym.Env:
    return gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps)


def _start_direction(env: gym.Env, direction: int, probability: float) -> gym.Env:
    from mnm_rl.envs.minigrid import StartDirection

    return StartDirection(env, direction, probability)


def _min_start_column(env: gym.Env, min_column: int, probability: float = 1.0) -> gym.Env:
    from mnm_rl.envs.minigrid import MinStartColumn

    return MinStartColumn(env, min_column, probability)


#: Wrappers a preset can name, with what they do.
WRAPPERS: dict[str, tuple[Callable[..., gym.Env], str]] = {
    "symbolic_minigrid": (_symbolic_minigrid, "MiniGrid: symbolic image + direction, no mission"),
    "view_size": (_view_size, "MiniGrid: agent_view_size (minigrid's ViewSizeWrapper)"),
    "action_subset": (_action_subset, "keep only the listed actions (indices or MiniGrid names)"),
    "time_limit": (_time_limit, "gymnasium's TimeLimit(max_episode_steps)"),
    "start_direction": (
        _start_direction,
        "MiniGrid: some episodes start facing `direction` (a training curriculum)",
    ),
    "min_start_column": (
        _min_start_column,
        "MiniGrid-Memory: start at column >= `min_column`, not next to the cue (training)",
    ),
}


def _import_wrapper(path: str) -> Callable[..., gym.Env]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import wrapper {path!r}: {err}") from None


def _wrapper(config: WrapperConfig) -> Callable[..., gym.Env]:
    if config.name in WRAPPERS:
        return WRAPPERS[config.name][0]
    if ":" in config.name:
        return _import_wrapper(config.name)
    raise ConfigError(
        f"unknown wrapper {config.name!r}; expected one of {', '.join(WRAPPERS)} "
        "or an import path 'package.module:Class'"
    )


def _is_minigrid(env_id: str) -> bool:
    entry = gym.spec(env_id).entry_point
    name = entry if isinstance(entry, str) else getattr(entry, "__module__", "")
    return name.startswith("minigrid")


def registered_ids() -> list[str]:
    """Every gymnasium id registered after importing minigrid and our envs."""
    try:
        import minigrid  # noqa: F401  (registers MiniGrid-* ids)
    except ImportError:
        pass
    return list(gym.registry)


def spec_for_gym_id(env_id: str) -> EnvPreset | None:
    """A preset for a registered gymnasium id (``None`` if unknown): no wrappers, except the
    symbolic observation wrapper for MiniGrid envs."""
    ids = registered_ids()
    lookup = env_id
    if ":" in env_id:  # gymnasium's "module:Id" form imports the module first
        module, _, lookup = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError:
            return None
        ids = list(gym.registry)
    if lookup not in ids:
        return None
    wrappers = [WrapperConfig(name="symbolic_minigrid")] if _is_minigrid(lookup) else []
    return EnvPreset(
        name=lookup.replace("/", "_").replace(":", "_"),
        description=f"gymnasium id {lookup}",
        id=lookup,
        wrappers=wrappers,
    )


def resolve_env(name: str) -> EnvPreset:
    """The env preset ``name``, or else a preset for the registered gymnasium id ``name``."""
    from mnm_rl import presets

    names = presets.env_names()
    if name in names:
        return presets.load_env_preset(name)
    preset = spec_for_gym_id(name)
    if preset is not None:
        return preset
    suggestions = closest(name, names, n=3) or closest(name, registered_ids(), n=3)
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise ConfigError(
        f"unknown env {name!r}{hint} (presets: {', '.join(names)}; "
        "any registered gymnasium id also works)"
    )


def make_env(
    spec: EnvSpec, render_mode: str | None = None, monitor: bool = False, training: bool = False
) -> gym.Env:
    """One env: ``gymnasium.make`` with the spec's kwargs (a MiniGrid env with the fast view,
    :func:`~mnm_rl.envs.minigrid_view.use_fast_view`, its actions as ints,
    :func:`~mnm_rl.envs.minigrid_actions.use_int_actions`, and a MiniGrid-Memory env with the
    fast grid, :func:`~mnm_rl.envs.minigrid_memory.use_fast_memory_grid`), then (``training``) its
    ``train_wrappers``, then its wrappers (then ``Monitor``)."""
    if spec.id not in gym.registry:
        registered_ids()  # imports minigrid, which registers its ids
    kwargs = dict(spec.kwargs)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(spec.id, **kwargs)
        if "minigrid.minigrid_env" in sys.modules:  # else env cannot be a MiniGrid env
            from mnm_rl.envs.minigrid_actions import use_int_actions
            from mnm_rl.envs.minigrid_memory import use_fast_memory_grid
            from mnm_rl.envs.minigrid_view import use_fast_view

            use_fast_view(env)
            use_fast_memory_grid(env)
            env = use_int_actions(env)
        if training and spec.train_wrappers:
            plain = env
            for wrapper in spec.train_wrappers:
                env = _wrapper(wrapper)(env, **wrapper.kwargs)
            if spec.train_wrappers_end:
                from mnm_rl.wrappers import TrainWrapperGate

                env = TrainWrapperGate(env, plain)
        for wrapper in spec.wrappers:
            env = _wrapper(wrapper)(env, **wrapper.kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, gym.error.Error) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot make env {spec.name!r} ({spec.id}): {message}") from None
    if monitor:
        from stable_baselines3.common.monitor import Monitor

        env = Monitor(env)
    return env


def end_train_wrappers(vec_env) -> int:
    """Switch off the ``train_wrappers`` of every env of a vec env built by :func:`make_vec_env`
    from a spec whose curriculum ends (``train_wrappers_until`` or
    ``train_wrappers_until_success``): each env's next episode and all later ones come from the
    task itself (:meth:`~mnm_rl.wrappers.TrainWrapperGate.end_curriculum`, wherever the env
    lives). Returns how many envs were switched."""
    gated = [
        i for i, has in enumerate(vec_env.env_method("has_wrapper_attr", "end_curriculum")) if has
    ]
    if gated:
        vec_env.env_method("end_curriculum", indices=gated)
    return len(gated)


def train_base_seed(spec: EnvSpec, run_seed: int, n_envs: int, num_timesteps: int = 0) -> int:
    """First of ``n_envs`` consecutive training seeds, drawn from the preset's ``train_seeds``.

    Deterministic in ``(run_seed, num_timesteps)``, so a resumed run gets fresh episodes.
    """
    span = len(spec.train_seeds) - n_envs + 1
    if span < 1:
        raise ConfigError(
            f"n_envs ({n_envs}) exceeds the {len(spec.train_seeds)} training seeds of {spec.name}"
        )
    rng = np.random.default_rng([run_seed, num_timesteps])
    return spec.train_seeds.start + int(rng.integers(span))


def make_vec_env(spec: EnvSpec, n_envs: int, seed: int | None = None, env_workers: int = 0):
    """The training envs: ``n_envs`` monitored envs with the spec's ``train_wrappers``; env ``i``
    first resets with ``seed + i``. A :class:`~mnm_rl.lean_vec_env.LeanDummyVecEnv`
    (stable-baselines3's ``DummyVecEnv`` without its deep copies), or with ``env_workers`` a
    :class:`~mnm_rl.parallel_vec_env.ParallelVecEnv` stepping them in ``env_workers + 1`` groups
    at once (the same episodes either way)."""
    from mnm_rl.lean_vec_env import LeanDummyVecEnv
    from mnm_rl.parallel_vec_env import ParallelVecEnv

    if n_envs < 1:
        raise ConfigError(f"n_envs must be positive, got {n_envs}")
    if not 0 <= env_workers < n_envs:
        raise ConfigError(
            f"env_workers must be in [0, {n_envs - 1}] for {n_envs} envs, got {env_workers}"
        )
    make_env(spec, training=True).close()  # fail here, clearly, rather than inside the vec env
    env_fns = [partial(make_env, spec, monitor=True, training=True) for _ in range(n_envs)]
    vec_env = ParallelVecEnv(env_fns, env_workers) if env_workers else LeanDummyVecEnv(env_fns)
    if seed is not None:
        vec_env.seed(seed)
    return vec_env


__all__ = [
    "WRAPPERS",
    "end_train_wrappers",
    "make_env",
    "make_vec_env",
    "registered_ids",
    "resolve_env",
    "spec_for_gym_id",
    "train_base_seed",
]
