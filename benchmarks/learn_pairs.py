"""Training throughput in turns: a rollout plus update of each agent in turn, in one process.

``throughput.py`` times each config in a process of its own, one config after another, each
for a few seconds; on a shared host the load changes between them, and its rounds disagree by up
to 1.5x (docs/benchmarks.md). Here every agent lives in one process and they take turns, one
``learn()`` of one rollout (rollout plus update, a fraction of a second) each, the order
reversed every other turn (``kernel_pairs.turns``). A change in the machine's load then hits the
agents of one turn alike, and the figure is, for each config, the **median over the turns of
its rate divided by a reference's** in the same turn, with its quartiles and a 95% confidence
interval of that median (the distribution-free one: the order statistics
``n / 2 -+ 0.98 sqrt(n)`` of the ``n`` ratios, a binomial interval that assumes only that the
turns are independent).

Configs are ``throughput.py``'s names: our agents (``lstm``, ``mnm-p``, ``mnm-p:2x2``, ...),
optionally ending in ``/k2`` (the MNM kernel splits a training batch between two threads while
that agent runs: ``fused.set_kernel_threads(2)``); ``sb3-contrib`` (RecurrentPPO, one
``learn()`` of one rollout per turn as well); ``ceiling`` (raw stepping of the same env,
``n_steps`` random actions per turn). Any may end in ``/mgview`` (its MiniGrid envs use
MiniGrid's own observation code instead of mnm_rl's fast view, ``mnm_rl.envs.minigrid_view``)
and in ``/npact`` (they take numpy integer actions, not ints: ``mnm_rl.envs.minigrid_actions``),
our agents in ``/pyheads`` (their heads run as PyTorch modules, not compiled calls, in the
updates and in rollout steps that are not one compiled call: ``mnm_rl.agent.action_heads``), in
``/pyloss`` (their updates compute PPO's loss and its gradient as PyTorch operators:
``mnm_rl.agent.ppo_loss``) and in ``/pystep`` (its rollout steps run as PyTorch operators around
the compiled core step, not one compiled call of the whole policy: ``mnm_rl.agent.policy_step``;
its heads are then the compiled ones unless ``/pyheads`` too) and in ``/atenmm`` (their kernels'
and input projections' matrix products through ATen, MKL, not the kernels' own:
``mnm_rl.memory.products``) and in ``/pyopt`` (their updates clip the gradients and take Adam's
steps with PyTorch's code, not one compiled call each: ``mnm_rl.agent.gradient_step``) and in
``/autograd`` (their updates' gradients through autograd, not the kernels' explicit backward
passes: ``mnm_rl.agent.explicit``), then in
``/par`` (its own ``ParallelVecEnv`` with one worker
process; an idle agent's worker sleeps). Switches that hold for a whole process (``/eager``,
``/unmap``, ``@N``) are ``throughput.py``'s. Every agent is built in the same setting
(``throughput.py``'s options: env, view size, envs, rollout length, epochs, minibatch, width),
with one torch thread.

The table also gives each config's rate per CPU second of this process (``time.process_time``:
with ``/k2`` both kernel threads, with ``/par`` not the worker). Where it swings between turns
as much as the wall rate, the process had the core all along and ran slower: the host's load
shows in the speed of the core itself (a sibling hyperthread, shared caches), which CPU time
does not remove either.

    python benchmarks/learn_pairs.py                         # mnm-p/k2/par against lstm/par, 3x3
    python benchmarks/learn_pairs.py --view-size 7 --pairs 60
    python benchmarks/learn_pairs.py --configs sb3-contrib ceiling lstm/par mnm-p/k2/par \
        --ratio-to lstm/par sb3-contrib ceiling             # every target of issue 5
    python benchmarks/learn_pairs.py --from-json run.txt --ratio-to mnm-p/k2/par
        # a saved run's output (or its JSON line) summarised again against other references
    python benchmarks/learn_pairs.py --configs lstm/par mnm-p/k2/par --against 8c4d0aa
        # this checkout's agents against the same agents with the mnm_rl of commit 8c4d0aa
    python benchmarks/learn_pairs.py --phase rollout --configs mnm-p/k2 --against 8c4d0aa
        # their rollouts alone

``--phase rollout`` or ``--phase update`` times one phase of each turn instead of the whole
``learn()``: the rollout alone (``collect_rollouts``, the update never run, so the policy stays
as one untimed ``learn()`` left it) or the update alone (``train()``, again and again on the
rollout of that ``learn()``); a rate is then env steps per second of that phase (the rollout's
steps, or the steps the update trains on). Pieces of a few tens of milliseconds pair less well
than whole ``learn()`` turns on a busy host: give them more turns.

``--against REV`` pairs two versions of the package, for changes outside the compiled kernels
(``kernel_pairs.py --against`` pairs kernel sources): each of our agents' configs also runs as
``CONFIG@REV``, in a process of its own that imports ``mnm_rl`` from the files of commit REV
(``git archive``) and builds that commit's kernels into a folder of their own. The two
processes take turns like any two agents, the one waiting on a pipe while the other runs, and
each times its own ``learn()``; the ratios default to ``--ratio-to CONFIG@REV`` of the first
config.

The last line printed is a JSON object: ``{"env", "view_size", ..., "pairs", "phase", "sps":
{config: median steps/s}, "rates": {config: [steps/s of every turn]}, "cpu_rates": {config: [steps
per CPU second of this process, every turn]}, "ratio_to": {reference:
{"median": {config: ...}, "ci95": {config: [low, high]}, "quartiles": {config: [q1, q3]},
"range": {config: [min, max]}}}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
#: The repository this script belongs to.
REPO = Path(__file__).resolve().parents[1]

import throughput  # noqa: E402
from kernel_pairs import turns  # noqa: E402

DEFAULT_CONFIGS = ["lstm/par", "mnm-p/k2/par"]
#: The config name of raw env stepping with random actions.
CEILING = "ceiling"
#: throughput.py's options for the setting every agent is built in, passed on to its parser.
SETTING_FLAGS = ("--env", "--n-envs", "--view-size", "--n-steps", "--batch-size", "--n-epochs",
                 "--seq-len", "--hidden")  # fmt: skip
#: What a turn times (--phase): the whole learn(), or one of its two phases.
PHASES = ("learn", "rollout", "update")
#: A progress line every this many timed turns.
PROGRESS_EVERY = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="what takes turns")
    p.add_argument("--ratio-to", nargs="+", metavar="CONFIG",
                   help="the configs every other is divided by, turn by turn (default: lstm/par\n"
                   "if run, else lstm if run, else the first config)")  # fmt: skip
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: take the turns' rates from a saved run (its output, or\n"
                   "just its JSON line) and summarise them again with --ratio-to")  # fmt: skip
    p.add_argument(
        "--against",
        metavar="REV",
        help="also run each of our agents' configs with the mnm_rl of git revision\n"
        "REV, in a process of its own, as CONFIG@REV (see the module docstring)",
    )
    p.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)  # a --against process
    p.add_argument("--phase", choices=PHASES, default="learn",
                   help="what a turn times: one learn() of one rollout (default), the\n"
                   "rollout alone or the update alone (see the module docstring)")  # fmt: skip
    p.add_argument("--pairs", type=int, default=40, help="timed turns of every agent")
    p.add_argument("--warm-up", type=int, default=2, help="untimed turns first")
    for flag in SETTING_FLAGS:
        p.add_argument(flag, help=f"as throughput.py's {flag}")
    args = p.parse_args(argv)
    if args.from_json is not None:
        running = [
            flag
            for flag in (
                "--configs",
                "--against",
                "--phase",
                "--pairs",
                "--warm-up",
                *SETTING_FLAGS,
            )  # fmt: skip
            if getattr(args, _dest(flag)) != p.get_default(_dest(flag))
        ]
        if running:
            p.error(f"--from-json runs nothing and takes only --ratio-to, not {' '.join(running)}")
        try:
            args.saved = load_saved_run(Path(args.from_json))
        except (OSError, ValueError) as err:
            p.error(f"--from-json {args.from_json}: {err}")
        args.configs = list(args.saved["rates"])
        for reference in args.ratio_to or []:
            if reference not in args.configs:
                p.error(f"--ratio-to {reference}: not one of the saved run's configs")
        args.ratio_to = args.ratio_to or list(args.saved["ratio_to"])
        return args
    given = {flag: getattr(args, _dest(flag)) for flag in SETTING_FLAGS}
    args.setting_argv = [
        x for flag, value in given.items() if value is not None for x in (flag, value)
    ]
    args.setting = throughput.parse_args(args.setting_argv)
    if args.serve is not None:
        return args
    args.twins = {}
    if args.against is not None:
        try:
            args.against_commit = resolve_revision(args.against)
        except subprocess.CalledProcessError as err:
            p.error(f"--against {args.against}: {err.stderr.strip() or 'not a git revision'}")
        ours = [c for c in args.configs if parse_config(c).agent not in (CEILING, "sb3-contrib")]
        if not ours:
            p.error("--against: give at least one of our agents' configs")
        args.twins = {f"{c}@{args.against}": c for c in ours}
        args.configs = [*args.configs, *args.twins]
    if len(args.configs) < 2:
        p.error("--configs: give at least two configs")
    if len(set(args.configs)) != len(args.configs):
        p.error("--configs: each config once")
    if args.ratio_to is None and args.twins:
        args.ratio_to = [next(iter(args.twins))]
    if args.ratio_to is None:
        args.ratio_to = [
            next((c for c in ("lstm/par", "lstm") if c in args.configs), args.configs[0])
        ]
    for reference in args.ratio_to:
        if reference not in args.configs:
            p.error(f"--ratio-to {reference}: not one of --configs")
    for config in args.configs:
        if config in args.twins:
            continue
        problem = config_problem(config)
        if problem:
            p.error(f"--configs: {config!r} {problem}")
    if args.phase == "update" and CEILING in (parse_config(c).agent for c in args.configs):
        p.error("--phase update: the ceiling has no update")
    if args.pairs < 1 or args.warm_up < 0:
        p.error("--pairs must be positive and --warm-up not negative")
    for suffix in PER_AGENT:
        variable = throughput.SUFFIXES[suffix][0]
        if variable in os.environ:
            p.error(f"unset {variable}: this script sets it agent by agent ({suffix})")
    return args


def _dest(flag: str) -> str:
    """The attribute argparse stores ``flag`` under: ``"--n-envs"`` -> ``"n_envs"``."""
    return flag[2:].replace("-", "_")


#: The suffixes this script applies agent by agent; throughput.py's others hold for a process.
PER_AGENT = (
    throughput.KERNEL2,
    throughput.MINIGRID_VIEW,
    throughput.NUMPY_ACTIONS,
    throughput.MINIGRID_RESET,
    throughput.COMPUTED_VIEWS,
    throughput.MINIGRID_STEP,
    throughput.PYTORCH_HEADS,
    throughput.PYTORCH_LOSS,
    throughput.PYTORCH_STEP,
    throughput.ATEN_PRODUCTS,
    throughput.PYTORCH_OPTIMIZER,
    throughput.AUTOGRAD,
)


class Config(NamedTuple):
    """What a config name says: the agent (with any suffix that holds for a whole process),
    its kernel threads (2 with ``/k2``), its env worker processes (1 with ``/par``), whether
    its MiniGrid envs have mnm_rl's fast view (not with ``/mgview``), whether they take
    their actions as Python ints (not with ``/npact``), whether its MiniGrid-Memory envs lay
    out their grids from a kept wall plan (not with ``/mgreset``), whether they keep the images
    of the views met (not with ``/viewcalc``), whether they step with mnm_rl's integer step
    (not with ``/mgstep``), whether its rollout steps run the
    compiled action heads (not with ``/pyheads``), whether its updates run the compiled PPO
    loss (not with ``/pyloss``), whether its rollout steps run the compiled policy step (not
    with ``/pystep``), whether its products are the kernels' own (not with ``/atenmm``),
    whether its updates clip and step in one compiled call each (not with ``/pyopt``) and
    whether they take the explicit backward passes (not with ``/autograd``)."""

    agent: str
    kernel_threads: int
    env_workers: int
    fast_view: bool
    int_actions: bool
    fast_reset: bool
    kept_views: bool
    fast_step: bool
    compiled_heads: bool
    compiled_loss: bool
    compiled_step: bool
    dense_products: bool
    compiled_optimizer: bool
    explicit_backward: bool


def parse_config(config: str) -> Config:
    """``"mnm-p/k2/par"`` -> ``Config("mnm-p", 2, 1, True, ...)``: every compiled piece on."""
    name, workers = throughput.split_parallel(config)
    base, suffixes = throughput.split_suffixes(name)
    rest = "".join(s for s in reversed(suffixes) if s not in PER_AGENT)
    return Config(
        base + rest,
        2 if throughput.KERNEL2 in suffixes else 1,
        workers,
        throughput.MINIGRID_VIEW not in suffixes,
        throughput.NUMPY_ACTIONS not in suffixes,
        throughput.MINIGRID_RESET not in suffixes,
        throughput.COMPUTED_VIEWS not in suffixes,
        throughput.MINIGRID_STEP not in suffixes,
        throughput.PYTORCH_HEADS not in suffixes,
        throughput.PYTORCH_LOSS not in suffixes,
        throughput.PYTORCH_STEP not in suffixes,
        throughput.ATEN_PRODUCTS not in suffixes,
        throughput.PYTORCH_OPTIMIZER not in suffixes,
        throughput.AUTOGRAD not in suffixes,
    )


def config_problem(config: str) -> str | None:
    """Why ``config`` cannot run here, or ``None``."""
    parsed = parse_config(config)
    name, kernel_threads = parsed.agent, parsed.kernel_threads
    if throughput.THREADS in config or name != throughput.split_suffixes(name)[0]:
        return "holds for a whole process: use throughput.py"
    core = throughput.split_config(name)[0]
    if core not in {a.partition(":")[0] for a in throughput.AGENTS} | {CEILING}:
        return "is not one of lstm, gru, mlp, mnm-p, mnm-g, mnm-p:HxL, sb3-contrib, ceiling"
    if kernel_threads > 1 and core in (CEILING, "sb3-contrib"):
        return f"{throughput.KERNEL2} is for our agents"
    for suffix in pytorch_suffixes(parsed):
        if core in (CEILING, "sb3-contrib"):
            return f"{suffix} is for our agents"
    return None


def pytorch_suffixes(parsed: Config) -> list[str]:
    """The suffixes of ``parsed`` that run a compiled piece of our agents in PyTorch instead
    (``/pyheads``, ``/pyloss``, ``/pystep``, ``/atenmm``, ``/pyopt``, ``/autograd``)."""
    pieces = ((throughput.PYTORCH_HEADS, parsed.compiled_heads),
              (throughput.PYTORCH_LOSS, parsed.compiled_loss),
              (throughput.PYTORCH_STEP, parsed.compiled_step),
              (throughput.ATEN_PRODUCTS, parsed.dense_products),
              (throughput.PYTORCH_OPTIMIZER, parsed.compiled_optimizer),
              (throughput.AUTOGRAD, parsed.explicit_backward))  # fmt: skip
    return [suffix for suffix, compiled in pieces if not compiled]


def _random_states() -> tuple[Any, Any, Any]:
    """The states of Python's, numpy's and torch's global random generators."""
    import random

    import torch

    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_random_states(states: tuple[Any, Any, Any]) -> None:
    import random

    import torch

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


