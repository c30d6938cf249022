"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys

import pytest


def pytest_sessionstart(session):
    """Compile the package's kernels that are not built yet, several at once, before the first
    tests that need them would compile them one after another (a kernel that cannot be built
    fails those tests as before)."""
    from mnm_rl import native

    native.build_in_parallel(native.unbuilt_modules())


@pytest.fixture
def no_compiler(monkeypatch):
    """``torch.utils.cpp_extension.load`` fails as it does where there is no C++ compiler."""
    import torch.utils.cpp_extension

    def fail(**kwargs):
        raise OSError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)


TINY_SOURCE = """
#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""
TINY_MODULE = """
from pathlib import Path
from mnm_rl import native
EXTENSION = native.LazyExtension({name!r}, [Path(__file__).with_name({source!r})], {what!r})
"""


@pytest.fixture(scope="module")
def tiny_extensions(tmp_path_factory):
    """Modules ``tiny_kernel_a``/``_b`` (an extension of one small function each) and
    ``broken_kernel`` (a source that does not compile), importable, and a build cache of their
    own: ``(folder, cache)``."""
    folder = tmp_path_factory.mktemp("tiny_kernels")
    for module, source in (("tiny_kernel_a", TINY_SOURCE), ("tiny_kernel_b", TINY_SOURCE),
                           ("broken_kernel", "this is not C++")):  # fmt: skip
        (folder / f"{module}.cpp").write_text(source)
        text = TINY_MODULE.format(name=f"mnm_rl_test_{module}", source=f"{module}.cpp",
                                  what=f"the test's {module}")  # fmt: skip
        (folder / f"{module}.py").write_text(text)
    return folder, tmp_path_factory.mktemp("tiny_cache")


@pytest.fixture
def with_tiny_extensions(tiny_extensions, monkeypatch):
    """The tiny extensions' modules importable (and imported afresh in each test), their cache
    as ``TORCH_EXTENSIONS_DIR``, compiled kernels on; gives their folder."""
    folder, cache = tiny_extensions
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setenv("MNM_RL_FUSED", "1")
    yield folder
    for module in ("tiny_kernel_a", "tiny_kernel_b", "broken_kernel"):
        sys.modules.pop(module, None)
