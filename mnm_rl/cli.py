"""The ``mnm-rl`` command line: train, eval, record, plot, sweep, list, build.

Bad input (unknown env or agent, a bad ``--set``, a missing run, a file that is not a
checkpoint, non-positive numbers) ends with one line ``mnm-rl: error: ...`` on stderr and exit
status 2. Heavy modules (torch, stable-baselines3) are imported only once the input is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mnm_rl.config import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and name the subcommand's help."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, even if the input held line breaks
        self.exit(EXIT_USAGE, f"mnm-rl: error: {message} (see '{self.prog} --help')\n")


def _bounded(cast, accept, requirement: str):
    """An argparse ``type`` that converts with ``cast`` and requires ``accept(value)``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value

    return parse


_positive_int = _bounded(lambda t: int(t.replace("_", "")), lambda v: v >= 1, "a positive integer")
_non_negative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _bounded(float, lambda v: v > 0, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    from mnm_rl.presets import DEFAULT_AGENT, DEFAULT_ENV

    parser = _Parser(
        prog="mnm-rl",
        description="Recurrent PPO with Metalearned Neural Memory: train, evaluate, record, plot.",
        epilog="On a CPU the MNM cores (and the lstm and gru cores, the features extractor's "
        "layer over a symbol grid, a rollout step's action heads and draw, and an update's PPO "
        "loss) run C++ kernels, compiled on first use (cached; 'mnm-rl build' compiles them all "
        "at once, and 'mnm-rl train' on a CPU does before it starts); MNM_RL_FUSED=0 in "
        "the environment runs the same equations in plain PyTorch. "
        "The kernel keeps the memory it frees for reuse (glibc); MNM_RL_RETAIN_MEMORY=0 hands it "
        "back to the OS. MNM_RL_KERNEL_THREADS=N (or --set train.kernel_threads=N) lets the MNM "
        "and lstm kernels, the input projections and the heads split each minibatch between N "
        "threads (and the MNM kernel each rollout step of 16 envs or more a thread), and with "
        "N >= 2 Adam's step runs on two for models of 65536 parameter elements "
        "or more (MNM_RL_ADAM_THREADS=0 keeps one). An MNM policy's rollout step runs on a "
        "thread of its own while the step before it is stored (MNM_RL_STEP_THREAD=0 keeps it "
        "on the rollout's thread). The kernels' split parts run on threads of their own that "
        "sleep soon after each call (MNM_RL_PART_POOL=0 runs them on OpenMP's). "
        "--set train.env_workers=N steps the "
        "training envs in N worker processes alongside the trainer (docs/benchmarks.md says "
        "when that pays). MiniGrid envs compute their observations straight from the grid, "
        "the same arrays 3.5-5x faster than MiniGrid's code; MNM_RL_FAST_VIEW=0 keeps "
        "MiniGrid's. They take their actions as Python ints, which MiniGrid compares with its "
        "action enum much faster than numpy's; MNM_RL_INT_ACTIONS=0 passes numpy's on. "
        "MiniGrid-Memory envs lay out each episode's grid from a kept wall plan, the same grid "
        "2-4x faster; MNM_RL_FAST_RESET=0 keeps MiniGrid's code. They keep the image of each "
        "view met (per layout, cell and direction) instead of computing it again; "
        "MNM_RL_KEPT_VIEWS=0 computes every view. They step in plain integer arithmetic "
        "instead of MiniGrid's numpy code, the same steps; MNM_RL_FAST_STEP=0 keeps MiniGrid's. "
        "MNM_RL_COMPILED_HEADS=0 runs only the action heads (rollout and training) in plain "
        "PyTorch, "
        "MNM_RL_COMPILED_LOSS=0 only PPO's loss, MNM_RL_COMPILED_STEP=0 only the policy's "
        "rollout step (extractor, core and heads in one call otherwise), "
        "MNM_RL_COMPILED_OPTIMIZER=0 only the gradients' clipping and Adam's step, "
        "MNM_RL_EXPLICIT_BACKWARD=0 trains through autograd instead of the kernels' own "
        "backward passes. The kernels' "
        "matrix "
        "products are their own (MKL runs its AVX2 code on AMD CPUs); "
        "MNM_RL_DENSE_PRODUCTS=0 runs ATen's instead.",
    )
    from mnm_rl import __version__

    parser.add_argument("--version", action="version", version=f"mnm-rl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train an agent on an env preset or gymnasium id")
    train.add_argument("--env", help=f"env preset or gymnasium id (default {DEFAULT_ENV})")
    train.add_argument("--agent", help=f"agent preset (default {DEFAULT_AGENT})")
    train.add_argument("--timesteps", type=_positive_int, help="total env steps")
    train.add_argument("--seed", type=_non_negative_int, help="run seed (default 0)")
    train.add_argument("--n-envs", type=_positive_int, help="parallel envs")
    train.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:1 ...")
    train.add_argument("--run-dir", type=Path, help="folder for this run (default: under --root)")
    train.add_argument("--root", type=Path, default=Path("runs"), help="runs root (default runs)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. agent.ppo.learning_rate=1e-3 (repeatable)",
    )
    train.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("eval", help="evaluate a run or model on held-out seeds")
    evaluate.add_argument("model", type=Path, metavar="RUN_OR_MODEL")
    evaluate.add_argument("--episodes", type=_positive_int, help="episodes (default: the run's)")
    evaluate.add_argument("--env", help="env preset or gymnasium id (default: the run's env)")
    evaluate.add_argument("--stochastic", action="store_true", help="sample actions")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--out", type=Path, help="JSON file (default: in the run folder)")

    record = sub.add_parser("record", help="record episodes as a GIF or MP4")
    record.add_argument("model", type=Path, metavar="RUN_OR_MODEL")
    record.add_argument("--out", type=Path, required=True, help="FILE.gif or FILE.mp4")
    record.add_argument("--episodes", type=_positive_int, default=2)
    record.add_argument("--env", help="env preset or gymnasium id (default: the run's env)")
    record.add_argument("--fps", type=_positive_float, default=4.0)
    record.add_argument("--max-steps", type=_positive_int, default=500, help="per episode")
    record.add_argument("--stochastic", action="store_true", help="sample actions")
    record.add_argument("--plot", type=Path, help="diagnostics plot (default FILE-memory.png)")
    record.add_argument("--device", default="auto")

    plot = sub.add_parser(
        "plot", help="plot learning curves from runs' TensorBoard logs or exported scalars"
    )
    plot.add_argument(
        "runs",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="run folder, folder of runs, or exported <env>__<agent>__<seed>.csv",
    )
    plot.add_argument("--out", type=Path, default=Path("curves.png"))
    plot.add_argument("--tag", default="rollout/success_rate", help="TensorBoard scalar")

    sweep = sub.add_parser(
        "sweep", help="run a grid or search of env x agent x seed x overrides on Ray Tune"
    )
    sweep.add_argument("spec", type=Path, nargs="?", metavar="SPEC.yaml", help="sweep spec")
    sweep.add_argument("--env", dest="envs", action="append", help="env (repeatable)")
    sweep.add_argument("--agent", dest="agents", action="append", help="agent (repeatable)")
    sweep.add_argument("--seeds", type=_non_negative_int, nargs="+", help="run seeds")
    sweep.add_argument("--timesteps", type=_positive_int, help="env steps per trial")
    sweep.add_argument("--n-envs", type=_positive_int, help="parallel envs per trial")
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every trial (repeatable)",
    )
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="grid over a config value, e.g. agent.ppo.learning_rate=5e-4,1e-3 (repeatable)",
    )
    sweep.add_argument("--name", help="sweep name (default: the spec's, else 'sweep')")
    sweep.add_argument("--root", type=Path, default=Path("runs"), help="runs root (default runs)")
    sweep.add_argument("--storage", type=Path, help="Ray Tune storage (default ROOT/sweeps)")
    sweep.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    sweep.add_argument("--num-cpus", type=_positive_int, help="local Ray CPUs (default: all)")
    sweep.add_argument(
        "--cpus-per-trial", type=_positive_float, default=1.0, help="CPUs per trial (default 1)"
    )
    sweep.add_argument("--max-concurrent", type=_positive_int, help="trials at once")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep")

    sub.add_parser("list", help="list env and agent presets")

    build = sub.add_parser(
        "build",
        help="compile the C++ kernels now, several at once (else each compiles when first needed)",
    )
    build.add_argument(
        "--jobs", type=_positive_int, help="builds at a time (default: the CPUs this process has)"
    )
    return parser