class Agent:
    """One config's agent (or, for ``ceiling``, its env alone), the kernel threads to use while it
    trains and the compiled pieces to run in PyTorch instead."""

    def __init__(self, config: str, setting: argparse.Namespace, phase: str = "learn") -> None:
        parsed = parse_config(config)
        #: what :meth:`take_turn` times (one of PHASES)
        self.phase = phase
        name, self.kernel_threads = parsed.agent, parsed.kernel_threads
        #: the environment variables that switch compiled pieces off while this agent trains
        self.pytorch_switches = [throughput.SUFFIXES[s][0] for s in pytorch_suffixes(parsed)]
        self.env = throughput.make_env(
            setting,
            for_sb3_contrib=name == "sb3-contrib",
            env_workers=parsed.env_workers,
            fast_view=parsed.fast_view,
            int_actions=parsed.int_actions,
            fast_reset=parsed.fast_reset,
            kept_views=parsed.kept_views,
            fast_step=parsed.fast_step,
        )
        self.steps = setting.n_steps * setting.n_envs
        if name == CEILING:
            self.model = None
            self.env.reset()
            self.random = np.random.default_rng(0)
        else:
            self.model = throughput.build_agent(name, setting, self.env, "cpu")  # seeds them
        #: The global generators' states (Python's, numpy's, torch's) as this agent left them:
        #: each agent draws from its own, so that agents in one process do not change each
        #: other's training (the actions drawn, the minibatches' order) by taking turns, and two
        #: agents of the same config and seed train alike whatever else runs in the process.
        self.random_states = _random_states()
        self._callback = None
        if self.model is not None and phase != "learn":
            self._prepare_phase()

    def _prepare_phase(self) -> None:
        """Untimed, before the turns of one phase: one ``learn()`` of one rollout (the kernels
        built, a rollout in the buffer for the updates), then for the rollouts the callback that
        ``learn()`` makes."""
        model = self.model

        def prepare() -> None:
            model.learn(self.steps, reset_num_timesteps=False)
            if self.phase == "rollout":
                _, self._callback = model._setup_learn(self.steps, reset_num_timesteps=False)
                self._callback.on_training_start({}, {})

        self._run(prepare)

    def _phase(self) -> None:
        """One ``learn()`` of one rollout, or its rollout or its update alone."""
        model = self.model
        if self.phase == "learn":
            model.learn(self.steps, reset_num_timesteps=False)
        elif self.phase == "rollout":
            model.collect_rollouts(model.env, self._callback, model.rollout_buffer, model.n_steps)
        else:
            model.train()

    def take_turn(self) -> tuple[float, float]:
        """Wall seconds and this process's CPU seconds of one turn: one ``learn()`` of one rollout
        (rollout plus update), or the rollout or the update alone (``phase``); for the ceiling, of
        as many steps with random actions."""
        if self.model is None:
            vec_steps = self.steps // self.env.num_envs
            actions = self.random.integers(
                self.env.action_space.n, size=(vec_steps, self.env.num_envs)
            )
            start, start_cpu = time.perf_counter(), time.process_time()
            for action in actions:
                self.env.step(action)
            return time.perf_counter() - start, time.process_time() - start_cpu
        return self._run(self._phase)

    def _run(self, work: Callable[[], None]) -> tuple[float, float]:
        """``work()`` with this agent's kernel threads, PyTorch switches and random generators,
        timed: wall seconds and this process's CPU seconds."""
        from mnm_rl.memory import fused

        fused.set_kernel_threads(self.kernel_threads)
        for variable in self.pytorch_switches:
            os.environ[variable] = "0"
        others = _random_states()
        _set_random_states(self.random_states)
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            work()
            return time.perf_counter() - start, time.process_time() - start_cpu
        finally:
            self.random_states = _random_states()
            _set_random_states(others)
            fused.set_kernel_threads(None)
            for variable in self.pytorch_switches:
                os.environ.pop(variable, None)

    def episodes(self) -> tuple[int, int]:
        """How many episodes its envs have finished so far, and their steps in all (from the
        envs' ``Monitor``)."""
        lengths = [n for env in self.env.env_method("get_episode_lengths") for n in env]
        return len(lengths), sum(lengths)

    def close(self) -> None:
        self.env.close()


