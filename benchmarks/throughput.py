"""Training throughput: our recurrent PPO against sb3-contrib's RecurrentPPO, side by side.

For one environment, number of envs, rollout length, number of epochs and minibatch size, times:

(a) ``ceiling``: raw vectorised env stepping with random actions (the same ``VecEnv`` our agent
    steps), the upper bound for any agent;
(b) ``sb3-contrib``: sb3-contrib's ``RecurrentPPO`` (``MlpLstmPolicy``, its default architecture,
    i.e. separate actor and critic LSTMs) with ``lstm_hidden_size`` equal to our cores' width;
(c) our ``MemoryPPO`` with each core: ``mlp``, ``lstm``, ``gru``, ``mnm-p``, ``mnm-g``, and
    mnm-p at the presets' memory sizes, ``mnm-p:2x2`` (2 heads, 2 layers) and ``mnm-p:1x1``.
    On the CPU the MNM cores run the fused kernel (``mnm_rl.memory.fused``); a config name
    ending in ``/eager`` (``mnm-p/eager``) runs the same core in plain PyTorch, one ending in
    ``/unmap`` lets glibc return the kernel's freed buffers to the OS (the default before the
    fifth session), one ending in ``/k2`` lets the kernel split a training batch between two
    threads of its own (``MNM_RL_KERNEL_THREADS=2``; torch keeps ``--threads``). MiniGrid envs
    compute their observations with mnm_rl's fast view (``mnm_rl.envs.minigrid_view``, the same
    arrays as MiniGrid's) for every config, sb3-contrib included; a config name ending in
    ``/mgview`` (``ceiling/mgview``, ``lstm/mgview``) uses MiniGrid's own code. MiniGrid envs
    take their actions as Python ints (``mnm_rl.envs.minigrid_actions``) for every config too;
    one ending in ``/npact`` hands them numpy integers, as stable-baselines3's vec envs pass
    them. MiniGrid-Memory envs lay out each episode's grid from a kept wall plan
    (``mnm_rl.envs.minigrid_memory``, the same grid as MiniGrid's) for every config too; one
    ending in ``/mgreset`` runs MiniGrid's own code. Their views' images are kept and reused
    (``mnm_rl.envs.minigrid_memory.KeptViews``, the same images) for every config too; one
    ending in ``/viewcalc`` computes every view. They step with mnm_rl's integer step
    (``mnm_rl.envs.minigrid_memory.FastMemoryStep``, the same steps) for every config too; one
    ending in ``/mgstep`` runs MiniGrid's own ``step``. A config name ending in ``/par``
    (``lstm/par``, ``ceiling/par``, ``sb3-contrib/par``)
    steps its envs with ``mnm_rl.parallel_vec_env.ParallelVecEnv``: half of them in a worker
    process, at the same time as this process steps the other half. Any config may end in
    ``@N`` to run with N torch threads instead of ``--threads`` (``lstm@2``,
    ``mnm-p:2x2/eager@2``): thread counts side by side in one run.

Each agent runs one warm-up ``learn()`` of one rollout, then a timed ``learn()`` of
``--rollouts`` rollouts (rollout plus update). ``collect_rollouts`` and ``train`` are wrapped with
timers on the instance (their behaviour is unchanged) to split the time between rollout and
update. Every measurement runs in a fresh subprocess, so its peak memory is that process's peak
resident set size (``ru_maxrss``); ``learn_mb`` is how much the timed ``learn()`` raised it. On a
GPU, ``peak_mb`` is ``torch.cuda.max_memory_allocated`` instead. Configurations are run in
interleaved rounds (every config once per round) and we report medians, so a change in the
machine's load hits every configuration alike; ratios are ratios of the medians. On a busy
machine the rounds can disagree by more than the configs do, so the table is followed by each
config's rate over one reference config's in the same round (``--ratio-to``; by default
``lstm/par``, else ``lstm``, whichever was run), round by round, and their median.

The mnm-p scaling section times one epoch of ``train()`` on a collected rollout of 8 envs x 256
steps, with 8 chunks per minibatch, against the truncated-BPTT length ``seq_len`` and against the
memory width ``D``. Its memory column counts the bytes autograd saves for the backward pass of one
minibatch (unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``), which is what
truncation bounds; ``seq_len = n_steps`` is full-rollout BPTT.

    python benchmarks/throughput.py --quick          # < 5 minutes on 2 CPU cores
    python benchmarks/throughput.py                  # the numbers in docs/benchmarks.md
    python benchmarks/throughput.py --device cuda    # (c) on a GPU

The last line printed is a JSON object (see ``summary``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

AGENTS = ("sb3-contrib", "mlp", "lstm", "gru", "mnm-p", "mnm-g", "mnm-p:2x2", "mnm-p:1x1")
#: A config name ending in this runs the MNM core's PyTorch code instead of the fused kernel
#: (``MNM_RL_FUSED=0``), e.g. ``mnm-p:2x2/eager``: the two side by side in one run.
EAGER = "/eager"
#: A config name ending in this lets glibc hand the kernel's freed buffers back to the OS
#: (``MNM_RL_RETAIN_MEMORY=0``, see ``mnm_rl/memory/allocator.py``), e.g. ``mnm-p:2x2/unmap``.
UNMAP = "/unmap"
#: A config name ending in this lets the MNM kernel split a training batch between two threads
#: of its own (``MNM_RL_KERNEL_THREADS=2``) while torch keeps ``--threads``, e.g. ``mnm-p/k2``.
KERNEL2 = "/k2"
#: A config name ending in this steps MiniGrid envs with MiniGrid's own observation code instead
#: of mnm_rl's fast view (``MNM_RL_FAST_VIEW=0``, see ``mnm_rl/envs/minigrid_view.py``), e.g.
#: ``ceiling/mgview`` or ``lstm/mgview/par``.
MINIGRID_VIEW = "/mgview"
#: A config name ending in this hands MiniGrid envs their actions as numpy integers, as
#: stable-baselines3's vec envs pass them, instead of as Python ints (``MNM_RL_INT_ACTIONS=0``,
#: see ``mnm_rl/envs/minigrid_actions.py``), e.g. ``ceiling/npact`` or ``lstm/npact/par``.
NUMPY_ACTIONS = "/npact"
#: A config name ending in this lays out MiniGrid-Memory's grid at every reset with MiniGrid's own
#: code instead of mnm_rl's kept wall plan (``MNM_RL_FAST_RESET=0``, see
#: ``mnm_rl/envs/minigrid_memory.py``), e.g. ``ceiling/mgreset`` or ``lstm/mgreset/par``.
MINIGRID_RESET = "/mgreset"
#: A config name ending in this computes every view of its MiniGrid-Memory envs (with the fast
#: view's code) instead of keeping the images of the views met (``MNM_RL_KEPT_VIEWS=0``, see
#: ``mnm_rl/envs/minigrid_memory.py``), e.g. ``ceiling/viewcalc`` or ``lstm/viewcalc/par``.
COMPUTED_VIEWS = "/viewcalc"
#: A config name ending in this steps its MiniGrid-Memory envs with MiniGrid's own
#: ``MemoryEnv.step`` instead of mnm_rl's integer step (``MNM_RL_FAST_STEP=0``, see
#: ``mnm_rl/envs/minigrid_memory.py``), e.g. ``ceiling/mgstep`` or ``lstm/mgstep/par``.
MINIGRID_STEP = "/mgstep"
#: A config name ending in this runs the action and value heads as PyTorch modules instead of
#: compiled calls (``MNM_RL_COMPILED_HEADS=0``, see ``mnm_rl/agent/action_heads.py``): in the
#: updates, and in a rollout step that is not one compiled call itself (``/pystep``), e.g.
#: ``lstm/pyheads`` or ``mnm-p/k2/pyheads/par``.
PYTORCH_HEADS = "/pyheads"
#: A config name ending in this computes PPO's loss and its gradient as PyTorch operators instead
#: of one compiled call (``MNM_RL_COMPILED_LOSS=0``, see ``mnm_rl/agent/ppo_loss.py``), e.g.
#: ``lstm/pyloss`` or ``mnm-p/k2/pyloss/par``.
PYTORCH_LOSS = "/pyloss"
#: A config name ending in this runs a rollout step of the policy (extractor, core, heads, draw)
#: as PyTorch operators around the compiled core step, grid encoder and heads, instead of one
#: compiled call (``MNM_RL_COMPILED_STEP=0``, see ``mnm_rl/agent/policy_step.py``), e.g.
#: ``lstm/pystep``; ``lstm/pystep/pyheads`` runs the heads in PyTorch too.
PYTORCH_STEP = "/pystep"
#: A config name ending in this runs the matrix products of our compiled kernels and of the cores'
#: input projections through ATen (MKL) instead of the kernels' own hand-written products
#: (``MNM_RL_DENSE_PRODUCTS=0``, see ``mnm_rl/memory/products.py``), e.g. ``lstm/atenmm/par``.
ATEN_PRODUCTS = "/atenmm"
#: A config name ending in this clips its gradients and takes Adam's steps with PyTorch's code
#: (``clip_grad_norm_``, ``optimizer.step()``) instead of one compiled call each
#: (``MNM_RL_COMPILED_OPTIMIZER=0``, see ``mnm_rl/agent/gradient_step.py``), e.g. ``lstm/pyopt``.
PYTORCH_OPTIMIZER = "/pyopt"
#: A config name ending in this computes its updates' gradients through autograd instead of the
#: kernels' explicit backward passes (``MNM_RL_EXPLICIT_BACKWARD=0``, see
#: ``mnm_rl/agent/explicit.py``), e.g. ``lstm/autograd``.
AUTOGRAD = "/autograd"
#: A config name ending in this runs each rollout step on the rollout's own thread, after the
#: step before it is stored, instead of on the compiled step's thread while it is stored
#: (``MNM_RL_STEP_THREAD=0``, see ``mnm_rl/agent/policy_step.py``), e.g. ``mnm-p/k2/nothread``.
ONE_THREAD_STEPS = "/nothread"
#: A config name ending in this runs the kernels' parts on OpenMP's threads instead of their own
#: pool (``MNM_RL_PART_POOL=0``, see ``mnm_rl/memory/csrc/parts.h``), e.g. ``mnm-p/k2/omp``.
OPENMP_PARTS = "/omp"
SUFFIXES = {
    EAGER: ("MNM_RL_FUSED", "0"),
    UNMAP: ("MNM_RL_RETAIN_MEMORY", "0"),
    KERNEL2: ("MNM_RL_KERNEL_THREADS", "2"),
    MINIGRID_VIEW: ("MNM_RL_FAST_VIEW", "0"),
    NUMPY_ACTIONS: ("MNM_RL_INT_ACTIONS", "0"),
    MINIGRID_RESET: ("MNM_RL_FAST_RESET", "0"),
    COMPUTED_VIEWS: ("MNM_RL_KEPT_VIEWS", "0"),
    MINIGRID_STEP: ("MNM_RL_FAST_STEP", "0"),
    PYTORCH_HEADS: ("MNM_RL_COMPILED_HEADS", "0"),
    PYTORCH_LOSS: ("MNM_RL_COMPILED_LOSS", "0"),
    PYTORCH_STEP: ("MNM_RL_COMPILED_STEP", "0"),
    ATEN_PRODUCTS: ("MNM_RL_DENSE_PRODUCTS", "0"),
    PYTORCH_OPTIMIZER: ("MNM_RL_COMPILED_OPTIMIZER", "0"),
    AUTOGRAD: ("MNM_RL_EXPLICIT_BACKWARD", "0"),
    ONE_THREAD_STEPS: ("MNM_RL_STEP_THREAD", "0"),
    OPENMP_PARTS: ("MNM_RL_PART_POOL", "0"),
}
#: A config name ending in this (before any ``@N``) steps its envs in two groups at once, one in a
#: worker process (``ParallelVecEnv(n_workers=1)``), e.g. ``lstm/par`` next to ``lstm``. The CPU
#: time of the measurement (``steps/CPU-s``) does not count the worker's.
PARALLEL = "/par"
#: A config name ending in ``@N`` runs with N torch threads instead of ``--threads``, e.g.
#: ``mnm-p:2x2@2`` next to ``mnm-p:2x2``: one and two threads side by side in one run.
THREADS = "@"


def split_threads(name: str, default: int) -> tuple[str, int]:
    """``"mnm-p:2x2@2"`` -> ``("mnm-p:2x2", 2)``; without ``@N``, ``(name, default)``."""
    base, _, threads = name.partition(THREADS)
    if not threads:
        return base, default
    if not threads.isdigit() or int(threads) < 1:
        raise ValueError(f"{name!r}: the thread count after {THREADS!r} must be a positive integer")
    return base, int(threads)


def split_parallel(name: str) -> tuple[str, int]:
    """``"lstm/par"`` -> ``("lstm", 1)``: the config and its number of env worker processes."""
    if name.endswith(PARALLEL):
        return name.removesuffix(PARALLEL), 1
    return name, 0


def split_suffixes(name: str) -> tuple[str, list[str]]:
    """``"mnm-p/k2/mgview"`` -> ``("mnm-p", ["/mgview", "/k2"])``: the name without its trailing
    variant suffixes (``SUFFIXES``, in any order), and those suffixes."""
    found: list[str] = []
    while suffix := next((s for s in SUFFIXES if name.endswith(s)), None):
        name = name.removesuffix(suffix)
        found.append(suffix)
    return name, found


def split_config(name: str) -> tuple[str, dict[str, int]]:
    """``"mnm-p:2x2"`` -> ``("mnm-p", {"n_heads": 2, "n_layers": 2})``: an MNM core with H heads
    and L fast-weight layers (the presets' sizes); a plain core name has no extra kwargs.
    Trailing variant suffixes (``"mnm-p:2x2/eager"``, see ``SUFFIXES``) are dropped here: see
    :func:`run_agent`."""
    name = split_suffixes(name)[0]
    core, _, size = name.partition(":")
    if not size:
        return core, {}
    heads, _, layers = size.partition("x")
    return core, {"n_heads": int(heads), "n_layers": int(layers)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", default="MiniGrid-MemoryS7-v0")
    p.add_argument("--n-envs", type=int, default=8)
    p.add_argument(
        "--view-size",
        type=int,
        default=3,
        help="MiniGrid's agent_view_size: 3 (default) as in our MiniGrid presets, 7 as the env\n"
        "is registered (the issue's setting: raw stepping about 2.4x slower)",
    )
    p.add_argument("--n-steps", type=int, default=128, help="rollout length per env")
    p.add_argument("--batch-size", type=int, default=256, help="env steps per minibatch")
    p.add_argument("--n-epochs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16, help="our truncated-BPTT chunk length")
    p.add_argument("--hidden", type=int, default=64, help="width of every core and sb3's LSTM")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--device", default="cpu", help="device for our agents (c): cpu or cuda")
    p.add_argument("--rollouts", type=int, default=4, help="timed rollouts per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians reported")
    p.add_argument("--configs", nargs="+", default=["ceiling", *AGENTS])
    p.add_argument(
        "--ratio-to",
        metavar="CONFIG",
        help="the config every other is divided by, round by round (default: lstm/par if run,\n"
        "else lstm)",
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the mnm-p scaling tables")
    p.add_argument("--quick", action="store_true", help="fewer rounds and sizes (< 5 minutes)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.view_size < 3 or args.view_size % 2 == 0:
        p.error(f"--view-size must be an odd number of at least 3 (MiniGrid), got {args.view_size}")
    if args.ratio_to is None:
        args.ratio_to = next((c for c in ("lstm/par", "lstm") if c in args.configs), None)
    elif args.ratio_to not in args.configs:
        p.error(f"--ratio-to {args.ratio_to}: not one of --configs")
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.rollouts = min(args.rollouts, 2)
    return args


# ------------------------------------------------------------------------------ worker helpers
def _setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _is_minigrid(env_id: str) -> bool:
    return env_id.startswith("MiniGrid")


def make_env(
    args: argparse.Namespace,
    for_sb3_contrib: bool = False,
    env_workers: int = 0,
    vec_env_cls: type | None = None,
    vec_env_kwargs: dict[str, Any] | None = None,
    fast_view: bool = True,
    int_actions: bool = True,
    fast_reset: bool = True,
    kept_views: bool = True,
    fast_step: bool = True,
):
    """The vectorised env of ``args.n_envs`` monitored ``args.env`` envs, seeded from 0. MiniGrid
    gets ``agent_view_size=args.view_size`` (3 when ``args`` has none), with ``fast_view`` the
    fast view of mnm_rl's env builder (``mnm_rl.envs.minigrid_view``, for sb3-contrib too: the
    same env for every agent; ``MNM_RL_FAST_VIEW=0`` switches it off as well), with
    ``int_actions`` its actions as Python ints (``mnm_rl.envs.minigrid_actions``, for sb3-contrib
    too; ``MNM_RL_INT_ACTIONS=0`` switches it off as well), with ``fast_reset`` a MiniGrid-Memory
    env's grid laid out from a kept wall plan (``mnm_rl.envs.minigrid_memory``, for sb3-contrib
    too; ``MNM_RL_FAST_RESET=0`` switches it off as well), with ``kept_views`` (and the fast
    view and grid) the images of a MiniGrid-Memory env's views kept and reused
    (``MNM_RL_KEPT_VIEWS=0`` switches it off as well), with ``fast_step`` (and the fast grid)
    a MiniGrid-Memory env stepped by mnm_rl's integer step (``MNM_RL_FAST_STEP=0`` switches it
    off as well), and an observation wrapper: our
    ``SymbolicMiniGrid`` for us, minigrid's ``ImgObsWrapper`` (a Box) for sb3-contrib. With
    ``env_workers``, a ``ParallelVecEnv`` with that many worker processes; else
    ``vec_env_cls(env_fns, **vec_env_kwargs)``, by default the ``LeanDummyVecEnv`` that
    ``mnm-rl train`` steps its envs in (``mnm_rl.lean_vec_env``: ``DummyVecEnv`` without its deep
    copies), for every config, the ceiling and sb3-contrib included."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env

    import mnm_rl  # noqa: F401  (registers the mnm_rl envs)

    kwargs: dict[str, Any] = {}
    wrapper = None
    if _is_minigrid(args.env):
        import minigrid  # noqa: F401  (registers the MiniGrid envs)
        from minigrid.wrappers import ImgObsWrapper

        from mnm_rl.envs.minigrid import SymbolicMiniGrid
        from mnm_rl.envs.minigrid_actions import use_int_actions
        from mnm_rl.envs.minigrid_view import use_fast_view

        try:
            from mnm_rl.envs.minigrid_memory import use_fast_memory_grid
        except ImportError:  # an mnm_rl from before it (learn_pairs.py --against an old commit)
            use_fast_memory_grid = None

        kwargs = dict(agent_view_size=getattr(args, "view_size", 3))
        observation = ImgObsWrapper if for_sb3_contrib else SymbolicMiniGrid

        def wrapper(env):
            if fast_view:
                use_fast_view(env)
            if fast_reset and use_fast_memory_grid is not None:
                # only what differs from the defaults: an mnm_rl from before these options
                # (learn_pairs.py --against an old commit) takes the call without them
                options = {"kept_views": kept_views, "fast_step": fast_step}
                use_fast_memory_grid(env, **{k: v for k, v in options.items() if not v})
            env = observation(env)
            return use_int_actions(env) if int_actions else env

    elif for_sb3_contrib and isinstance(gym.make(args.env).observation_space, gym.spaces.Dict):
        raise ValueError(f"{args.env} has Dict observations, which RecurrentPPO cannot take")
    if env_workers:
        from mnm_rl.parallel_vec_env import ParallelVecEnv

        vec_env_cls, vec_env_kwargs = ParallelVecEnv, {"n_workers": env_workers}
    elif vec_env_cls is None:
        from mnm_rl.lean_vec_env import LeanDummyVecEnv

        vec_env_cls = LeanDummyVecEnv
    return make_vec_env(
        args.env,
        n_envs=args.n_envs,
        seed=0,
        wrapper_class=wrapper,
        env_kwargs=kwargs,
        vec_env_cls=vec_env_cls,
        vec_env_kwargs=vec_env_kwargs,
    )


