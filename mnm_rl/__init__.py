"""mnm-rl: reinforcement learning with Metalearned Neural Memory."""

from mnm_rl import envs as _envs  # noqa: F401  (registers our gymnasium ids)

__version__ = "0.1.0"