def resolve_revision(revision: str) -> str:
    """The full commit hash of git ``revision`` in this repository."""
    return subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def export_revision(commit: str, folder: Path) -> Path:
    """The files of ``commit`` (``git archive``), unpacked into ``folder``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


class RemoteAgent:
    """A config's agent in a process of its own that imports ``mnm_rl`` from ``checkout`` (the
    files of another commit) and runs one ``learn()`` of one rollout whenever asked, timed
    there: ``learn_pairs.py --serve CONFIG`` with ``checkout`` first on its ``PYTHONPATH``. This
    script and ``throughput.py`` are today's; only the package is the other commit's. Its
    compiled kernels are built from the commit's sources into a build folder of their own
    (kept under the temporary directory, keyed by the commit, for the next run). While this
    process's agents take their turns, it waits on its pipe."""

    def __init__(
        self, config: str, setting_argv: list[str], checkout: Path, commit: str, phase: str
    ):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, [env.get("PYTHONPATH")])])
        env["TORCH_EXTENSIONS_DIR"] = str(Path(tempfile.gettempdir()) / f"mnm_rl_ext_{commit}")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", config, "--phase", phase,
             *setting_argv],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        reply = self._reply()
        package = Path(reply["package"]).resolve()
        if checkout.resolve() not in package.parents:
            self.close()
            raise RuntimeError(f"--against: the other process imported mnm_rl from {package}")
        self.steps = reply["steps"]
        self.finished: tuple[int, int] = (0, 0)

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"--against: its process exited (code {self.process.wait()})")
        return json.loads(line)

    def take_turn(self) -> tuple[float, float]:
        assert self.process.stdin is not None
        self.process.stdin.write("turn\n")
        self.process.stdin.flush()
        reply = self._reply()
        self.finished = tuple(reply["episodes"])
        return reply["wall"], reply["cpu"]

    def episodes(self) -> tuple[int, int]:
        """:meth:`Agent.episodes` of the other process's agent, after its last turn."""
        return self.finished

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # its loop ends at the end of its input
            self.process.wait(timeout=60)


