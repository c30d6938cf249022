"""Building the package's C++ extensions with ``torch.utils.cpp_extension`` on first use.

Six extensions (:data:`EXTENSION_MODULES`): the memory's sequence kernels
(:mod:`mnm_rl.memory.fused`), the agent's symbol-grid encoder (:mod:`mnm_rl.agent.grid_linear`),
its action heads for a rollout step (:mod:`mnm_rl.agent.action_heads`), a rollout step of the
whole policy (:mod:`mnm_rl.agent.policy_step`, which compiles the MNM kernel's source as well),
PPO's loss (:mod:`mnm_rl.agent.ppo_loss`) and the gradients' clipping and Adam's step
(:mod:`mnm_rl.agent.gradient_step`). Each compiles the first time it is needed
(cached under ``~/.cache/torch_extensions``, or ``TORCH_EXTENSIONS_DIR``). Without a C++
compiler, or with ``MNM_RL_FUSED=0`` in the environment, the PyTorch code runs instead.

Built one after another as a run first needs them, the six took 217 s on two CPUs;
:func:`build_in_parallel` builds those not built yet each in a process of its own, as many at a
time as there are CPUs, 175 s there (``mnm-rl build``, and ``mnm-rl train`` on a CPU before it
starts; ``benchmarks/build_time.py``). ``mnm-rl eval`` and ``record`` build only the one each
uses (:data:`PREDICT_MODULES`, :data:`SEQUENCE_MODULES`).

A build that was killed (Ctrl-C, a timeout) leaves torch's ``lock`` file in its build directory,
and every later ``load`` of that extension would wait for it forever. Builds here therefore hold
an OS file lock (``flock``, released by the kernel when its holder dies) on the build directory
while torch works in it: whoever holds that lock and still finds torch's ``lock`` file knows its
builder is dead and removes it (:func:`build_directory_lock`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: How the extensions are compiled. OpenMP runs the MNM kernel's batch split on threads; the
#: process's OpenMP runtime is torch's own ``libgomp.so.1``, already loaded, so the extensions
#: share torch's thread pool rather than starting another.
COMPILE_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
#: Environment variable: ``0`` switches every compiled kernel off.
SWITCH_VARIABLE = "MNM_RL_FUSED"
#: The file, in an extension's build directory, that this package's builders ``flock``.
BUILD_LOCK_NAME = "mnm_rl_build.flock"
#: torch's own lock file in a build directory (``torch.utils.file_baton.FileBaton``).
TORCH_LOCK_NAME = "lock"
#: The modules that each define one of the package's extensions, as ``EXTENSION``.
#: Longest builds first, so that a parallel build ends soonest.
EXTENSION_MODULES = (
    "mnm_rl.memory.fused",
    "mnm_rl.agent.policy_step",
    "mnm_rl.agent.action_heads",
    "mnm_rl.agent.grid_linear",
    "mnm_rl.agent.ppo_loss",
    "mnm_rl.agent.gradient_step",
)

#: The one whose extension a trained policy's ``predict`` uses on a CPU (``mnm-rl eval``): the
#: whole rollout step in one call (others only where that cannot be built or is switched off).
PREDICT_MODULES = ("mnm_rl.agent.policy_step",)
#: The one whose extension a policy's ``forward_sequence`` uses (``mnm-rl record``).
SEQUENCE_MODULES = ("mnm_rl.memory.fused",)


def compiled_enabled() -> bool:
    """Whether compiled kernels may be used: not switched off by ``MNM_RL_FUSED=0``."""
    return os.environ.get(SWITCH_VARIABLE, "1") != "0"


@contextlib.contextmanager
def build_directory_lock(build_directory: Path) -> Iterator[None]:
    """Hold this package's exclusive lock on ``build_directory`` (waiting for another process
    that holds it); a torch ``lock`` file found there meanwhile is a dead build's and is removed,
    with a warning. Without ``fcntl`` (Windows), or on a file system that refuses the lock, it
    only makes the directory (torch's own lock file still orders live builds)."""
    build_directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    with open(build_directory / BUILD_LOCK_NAME, "a") as lock_file:
        try:  # released on close, or by the kernel when this process dies
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without locks
            yield
            return
        stale = build_directory / TORCH_LOCK_NAME
        if stale.exists():
            stale.unlink(missing_ok=True)
            warnings.warn(
                f"mnm-rl: removed {stale}, left by a build that did not finish",
                RuntimeWarning,
                stacklevel=3,
            )
        yield


@contextlib.contextmanager
def extension_build_lock(name: str) -> Iterator[Path]:
    """torch's build directory for extension ``name`` (``TORCH_EXTENSIONS_DIR`` or the default
    cache), held under :func:`build_directory_lock`: pass it to ``load``'s ``build_directory``."""
    directory = build_directory(name)
    with build_directory_lock(directory):
        yield directory


def build_directory(name: str) -> Path:
    """torch's build directory for extension ``name`` (made if missing)."""
    # torch's own choice of directory, by a private function: a torch without it makes
    # build_extension fall back to the PyTorch code, with its warning
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def build_extension(name: str, sources: Sequence[Path], what: str) -> ModuleType | None:
    """Compile (or load the cached build of) extension ``name`` from ``sources``; ``None``, with
    a warning naming ``what`` falls back to PyTorch, if it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        with extension_build_lock(name) as build_directory:
            return load(
                name=name,
                sources=[str(source) for source in sources],
                extra_cflags=COMPILE_FLAGS,
                extra_ldflags=LINK_FLAGS,
                build_directory=str(build_directory),
                verbose=False,
            )
    except Exception as error:  # no compiler, no headers: fall back to PyTorch
        first_line = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(
            f"mnm-rl: {what} could not be built ({type(error).__name__}: {first_line}); "
            "using the PyTorch code",
            RuntimeWarning,
            stacklevel=4,  # past LazyExtension.load and load_extension: their caller
        )
        return None


class LazyExtension:
    """An extension compiled (or loaded from the build cache) the first time it is asked for.

    :meth:`load` gives the module, or ``None``: under ``MNM_RL_FUSED=0`` (without building it),
    or when it cannot be built (one warning, and no second attempt). ``on_load`` runs once,
    after the first successful build.
    """

    def __init__(
        self, name: str, sources: Sequence[Path], what: str,
        on_load: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.name, self.sources, self.what, self.on_load = name, list(sources), what, on_load
        self.module: ModuleType | None = None
        self.failed = False

    def load(self) -> ModuleType | None:
        """The compiled module; ``None`` if switched off or if it cannot be built."""
        if not compiled_enabled():
            return None
        if self.module is None and not self.failed:
            self.module = build_extension(self.name, self.sources, self.what)
            self.failed = self.module is None
            if self.module is not None and self.on_load is not None:
                self.on_load()
        return self.module


def package_extensions(modules: Sequence[str] | None = None) -> dict[str, LazyExtension]:
    """The ``EXTENSION`` of each module named (by default :data:`EXTENSION_MODULES`), by module
    name, importing them."""
    names = EXTENSION_MODULES if modules is None else modules
    return {name: importlib.import_module(name).EXTENSION for name in names}


def is_built(extension: LazyExtension) -> bool:
    """Whether ``extension``'s library is in its build directory and ninja, asked there, has
    nothing left to do (its sources and the build file unchanged since). A build file that
    torch will rewrite first (other sources, other flags) is not seen: loading then rebuilds."""
    ninja = shutil.which("ninja")
    try:
        directory = build_directory(extension.name)
    except ImportError:  # a torch without it: loading falls back to the PyTorch code
        return False
    library = directory / f"{extension.name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    if ninja is None or not library.exists():
        return False
    dry_run = subprocess.run(
        [ninja, "-C", str(directory), "-n"], capture_output=True, text=True, check=False
    )
    return dry_run.returncode == 0 and "no work to do" in dry_run.stdout


def unbuilt_modules(modules: Sequence[str] | None = None) -> list[str]:
    """Those of ``modules`` (by default :data:`EXTENSION_MODULES`) whose extension is not built
    yet; none under ``MNM_RL_FUSED=0``."""
    if not compiled_enabled():
        return []
    return [name for name, ext in package_extensions(modules).items() if not is_built(ext)]


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - not on Linux


@dataclass(frozen=True)
class BuildResult:
    """How building one module's extension went: ``error`` is the build's warning, or empty."""

    module: str
    seconds: float
    error: str = ""


#: What each build process runs: import the module named and build its extension.
_BUILD_ONE = (
    "import importlib, sys\n"
    "module = importlib.import_module(sys.argv[1])\n"
    "sys.exit(0 if module.EXTENSION.load() is not None else 1)\n"
)


def build_in_parallel(modules: Sequence[str], jobs: int | None = None) -> list[BuildResult]:
    """Build the extensions of ``modules``, each in a process of its own, ``jobs`` at a time
    (by default as many as this process may use CPUs: a build's compiler takes up to 1.7 GB),
    and wait for them all. Each process sees this one's import path
    and environment (``TORCH_EXTENSIONS_DIR``); this process then loads the builds from the
    cache. A module that cannot be built gets the warning its build gave as ``error``."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be positive, got {jobs}")
    cpus = usable_cpus()
    jobs = min(jobs or cpus, max(1, len(modules)))
    # a build of several sources runs its compilers in parallel too (torch's MAX_JOBS, by
    # default the CPU count): no more compilers at once than CPUs, each taking up to 1.7 GB
    compilers = os.environ.get("MAX_JOBS") or str(max(1, cpus - jobs + 1))
    environment = {
        **os.environ,
        "MAX_JOBS": compilers,
        "PYTHONPATH": os.pathsep.join(p or os.curdir for p in sys.path),
    }
    waiting, running, results = list(modules), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                name = waiting.pop(0)
                stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing blocks on it
                process = subprocess.Popen(  # a session of its own: its compilers with it
                    [sys.executable, "-c", _BUILD_ONE, name],
                    env=environment, stdout=subprocess.DEVNULL, stderr=stderr,
                    start_new_session=True,
                )  # fmt: skip
                running[name] = (process, stderr, time.perf_counter())
            time.sleep(0.05)
            for name, (process, stderr, start) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                with stderr:
                    stderr.seek(0)
                    said = stderr.read()
                error = "" if process.returncode == 0 else _build_error(said, process.returncode)
                results[name] = BuildResult(name, time.perf_counter() - start, error)
    finally:  # interrupted (Ctrl-C): no build outlives the call (the next build of that
        # extension removes what it left). SIGTERM to each build's session: its Python ends, and
        # ninja, which runs each compiler in a process group of its own, stops them as it ends.
        for process, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process, stderr, _ in running.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGTERM ignored
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            stderr.close()
    return [results[name] for name in modules]


def _build_error(stderr: str, returncode: int) -> str:
    """The line of a failed build process's output that says why (its warning), else its last
    line, else its exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if "mnm-rl:" in line]
    if said:
        return said[-1][said[-1].index("mnm-rl:") :]
    return lines[-1] if lines else f"the build process exited with status {returncode}"
