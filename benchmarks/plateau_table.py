"""Training success of MiniGrid-MemoryS9 runs in windows of env steps, from docs/results CSVs.

    python benchmarks/plateau_table.py                      # the ent_coef 0.05 runs
    python benchmarks/plateau_table.py --match "mnm-p__"    # any file-name substring

Per run: the mean of ``rollout/success_rate`` (training episodes) and ``rollout/ep_len_mean``
in windows of 100k env steps starting at 100k, 300k, 500k, 700k and 900k, and the final
held-out success from ``results.json``. A success rate of 0.50 is chance; 0.55-0.60 is the
plateau of a policy that uses the cue only when it starts next to it.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

from mnm_rl.runs import slug

DOCS = Path(__file__).resolve().parents[1] / "docs"
WINDOWS = (100_000, 300_000, 500_000, 700_000, 900_000)
PREFIX = "MiniGrid-MemoryS9__"


def window_means(path: Path, tag: str) -> list[float | None]:
    points = [
        (int(row["step"]), float(row["value"]))
        for row in csv.DictReader(path.open())
        if row["tag"] == tag
    ]
    means = []
    for start in WINDOWS:
        inside = [v for step, v in points if start <= step < start + 100_000]
        means.append(sum(inside) / len(inside) if inside else None)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", default="ent_coef_0.05", help="substring of the CSV names")
    args = parser.parse_args()
    final = defaultdict(dict)
    for row in json.loads((DOCS / "results.json").read_text()):
        final[row["agent"]][row["seed"]] = row["heldout_success"]
    heads = " | ".join(f"{w // 1000}k" for w in WINDOWS)
    print(f"| run | training success at {heads} | episode length at {heads} | final held-out |")
    print("|---|" + "---|" * (2 * len(WINDOWS) + 1))
    for path in sorted(DOCS.glob(f"results/{PREFIX}*{args.match}*.csv")):
        agent, seed = path.stem[len(PREFIX) :].rsplit("__", 1)
        success = window_means(path, "rollout/success_rate")
        length = window_means(path, "rollout/ep_len_mean")
        label = next((a for a in final if slug(a) == agent), None)
        held_out = final.get(label, {}).get(int(seed))
        cells = [f"{v:.2f}" if v is not None else "" for v in success]
        cells += [f"{v:.1f}" if v is not None else "" for v in length]
        cells.append(f"{held_out:.3f}" if held_out is not None else "")
        print(f"| {agent} seed {seed} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