# ------------------------------------------------------------------------------------- train
def _resolve_train_config(args: argparse.Namespace):
    from mnm_rl.presets import resolve_run_config

    train = {
        key: value
        for key, value in (
            ("timesteps", args.timesteps),
            ("seed", args.seed),
            ("n_envs", args.n_envs),
            ("device", args.device),
        )
        if value is not None
    }
    return resolve_run_config(args.env, args.agent, train, args.overrides)


def _resume_config(args: argparse.Namespace):
    from mnm_rl.runs import check_run_dir, latest_model, load_config

    for flag, value in (
        ("--env", args.env),
        ("--agent", args.agent),
        ("--seed", args.seed),
        ("--n-envs", args.n_envs),
        ("--run-dir", args.run_dir),
        ("--set", args.overrides or None),
    ):
        if value is not None:
            raise ConfigError(f"--resume continues the run's saved config; {flag} cannot change")
    run_dir = check_run_dir(args.resume)
    config = load_config(run_dir)
    update: dict[str, Any] = {}
    if args.timesteps is not None:
        update["timesteps"] = args.timesteps
    if args.device is not None:
        update["device"] = args.device
    if update:
        config = config.model_copy(update={"train": config.train.model_copy(update=update)})
    return config, run_dir, latest_model(run_dir)


