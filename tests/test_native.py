"""The lazy extension loader both compiled kernels share (``mnm_rl.native``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

from mnm_rl import native


def test_it_builds_once_and_runs_on_load_once(monkeypatch):
    builds, loaded = [], []
    module = types.ModuleType("fake_kernel")
    monkeypatch.setattr(native, "build_extension", lambda *args: builds.append(args) or module)
    extension = native.LazyExtension("fake", [], "a fake kernel", on_load=lambda: loaded.append(1))
    assert extension.load() is module
    assert extension.load() is module
    assert builds == [("fake", [], "a fake kernel")]
    assert loaded == [1]


def test_a_failed_build_is_not_retried(monkeypatch):
    builds = []
    monkeypatch.setattr(native, "build_extension", lambda *args: builds.append(args) or None)
    extension = native.LazyExtension("fake", [], "a fake kernel", on_load=lambda: pytest.fail())
    assert extension.load() is None
    assert extension.load() is None
    assert len(builds) == 1 and extension.failed


def test_switched_off_it_is_not_built(monkeypatch):
    monkeypatch.setenv("MNM_RL_FUSED", "0")
    monkeypatch.setattr(native, "build_extension", lambda *args: pytest.fail("built"))
    assert native.LazyExtension("fake", [], "a fake kernel").load() is None


def test_a_dead_builds_torch_lock_is_removed(tmp_path):
    (tmp_path / native.TORCH_LOCK_NAME).touch()
    with pytest.warns(RuntimeWarning, match="did not finish"):
        with native.build_directory_lock(tmp_path):
            assert not (tmp_path / native.TORCH_LOCK_NAME).exists()


def test_it_waits_for_a_live_builder_and_leaves_its_lock_alone(tmp_path):
    # The child holds the flock with torch's lock in place (a build in progress), then finishes.
    child = textwrap.dedent(
        f"""
        import fcntl, pathlib, time
        directory = pathlib.Path({str(tmp_path)!r})
        with open(directory / {native.BUILD_LOCK_NAME!r}, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (directory / {native.TORCH_LOCK_NAME!r}).touch()
            (directory / "ready").touch()
            time.sleep(0.5)
            (directory / {native.TORCH_LOCK_NAME!r}).unlink()
            (directory / "finished").touch()
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child])
    try:
        while not (tmp_path / "ready").exists():
            assert process.poll() is None, "the child died"
            time.sleep(0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stale lock to report
            with native.build_directory_lock(tmp_path):
                assert (tmp_path / "finished").exists()
    finally:
        assert process.wait(timeout=60) == 0


def test_an_extension_loads_past_a_killed_builds_lock():
    from torch.utils.cpp_extension import _get_build_directory

    from mnm_rl.agent import action_heads

    directory = Path(_get_build_directory(action_heads.EXTENSION.name, verbose=False))
    stale = directory / native.TORCH_LOCK_NAME
    stale.touch()
    try:
        load = "from mnm_rl.agent import action_heads; assert action_heads.EXTENSION.load()"
        environment = {**os.environ, native.SWITCH_VARIABLE: "1"}
        finished = subprocess.run(
            [sys.executable, "-c", load], env=environment, timeout=600, capture_output=True,
            text=True,
        )  # fmt: skip
        assert finished.returncode == 0, finished.stderr
        assert "did not finish" in finished.stderr
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_a_file_system_that_refuses_the_lock_still_builds(tmp_path, monkeypatch):
    """flock failing (a network file system without locks): the build goes on without this
    package's lock, and a torch lock file there is left alone (nothing tells a dead build's
    from a live one then)."""
    import fcntl

    def refuse(*args):
        raise OSError("no locks here")

    monkeypatch.setattr(fcntl, "flock", refuse)
    (tmp_path / native.TORCH_LOCK_NAME).touch()
    entered = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with native.build_directory_lock(tmp_path):
            entered.append(True)
    assert entered and (tmp_path / native.TORCH_LOCK_NAME).exists()


# ---------------------------------------------------------------- building several at once
TINY = ["tiny_kernel_a", "tiny_kernel_b", "broken_kernel"]


def test_the_package_lists_every_extension_it_defines():
    import importlib
    import pkgutil

    import mnm_rl

    defined = set()
    for info in pkgutil.walk_packages(mnm_rl.__path__, "mnm_rl."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        module = importlib.import_module(info.name)
        defined |= {v.name for v in vars(module).values() if isinstance(v, native.LazyExtension)}
    listed = {extension.name for extension in native.package_extensions().values()}
    assert listed == defined and len(listed) == len(native.EXTENSION_MODULES)


def test_a_parallel_build_builds_what_is_not_built_and_reports_what_fails(with_tiny_extensions):
    import importlib

    assert native.unbuilt_modules(TINY) == TINY
    results = native.build_in_parallel(TINY, jobs=2)
    assert [result.module for result in results] == TINY
    assert [bool(result.error) for result in results] == [False, False, True]
    assert results[2].error.startswith("mnm-rl: the test's broken_kernel could not be built")
    assert all(result.seconds > 0 for result in results)
    assert native.unbuilt_modules(TINY) == ["broken_kernel"]
    assert importlib.import_module("tiny_kernel_a").EXTENSION.load().answer() == 42

    # a changed source: ninja has work to do again, so it is not built
    source = with_tiny_extensions / "tiny_kernel_b.cpp"
    source.write_text(source.read_text() + f"// changed at {time.time()}\n")
    assert native.unbuilt_modules(TINY[:2]) == ["tiny_kernel_b"]
    assert native.build_in_parallel(["tiny_kernel_b"])[0].error == ""
    assert native.unbuilt_modules(TINY[:2]) == []


def test_switched_off_nothing_is_left_to_build(monkeypatch):
    monkeypatch.setenv(native.SWITCH_VARIABLE, "0")
    assert native.unbuilt_modules() == []


def test_a_parallel_build_needs_a_positive_job_count():
    with pytest.raises(ValueError, match="jobs must be positive"):
        native.build_in_parallel(["mnm_rl.agent.ppo_loss"], jobs=0)
    assert native.build_in_parallel([]) == []


def test_the_build_command_reports_each_kernel_and_fails_on_one_not_built(
    with_tiny_extensions, monkeypatch, capsys
):
    from mnm_rl import cli

    monkeypatch.setattr(native, "EXTENSION_MODULES", tuple(TINY))
    status = cli.main(["build", "--jobs", "1"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "the test's broken_kernel  not built: mnm-rl: the test's broken_kernel" in out
    for module in TINY[:2]:
        assert f"the test's {module}  built" in out  # built now, or already
    monkeypatch.setattr(native, "EXTENSION_MODULES", tuple(TINY[:2]))
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert out.count("built already") == 2 and "compiling" not in out
    monkeypatch.setenv(native.SWITCH_VARIABLE, "0")
    assert cli.main(["build"]) == 0
    assert "switched off (MNM_RL_FUSED=0)" in capsys.readouterr().out


def test_training_on_a_cpu_builds_the_missing_kernels_first(with_tiny_extensions, monkeypatch,
                                                           capsys):  # fmt: skip
    from mnm_rl import cli

    monkeypatch.setattr(native, "EXTENSION_MODULES", ("tiny_kernel_a",))
    source = with_tiny_extensions / "tiny_kernel_a.cpp"
    source.write_text(source.read_text() + f"// changed at {time.time()}\n")  # to build again
    with monkeypatch.context() as gpu:  # kernels a run on the GPU does not use
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        cli._build_kernels("cuda")
        cli._build_kernels("auto")
    assert capsys.readouterr().out == "" and native.unbuilt_modules() == ["tiny_kernel_a"]
    cli._build_kernels("cpu")
    out = capsys.readouterr().out
    assert out.startswith("mnm-rl: compiling 1 kernel (first use; cached for later runs)")
    assert "mnm-rl: compiled in " in out and native.unbuilt_modules() == []
    cli._build_kernels("cpu")  # nothing left to build: nothing said
    assert capsys.readouterr().out == ""


def test_an_interrupted_parallel_build_leaves_no_process_behind(with_tiny_extensions, monkeypatch):
    """Ctrl-C while the builds run: each build's whole session (its Python, ninja and the
    compiler) is killed before the interrupt goes on."""
    source = with_tiny_extensions / "tiny_kernel_a.cpp"
    source.write_text(source.read_text() + f"// changed at {time.time()}\n")  # to build again
    started, real_popen, real_sleep = [], subprocess.Popen, time.sleep

    def recording(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    interrupted = []

    def interrupt_once_compiling(seconds):
        if not interrupted and _processes_naming(source):  # the compiler of that source runs
            interrupted.append(True)
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(native.subprocess, "Popen", recording)
    monkeypatch.setattr(native.time, "sleep", interrupt_once_compiling)
    with pytest.raises(KeyboardInterrupt):
        native.build_in_parallel(["tiny_kernel_a"])
    monkeypatch.undo()
    (build,) = started
    assert build.returncode is not None  # killed and reaped
    for _ in range(10):  # killed ones go at once (reaped by init); a compile runs for seconds
        if not _processes_naming(source):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"still running: {_processes_naming(source)}")


def _processes_naming(path: Path) -> list[str]:
    """The command lines of live processes that name ``path`` (a compiler of that source)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # ended meanwhile
            continue
        if state != "Z" and any(str(path).encode() in word for word in words):
            found.append(" ".join(w.decode(errors="replace") for w in words))
    return found
