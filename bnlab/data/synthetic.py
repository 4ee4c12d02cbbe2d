"""Synthetic regression data for Santurkar et al.'s deep linear network (Santurkar et al. 2018, App. A.1).

x ~ N(0, I_dim), A with i.i.d. N(0, 1) entries, y = A x for every sample, i.e. Y = X A^T.
"""

from __future__ import annotations

import torch

from bnlab.errors import ConfigError

__all__ = ["make_gaussian_regression"]


def make_gaussian_regression(
    n: int = 1000, dim: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (x (n, dim), y (n, dim), A (dim, dim)) with y = x @ A.T.

    A is drawn first, then x, from one generator seeded with ``seed``, always in float64 and only
    then cast to ``dtype``: the float32 problem is the float64 problem rounded, not a different
    random draw, so results at the two precisions can be compared.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"make_gaussian_regression: n must be a positive int, got {n!r}.")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"make_gaussian_regression: dim must be a positive int, got {dim!r}.")
    if not dtype.is_floating_point:
        raise ConfigError(f"make_gaussian_regression: dtype must be floating point, got {dtype}.")
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)  # (dim, dim)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)  # (n, dim)
    y = x @ a.T  # (n, dim)
    return x.to(dtype).contiguous(), y.to(dtype).contiguous(), a.to(dtype).contiguous()