def _preflight(config) -> None:
    """Fail on a bad env or device before a run folder is created."""
    from mnm_rl.env_factory import make_env
    from mnm_rl.training import check_device

    make_env(config.env).close()
    check_device(config.train.device)


def cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from mnm_rl.runs import EVAL_FILE, checkpoint_steps, new_run_dir, save_config

    if args.resume is not None:
        config, run_dir, checkpoint = _resume_config(args)
        done = checkpoint_steps(checkpoint)
        if config.train.timesteps <= done:
            raise ConfigError(
                f"the run already has {done} env steps; pass --timesteps larger than {done}"
            )
        _preflight(config)
        _build_kernels(config.train.device)
    else:
        config = _resolve_train_config(args)
        checkpoint = None
        if args.run_dir is not None and args.run_dir.exists():
            if not args.run_dir.is_dir() or any(args.run_dir.iterdir()):
                raise ConfigError(f"--run-dir {args.run_dir} exists and is not empty; use --resume")
        _preflight(config)
        _build_kernels(config.train.device)  # before the run folder: Ctrl-C here leaves none
        if args.run_dir is not None:
            run_dir = args.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = new_run_dir(args.root, config.env.name, config.agent.name, config.train.seed)
    from mnm_rl.training import train_run  # heavy: torch, SB3

    save_config(run_dir, config)
    verb = f"resuming {checkpoint}" if checkpoint else "training"
    print(
        f"mnm-rl: {verb}: {config.agent.name} on {config.env.name} ({config.env.id}), "
        f"{config.train.timesteps} steps, {config.train.n_envs} envs, seed {config.train.seed}"
        f"\nmnm-rl: run folder {run_dir}",
        flush=True,
    )
    try:
        with _stop_on_signals() as stop:
            model = train_run(
                config, run_dir, resume_from=checkpoint, progress=not args.no_progress, stop=stop
            )
    except ConfigError:
        if checkpoint is None and not any(run_dir.rglob("*.zip")):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained: leave no empty run
        raise
    print(f"mnm-rl: saved {run_dir / 'model.zip'} ({model.num_timesteps} env steps)")
    if config.train.eval_episodes > 0:
        report = _evaluate(
            model,
            config.env,
            config.train.eval_episodes,
            config.train.eval_deterministic,
            {"model": "model.zip", "num_timesteps": model.num_timesteps},
        )
        _write_report(report, run_dir / EVAL_FILE)
    return 0


