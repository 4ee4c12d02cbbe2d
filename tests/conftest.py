"""Shared fixtures: ``bn_path`` runs a test module once through bnlab's fused CPU kernels and once
through the composite torch path (``bnlab.norm.kernels``), so every oracle holds on both."""
from __future__ import annotations

import os

import pytest

from bnlab.norm import kernels


def require_kernels() -> None:
    """Build/load the fused kernels; without a compiler, skip on a user's machine but fail in CI,
    where scripts/install.sh installs g++ and ninja (so a kernel test can never silently vanish)."""
    try:
        with kernels.use_mode("on"):
            kernels.available()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the fused kernels must build in CI: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=["kernels", "composite"])
def bn_path(request):
    if request.param == "kernels":
        require_kernels()
    with kernels.use_mode("on" if request.param == "kernels" else "off"):
        yield request.param
