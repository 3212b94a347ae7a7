"""Fixtures shared by the compression tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def failed_kernel_build(monkeypatch):
    """effinfer's CPU kernels as on a machine without a C++ compiler: the next request builds, and that fails."""
    import torch.utils.cpp_extension

    import effinfer.kernels as kernels

    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_built", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
