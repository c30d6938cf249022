"""mnm-rl: reinforcement learning with Metalearned Neural Memory."""

from __future__ import annotations

from typing import Any

from mnm_rl import envs as _envs  # noqa: F401  (registers our gymnasium ids)

__version__ = "0.1.0"

_LAZY = {
    "load_policy": "mnm_rl.loading",
    "load_run_config": "mnm_rl.loading",
    "make_run_env": "mnm_rl.loading",
}


def __getattr__(name: str) -> Any:  # lazy, so that `import mnm_rl` stays light (no torch)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mnm_rl' has no attribute {name!r}")


__all__ = ["__version__", "load_policy", "load_run_config", "make_run_env"]
