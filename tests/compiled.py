"""The compiled extensions in tests: built, or the test fails (CI has a C++ compiler)."""

from __future__ import annotations

from types import ModuleType

from mnm_rl import native


def built(extension: native.LazyExtension) -> ModuleType:
    """``extension``'s compiled module; an assertion error if it cannot be built."""
    module = extension.load()
    assert module is not None, f"{extension.what} did not build"
    return module
