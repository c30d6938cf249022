"""The lazy extension loader both compiled kernels share (``mnm_rl.native``)."""

from __future__ import annotations

import types

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
