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