class _Timer:
    """Wraps a model's ``collect_rollouts`` and ``train`` to accumulate their wall and CPU time
    (``time.process_time``: unlike wall time, it does not count the time other processes on a
    shared machine take the CPU from this one)."""

    def __init__(self, model, synchronize=None):
        self.reset()
        self.sync = synchronize or (lambda: None)
        collect, train = model.collect_rollouts, model.train

        def timed(fn, phase):
            def wrapper(*a, **k):
                wall, cpu = time.perf_counter(), time.process_time()
                out = fn(*a, **k)
                self.sync()
                self.wall[phase] += time.perf_counter() - wall
                self.cpu[phase] += time.process_time() - cpu
                return out

            return wrapper

        model.collect_rollouts, model.train = timed(collect, "rollout"), timed(train, "update")

    def reset(self) -> None:
        self.wall = {"rollout": 0.0, "update": 0.0}
        self.cpu = {"rollout": 0.0, "update": 0.0}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_agent(name: str, args: argparse.Namespace, env, device: str):
    common = dict(
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        seed=0,
        device=device,
    )
    if name == "sb3-contrib":
        from sb3_contrib import RecurrentPPO

        return RecurrentPPO(
            "MlpLstmPolicy", env, policy_kwargs=dict(lstm_hidden_size=args.hidden), **common
        )
    from mnm_rl.agent import MemoryPPO

    core, size = split_config(name)
    return MemoryPPO(
        env=env,
        core=core,
        seq_len=args.seq_len,
        policy_kwargs=dict(
            core_kwargs=dict(hidden_size=args.hidden, **size), features_dim=args.hidden
        ),
        **common,
    )


