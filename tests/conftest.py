"""Shared fixtures: ``bn_path`` runs a test module once through bnlab's fused CPU kernels and once
through the composite torch path (``bnlab.norm.kernels``), so every oracle holds on both."""
from __future__ import annotations

import pytest

from bnlab.norm import kernels


@pytest.fixture(scope="module", params=["kernels", "composite"])
def bn_path(request):
    if request.param == "kernels":
        try:
            with kernels.use_mode("on"):
                kernels.available()
        except RuntimeError as exc:  # no C++ compiler on this machine: only the composite path exists
            pytest.skip(str(exc))
    with kernels.use_mode("on" if request.param == "kernels" else "off"):
        yield request.param
