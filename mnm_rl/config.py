"""Presets and run configuration: pydantic models, YAML loading and ``--set key=value`` overrides.

A *run config* has three sections, each a model below:

* ``env`` (:class:`EnvSpec`): the gymnasium id, its ``make`` kwargs, the wrappers, and the
  training and held-out evaluation seed ranges;
* ``agent`` (:class:`AgentPreset`): the memory core, the policy's sizes and PPO's hyperparameters;
* ``train`` (:class:`TrainConfig`): timesteps, parallel envs, seed, device, checkpoints, evaluation.

An env preset file (``envs/*.yaml``) is an :class:`EnvPreset`: an :class:`EnvSpec` plus the
``train`` defaults and the ``agent`` (all agents) and ``agents`` (by name) overrides that suit the
env. An agent preset file
(``agents/*.yaml``) is an :class:`AgentPreset`. Every model forbids unknown keys and checks types
strictly, so a typo in a file or in ``--set`` is an error, never silently ignored.

This module imports neither torch nor gymnasium.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

CoreName = Literal["mnm-p", "mnm-g", "lstm", "gru", "mlp"]
MNM_CORES = ("mnm-p", "mnm-g")


class ConfigError(ValueError):
    """A bad preset, run config or override; the message is one line meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SeedRange(_Strict):
    """Seeds ``start, start + 1, ..., stop - 1``."""

    start: NonNegativeInt
    stop: PositiveInt

    @model_validator(mode="after")
    def _nonempty(self) -> SeedRange:
        if self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be greater than start ({self.start})")
        return self

    def __len__(self) -> int:
        return self.stop - self.start

    def seed(self, k: int) -> int:
        """The ``k``-th seed of the range."""
        if not 0 <= k < len(self):
            raise ConfigError(f"seed index {k} is outside the range of {len(self)} seeds")
        return self.start + k

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.stop and other.start < self.stop


