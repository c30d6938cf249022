"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_compiler(monkeypatch):
    """``torch.utils.cpp_extension.load`` fails as it does where there is no C++ compiler."""
    import torch.utils.cpp_extension

    def fail(**kwargs):
        raise OSError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
