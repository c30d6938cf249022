"""Memory-demanding gymnasium environments, registered under the ``mnm_rl/`` namespace.

Importing this package (or ``mnm_rl``) registers ``mnm_rl/DelayedCueRecall-v0`` and
``mnm_rl/KeyValueRecall-v0``; ``gymnasium.make("mnm_rl:mnm_rl/DelayedCueRecall-v0")`` works
without importing ``mnm_rl`` first.
"""

from __future__ import annotations

import gymnasium as gym

from mnm_rl.envs.delayed_cue import DelayedCueRecallEnv
from mnm_rl.envs.key_value import KeyValueRecallEnv

#: Registered gymnasium ids mapped to their entry points.
ENV_IDS: dict[str, str] = {
    "mnm_rl/DelayedCueRecall-v0": "mnm_rl.envs.delayed_cue:DelayedCueRecallEnv",
    "mnm_rl/KeyValueRecall-v0": "mnm_rl.envs.key_value:KeyValueRecallEnv",
}


def register_envs() -> None:
    """Register this package's environments with gymnasium; ids already registered are skipped."""
    for env_id, entry_point in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point)


register_envs()

__all__ = ["ENV_IDS", "DelayedCueRecallEnv", "KeyValueRecallEnv", "register_envs"]
