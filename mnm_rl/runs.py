"""The run folder: ``runs/<env>/<agent>/<seed>-<time>/``.

::

    config.yaml                 the resolved run config (env, agent, train)
    tb/                         TensorBoard event files (one per training session)
    checkpoints/step_<N>.zip    periodic checkpoints, N = env steps so far (SB3, for resuming)
    checkpoints/step_<N>.pt     the same policy as a safe policy file (tensors + JSON)
    model.zip                   the final model (SB3, for resuming)
    policy.pt                   the final policy as a safe policy file (``load_policy``)
    eval.json                   held-out evaluation written at the end of training / by `eval`

Model files are stable-baselines3 zips (weights, optimiser state, ``num_timesteps``); every file is
written to a temporary file in the same folder and then renamed over the target, so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from mnm_rl.config import ConfigError, RunConfig, dump_yaml, load_yaml, validate

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.zip"
POLICY_FILE = "policy.pt"
CHECKPOINT_DIR = "checkpoints"
TB_DIR = "tb"
EVAL_FILE = "eval.json"
DEFAULT_ROOT = Path("runs")

_CHECKPOINT_RE = re.compile(r"^step_(\d+)\.zip$")


class CheckpointError(ConfigError):
    """A path that is not a readable model checkpoint."""


def slug(name: str) -> str:
    """A folder-safe version of an env or agent name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "env"


def new_run_dir(root: Path, env_name: str, agent_name: str, seed: int) -> Path:
    """Create and return ``root/<env>/<agent>/<seed>-<YYYYmmdd-HHMMSS>`` (suffixed if taken)."""
    parent = Path(root) / slug(env_name) / slug(agent_name)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run_dir = parent / (f"{seed}-{stamp}" if n == 0 else f"{seed}-{stamp}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a run folder under {parent}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_model(model, path: Path) -> Path:
    """Save an SB3 model to ``path`` atomically."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def policy_file_for(model_path: Path) -> Path:
    """The safe policy file written next to an SB3 model file: ``model.zip`` -> ``policy.pt``,
    ``step_<N>.zip`` -> ``step_<N>.pt``."""
    model_path = Path(model_path)
    if model_path.name == MODEL_FILE:
        return model_path.with_name(POLICY_FILE)
    return model_path.with_suffix(".pt")


def checkpoint_path(run_dir: Path, num_timesteps: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{num_timesteps:010d}.zip"


def save_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, dump_yaml(config.model_dump(mode="json")))


def is_run_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def load_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    return validate(RunConfig, load_yaml(path), str(path))


def check_run_dir(path: Path) -> Path:
    """``path`` if it is a run folder; :class:`ConfigError` saying what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run folder (not a directory)")
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"{path} is not a run folder (no {CONFIG_FILE})")
    return path


def run_dir_of(model_path: Path) -> Path | None:
    """The run folder a model file belongs to (its folder or the one above), if any."""
    for parent in list(Path(model_path).resolve().parents)[:2]:
        if is_run_dir(parent):
            return parent
    return None


def checkpoint_steps(path: Path) -> int:
    """``num_timesteps`` stored in a checkpoint; :class:`CheckpointError` if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a model file")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            # A cut-off file can still parse as a zip: the directory of an archive stored inside
            # it (torch's policy.pth) is then found, with entries that do not start at byte 0.
            if not infos or min(info.header_offset for info in infos) != 0:
                raise CheckpointError(f"{path} is not a readable checkpoint (truncated or damaged)")
            names = {info.filename for info in infos}
            if not {"data", "policy.pth"} <= names:
                raise CheckpointError(f"{path} is not a mnm-rl checkpoint (no SB3 model inside)")
            bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(f"{path} is corrupt (bad CRC in {bad})")
            data = json.loads(archive.read("data"))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zipfile.LargeZipFile) as err:
        kind = "truncated or not a zip" if isinstance(err, zipfile.BadZipFile | EOFError) else err
        raise CheckpointError(f"{path} is not a readable checkpoint ({kind})") from None
    steps = data.get("num_timesteps") if isinstance(data, dict) else None
    if not isinstance(steps, int):
        raise CheckpointError(f"{path} is not a mnm-rl checkpoint (no num_timesteps)")
    return steps


def checkpoints(run_dir: Path) -> list[Path]:
    """Periodic checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_model(run_dir: Path) -> Path:
    """The model with the most env steps: the final ``model.zip`` or the last checkpoint."""
    candidates = checkpoints(run_dir)
    final = Path(run_dir) / MODEL_FILE
    if final.is_file():
        candidates.append(final)  # on a tie the final model wins (later in the list)
    if not candidates:
        raise ConfigError(f"run folder {run_dir} has no model or checkpoint yet")
    best, best_steps, error = None, -1, None
    for path in candidates:
        try:
            steps = checkpoint_steps(path)
        except CheckpointError as err:  # a damaged file: fall back to the others
            error = err
            continue
        if steps >= best_steps:
            best, best_steps = path, steps
    if best is None:
        raise error or ConfigError(f"run folder {run_dir} has no readable model")
    return best


def resolve_model(path: Path) -> tuple[Path, Path | None]:
    """``(model file, run folder or None)`` for a run folder or a model file."""
    path = Path(path)
    if path.is_dir():
        check_run_dir(path)
        return latest_model(path), path
    if not path.exists():
        kind = "model file" if path.suffix == ".zip" else "run folder or model file"
        raise ConfigError(f"{kind} {path} does not exist")
    checkpoint_steps(path)
    return path, run_dir_of(path)


__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "CheckpointError",
    "EVAL_FILE",
    "MODEL_FILE",
    "POLICY_FILE",
    "TB_DIR",
    "atomic_write_bytes",
    "checkpoint_path",
    "checkpoint_steps",
    "checkpoints",
    "latest_model",
    "load_config",
    "new_run_dir",
    "policy_file_for",
    "resolve_model",
    "save_config",
    "save_model",
    "write_json",
]
