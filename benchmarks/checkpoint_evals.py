"""Held-out success of every checkpoint of runs trained without ``train.eval_every``.

    python benchmarks/checkpoint_evals.py runs/MiniGrid-Memory/mnm-p/* --episodes 100

Writes ``eval-step_<N>-<env>.json`` (the ``mnm-rl eval`` report) next to the run's other files;
``benchmarks/export_results.py`` reads them for the steps-to-90% column, whose resolution is then
the checkpoint interval. Loads the SB3 zips with ``MemoryPPO.load``: use it on your own runs only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mnm_rl.agent import MemoryPPO
from mnm_rl.evaluation import evaluate
from mnm_rl.runs import checkpoint_steps, checkpoints, load_config, slug, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run_dir in args.runs:
        config = load_config(run_dir)
        for checkpoint in checkpoints(run_dir):
            out = run_dir / f"eval-{checkpoint.stem}-{slug(config.env.name)}.json"
            if out.exists():
                continue
            model = MemoryPPO.load(checkpoint, device="cpu")
            extra = {"model": str(checkpoint), "num_timesteps": checkpoint_steps(checkpoint)}
            report = evaluate(model, config.env, args.episodes, True, extra)
            write_json(out, report)
            print(f"{checkpoint}: held-out success {report['success_rate']:.3f}", flush=True)


if __name__ == "__main__":
    main()