def serve(config: str, setting: argparse.Namespace, phase: str = "learn") -> None:
    """The ``--serve`` loop: build ``config``'s agent, then one timed ``learn()`` per ``turn``
    line on stdin, each answered with a JSON line ``{"wall", "cpu", "episodes"}`` on stdout
    (``episodes``: :meth:`Agent.episodes` after the turn)."""
    # The answers go to the pipe on a file descriptor of their own; whatever else this process
    # or its env workers print goes to stderr, not into the pipe.
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import torch

    import mnm_rl

    torch.set_num_threads(1)
    agent = Agent(config, setting, phase)
    print(json.dumps({"package": mnm_rl.__file__, "steps": agent.steps}), file=answer, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "turn":
                wall, cpu = agent.take_turn()
                reply = {"wall": wall, "cpu": cpu, "episodes": agent.episodes()}
                print(json.dumps(reply), file=answer, flush=True)
    finally:
        agent.close()


class Turns(NamedTuple):
    """Every timed turn of every config: steps per wall second, steps per CPU second of its
    process, and the mean length of the episodes that ended in the turn (``None`` where none
    did)."""

    rates: dict[str, list[float]]
    cpu_rates: dict[str, list[float]]
    episode_steps: dict[str, list[float | None]]


def run_pairs(agents: dict[str, Agent | RemoteAgent], pairs: int, warm_up: int) -> Turns:
    """Every agent's timed turns (:class:`Turns`); the turns' order alternates. Episodes are
    counted outside the timed ``learn()``."""
    out = Turns(*({config: [] for config in agents} for _ in range(3)))
    rates = out.rates
    finished = {config: agent.episodes() for config, agent in agents.items()}
    for turn in range(warm_up + pairs):
        for config, agent in turns(turn, agents):
            seconds, cpu_seconds = agent.take_turn()
            episodes, steps = agent.episodes()
            before = finished[config]
            finished[config] = (episodes, steps)
            if turn >= warm_up:
                rates[config].append(agent.steps / seconds)
                out.cpu_rates[config].append(agent.steps / cpu_seconds)
                ended = episodes - before[0]
                out.episode_steps[config].append((steps - before[1]) / ended if ended else None)
        done = turn + 1 - warm_up
        if done > 0 and (done % PROGRESS_EVERY == 0 or done == pairs):
            line = ", ".join(f"{c} {statistics.median(r):.0f}" for c, r in rates.items())
            print(f"turn {done}/{pairs}, median steps/s so far: {line}", flush=True)
    return out


def ratio_tables(rates: dict[str, list[float]], references: list[str]) -> dict[str, Any]:
    """For each reference, every other config's rate over the reference's in the same turn:
    the median, its 95% interval, the quartiles and the range of those ratios."""
    ratio_to = {}
    for reference in references:
        ratios = {
            c: [a / b for a, b in zip(r, rates[reference], strict=True)]
            for c, r in rates.items()
            if c != reference
        }
        ratio_to[reference] = {
            "median": {c: statistics.median(r) for c, r in ratios.items()},
            "ci95": {c: median_interval(r) for c, r in ratios.items()},
            "quartiles": {c: quartiles(r) for c, r in ratios.items()},
            "range": {c: [min(r), max(r)] for c, r in ratios.items()},
        }
    return ratio_to


def load_saved_run(path: Path) -> dict[str, Any]:
    """The JSON object of a saved run of this script: the last line of ``path`` that is a JSON
    object with every turn's ``rates`` and ``cpu_rates``."""
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            try:
                saved = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(saved, dict) and {"rates", "cpu_rates"} <= saved.keys():
                return saved
    raise ValueError("no JSON line of learn_pairs.py with every turn's rates")


def summary(args: argparse.Namespace, timed: Turns) -> dict[str, Any]:
    s = args.setting
    rates = timed.rates
    ratio_to = ratio_tables(rates, args.ratio_to)
    return {
        "env": s.env, "view_size": s.view_size, "n_envs": s.n_envs, "n_steps": s.n_steps,
        "batch_size": s.batch_size, "n_epochs": s.n_epochs, "seq_len": s.seq_len,
        "hidden": s.hidden, "threads": 1, "pairs": args.pairs, "phase": args.phase,
        "sps": {c: statistics.median(r) for c, r in rates.items()},
        "rates": rates,
        "cpu_rates": timed.cpu_rates,
        "episode_steps": timed.episode_steps,
        "ratio_to": ratio_to,
    }  # fmt: skip


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (the median of each half, for one value that value)."""
    if len(values) == 1:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def median_interval(values: list[float], z: float = 1.96) -> list[float]:
    """A distribution-free confidence interval of the median (95% at ``z = 1.96``): the order
    statistics ``k`` and ``n - 1 - k`` with ``k = floor((n - z sqrt(n)) / 2)``, by the normal
    approximation of the binomial count of values below the median; min and max when ``n`` is
    too small for that."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2))
    return [ordered[k], ordered[n - 1 - k]]


def _mean_length(steps: list[float | None]) -> str:
    """The median over turns of their episodes' mean lengths, or "-" where none ended."""
    known = [s for s in steps if s is not None]
    return f"{statistics.median(known):.1f}" if known else "-"


def print_table(out: dict[str, Any]) -> None:
    width = max(16, *(len(config) for config in out["rates"]))
    print(
        f"{'config':{width}s} {'steps/s':>8s} {'min..max':>13s}  {'steps/CPU-s':>11s} "
        f"{'min..max':>13s}"
    )
    for config, wall in out["rates"].items():
        cpu = out["cpu_rates"][config]
        print(f"{config:{width}s} {statistics.median(wall):8.0f} "
              f"{min(wall):6.0f}..{max(wall):<6.0f}"
              f"  {statistics.median(cpu):11.0f} {min(cpu):6.0f}..{max(cpu):<6.0f}")  # fmt: skip
    episode_steps = out.get("episode_steps")  # not in runs saved before the thirty-fourth session
    if episode_steps:
        tenth = max(1, len(next(iter(episode_steps.values()))) // 10)
        print(f"\nsteps per episode that ended, over the first and the last {tenth} turns:")
        for config, steps in episode_steps.items():
            print(f"{config:{width}s} {_mean_length(steps[:tenth]):>9s} "
                  f"{_mean_length(steps[-tenth:]):>9s}")  # fmt: skip
    for reference, table in out["ratio_to"].items():
        print(f"\nrate over {reference}'s in the same turn: median [95% CI] (quartiles, min..max)")
        for config, ratio in table["median"].items():
            (low, high), (q1, q3) = table["ci95"][config], table["quartiles"][config]
            least, most = table["range"][config]
            print(f"{config:{width}s} {ratio:7.3f} [{low:.3f}, {high:.3f}]"
                  f" ({q1:.3f}..{q3:.3f}, {least:.2f}..{most:.2f})")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    if args.from_json is not None:
        print(f"command: python benchmarks/learn_pairs.py {' '.join(raw)}")
        out = {**args.saved, "ratio_to": ratio_tables(args.saved["rates"], args.ratio_to)}
        print_table(out)
        print(json.dumps(out))
        return out
    if args.serve is not None:
        serve(args.serve, args.setting, args.phase)
        return {}
    import torch

    torch.set_num_threads(1)
    s = args.setting
    print(f"machine: {throughput.machine()}")
    print(f"command: python benchmarks/learn_pairs.py {' '.join(raw)}")
    print(
        f"env {s.env} (agent_view_size {s.view_size} if MiniGrid), {s.n_envs} envs, n_steps "
        f"{s.n_steps}, batch {s.batch_size}, {s.n_epochs} epochs, seq_len {s.seq_len}, width "
        f"{s.hidden}, torch threads 1, cpu; {args.warm_up} + {args.pairs} turns"
        + ("" if args.phase == "learn" else f" of the {args.phase} alone"),
        flush=True,
    )
    throughput.build_kernels()
    with tempfile.TemporaryDirectory(prefix="learn_pairs_") as folder:
        if args.twins:
            checkout = export_revision(args.against_commit, Path(folder))
            print(f"against: {args.against} = {args.against_commit}", flush=True)
        agents: dict[str, Agent | RemoteAgent] = {}
        try:
            for config in args.configs:
                if config in args.twins:
                    agents[config] = RemoteAgent(
                        args.twins[config], args.setting_argv, checkout, args.against_commit,
                        args.phase,
                    )  # fmt: skip
                else:
                    agents[config] = Agent(config, s, args.phase)
            timed = run_pairs(agents, args.pairs, args.warm_up)
        finally:
            for agent in agents.values():
                agent.close()
    out = summary(args, timed)
    print()
    print_table(out)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
