"""Where a PPO update's wall time goes, piece by piece: the recurrent kernels, the input and
output projections, the features extractor, the heads, PPO's loss, the memory's reconstruction
losses, the minibatches' gathers, clipping and Adam, the Python glue around them (the core's
explicit pass -- for MNM ``fused.explicit_sequence``, the policy's, the minibatch's loss and
diagnostics in ``MemoryPPO._loss``), and the rest (the training loop's Python between them).

Builds ``throughput.py``'s agent for each ``--configs`` name (its variant suffixes, ``/k2``
included) in the issue's setting (MiniGrid-MemoryS7, 7 x 7 view, 8 envs x 128 steps, 4 epochs of
16 sequences x 16 steps; ``--view-size 3`` for our presets' view), one torch thread, collects a
rollout, then times ``--updates`` calls of ``train()`` on it. The pieces are module functions
wrapped to add up their wall time, each without the time of the pieces it calls (the LSTM
kernel's piece without its input projection's, say), so that what is left of the update's time
is ``rest``: the Python between the pieces. A function that returns a backward pass (the
explicit passes of :mod:`mnm_rl.agent.explicit`) has that timed too, as the piece's
``backward``. Wall time, since the kernels' second thread (``/k2``) is the point; medians over
the updates. Each config's variant suffixes set their environment variables while it runs.

    python benchmarks/update_pieces.py
    python benchmarks/update_pieces.py --configs mnm-p/k2 lstm --updates 20 --view-size 3

Prints a table (ms per update and share of the update) and, as its last line, a JSON list of
``{"config", "view", "update_ms", "pieces": {name: ms}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402

#: The timed pieces: (module, attribute path, piece name, backward piece name or None). A
#: backward name means the function returns its backward pass last (a tuple's last item).
PIECES = [
    ("mnm_rl.memory.fused", "_kernel_forward", "MNM kernel forward", None),
    ("mnm_rl.memory.fused", "_kernel_backward", "MNM kernel backward", None),
    ("mnm_rl.memory.baselines", "explicit_lstm", "LSTM kernel forward", "LSTM kernel backward"),
    ("mnm_rl.memory.baselines", "explicit_gru", "GRU kernel forward", "GRU kernel backward"),
    ("mnm_rl.memory.products", "linear_explicit", "projections forward", "projections backward"),
    ("mnm_rl.agent.extractors", "MemoryFeaturesExtractor.explicit_forward",
     "extractor forward", "extractor backward"),
    ("mnm_rl.agent.action_heads", "explicit_heads", "heads forward", "heads backward"),
    ("mnm_rl.agent.ppo", "ppo_loss_explicit", "PPO loss", None),
    ("mnm_rl.memory.fast_weights", "FastWeightMemory.reconstruction_loss",
     "reconstruction losses", None),
    ("mnm_rl.memory.fused", "reconstruction_errors", "reconstruction losses", None),
    ("mnm_rl.agent.gradient_step", "clip_grad_norm", "clip", None),
    ("mnm_rl.agent.gradient_step", "adam_step", "Adam", None),
    ("mnm_rl.agent.gradient_step", "zero_grad", "zero_grad", None),
    ("mnm_rl.agent.explicit", "apply_gradients", "apply gradients", None),
    # The Python around those pieces, by the function it is in (each without the pieces above):
    ("mnm_rl.memory.fused", "explicit_sequence", "core glue forward", "core glue backward"),
    ("mnm_rl.memory.mnm", "MNMCore.explicit_forward", "core glue forward", "core glue backward"),
    ("mnm_rl.memory.baselines", "_FusedRNNCore.explicit_forward",
     "core glue forward", "core glue backward"),
    ("mnm_rl.agent.policy", "RecurrentMemoryPolicy.explicit_forward_sequence",
     "policy glue forward", "policy glue backward"),
    ("mnm_rl.agent.ppo", "MemoryPPO._loss", "minibatch loss glue", None),
]  # fmt: skip
MINIBATCHES = "minibatch gathers"
REST = "rest"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["mnm-p/k2", "lstm"],
                   help="throughput.py's config names (not /par or sb3-contrib)")  # fmt: skip
    p.add_argument("--updates", type=int, default=12, help="timed train() calls per config")
    p.add_argument("--view-size", type=int, default=7, help="MiniGrid's agent_view_size")
    args = p.parse_args(argv)
    if args.updates < 1:
        p.error(f"--updates must be positive, got {args.updates}")
    bad = [c for c in args.configs if c.startswith("sb3-contrib") or c.endswith("/par")]
    if bad:
        p.error(f"--configs must be our agents in one process, got {' '.join(bad)}")
    return args


class Stopwatch:
    """Wall seconds added up per piece while installed (module attributes replaced by timed
    wrappers, put back by :meth:`remove`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._installed: list[tuple[Any, str, Any]] = []
        #: for each piece running now (outermost first), the time of the pieces it called
        self._nested: list[float] = []

    def run(self, name: str, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)``, its time less that of the pieces it calls added to
        ``name``."""
        self._nested.append(0.0)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            nested = self._nested.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed

    def timed(self, name: str, fn: Callable, backward: str | None = None) -> Callable:
        def wrapper(*args, **kwargs):
            out = self.run(name, fn, *args, **kwargs)
            if backward is not None and isinstance(out, tuple) and out and callable(out[-1]):
                out = (*out[:-1], self.timed(backward, out[-1]))
            return out

        return wrapper

    def install(self) -> None:
        import importlib

        for module_name, path, name, backward in PIECES:
            owner: Any = importlib.import_module(module_name)
            *outer, attribute = path.split(".")
            for part in outer:
                owner = getattr(owner, part)
            original = owner.__dict__[attribute] if isinstance(owner, type) else None
            fn = getattr(owner, attribute)
            wrapped: Any = self.timed(name, fn, backward)
            if isinstance(original, staticmethod):
                wrapped = staticmethod(wrapped)
            self._installed.append((owner, attribute, original or fn))
            setattr(owner, attribute, wrapped)

    def remove(self) -> None:
        for owner, attribute, original in reversed(self._installed):
            setattr(owner, attribute, original)
        self._installed.clear()


def timed_minibatches(buffer, watch: Stopwatch) -> None:
    """Time the buffer's minibatch generator (its gathers) as :data:`MINIBATCHES`."""
    minibatches = buffer.minibatches

    def wrapper(*args, **kwargs) -> Iterator:
        batches = minibatches(*args, **kwargs)
        while (batch := watch.run(MINIBATCHES, next, batches, None)) is not None:
            yield batch

    buffer.minibatches = wrapper


def measure(config: str, setting: argparse.Namespace, updates: int) -> dict[str, Any]:
    """Median wall ms of ``train()`` and of each piece, over ``updates`` calls."""
    environment = dict(os.environ)
    throughput.apply_suffixes(config)
    env = throughput.make_env(setting)
    try:
        model = throughput.build_agent(config, setting, env, "cpu")
        model.learn(setting.n_steps * setting.n_envs)
        watch = Stopwatch()
        watch.install()
        try:
            timed_minibatches(model.rollout_buffer, watch)
            model.train()  # warm
            totals, pieces = [], []
            for _ in range(updates):
                watch.seconds = {}
                start = time.perf_counter()
                model.train()
                totals.append(time.perf_counter() - start)
                pieces.append(dict(watch.seconds))
        finally:
            watch.remove()
    finally:
        env.close()
        os.environ.clear()
        os.environ.update(environment)
    names = [name for _, _, name, _ in PIECES] + [
        backward for _, _, _, backward in PIECES if backward
    ]
    medians = {
        name: statistics.median(p.get(name, 0.0) for p in pieces) * 1e3
        for name in [*names, MINIBATCHES]
    }
    medians = {name: ms for name, ms in medians.items() if ms > 0}
    rest = [t - sum(p.values()) for t, p in zip(totals, pieces, strict=True)]
    medians[REST] = statistics.median(rest) * 1e3
    return {
        "config": config,
        "view": setting.view_size,
        "update_ms": statistics.median(totals) * 1e3,
        "pieces": dict(sorted(medians.items(), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    setting = throughput.parse_args(["--view-size", str(args.view_size)])
    print(f"command: python benchmarks/update_pieces.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(f"machine: {throughput.machine()}")
    print(
        f"env {setting.env} ({setting.view_size} x {setting.view_size} view), {setting.n_envs} "
        f"envs x {setting.n_steps} steps, {setting.n_epochs} epochs of minibatches of "
        f"{setting.batch_size // setting.seq_len} x {setting.seq_len}; medians of "
        f"{args.updates} updates, wall ms",
        flush=True,
    )
    rows = []
    for config in args.configs:
        row = measure(config, setting, args.updates)
        rows.append(row)
        print(f"\n{config}: update {row['update_ms']:.1f} ms")
        for name, ms in row["pieces"].items():
            print(f"  {name:<24s}{ms:8.1f} ms {100 * ms / row['update_ms']:6.1f}%")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
