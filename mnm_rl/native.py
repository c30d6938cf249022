"""Building the package's C++ extensions with ``torch.utils.cpp_extension`` on first use.

Five extensions: the memory's sequence kernels (:mod:`mnm_rl.memory.fused`), the agent's
symbol-grid encoder (:mod:`mnm_rl.agent.grid_linear`), its action heads for a rollout step
(:mod:`mnm_rl.agent.action_heads`), a rollout step of the whole policy
(:mod:`mnm_rl.agent.policy_step`, which compiles the MNM kernel's source as well) and PPO's loss
(:mod:`mnm_rl.agent.ppo_loss`). Each compiles the first time it is needed
(cached under ``~/.cache/torch_extensions``, or ``TORCH_EXTENSIONS_DIR``). Without a C++
compiler, or with ``MNM_RL_FUSED=0`` in the environment, the PyTorch code runs instead.

A build that was killed (Ctrl-C, a timeout) leaves torch's ``lock`` file in its build directory,
and every later ``load`` of that extension would wait for it forever. Builds here therefore hold
an OS file lock (``flock``, released by the kernel when its holder dies) on the build directory
while torch works in it: whoever holds that lock and still finds torch's ``lock`` file knows its
builder is dead and removes it (:func:`build_directory_lock`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
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
    # torch's own choice of directory, by a private function: a torch without it makes
    # build_extension fall back to the PyTorch code, with its warning
    from torch.utils.cpp_extension import _get_build_directory

    directory = Path(_get_build_directory(name, verbose=False))
    with build_directory_lock(directory):
        yield directory


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