@contextlib.contextmanager
def environment_variable(name: str, value: str | None) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` inside (unset for ``None``), and
    after as it was before."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def apply_suffixes(name: str) -> None:
    """Set the environment variable of each variant suffix ``name`` ends with (``/eager``,
    ``/unmap``, ``/k2``, ``/mgview``, ``/npact``, ``/mgreset``, ``/viewcalc``, ``/mgstep``,
    ``/pyheads``, ``/pyloss``,
    ``/pystep``, ``/atenmm``, ``/pyopt``, ``/autograd``, ``/nothread``, ``/omp``; see ``SUFFIXES``),
    before mnm_rl loads its kernels or builds an env."""
    for suffix in split_suffixes(name)[1]:
        variable, value = SUFFIXES[suffix]
        os.environ[variable] = value


def run_agent(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One warm-up rollout+update, then ``args.rollouts`` timed ones."""
    name, threads = split_threads(config, args.threads)
    name, env_workers = split_parallel(name)
    apply_suffixes(name)
    torch = _setup_torch(threads)
    device = "cpu" if name == "sb3-contrib" else args.device
    cuda = device.startswith("cuda")
    env = make_env(args, for_sb3_contrib=name == "sb3-contrib", env_workers=env_workers)
    model = build_agent(name, args, env, device)
    timer = _Timer(model, torch.cuda.synchronize if cuda else None)
    per_rollout = args.n_steps * args.n_envs
    model.learn(per_rollout)
    timer.reset()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = _max_rss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    model.learn(per_rollout * args.rollouts, reset_num_timesteps=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    after = _max_rss_mb()
    env.close()
    return {
        "name": config,
        "threads": threads,
        "sps": per_rollout * args.rollouts / elapsed,
        "cpu_sps": per_rollout * args.rollouts / cpu,
        "seconds": elapsed,
        "rollout_s": timer.wall["rollout"],
        "update_s": timer.wall["update"],
        "rollout_cpu_s": timer.cpu["rollout"],
        "update_cpu_s": timer.cpu["update"],
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else after,
        "learn_mb": after - before,
    }


def run_ceiling(args: argparse.Namespace, config: str = "ceiling") -> dict[str, Any]:
    """Raw stepping of the same VecEnv with uniformly random actions."""
    import numpy as np

    apply_suffixes(split_parallel(config)[0])
    _setup_torch(args.threads)
    env = make_env(args, env_workers=split_parallel(config)[1])
    env.reset()
    rng = np.random.default_rng(0)
    n_actions = int(env.action_space.n)
    vec_steps = max(200, args.n_steps * args.rollouts)
    actions = rng.integers(n_actions, size=(vec_steps + 50, args.n_envs))
    for a in actions[:50]:  # warm-up
        env.step(a)
    start, start_cpu = time.perf_counter(), time.process_time()
    for a in actions[50:]:
        env.step(a)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    env.close()
    return {
        "name": config,
        "sps": vec_steps * args.n_envs / elapsed,
        "cpu_sps": vec_steps * args.n_envs / cpu,
        "seconds": elapsed,
        "rollout_s": elapsed,
        "update_s": 0.0,
        "rollout_cpu_s": cpu,
        "update_cpu_s": 0.0,
        "peak_mb": _max_rss_mb(),
        "learn_mb": 0.0,
    }


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs.

    The storages are held until ``fn()`` returns: one that a freed part of the graph let go of
    (an output ``fn`` drops) could otherwise lend its address to another saved later, which
    would then count in its place, so that the total depended on the allocator's reuse."""
    import torch

    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), s)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in storages.values())


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """mnm-p update cost per env step and autograd memory against seq_len and D."""
    torch = _setup_torch(args.threads)
    from mnm_rl.agent import MemoryPPO

    n_steps, chunks = 256, 8
    seq_lens = (16, 64, 256) if args.quick else (16, 32, 64, 128, 256)
    widths = (32, 64, 128) if args.quick else (32, 64, 128, 256)
    points = [(s, args.hidden) for s in seq_lens] + [
        (args.seq_len, d) for d in widths if d != args.hidden
    ]
    env = make_env(args)
    rows = []
    for seq_len, dim in points:
        model = MemoryPPO(
            env=env,
            core="mnm-p",
            n_steps=n_steps,
            seq_len=seq_len,
            batch_size=chunks * seq_len,
            n_epochs=1,
            seed=0,
            device=args.device,
            policy_kwargs=dict(core_kwargs=dict(hidden_size=dim), features_dim=args.hidden),
        )
        _, callback = model._setup_learn(n_steps * args.n_envs, None)
        callback.on_training_start(locals(), globals())
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_steps)
        times = []  # CPU time on a CPU (a shared machine's load does not count), else wall time
        clock = time.perf_counter if args.device.startswith("cuda") else time.process_time
        for _ in range(2 if args.quick else 3):
            start = clock()
            model.train()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(clock() - start)
        batch = next(model.rollout_buffer.minibatches(chunks))

        def forward(model=model, batch=batch):
            _, _, _, aux = model.policy.forward_sequence(
                batch.observations, batch.states, batch.episode_starts
            )
            return dict(aux)  # read, as the PPO loss does: an MNM core computes them then

        rows.append(
            {
                "seq_len": seq_len,
                "D": dim,
                "update_us_per_step": 1e6 * min(times) / (n_steps * args.n_envs),
                "saved_mb": saved_bytes(forward) / 2**20,
            }
        )
    return {"name": "scaling", "rows": rows, "n_steps": n_steps, "chunks": chunks}


def worker(args: argparse.Namespace) -> None:
    if split_config(split_parallel(args.worker)[0])[0] == "ceiling":
        out = run_ceiling(args, args.worker)
    elif args.worker == "scaling":
        out = run_scaling(args)
    else:
        out = run_agent(args.worker, args)
    print(json.dumps(out))


# -------------------------------------------------------------------------------- orchestrator
def run_worker(command: list[str], what: str) -> Any:
    """The JSON last line of ``command``, a benchmark's worker process; its stderr's tail in
    the error where it fails (``what`` names it there)."""
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spawn(name: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    return run_worker(cmd, f"worker {name}")


def build_kernels() -> list[str]:
    """Compile the package's kernels that are not built yet, several at once (as ``mnm-rl build``
    does), before the configs would build them one after another as each first needs them;
    says so when it does. Returns the modules it built."""
    from mnm_rl import native

    modules = native.unbuilt_modules()
    if modules:
        print(f"compiling {len(modules)} kernels first (in parallel)", flush=True)
        native.build_in_parallel(modules)
    return modules


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def round_ratios(
    results: dict[str, list[dict[str, Any]]], reference: str
) -> dict[str, list[float]]:
    """Every config's wall-clock rate over ``reference``'s in the same round, round by round
    (the ceiling and the reference itself left out): what a change in the machine's load between
    rounds shifts less than the ratio of the medians."""
    ref = [r["sps"] for r in results[reference]]
    return {
        name: [r["sps"] / q for r, q in zip(runs, ref, strict=True)]
        for name, runs in results.items()
        if name not in ("ceiling", reference)
    }


def summary(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict:
    med = {k: statistics.median(r["sps"] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r["cpu_sps"] for r in v) for k, v in results.items()}
    peak = {k: max(r["peak_mb"] for r in v) for k, v in results.items()}
    return {
        "env": args.env,
        "n_envs": args.n_envs,
        "view_size": args.view_size,
        "n_steps": args.n_steps,
        "batch_size": args.batch_size,
        "n_epochs": args.n_epochs,
        "seq_len": args.seq_len,
        "hidden": args.hidden,
        "device": args.device,
        "threads": args.threads,
        "rounds": args.rounds,
        "ceiling_sps": med.get("ceiling"),
        "sb3_contrib_lstm_sps": med.get("sb3-contrib"),
        "sps": {k: med[k] for k in AGENTS[1:] if k in med},
        "sps_by_config": med,  # every config, variants (/eager, @N) included
        "peak_mb": {k: peak[k] for k in AGENTS if k in peak},
        "cpu_sps": cpu,
        "ratio_to": args.ratio_to,
        "round_ratios": round_ratios(results, args.ratio_to) if args.ratio_to in results else {},
    }


def print_table(results: dict[str, list[dict[str, Any]]]) -> None:
    """Medians over rounds. ``wall``: env steps per second of wall time; ``cpu``: per second of
    this process's CPU time. Rollout/update split in CPU time."""
    wall = {k: statistics.median(r["sps"] for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r["cpu_sps"] for r in v) for k, v in results.items()}
    width = max(12, *(len(name) for name in results))

    def ratio(values: dict[str, float], name: str, ref: str, scale: float = 1.0) -> str:
        if ref not in values or name in ("ceiling", ref):
            return f"{'':>6}"
        return f"{scale * values[name] / values[ref]:6.2f}"

    print(
        f"{'config':<{width}} {'steps/s':>8} {'min..max':>13} {'steps/CPU-s':>11} {'rollout':>7} "
        f"{'update':>6} {'x sb3':>6} {'(cpu)':>6} {'%ceil':>6} {'(cpu)':>6} {'peak MB':>7} "
        f"{'learn MB':>8}"
    )
    for name, runs in results.items():
        sps = [r["sps"] for r in runs]
        total = sum(r["rollout_cpu_s"] + r["update_cpu_s"] for r in runs)
        roll = sum(r["rollout_cpu_s"] for r in runs) / total if total else 0.0
        print(
            f"{name:<{width}} {wall[name]:8.0f} {min(sps):6.0f}..{max(sps):<6.0f} "
            f"{cpu[name]:11.0f} "
            f"{100 * roll:6.0f}% {100 * (1 - roll):5.0f}% {ratio(wall, name, 'sb3-contrib')} "
            f"{ratio(cpu, name, 'sb3-contrib')} {ratio(wall, name, 'ceiling', 100)} "
            f"{ratio(cpu, name, 'ceiling', 100)} {max(r['peak_mb'] for r in runs):7.0f} "
            f"{statistics.median(r['learn_mb'] for r in runs):8.0f}"
        )


def print_round_ratios(results: dict[str, list[dict[str, Any]]], reference: str) -> None:
    """:func:`round_ratios` as a table: one column per round, then their median."""
    ratios = round_ratios(results, reference)
    if not ratios:
        return
    rounds = len(results[reference])
    print(f"\nrate over {reference}'s in the same round")
    print(f"{'config':<14} " + " ".join(f"{f'r{i + 1}':>5}" for i in range(rounds)) + "  median")
    for name, values in ratios.items():
        cells = " ".join(f"{v:5.2f}" for v in values)
        print(f"{name:<14} {cells}  {statistics.median(values):6.2f}")


def print_scaling(scaling: dict[str, Any], hidden: int, seq_len: int) -> None:
    rows = scaling["rows"]
    full = scaling["n_steps"]
    print(
        f"\nmnm-p update cost, {scaling['chunks']} chunks per minibatch, rollout of "
        f"{scaling['n_steps']} steps x n_envs (seq_len {full} = full-rollout BPTT)"
    )
    print(f"{'seq_len':>7} {'D':>4} {'update us/env step':>19} {'autograd MB/minibatch':>22}")
    for r in rows:
        print(
            f"{r['seq_len']:7d} {r['D']:4d} {r['update_us_per_step']:19.1f} {r['saved_mb']:22.1f}"
        )
    by_len = {r["seq_len"]: r for r in rows if r["D"] == hidden}
    if full in by_len and seq_len in by_len:
        saving = by_len[full]["saved_mb"] / by_len[seq_len]["saved_mb"]
        print(
            f"truncated BPTT (seq_len {seq_len}) saves {saving:.1f}x the autograd memory of "
            f"full-rollout BPTT (seq_len {full}) per minibatch of the same number of chunks"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    raw = sys.argv[1:] if argv is None else argv
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/throughput.py {' '.join(raw)}")
    print(
        f"env {args.env} (agent_view_size {args.view_size} if MiniGrid), {args.n_envs} envs, "
        f"n_steps {args.n_steps}, batch {args.batch_size}, "
        f"{args.n_epochs} epochs, seq_len {args.seq_len}, width {args.hidden}, "
        f"torch threads {args.threads}, device {args.device} (sb3-contrib on cpu), "
        f"{args.rounds} rounds x {args.rollouts} timed rollouts",
        flush=True,
    )
    if args.device == "cpu":
        build_kernels()
    passthrough = [a for a in raw if a != "--quick"]
    passthrough += ["--rollouts", str(args.rollouts)]
    if args.quick:
        passthrough.append("--quick")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    for round_ in range(args.rounds):
        for name in args.configs:
            results[name].append(_spawn(name, passthrough))
        line = ", ".join(f"{n} {results[n][-1]['sps']:.0f}" for n in args.configs)
        print(f"round {round_ + 1}/{args.rounds}: {line}", flush=True)
    print()
    print_table(results)
    if args.ratio_to is not None:
        print_round_ratios(results, args.ratio_to)
    scaling = None
    if not args.no_scaling:
        scaling = _spawn("scaling", passthrough)
        print_scaling(scaling, args.hidden, args.seq_len)
    out = summary(args, results)
    if scaling is not None:
        out["scaling_mnm_p"] = scaling["rows"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
