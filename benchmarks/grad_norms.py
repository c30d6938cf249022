"""Gradient norms per parameter group, before clipping, from a run's checkpoint.

Loads a checkpoint, trains it for two more rollouts on fresh training envs (the checkpoint on
disk is not touched) and records, for every minibatch, the gradient norm of each top-level part
of the policy (each layer of the core separately) before ``clip_grad_norm_``. Prints the median
and the maximum over the minibatches.

    python benchmarks/grad_norms.py runs/s9/mnm-p-seed1 500000
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from mnm_rl.agent import MemoryPPO
from mnm_rl.env_factory import make_vec_env
from mnm_rl.runs import load_config


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: grad_norms.py RUN_DIR CHECKPOINT_STEPS")
    torch.set_num_threads(1)
    run, step = Path(sys.argv[1]), sys.argv[2]
    config = load_config(run)
    env = make_vec_env(config.env, config.train.n_envs, 12345)
    checkpoint = next((run / "checkpoints").glob(f"step_*{step}.zip"))
    model = MemoryPPO.load(checkpoint, env=env, device="cpu")
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, parameter in model.policy.named_parameters():
        parts = name.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "core" else parts[0], []).append(
            parameter
        )
    records: list[dict[str, float]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        records.append(
            {
                group: float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])))
                for group, ps in groups.items()
            }
        )
        return clip(parameters, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        model.learn(config.train.n_envs * model.n_steps * 2, reset_num_timesteps=False)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    print(f"{run} {checkpoint.name}: {len(records)} minibatches, gradient norm before clipping")
    for group in records[0]:
        values = [r[group] for r in records]
        print(f"  {group:24s} median {statistics.median(values):.4f}  max {max(values):.4f}")


if __name__ == "__main__":
    main()
