"""Recurrent memory cores in plain PyTorch: MNM (mnm-p, mnm-g), LSTM, GRU and a memoryless MLP.

This package knows nothing of reinforcement learning. Every core implements
:class:`RecurrentCore`: ``forward(x [T, B, F], state, episode_starts [T, B])`` returns
``(features [T, B, D_out], final_state, aux)``.
"""

from __future__ import annotations

from typing import Any

from mnm_rl.memory.base import AUX_KEYS, RecurrentCore
from mnm_rl.memory.baselines import GRUCore, LSTMCore, MLPCore
from mnm_rl.memory.fast_weights import FastWeightMemory
from mnm_rl.memory.mnm import MNMCore
from mnm_rl.memory.state import CoreState

CORE_KINDS = ("mnm-p", "mnm-g", "lstm", "gru", "mlp")


def make_core(kind: str, input_size: int, **kwargs: Any) -> RecurrentCore:
    """Build a core by name: ``mnm-p``, ``mnm-g``, ``lstm``, ``gru`` or ``mlp``.

    ``kwargs`` go to the core's constructor (``hidden_size`` for all; ``n_heads``, ``n_layers``,
    ``memory_size``, ``activation``, ``output_size`` for MNM).
    """
    if kind in ("mnm-p", "mnm-g"):
        return MNMCore(input_size, write_rule=kind, **kwargs)
    baselines = {"lstm": LSTMCore, "gru": GRUCore, "mlp": MLPCore}
    if kind not in baselines:
        raise ValueError(f"unknown core {kind!r}; expected one of {', '.join(CORE_KINDS)}")
    return baselines[kind](input_size, **kwargs)


__all__ = [
    "AUX_KEYS",
    "CORE_KINDS",
    "CoreState",
    "FastWeightMemory",
    "GRUCore",
    "LSTMCore",
    "MLPCore",
    "MNMCore",
    "RecurrentCore",
    "make_core",
]