class WrapperConfig(_Strict):
    """A wrapper applied after ``gymnasium.make``: a name from :data:`mnm_rl.env_factory.WRAPPERS`
    or an import path ``package.module:Class``, with its keyword arguments."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class EnvSpec(_Strict):
    """How to build the env and which seeds it may use."""

    name: str
    description: str = ""
    id: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    wrappers: list[WrapperConfig] = Field(default_factory=list)
    #: Wrappers for the training envs only, applied right after ``gymnasium.make`` (before
    #: ``wrappers``): a curriculum that changes how training episodes start. Evaluation never
    #: uses them.
    train_wrappers: list[WrapperConfig] = Field(default_factory=list)
    #: The ``train_wrappers`` shape only the training episodes that start before this many env
    #: steps of the run; later ones come from the task itself (``None``: the whole run).
    train_wrappers_until: PositiveInt | None = None
    #: End the ``train_wrappers`` earlier, once at least this share of the last
    #: ``train_wrappers_window`` finished training episodes succeeded (a positive final reward),
    #: or at ``train_wrappers_until``, whichever comes first (``None``: by env step only).
    train_wrappers_until_success: float | None = Field(None, gt=0, le=1)
    train_wrappers_window: PositiveInt = 100
    train_seeds: SeedRange = SeedRange(start=0, stop=100_000)
    eval_seeds: SeedRange = SeedRange(start=100_000, stop=200_000)

    @property
    def train_wrappers_end(self) -> bool:
        """Whether the ``train_wrappers`` end during the run (by env step or by success)."""
        ends = (self.train_wrappers_until, self.train_wrappers_until_success)
        return any(end is not None for end in ends)

    @model_validator(mode="after")
    def _disjoint_seeds(self) -> EnvSpec:
        for name in ("train_wrappers_until", "train_wrappers_until_success"):
            if getattr(self, name) is not None and not self.train_wrappers:
                raise ValueError(f"{name} is set but there are no train_wrappers")
        if self.train_seeds.overlaps(self.eval_seeds):
            raise ValueError(
                f"train_seeds [{self.train_seeds.start}, {self.train_seeds.stop}) and eval_seeds "
                f"[{self.eval_seeds.start}, {self.eval_seeds.stop}) overlap"
            )
        return self


class TrainConfig(_Strict):
    """Settings of one training run."""

    timesteps: PositiveInt = 100_000
    n_envs: PositiveInt = 8
    seed: NonNegativeInt = 0
    device: str = "auto"
    #: Write a checkpoint every this many env steps (plus the final model).
    checkpoint_every: PositiveInt = 50_000
    #: Held-out episodes evaluated at the end of training (0: no evaluation).
    eval_episodes: NonNegativeInt = 100
    #: Evaluate with the most likely action (else sample from the policy).
    eval_deterministic: bool = True
    #: Held-out evaluation during training every this many env steps, logged to TensorBoard as
    #: ``eval/success_rate`` (0: none). Gives the learning curve on held-out seeds.
    eval_every: NonNegativeInt = 0
    #: Held-out episodes of each evaluation during training.
    eval_every_episodes: PositiveInt = 100
    #: ``torch.set_num_threads``; small recurrent nets run fastest on one thread (``None``: torch's
    #: default, all cores).
    torch_threads: PositiveInt | None = 1
    #: Threads the fused MNM kernel splits each minibatch between (its own threads, at least 4
    #: sequences each; a rollout step where each gets 16 envs or more; ``None``:
    #: ``torch_threads``), and that the
    #: lstm kernel, the cores' input projections and the action and value heads split an
    #: update's work between. 2 made MNM training on MiniGrid-MemoryS9 1.1-1.3x faster on a
    #: 2-core machine; keep 1 when runs share the cores (see docs/benchmarks.md).
    kernel_threads: PositiveInt | None = None
    #: Worker processes that step the training envs alongside this one (0: every env in this
    #: process, a ``DummyVecEnv``). With ``N`` the ``n_envs`` envs are stepped in ``N + 1``
    #: groups at once (:class:`mnm_rl.parallel_vec_env.ParallelVecEnv`); it must be below
    #: ``n_envs``. 1 uses the second core of a 2-core machine; up to ``cores - 1`` on more.
    env_workers: NonNegativeInt = 0

    @model_validator(mode="after")
    def _check_env_workers(self) -> TrainConfig:
        if self.env_workers >= self.n_envs:
            raise ValueError(
                f"env_workers ({self.env_workers}) must be below n_envs ({self.n_envs}): each "
                "worker and this process step at least one env"
            )
        return self


class EnvPreset(EnvSpec):
    """An env preset file: the env plus the training defaults and agent overrides that suit it."""

    train: dict[str, Any] = Field(default_factory=dict)
    #: Overrides for every agent (nested, like an agent preset).
    agent: dict[str, Any] = Field(default_factory=dict)
    #: Overrides for one agent preset, by name, applied after ``agent``.
    agents: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_train(self) -> EnvPreset:
        TrainConfig.model_validate(self.train)
        return self

    def spec(self) -> EnvSpec:
        return EnvSpec.model_validate(self.model_dump(exclude={"train", "agent", "agents"}))


class CoreConfig(_Strict):
    """Keyword arguments of the memory core (all but ``hidden_size`` are for MNM cores only)."""

    hidden_size: PositiveInt = 64
    n_heads: PositiveInt | None = None
    n_layers: PositiveInt | None = None
    memory_size: PositiveInt | None = None
    activation: Literal["tanh", "sigmoid"] | None = None
    #: Steps back of the pair the retention loss asks the memory for (see
    #: :class:`mnm_rl.memory.MNMCore`); it must be shorter than ``ppo.seq_len``.
    retention_lag: NonNegativeInt | None = None
    #: Read from the memory before this step's write (see :class:`mnm_rl.memory.MNMCore`).
    read_before_write: bool | None = None
    #: Keys, values and write strength also read the step's input, not only the controller state
    #: (see :class:`mnm_rl.memory.MNMCore`).
    interaction_input: bool | None = None

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class PolicyConfig(_Strict):
    """The policy's sizes (see :class:`mnm_rl.agent.RecurrentMemoryPolicy`)."""

    core_kwargs: CoreConfig = CoreConfig()
    features_dim: PositiveInt = 64
    embedding_dim: PositiveInt = 8
    #: Also encode a symbolic grid by the sum of its cells' embeddings (what is in view,
    #: wherever it is; see :class:`mnm_rl.agent.extractors.SymbolicGridEncoder`).
    grid_pooling: bool = False
    shared_core: bool = True
    net_arch: list[PositiveInt] = Field(default_factory=lambda: [64])
    #: Learning rate of the core's memory parameters (MNM: the interaction and the fast-weight
    #: memory) relative to the rest of the policy.
    memory_lr_scale: PositiveFloat = 1.0


class PPOConfig(_Strict):
    """PPO hyperparameters (see :class:`mnm_rl.agent.MemoryPPO`)."""

    learning_rate: PositiveFloat = 3e-4
    #: If set, the learning rate stays at ``learning_rate`` for the first
    #: ``learning_rate_decay_from`` share of the run's env steps, then goes linearly to this
    #: value at the end: the last updates are small, so the final policy stays close to the one
    #: that was last evaluated.
    learning_rate_final: NonNegativeFloat | None = None
    learning_rate_decay_from: float = Field(0.0, ge=0, lt=1)
    n_steps: PositiveInt = 128
    batch_size: PositiveInt = 256
    seq_len: PositiveInt = 16
    n_epochs: PositiveInt = 4
    gamma: float = Field(0.99, gt=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip_range: PositiveFloat = 0.2
    ent_coef: NonNegativeFloat = 0.01
    #: If set, the entropy bonus goes linearly from ``ent_coef`` to this value over the first
    #: ``ent_coef_fraction`` of the run's env steps, then stays there.
    ent_coef_final: NonNegativeFloat | None = None
    ent_coef_fraction: float = Field(1.0, gt=0, le=1)
    vf_coef: NonNegativeFloat = 0.5
    mem_coef: NonNegativeFloat = 1.0
    max_grad_norm: PositiveFloat = 0.5
    target_kl: PositiveFloat | None = None
    #: A NaN/inf loss, gradient or fast weight: ``stop`` the run (the update is not applied) or
    #: ``skip`` the minibatch and count it in ``train/nonfinite_skips``.
    on_nonfinite: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _schedules(self) -> PPOConfig:
        if self.ent_coef_final is None and self.ent_coef_fraction != 1.0:
            raise ValueError("ent_coef_fraction needs ent_coef_final (the value to decay to)")
        if self.learning_rate_final is None and self.learning_rate_decay_from != 0.0:
            raise ValueError(
                "learning_rate_decay_from needs learning_rate_final (the value to decay to)"
            )
        return self

    @model_validator(mode="after")
    def _chunks(self) -> PPOConfig:
        for name in ("n_steps", "batch_size"):
            if getattr(self, name) % self.seq_len:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be a multiple of seq_len ({self.seq_len})"
                )
        return self


