"""mnm-rl: reinforcement learning with Metalearned Neural Memory."""

__version__ = "0.1.0"
