"""The safe policy file: tensors plus a plain-text (JSON) description, nothing executable.

``policy.pt`` (next to ``model.zip``) and ``checkpoints/step_<N>.pt`` (next to each checkpoint) are
written with ``torch.save`` and hold one mapping of plain types::

    {"format": "mnm-rl-policy", "version": 1,
     "config": "<JSON: spaces, policy constructor kwargs, num_timesteps>",
     "state_dict": {name: tensor}}

They are read with ``torch.load(weights_only=True)``, whose unpickler accepts only tensors and
plain containers, so a file that carries any other pickled object is refused before anything in
it can run. SB3's ``model.zip`` (optimiser state, ``MemoryPPO.load``) is for resuming trusted runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from mnm_rl.runs import CheckpointError, atomic_write_bytes

FORMAT = "mnm-rl-policy"
VERSION = 1

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (nn.Tanh, nn.ReLU, nn.ELU, nn.GELU, nn.SiLU, nn.LeakyReLU)
}
_KWARGS = (
    "core",
    "core_kwargs",
    "features_dim",
    "embedding_dim",
    "grid_pooling",
    "shared_core",
    "net_arch",
)


class SpaceMismatchError(ValueError):
    """A policy and an env whose observation or action spaces differ."""


# ------------------------------------------------------------------------------------ spaces
def space_to_dict(space: spaces.Space) -> dict[str, Any]:
    """A JSON-ready description of a gymnasium space (Discrete, Box, MultiDiscrete,
    MultiBinary, Dict, Tuple)."""
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": space.low.tolist(),
            "high": space.high.tolist(),
        }
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "dtype": str(space.dtype)}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_dict(s) for k, s in space.spaces.items()}}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "spaces": [space_to_dict(s) for s in space.spaces]}
    raise ValueError(f"cannot describe {type(space).__name__} spaces in a policy file")


def space_from_dict(data: dict[str, Any]) -> spaces.Space:
    """The inverse of :func:`space_to_dict`; ``ValueError`` for anything else."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "Discrete":
        return spaces.Discrete(int(data["n"]), start=int(data.get("start", 0)))
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        return spaces.Box(
            np.asarray(data["low"], dtype=dtype),
            np.asarray(data["high"], dtype=dtype),
            shape=tuple(data["shape"]),
            dtype=dtype,
        )
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(data["nvec"], dtype=np.dtype(data["dtype"]))
    if kind == "MultiBinary":
        return spaces.MultiBinary(data["n"])
    if kind == "Dict":
        return spaces.Dict({k: space_from_dict(v) for k, v in data["spaces"].items()})
    if kind == "Tuple":
        return spaces.Tuple([space_from_dict(v) for v in data["spaces"]])
    raise ValueError(f"unknown space description {kind!r}")


def describe(space: spaces.Space, limit: int = 120) -> str:
    """``str(space)`` on one line, shortened to ``limit`` characters."""
    text = " ".join(str(space).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_spaces(observation_space, action_space, env, env_name: str = "the env") -> None:
    """:class:`SpaceMismatchError` naming both spaces unless ``env``'s spaces are the policy's."""
    for name, mine in (("observation_space", observation_space), ("action_space", action_space)):
        theirs = getattr(env, name)
        if theirs != mine:
            raise SpaceMismatchError(
                f"the policy's {name} {describe(mine)} does not match {env_name}'s "
                f"{name} {describe(theirs)}"
            )


# -------------------------------------------------------------------------------- the file
def policy_config(model) -> dict[str, Any]:
    """The plain-type description of a :class:`~mnm_rl.agent.MemoryPPO`'s policy."""
    from mnm_rl import __version__

    params = model.policy._get_constructor_parameters()
    kwargs: dict[str, Any] = {k: params[k] for k in _KWARGS}
    kwargs["net_arch"] = list(kwargs["net_arch"])
    kwargs["core_kwargs"] = dict(kwargs["core_kwargs"])
    kwargs["ortho_init"] = bool(params["ortho_init"])
    activation = params["activation_fn"]
    if _ACTIVATIONS.get(activation.__name__) is not activation:
        raise ValueError(f"activation_fn {activation!r} cannot be written to a policy file")
    kwargs["activation_fn"] = activation.__name__
    return {
        "observation_space": space_to_dict(model.observation_space),
        "action_space": space_to_dict(model.action_space),
        "policy_kwargs": kwargs,
        "num_timesteps": int(model.num_timesteps),
        "mnm_rl_version": __version__,
    }


def save_policy_file(model, path: Path) -> Path:
    """Write ``model``'s policy as a safe policy file at ``path`` (atomically)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(policy_config(model), sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in model.policy.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def read_policy_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of a safe policy file; :class:`CheckpointError` if it is not one
    or carries anything but tensors and plain data (nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"policy file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for a pickle payload, RuntimeError if damaged
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"refusing {path}: it carries pickled Python objects, not only tensors "
                "(a policy file must load with torch.load(weights_only=True); "
                "use MemoryPPO.load only for files you trust)"
            ) from None
        raise CheckpointError(f"{path} is not a readable policy file ({first[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a mnm-rl policy file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported policy file version {payload.get('version')}")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a mnm-rl policy file (no state_dict of tensors)")
    try:
        config = json.loads(payload["config"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is not a mnm-rl policy file (bad config)") from None
    return config, state


class LoadedPolicy:
    """A trained policy rebuilt from a safe policy file.

    ``predict(obs, state, episode_start, deterministic) -> (action, state)`` follows sb3-contrib's
    RecurrentPPO (works with SB3's ``evaluate_policy``); ``policy`` is the
    :class:`~mnm_rl.agent.RecurrentMemoryPolicy`.
    """

    def __init__(self, policy, observation_space, action_space, num_timesteps: int, path: Path):
        self.policy = policy
        self.observation_space = observation_space
        self.action_space = action_space
        self.num_timesteps = num_timesteps
        self.path = Path(path)

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False):
        return self.policy.predict(observation, state, episode_start, deterministic)

    def check_env(self, env, env_name: str = "the env") -> None:
        """:class:`SpaceMismatchError` (a ``ValueError``) naming both spaces on a mismatch."""
        check_spaces(self.observation_space, self.action_space, env, env_name)

    def __repr__(self) -> str:
        return f"LoadedPolicy({self.path}, {self.num_timesteps} env steps)"


def load_policy_file(path: Path, device: str | torch.device = "auto") -> LoadedPolicy:
    """Rebuild the policy stored in a safe policy file."""
    from stable_baselines3.common.utils import get_device

    from mnm_rl.agent import RecurrentMemoryPolicy

    config, state = read_policy_file(path)
    try:
        observation_space = space_from_dict(config["observation_space"])
        action_space = space_from_dict(config["action_space"])
        kwargs = dict(config["policy_kwargs"])
        kwargs["activation_fn"] = _ACTIVATIONS[kwargs.get("activation_fn", "Tanh")]
        policy = RecurrentMemoryPolicy(observation_space, action_space, lambda _: 0.0, **kwargs).to(
            get_device(device)
        )
        policy.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot rebuild the policy in {path}: {first[:160]}") from None
    policy.set_training_mode(False)
    return LoadedPolicy(
        policy, observation_space, action_space, int(config.get("num_timesteps", 0)), Path(path)
    )


__all__ = [
    "LoadedPolicy",
    "SpaceMismatchError",
    "check_spaces",
    "load_policy_file",
    "read_policy_file",
    "save_policy_file",
    "space_from_dict",
    "space_to_dict",
]