class AgentPreset(_Strict):
    """An agent preset file: the core, the policy's sizes and PPO's hyperparameters."""

    name: str
    description: str = ""
    core: CoreName
    policy: PolicyConfig = PolicyConfig()
    ppo: PPOConfig = PPOConfig()

    @model_validator(mode="after")
    def _mnm_only_kwargs(self) -> AgentPreset:
        if self.core not in MNM_CORES:
            extra = sorted(set(self.policy.core_kwargs.kwargs()) - {"hidden_size"})
            if extra:
                raise ValueError(f"core {self.core!r} takes only hidden_size, not {extra}")
        lag = self.policy.core_kwargs.retention_lag
        if lag is not None and lag >= self.ppo.seq_len:
            raise ValueError(
                f"retention_lag ({lag}) must be smaller than ppo.seq_len ({self.ppo.seq_len}): "
                "the retained pair must lie in the same training sequence"
            )
        return self

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`mnm_rl.agent.MemoryPPO` (without env, seed, device)."""
        policy = self.policy.model_dump()
        policy["core_kwargs"] = self.policy.core_kwargs.kwargs()
        ppo = self.ppo.model_dump()
        final, fraction = ppo.pop("ent_coef_final"), ppo.pop("ent_coef_fraction")
        if final is not None:
            from stable_baselines3.common.utils import LinearSchedule  # torch: only when needed

            ppo["ent_coef"] = LinearSchedule(ppo["ent_coef"], final, fraction)
        final, decay_from = ppo.pop("learning_rate_final"), ppo.pop("learning_rate_decay_from")
        if final is not None:
            from mnm_rl.agent.schedules import LateLinearDecay

            ppo["learning_rate"] = LateLinearDecay(ppo["learning_rate"], final, decay_from)
        return {"core": self.core, **ppo, "policy_kwargs": policy}


class RunConfig(_Strict):
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    env: EnvSpec
    agent: AgentPreset
    train: TrainConfig = TrainConfig()
    version: str = ""


# ------------------------------------------------------------------------------------------ YAML
def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; :class:`ConfigError` if unreadable or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping, not {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """The first error of ``err`` as ``key.path: message`` on one line."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {message}{extra}" if loc else f"{message}{extra}"


def validate(model: type[BaseModel], data: Mapping[str, Any], source: str, prefix: str = ""):
    """``model.model_validate(data)``; a :class:`ConfigError` naming ``source`` on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err, prefix)}") from None


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------ overrides
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML (``16``, ``true``, ``[64, 64]``, ``null``); ``1e-3`` is a float."""
    if _FLOAT_RE.match(text.strip()) and not re.match(r"^[-+]?\d+$", text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """Split ``a.b.c=value`` into the key and its parsed value."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key=value with a dotted key, got {text!r}")
    return key, parse_value(value)


def set_nested(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in; nested mappings merge key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``, nested models included."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys += known_keys(candidate, path + ".")
    return keys


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``name`` (case-insensitive), best first."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[m] for m in matches]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    matches = closest(name, candidates)
    return f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


def apply_overrides(config: RunConfig, assignments: Iterable[str]) -> RunConfig:
    """Apply ``--set key=value`` assignments one by one, validating after each."""
    data = config.model_dump()
    for text in assignments:
        key, value = parse_assignment(text)
        set_nested(data, key, value)
        try:
            RunConfig.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                hint = did_you_mean(key, known_keys(RunConfig))
                raise ConfigError(f"--set {key}: unknown key{hint}") from None
            raise ConfigError(
                f"--set {text}: {format_validation_error(err) if loc else first['msg']}"
            ) from None
    return RunConfig.model_validate(data)


__all__ = [
    "AgentPreset",
    "ConfigError",
    "CoreConfig",
    "EnvPreset",
    "EnvSpec",
    "PPOConfig",
    "PolicyConfig",
    "RunConfig",
    "SeedRange",
    "TrainConfig",
    "WrapperConfig",
    "apply_overrides",
    "closest",
    "deep_merge",
    "did_you_mean",
    "dump_yaml",
    "load_yaml",
    "parse_value",
]