def _build_kernels(device: str, modules: Sequence[str] | None = None) -> None:
    """For a run on the CPU, compile the kernels of ``modules`` (by default all) not built yet,
    several at once, before the run would compile them one after another as it first needs each
    (a kernel that cannot be built warns again when the run asks for it, and the PyTorch code
    runs)."""
    import time

    from stable_baselines3.common.utils import get_device

    from mnm_rl import native

    if get_device(device).type != "cpu":  # "auto" as the agent resolves it
        return
    modules = native.unbuilt_modules(modules)
    if not modules:
        return
    print(
        f"mnm-rl: compiling {_kernels(len(modules))} (first use; cached for later runs)",
        flush=True,
    )
    start = time.perf_counter()
    failed = [result for result in native.build_in_parallel(modules) if result.error]
    done = f"mnm-rl: compiled in {time.perf_counter() - start:.0f} s"
    print(done + (f"; {len(failed)} could not be built" if failed else ""), flush=True)


def _kernels(count: int) -> str:
    return f"{count} kernel{'' if count == 1 else 's'}"


EXIT_NONFINITE = 3


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM set the yielded event (training stops at the next env step, saves a
    checkpoint and exits 128 + signal number); a second signal aborts at once."""
    import threading

    stop = threading.Event()
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers live in the main thread (e.g. a Ray Tune trial's thread)
        return

    def handler(signum, frame) -> None:
        if stop.is_set():
            for sig in previous:
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt("aborted by a second signal; no checkpoint saved")
        received.append(signum)
        stop.set()
        print(
            f"\nmnm-rl: {signal.Signals(signum).name}: stopping at the next env step and saving a "
            "checkpoint (send it again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    except Exception as err:
        err.signum = received[0] if received else signal.SIGINT  # type: ignore[attr-defined]
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -------------------------------------------------------------------------------------- eval
def _load_for(path: Path, env_name: str | None, device: str, kernels: Sequence[str]):
    """(policy, env spec, policy file, run folder, config) for a run folder or a model file,
    with the ``kernels`` (extension modules) the command will use compiled if they were not yet.

    Loads the safe policy file only (tensors + JSON, never a pickle)."""
    from mnm_rl.env_factory import resolve_env
    from mnm_rl.loading import resolve_policy
    from mnm_rl.runs import load_config

    policy_path, run_dir = resolve_policy(path)
    config = load_config(run_dir) if run_dir is not None else None
    if env_name is not None:
        spec = resolve_env(env_name).spec()
    elif config is not None:
        spec = config.env
    else:
        raise ConfigError(f"{path} is not inside a run folder; pass --env")
    from mnm_rl.safe_policy import load_policy_file

    model = load_policy_file(policy_path, device=device)
    _check_spaces(model, spec)
    _build_kernels(device, kernels)
    return model, spec, policy_path, run_dir, config


def _check_spaces(model, spec) -> None:
    from mnm_rl.env_factory import make_env
    from mnm_rl.safe_policy import SpaceMismatchError

    env = make_env(spec)
    try:
        model.check_env(env, f"env {spec.name!r}")
    except SpaceMismatchError as err:
        raise ConfigError(str(err)) from None
    finally:
        env.close()


def _evaluate(model, spec, episodes: int, deterministic: bool, extra: dict) -> dict:
    from mnm_rl.evaluation import evaluate

    report = evaluate(model, spec, episodes, deterministic, extra)
    _print_table(report)
    return report


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out evaluation on {report['env']} ({report['env_id']})")
    for column in ("episodes", "success rate", "mean return", "mean length", "seeds"):
        table.add_column(column, justify="right")
    table.add_row(
        str(report["episodes"]),
        f"{report['success_rate']:.3f} ± {report['success_rate_stderr']:.3f}",
        f"{report['mean_return']:.3f} ± {report['std_return']:.3f}",
        f"{report['mean_length']:.1f}",
        f"{report['seeds'][0]}..{report['seeds'][1] - 1}",
    )
    Console(width=110).print(table)


def _write_report(report: dict, path: Path) -> None:
    from mnm_rl.runs import write_json

    write_json(path, report)
    print(f"mnm-rl: wrote {path}")


def cmd_eval(args: argparse.Namespace) -> int:
    from mnm_rl.native import PREDICT_MODULES
    from mnm_rl.runs import EVAL_FILE, POLICY_FILE, slug

    model, spec, model_path, run_dir, config = _load_for(
        args.model, args.env, args.device, PREDICT_MODULES
    )
    episodes = args.episodes or (config.train.eval_episodes if config else 0) or 100
    report = _evaluate(
        model,
        spec,
        episodes,
        not args.stochastic,
        {"model": str(model_path), "num_timesteps": model.num_timesteps},
    )
    if args.out is not None:
        out = args.out
    else:
        folder = run_dir if run_dir is not None else model_path.parent
        default = (
            run_dir is not None
            and model_path.name == POLICY_FILE
            and spec.name == config.env.name
            and not args.stochastic
        )
        suffix = "-stochastic" if args.stochastic else ""
        name = EVAL_FILE if default else f"eval-{model_path.stem}-{slug(spec.name)}{suffix}.json"
        out = folder / name
    _write_report(report, out)
    return 0


# ------------------------------------------------------------------------------------ record
def cmd_record(args: argparse.Namespace) -> int:
    from mnm_rl.native import SEQUENCE_MODULES
    from mnm_rl.recording import VIDEO_SUFFIXES

    if args.out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError(f"--out must end in .gif or .mp4, got {args.out}")
    model, spec, model_path, _, _ = _load_for(args.model, args.env, args.device, SEQUENCE_MODULES)
    from mnm_rl.recording import (
        plot_diagnostics,
        record_episodes,
        write_diagnostics_csv,
        write_video,
    )

    recording = record_episodes(model, spec, args.episodes, not args.stochastic, args.max_steps)
    write_video(recording.frames, args.out, args.fps)
    print(
        f"mnm-rl: wrote {args.out} ({len(recording.frames)} frames, {args.episodes} episodes, "
        f"returns {', '.join(f'{r:.2f}' for r in recording.returns)})"
    )
    csv_path = args.out.with_name(args.out.stem + "-memory.csv")
    write_diagnostics_csv(recording, csv_path)
    if recording.has_memory:
        plot_path = args.plot or args.out.with_name(args.out.stem + "-memory.png")
        plot_diagnostics(recording, plot_path, f"{model_path} on {spec.name}")
        print(f"mnm-rl: wrote {csv_path} and {plot_path} (beta and write gain per step)")
    else:
        print(f"mnm-rl: wrote {csv_path}; the core has no memory diagnostics, so no plot")
    return 0


# -------------------------------------------------------------------------------------- plot
def cmd_plot(args: argparse.Namespace) -> int:
    from mnm_rl.plotting import load_sources, plot_curves

    curves = load_sources(args.runs, args.tag)
    summary = plot_curves(curves, args.out, args.tag)
    print(f"mnm-rl: wrote {args.out} from {len(curves)} runs: {json.dumps(summary)}")
    return 0


# ------------------------------------------------------------------------------------- sweep
def _sweep_spec(args: argparse.Namespace):
    from mnm_rl.config import parse_value
    from mnm_rl.sweep import SweepSpec

    spec = SweepSpec.from_file(args.spec) if args.spec is not None else SweepSpec()
    for key in ("envs", "agents", "seeds", "timesteps", "n_envs", "name"):
        value = getattr(args, key)
        if value is not None:
            setattr(spec, key, value)
    spec.overrides = [*spec.overrides, *args.overrides]
    for text in args.grid:
        key, sep, values = text.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {text!r} is not KEY=V1,V2,...")
        spec.grid[key.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    spec.check("the sweep")
    return spec


def cmd_sweep(args: argparse.Namespace) -> int:
    from mnm_rl.sweep import SUMMARY_FILE, import_ray, run_sweep

    import_ray()  # fail fast, with the install hint
    spec = _sweep_spec(args)
    where = f"Ray at {args.address}" if args.address else "a local Ray"
    if args.address is None:  # the trials here would each wait for the first to build them
        _build_kernels("auto")
    print(f"mnm-rl: sweep {spec.name!r}: {spec.n_trials()} trials on {where}", flush=True)
    rows = run_sweep(
        spec,
        args.root,
        storage=args.storage,
        address=args.address,
        num_cpus=args.num_cpus,
        cpus_per_trial=args.cpus_per_trial,
        max_concurrent=args.max_concurrent,
        resume=args.resume,
    )
    for row in rows:
        success = row["heldout_success"]
        shown = f"{success:.3f}" if success is not None else row["status"]
        print(f"  {row['env']} {row['agent']} seed {row['seed']} {row['hparams'] or ''}: {shown}")
    storage = (args.storage or args.root / "sweeps") / spec.name
    print(f"mnm-rl: wrote {storage / SUMMARY_FILE}")
    failed = [row for row in rows if row["status"] != "done"]
    return 1 if failed else 0


# -------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    from mnm_rl import presets

    width = max(map(len, [*presets.env_names(), *presets.agent_names()]))
    print("env presets (--env; any registered gymnasium id works too):")
    for name in presets.env_names():
        preset = presets.load_env_preset(name)
        mark = " (default)" if name == presets.DEFAULT_ENV else ""
        print(f"  {name:<{width}} {preset.id:<30} {preset.description}{mark}")
    print("agent presets (--agent):")
    for name in presets.agent_names():
        agent = presets.load_agent_preset(name)
        mark = " (default)" if name == presets.DEFAULT_AGENT else ""
        print(f"  {name:<{width}} {agent.core:<30} {agent.description}{mark}")
    print(f"presets read from {presets.preset_dir('envs')} and {presets.preset_dir('agents')}")
    return 0


# ------------------------------------------------------------------------------------- build
def cmd_build(args: argparse.Namespace) -> int:
    """Compile every kernel not built yet, ``--jobs`` at a time; status 1 if one cannot be."""
    from mnm_rl import native

    if not native.compiled_enabled():
        print(f"mnm-rl: compiled kernels are switched off ({native.SWITCH_VARIABLE}=0)")
        return 0
    extensions = native.package_extensions()
    unbuilt = native.unbuilt_modules()
    width = max(len(extension.what) for extension in extensions.values())
    for module, extension in extensions.items():
        if module not in unbuilt:
            print(f"  {extension.what:<{width}}  built already")
    if unbuilt:
        jobs = min(args.jobs or native.usable_cpus(), len(unbuilt))
        print(f"mnm-rl: compiling {_kernels(len(unbuilt))}, {jobs} at a time", flush=True)
    results = native.build_in_parallel(unbuilt, args.jobs)
    for result in results:
        built = f"built in {result.seconds:.0f} s"
        outcome = f"not built: {result.error}" if result.error else built
        print(f"  {extensions[result.module].what:<{width}}  {outcome}")
    directory = native.build_directory(next(iter(extensions.values())).name).parent
    print(f"mnm-rl: kernels cached under {directory}")
    return 1 if any(result.error for result in results) else 0


COMMANDS = {
    "build": cmd_build,
    "train": cmd_train,
    "eval": cmd_eval,
    "record": cmd_record,
    "plot": cmd_plot,
    "sweep": cmd_sweep,
    "list": cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mnm-rl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"mnm-rl: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        print(f"mnm-rl: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as err:
        from mnm_rl.training import TrainingFault, TrainingInterrupted

        if isinstance(err, TrainingInterrupted):
            print(f"mnm-rl: {err}; continue with --resume", file=sys.stderr)
            return 128 + int(getattr(err, "signum", signal.SIGINT))
        if isinstance(err, TrainingFault):
            print(f"mnm-rl: error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_NONFINITE
        raise


if __name__ == "__main__":
    sys.exit(main())
