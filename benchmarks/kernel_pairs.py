"""Paired timing of the fused MNM kernel against the PyTorch code or another build of itself.

One MNM core (width 64), in one process, 1 torch thread, CPU time, interleaved pairs (the two
builds take turns going first):

* the training pass: forward and backward over 16 steps x B sequences;
* the rollout: 32 single steps of 8 envs without autograd;
* the update (``--update``): one PPO update, ``train()``, of ``throughput.py``'s agent in the
  issue's setting (MiniGrid-MemoryS7 with its 7 x 7 view, 8 envs x 128 steps, 4 epochs of
  minibatches of 16 sequences x 16 steps) with this core, on one collected rollout, its
  parameters and optimizer state put back before each timed call: what a kernel change is worth
  to the whole update, encoder, heads, loss and optimizer included (since the thirty-first
  session the kernel's side takes the explicit backward passes, ``mnm_rl.agent.explicit``,
  which the PyTorch side, ``MNM_RL_FUSED=0``, cannot; against another build both do);

and, for the training pass, the memory each build keeps for the backward pass (MB of the
unique storages autograd's saved-tensor hooks see, as in ``throughput.py``'s scaling table).

    python benchmarks/kernel_pairs.py                   # the kernel against the PyTorch code
    python benchmarks/kernel_pairs.py --against 22972cf # against the kernel source of a commit

``--against REV`` builds the kernel sources ``mnm_rl/memory/csrc/`` as they were at git revision
REV under another extension name (with today's compiler flags) and loads both. Prints a table
and, as the last line, a JSON list of
``{"size", "batch", "phase", "other_ms", "kernel_ms", "speedup", "pair_speedup"}``
(``speedup`` = the ratio of the medians, other / kernel; ``pair_speedup`` = the median of the
pairs' own ratios, which a slow stretch of a busy machine shifts less; train rows also
``other_saved_mb`` and ``kernel_saved_mb``). ``--update-configs`` times only whole updates, of
any of ``throughput.py``'s agents (the LSTM and GRU kernels are in the same sources), and lists
``{"config", "other_ms", "kernel_ms", "speedup", "pair_speedup"}``; with ``--off VARIABLE`` the
other side is this build with ``VARIABLE=0`` in the environment (a compiled piece switched off).

    python benchmarks/kernel_pairs.py --against 476c786 --update   # also whole PPO updates
    python benchmarks/kernel_pairs.py --against 476c786 --sizes 4x3 1x1 --pairs 300
    python benchmarks/kernel_pairs.py --against cb7d90a --update-configs lstm gru  # their updates
    python benchmarks/kernel_pairs.py --off MNM_RL_COMPILED_OPTIMIZER --update-configs lstm mnm-p
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from throughput import build_agent, make_env, parse_args, saved_bytes
from torch.utils.cpp_extension import load

from mnm_rl import native
from mnm_rl.memory import MNMCore, fused

SOURCE_DIR = "mnm_rl/memory/csrc"
CASES = [((1, 1), 16), ((2, 2), 16), ((4, 3), 16), ((2, 2), 8)]


class _TwelveOutputs:
    """A build from before the kernel returned the final weights itself (12 outputs). A function
    the build does not have yet (``reconstruction_errors``, thirty-eighth session) comes from
    this checkout's build: ``current``. A build from before the forward passes took ``answers``
    (forty-second session; they always computed them) is called without it, and one from before
    the backward passes took ``recon_scale`` (forty-third session) without that (always 0 here:
    the autograd path gives the reconstruction loss's gradient as tensors)."""

    def __init__(self, ext, current):
        self.ext = ext
        self.current = current

    def _without(self, name: str, args: tuple, at: int):
        """``ext.name(*args)``, or without ``args[at]`` where the build's signature predates it."""
        try:
            return getattr(self.ext, name)(*args)
        except TypeError as err:  # an older signature, not a wrong argument of ours
            if "incompatible function arguments" not in str(err):
                raise
            return getattr(self.ext, name)(*args[:at], *args[at + 1 :])

    def forward_parts(self, *args):
        return self._without("forward_parts", args, len(args) - 2)

    def backward_parts(self, *args):
        return self._without("backward_parts", args, len(args) - 1)

    def forward(self, *args):
        out = list(self._without("forward", args, len(args) - 1))
        if len(out) != 12:  # a build that returns the final weights
            return out
        post = out[8]
        final = post[(args[0].shape[0] - 1) % post.shape[0]].clone()
        return [*out[:8], final, *out[8:]]

    def backward(self, *args):
        return self._without("backward", args, len(args) - 1)

    def __getattr__(self, name: str):  # the LSTM and GRU kernels, the products
        if hasattr(self.ext, name):
            return getattr(self.ext, name)
        return getattr(self.current, name)


def build_at(rev: str):
    """The extension built from the kernel sources (every file of ``csrc/``) at git ``rev``."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout

    names = git("ls-tree", "--name-only", f"{rev}:{SOURCE_DIR}").split()
    texts = {name: git("show", f"{rev}:{SOURCE_DIR}/{name}") for name in names}
    digest = hashlib.sha1("".join(texts[n] for n in sorted(texts)).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"mnm_rl_csrc_{digest}"
    folder.mkdir(exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text)
    sources = [str(folder / n) for n in sorted(names) if n.endswith(".cpp")]
    name = f"mnm_rl_sequence_{digest}"
    with native.extension_build_lock(name) as build_directory:  # survives a killed build
        other = load(
            name=name, sources=sources, extra_cflags=native.COMPILE_FLAGS,
            extra_ldflags=native.LINK_FLAGS, build_directory=str(build_directory),
        )  # fmt: skip
    return _TwelveOutputs(other, fused.load_extension())


def _training_inputs(core: MNMCore, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, batch, core.input_size)
    starts = torch.zeros(16, batch)
    starts[5, batch // 2] = 1
    return x, starts


def saved_mb(core: MNMCore, batch: int, runner) -> float:
    """MB kept for the backward pass of the training pass."""
    runner()
    x, starts = _training_inputs(core, batch)
    # the diagnostics read, as the PPO loss reads them: an MNM core computes them then
    return saved_bytes(lambda: dict(core(x, core.initial_state(batch), starts)[2])) / 2**20


def turns(pair: int, runners: dict) -> list:
    """The runners' (label, runner) items in pair ``pair``'s order: as given in even pairs,
    reversed in odd ones, so that neither build always runs first (warm caches, or a machine
    whose load changes, favour one position)."""
    items = list(runners.items())
    return items if pair % 2 == 0 else items[::-1]


def pair_speedup(other: list[float], kernel: list[float]) -> float:
    """The median of the pairs' own ratios, other / kernel."""
    return statistics.median(a / b for a, b in zip(other, kernel, strict=True))


def time_case(core: MNMCore, batch: int, runner, pairs: int) -> dict[str, list[float]]:
    x, starts = _training_inputs(core, batch)
    times: dict[str, list[float]] = {"train": [], "rollout": []}
    for _ in range(pairs):
        runner()
        start = time.process_time()
        y, _, aux = core(x, core.initial_state(batch), starts)
        (y.sum() + aux["recon_after"].sum()).backward()
        times["train"].append(time.process_time() - start)
        state, xs, s1 = core.initial_state(8), torch.randn(1, 8, core.input_size), torch.zeros(1, 8)
        start = time.process_time()
        with torch.inference_mode():
            for _ in range(32):
                _, state, _ = core(xs, state, s1)
        times["rollout"].append(time.process_time() - start)
    return times


#: throughput.py's settings in the issue's setting (``--view-size 7``), for the update phase.
UPDATE_SETTING = parse_args(["--view-size", "7"])


def time_updates(heads: int, layers: int, runners: dict, pairs: int) -> dict[str, list[float]]:
    """CPU seconds of ``train()`` of the mnm-p agent with an H x L memory under each runner
    (a callable of no arguments): :func:`time_train_calls`."""
    switches = {label: (lambda model, runner=runner: runner()) for label, runner in runners.items()}
    return time_train_calls(f"mnm-p:{heads}x{layers}", switches, pairs)


def time_train_calls(config: str, switches: dict, pairs: int) -> dict[str, list[float]]:
    """CPU seconds of ``train()`` of ``throughput.py``'s agent ``config`` in the issue's setting
    after each switch (a callable given the model), interleaved, every call from the same
    parameters and optimizer state and on the same rollout (collected by one ``learn()`` of one
    rollout first)."""
    env = make_env(UPDATE_SETTING)
    model = build_agent(config, UPDATE_SETTING, env, "cpu")
    model.learn(UPDATE_SETTING.n_steps * UPDATE_SETTING.n_envs)
    policy = copy.deepcopy(model.policy.state_dict())
    optimizer = copy.deepcopy(model.policy.optimizer.state_dict())
    times: dict[str, list[float]] = {label: [] for label in switches}
    for pair in range(pairs):
        for label, switch in turns(pair, switches):
            switch(model)
            model.policy.load_state_dict(policy)
            model.policy.optimizer.load_state_dict(optimizer)
            start = time.process_time()
            model.train()
            times[label].append(time.process_time() - start)
    env.close()
    return times


def time_configs(configs: list[str], label: str, use_other, use_kernel, pairs: int) -> list[dict]:
    """Paired ``train()`` times of each agent with the other build and with this one; prints a
    table and the JSON list of ``{"config", "other_ms", "kernel_ms", "speedup",
    "pair_speedup"}``."""
    rows = []
    print(f"{'config':14s} {label + ' ms':>12s} {'kernel ms':>10s} speedup pair med")
    for config in configs:
        switches = {"other": lambda model: use_other(), "kernel": lambda model: use_kernel()}
        times = time_train_calls(config, switches, pairs)
        a, b = statistics.median(times["other"]), statistics.median(times["kernel"])
        paired = pair_speedup(times["other"], times["kernel"])
        rows.append({"config": config, "other_ms": a * 1e3, "kernel_ms": b * 1e3,
                     "speedup": a / b, "pair_speedup": paired})  # fmt: skip
        print(f"{config:14s} {a * 1e3:12.2f} {b * 1e3:10.2f} {a / b:6.2f}x {paired:7.3f}x")
    use_kernel()
    print(json.dumps(rows))
    return rows


def main() -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--against", help="git revision whose kernel source to compare with")
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--update", action="store_true", help="also time whole PPO updates")
    p.add_argument("--off", metavar="VARIABLE",
                   help="with --update-configs: the other side runs with VARIABLE=0 in the "
                        "environment (MNM_RL_COMPILED_OPTIMIZER, ...), not another "
                        "build")  # fmt: skip
    p.add_argument("--update-configs", nargs="+", metavar="CONFIG",
                   help="time whole PPO updates of these throughput.py agents (lstm, gru, "
                        "mnm-p:2x2, ...) instead of the training passes and mnm-p's "
                        "updates")  # fmt: skip
    p.add_argument("--sizes", nargs="+", metavar="HxL",
                   help="only these memory sizes (default: all of 1x1, 2x2, 4x3)")  # fmt: skip
    args = p.parse_args()
    known = sorted({f"{heads}x{layers}" for (heads, layers), _ in CASES})
    unknown = sorted(set(args.sizes or []) - set(known))
    if unknown:
        p.error(f"--sizes: {', '.join(unknown)} not among {', '.join(known)}")
    if args.off and not args.update_configs:
        p.error("--off goes with --update-configs")
    cases = [c for c in CASES if args.sizes is None or f"{c[0][0]}x{c[0][1]}" in args.sizes]
    torch.set_num_threads(1)
    kernel = fused.load_extension()
    other = build_at(args.against) if args.against else None
    label = f"{args.off}=0" if args.off else args.against or "pytorch"

    def use_kernel():
        if args.off:
            os.environ.pop(args.off, None)
            return
        os.environ["MNM_RL_FUSED"] = "1"
        fused.EXTENSION.module = kernel

    def use_other():
        if args.off:
            os.environ[args.off] = "0"
        elif other is None:
            os.environ["MNM_RL_FUSED"] = "0"
        else:
            fused.EXTENSION.module = other

    if args.update_configs:
        return time_configs(args.update_configs, label, use_other, use_kernel, args.pairs)
    rows = []
    print(f"{'size':6s} {'batch':>5s} {'phase':8s} {label + ' ms':>12s} {'kernel ms':>10s} speedup"
          f" pair med  saved MB ({label} / kernel)")  # fmt: skip
    for (heads, layers), batch in cases:
        torch.manual_seed(0)
        core = MNMCore(64, hidden_size=64, n_heads=heads, n_layers=layers)
        mine, theirs = {"train": [], "rollout": []}, {"train": [], "rollout": []}
        sinks = {"other": (use_other, theirs), "kernel": (use_kernel, mine)}
        for pair in range(args.pairs):  # interleaved: one of each per round
            for _, (runner, sink) in turns(pair, sinks):
                for phase, values in time_case(core, batch, runner, 1).items():
                    sink[phase].extend(values)
        memory = {"other_saved_mb": saved_mb(core, batch, use_other),
                  "kernel_saved_mb": saved_mb(core, batch, use_kernel)}  # fmt: skip
        for phase in ("train", "rollout"):
            a, b = statistics.median(theirs[phase]), statistics.median(mine[phase])
            paired = pair_speedup(theirs[phase], mine[phase])
            rows.append({"size": f"{heads}x{layers}", "batch": batch, "phase": phase,
                         "other_ms": a * 1e3, "kernel_ms": b * 1e3, "speedup": a / b,
                         "pair_speedup": paired,
                         **(memory if phase == "train" else {})})  # fmt: skip
            saved = (f"  {memory['other_saved_mb']:.2f} / {memory['kernel_saved_mb']:.2f}"
                     if phase == "train" else "")  # fmt: skip
            print(f"{heads}x{layers:<4d} {batch:5d} {phase:8s} {a * 1e3:12.2f} {b * 1e3:10.2f} "
                  f"{a / b:6.2f}x {paired:7.3f}x{saved}")  # fmt: skip
    if args.update:
        for heads, layers in sorted({size for size, _ in cases}, reverse=True):
            times = time_updates(heads, layers, {"other": use_other, "kernel": use_kernel},
                                 args.pairs)  # fmt: skip
            a, b = statistics.median(times["other"]), statistics.median(times["kernel"])
            paired = pair_speedup(times["other"], times["kernel"])
            batch = UPDATE_SETTING.batch_size // UPDATE_SETTING.seq_len
            rows.append({"size": f"{heads}x{layers}", "batch": batch, "phase": "update",
                         "other_ms": a * 1e3, "kernel_ms": b * 1e3, "speedup": a / b,
                         "pair_speedup": paired})  # fmt: skip
            print(f"{heads}x{layers:<4d} {batch:5d} {'update':8s} {a * 1e3:12.2f} {b * 1e3:10.2f} "
                  f"{a / b:6.2f}x {paired:7.3f}x")  # fmt: skip
    use_kernel()
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
