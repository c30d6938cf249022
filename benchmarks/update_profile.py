"""Where a PPO update's (or a rollout's) time goes, by native function: Linux ``perf`` samples
of ``train()`` (or ``collect_rollouts()``).

Builds ``throughput.py``'s agent in the issue's setting (MiniGrid-MemoryS7, 7 x 7 view, 8 envs x
128 steps, 4 epochs of 16 sequences x 16 steps) with one core, collects a rollout, then calls
``train()`` over and over on it while ``perf record`` samples this process for ``--seconds``
(only the updates: not start-up, the rollout or the interpreter's exit). With ``--phase
rollout`` it collects rollouts over and over instead (the envs stepped in this process, so their
Python is in the interpreter's share too; the policy's compiled rollout step is in
``mnm_rl_policy_step.so``, which the table lists by symbol). Prints the top
symbols and the share of a few groups of them (MKL's multiply kernels, MKL's packing of its
operands, the fused sequence kernels' own code, the compiled rollout step, mnm_rl's other
kernels, ATen's copies, numpy, the Python interpreter), and, last, a
JSON object ``{"config", "phase", "seconds", "updates", "groups": {...}, "top": [[symbol,
share], ...]}`` (``updates``: the calls of the phase, updates or rollouts).

    python benchmarks/update_profile.py                   # mnm-p, 4 heads x 3 layers
    python benchmarks/update_profile.py --config mnm-p:2x2 --seconds 10
    python benchmarks/update_profile.py --config lstm/autograd   # throughput.py's variant suffixes
    python benchmarks/update_profile.py --config lstm --phase rollout
    PYTHONPATH=<a worktree of another commit> python benchmarks/update_profile.py   # its code

Needs ``perf`` on the PATH and permission to attach to this process (``perf_event_paranoid``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kernel_pairs import UPDATE_SETTING
from throughput import apply_suffixes, build_agent, make_env

#: Symbol groups: a name and a pattern matched against "dso symbol".
GROUPS = {
    "mkl multiply": r"mkl_blas_.*sgemm_kernel",
    "mkl packing": r"mkl_blas_.*(scopy|sgemm_.*copy)",
    "fused kernels' own code": r"^mnm_rl_sequence",
    "compiled rollout step": r"^mnm_rl_policy_step",
    "other mnm_rl kernels": r"^mnm_rl_",
    "aten copies": r"direct_copy_kernel|copy_kernel",
    "numpy": r"^_multiarray",
    "python interpreter": r"^libpython",
}


def parse_report(text: str) -> list[tuple[str, float]]:
    """``(dso symbol, percent)`` per line of ``perf report --sort dso,symbol --stdio``."""
    rows = []
    for line in text.splitlines():
        # the symbol ends where a run of spaces does (perf pads it and may add columns after)
        match = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+?)(?:\s{2,}|\s*$)", line)
        if match:
            rows.append((f"{match[2]} {match[3]}", float(match[1])))
    return rows


def group_shares(rows: list[tuple[str, float]]) -> dict[str, float]:
    """Percent of samples in each of :data:`GROUPS` (a symbol counts in the first that fits)."""
    shares = dict.fromkeys(GROUPS, 0.0)
    for symbol, percent in rows:
        for name, pattern in GROUPS.items():
            if re.search(pattern, symbol):
                shares[name] += percent
                break
    return shares


def build(config: str):
    """``(env, agent)``: ``throughput.py``'s agent for ``config`` in the issue's setting, the
    config's variant suffixes (``/autograd``, ``/eager``, ...) set in the environment first."""
    apply_suffixes(config)
    env = make_env(UPDATE_SETTING)
    return env, build_agent(config, UPDATE_SETTING, env, "cpu")


def phase_runner(model, phase: str):
    """A function that runs one ``phase`` of ``model``'s training: ``"update"``, one ``train()``
    on the rollout in its buffer, or ``"rollout"``, one ``collect_rollouts()`` into it."""
    if phase == "update":
        return model.train
    _, callback = model._setup_learn(model.n_steps * model.n_envs, None, reset_num_timesteps=False)
    callback.on_training_start(locals(), globals())
    return lambda: model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="mnm-p",
                   help="a core as throughput.py names it, variant suffixes included")  # fmt: skip
    p.add_argument("--phase", choices=("update", "rollout"), default="update",
                   help="what is sampled: train() calls or collect_rollouts() calls")  # fmt: skip
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    perf = shutil.which("perf")
    if perf is None:
        sys.exit("update_profile.py: needs Linux perf on the PATH")
    torch.set_num_threads(1)
    env, model = build(args.config)
    model.learn(UPDATE_SETTING.n_steps * UPDATE_SETTING.n_envs)
    run = phase_runner(model, args.phase)
    run()  # warm
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "perf.data"
        record = [perf, "record", "-F", "2000", "-p", str(os.getpid()), "-o", str(data)]
        recorder = subprocess.Popen(
            [*record, "--", "sleep", str(args.seconds)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # let perf attach
        updates = 0
        while recorder.poll() is None:
            run()
            updates += 1
        report = subprocess.run(
            [perf, "report", "-i", str(data), "--no-children", "--sort", "dso,symbol",
             "-g", "none", "--stdio"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    env.close()
    rows = parse_report(report)
    if not rows:
        sys.exit("update_profile.py: perf recorded no samples (perf_event_paranoid?)")
    shares = group_shares(rows)
    calls = "updates" if args.phase == "update" else "rollouts"
    print(f"{args.config}: {updates} {calls} sampled for {args.seconds:g} s")
    print(f"{'share':>7s}  symbol")
    for symbol, percent in rows[: args.top]:
        print(f"{percent:6.2f}%  {symbol[:110]}")
    print()
    for name, percent in shares.items():
        print(f"{percent:6.2f}%  {name}")
    summary = {
        "config": args.config,
        "phase": args.phase,
        "seconds": args.seconds,
        "updates": updates,
        "groups": shares,
        "top": [[symbol[:200], percent] for symbol, percent in rows[: args.top]],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
