"""A small, seeded training run on MiniGrid-MemoryS7, for tests that a speed-up changes nothing."""

from __future__ import annotations

import torch

from mnm_rl.agent import MemoryPPO
from mnm_rl.env_factory import make_vec_env, resolve_env


def trained_parameters(check_envs=None) -> dict[str, torch.Tensor]:
    """The parameters of a small lstm agent after two seeded rollouts and updates on two
    MiniGrid-MemoryS7 envs built by mnm_rl's env builder (whose envs ``check_envs``, if given,
    is called with first)."""
    env = make_vec_env(resolve_env("MiniGrid-MemoryS7-v0"), n_envs=2, seed=0)
    try:
        if check_envs is not None:
            check_envs(env.envs)
        model = MemoryPPO(
            env=env, core="lstm", n_steps=32, batch_size=32, n_epochs=2, seq_len=8, seed=0,
            policy_kwargs={"core_kwargs": {"hidden_size": 16}, "features_dim": 16},
        )  # fmt: skip
        model.learn(128)
        assert model._n_updates == 4  # two rollouts of 2 envs x 32 steps, two epochs each
        return model.policy.state_dict()
    finally:
        env.close()


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every parameter of ``a`` equals ``b``'s exactly."""
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
