"""How far does one PPO update move a policy, and what moves it?

From each checkpoint, collect one rollout on fresh training episodes and run one PPO update (the
run's own settings), then report the update's ``train/approx_kl`` (the mean over its minibatches
of KL(old || new) on the rollout's actions). Variants of the same update: each loss term but the
policy loss switched off (value, memory, entropy), only the policy loss, and (``--groups``) only
one parameter group trained at a time. Every variant of a checkpoint sees the same rollouts
(same env seeds, same torch seed), so the differences are the update's own.

    python benchmarks/kl_sources.py runs/GROUP/RUN/checkpoints/step_0000500000.zip ... \
        [--env MiniGrid-MemoryS9] [--repeats 3] [--groups]

Prints a table and, as its last line, a JSON object
``{"env": ..., "results": [{"checkpoint": ..., "variant": ..., "approx_kl": [..]}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from stable_baselines3.common.logger import Logger

from mnm_rl.agent import MemoryPPO
from mnm_rl.env_factory import make_vec_env
from mnm_rl.presets import load_env_preset

#: Loss-term variants: attribute changes on the loaded model ("ent" zeroes the entropy bonus).
TERMS: dict[str, dict[str, float]] = {
    "full update": {},
    "no value loss": {"vf_coef": 0.0},
    "no memory loss": {"mem_coef": 0.0},
    "no entropy bonus": {"ent": 0.0},
    "policy loss only": {"vf_coef": 0.0, "mem_coef": 0.0, "ent": 0.0},
}


def parameter_groups(model: MemoryPPO) -> list[str]:
    """Top-level parameter groups: ``core.<part>`` for the core, else the module's name."""
    groups: list[str] = []
    for name, _ in model.policy.named_parameters():
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "core" else parts[0]
        if group not in groups:
            groups.append(group)
    return groups


def one_update(checkpoint: str, env_name: str, seed: int, change: dict) -> float:
    """approx_kl of one rollout + PPO update from ``checkpoint`` with ``change`` applied."""
    spec = load_env_preset(env_name).spec()
    model = MemoryPPO.load(checkpoint, device="cpu")
    env = make_vec_env(spec, model.n_envs, seed=spec.train_seeds.start + 1000 * seed)
    model.set_env(env)
    model.set_random_seed(seed)
    logger = Logger(folder=None, output_formats=[])
    model.set_logger(logger)
    for key in ("vf_coef", "mem_coef"):
        if key in change and hasattr(model, key):
            setattr(model, key, change[key])
    if "ent" in change:
        model.ent_coef_schedule = lambda _progress: change["ent"]
    if "only" in change:
        for name, param in model.policy.named_parameters():
            param.requires_grad_(name == change["only"] or name.startswith(change["only"] + "."))
    model.learn(model.n_steps * model.n_envs, reset_num_timesteps=False)
    env.close()
    return float(logger.name_to_value["train/approx_kl"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--env", default="MiniGrid-MemoryS9")
    parser.add_argument("--repeats", type=int, default=3, help="rollouts per variant")
    parser.add_argument("--groups", action="store_true", help="also one parameter group at a time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    print(f"{'checkpoint':60s} {'variant':34s} approx_kl mean (per rollout)")
    for checkpoint in args.checkpoints:
        variants = dict(TERMS)
        if args.groups:
            model = MemoryPPO.load(checkpoint, device="cpu")
            variants.update({f"only {g}": {"only": g} for g in parameter_groups(model)})
        for variant, change in variants.items():
            kls = [one_update(checkpoint, args.env, seed, change) for seed in range(args.repeats)]
            results.append({"checkpoint": checkpoint, "variant": variant, "approx_kl": kls})
            per = ", ".join(f"{k:.4f}" for k in kls)
            print(f"{checkpoint[-60:]:60s} {variant:34s} {statistics.mean(kls):.4f} ({per})")
    print(json.dumps({"env": args.env, "results": results}))


if __name__ == "__main__":
    main()
