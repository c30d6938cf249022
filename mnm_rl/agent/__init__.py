"""Recurrent PPO agent with a memory core as the policy's recurrent feature extractor."""

from mnm_rl.agent.buffer import ChunkBatch, ChunkRolloutBuffer
from mnm_rl.agent.extractors import MemoryFeaturesExtractor
from mnm_rl.agent.policy import RecurrentMemoryPolicy
from mnm_rl.agent.ppo import MemoryPPO, NonFiniteError

__all__ = [
    "ChunkBatch",
    "ChunkRolloutBuffer",
    "MemoryFeaturesExtractor",
    "MemoryPPO",
    "NonFiniteError",
    "RecurrentMemoryPolicy",
]
