"""How far apart are the cue and the choice in MiniGrid-Memory episodes, in training chunks?

Truncated BPTT trains on chunks of ``seq_len`` consecutive rollout steps per env, cut without
regard to episodes. A gradient can only teach the core to keep the cue when the step that
sees the cue and the step that acts on it (the episode's last) fall in the same chunk. This
script plays a run's policy on the env preset's held-out seeds (sampling its actions, as in a
rollout, or its most likely action with ``--deterministic``; with ``--training-env`` from the
preset's training starts), records for every episode that
saw the cue the gap ``g`` (steps from the first step with the cue in view to the last step),
and prints, per ``seq_len``, the share of those episodes whose cue and choice share a chunk.
An episode starts at a uniformly random offset in the chunk grid, so that share is
``max(0, 1 - g / seq_len)`` per episode, averaged.

    python benchmarks/cue_gap.py runs/s9until/RUN [RUN ...] --seq-lens 16 32 64

Prints a table (one row per run) and a JSON last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from probe_cue import CueWatch, play_episode

from mnm_rl.agent import MemoryPPO
from mnm_rl.env_factory import make_env, resolve_env
from mnm_rl.runs import load_config, resolve_model


def cue_gaps(
    run: Path,
    episodes: int,
    deterministic: bool,
    seed: int,
    training_env: bool,
    env_name: str | None,
) -> dict[str, np.ndarray]:
    """Per episode: the gap from the first cue sighting to the last step (-1 if never seen),
    the episode length and whether it succeeded."""
    model_path, run_dir = resolve_model(run)
    if run_dir is None:
        raise SystemExit(f"cue_gap.py: {run} is not in a run folder (no config.yaml)")
    config = load_config(run_dir)
    policy = MemoryPPO.load(model_path, device="cpu").policy
    spec = config.env if env_name is None else resolve_env(env_name)
    env = make_env(spec, training=training_env)
    torch.manual_seed(seed)
    start = config.env.eval_seeds.start
    gaps, lengths, successes, watch = [], [], [], CueWatch(env)
    for episode in range(episodes):
        reward, length, _ = play_episode(policy, env, start + episode, deterministic, watch)
        gaps.append(-1 if watch.first_seen is None else length - 1 - watch.first_seen)
        lengths.append(length)
        successes.append(reward > 0)
    return {"gap": np.array(gaps), "length": np.array(lengths), "success": np.array(successes)}


def same_chunk_share(gaps: np.ndarray, seq_len: int) -> float:
    """Expected share of episodes whose two steps ``gap`` apart fall in one chunk of ``seq_len``."""
    return float(np.clip(1.0 - gaps / seq_len, 0.0, 1.0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--deterministic", action="store_true", help="most likely action")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for sampling actions")
    parser.add_argument(
        "--training-env", action="store_true", help="with the preset's train_wrappers (its starts)"
    )
    parser.add_argument("--env", help="play this env preset instead of the run's own")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    share_cols = " ".join(f"same chunk @{n:<3d}" for n in args.seq_lens)
    print(f"{'run':60s} success saw cue gap median [p10, p90] length  {share_cols}")
    for run in args.runs:
        data = cue_gaps(
            run, args.episodes, args.deterministic, args.seed, args.training_env, args.env
        )
        seen = data["gap"] >= 0
        gaps = data["gap"][seen]
        row = {
            "success": float(data["success"].mean()),
            "saw_cue": float(seen.mean()),
            "gap_median": float(np.median(gaps)) if gaps.size else None,
            "gap_p10": float(np.percentile(gaps, 10)) if gaps.size else None,
            "gap_p90": float(np.percentile(gaps, 90)) if gaps.size else None,
            "length_median": float(np.median(data["length"])),
            "same_chunk": {str(n): same_chunk_share(gaps, n) for n in args.seq_lens},
        }
        results[str(run)] = row
        shares = " ".join(f"{row['same_chunk'][str(n)]:13.3f}" for n in args.seq_lens)
        gap_text = (
            f"{row['gap_median']:5.1f} [{row['gap_p10']:.0f}, {row['gap_p90']:.0f}]"
            if gaps.size
            else "    - [-, -]"
        )
        print(
            f"{str(run)[-60:]:60s} {row['success']:.3f}   {row['saw_cue']:.3f}   {gap_text:>18s}  "
            f"{row['length_median']:5.1f}  {shares}"
        )
    settings = {
        "deterministic": args.deterministic,
        "training_env": args.training_env,
        "env": args.env,
    }
    print(json.dumps({**settings, "episodes": args.episodes, **results}))


if __name__ == "__main__":
    main()
