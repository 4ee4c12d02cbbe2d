"""NumPy float64 reference of batch normalization, written to be read next to the paper.

This is the oracle every faster implementation in bnlab is tested against, so it favours the
paper's notation over speed:

* :func:`forward` is Ioffe & Szegedy 2015, Algorithm 1.
* :func:`backward_paper` is the paper's six backprop formulas exactly as printed (A.3), including the
  term of dl/dmu_B that is identically zero; :func:`backward_compact` is the simplified form
  (A.3 "compact", the same identity as Santurkar et al. Fact C.1).
* :func:`population_statistics` and :func:`inference` are Algorithm 2, steps 10-11 (A.4): the mean of
  the batch means, ``m/(m-1)`` times the mean of the batch variances, then a fixed affine map.
* :func:`ema_update` is PyTorch's moving-average convention (C.3), used as the oracle for the
  running statistics of the modules.

Convolutional inputs (N, C, *spatial) are normalized per channel over N and all spatial positions
(A.5: one feature map is one "activation", effective mini-batch m' = m*p*q). Internally every
function views the input as a matrix (m', C) whose column k is the mini-batch B of activation k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Cache",
    "to_rows",
    "from_rows",
    "forward",
    "backward_paper",
    "backward_compact",
    "population_statistics",
    "inference",
    "inference_affine",
    "ema_update",
]


def to_rows(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N*prod(spatial), C): one column per normalized activation (A.5)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"expected an input of shape (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    return np.moveaxis(x, 1, -1).reshape(-1, c)


def from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_rows` for an input of the given (N, C, *spatial) shape."""
    n, c, *spatial = shape
    return np.moveaxis(rows.reshape(n, *spatial, c), -1, 1)


@dataclass(frozen=True)
class Cache:
    """What Algorithm 1 computes on the way, kept for the backward pass (all (m', C) or (C,))."""

    shape: tuple[int, ...]
    x: np.ndarray  # x_i, (m', C)
    mu: np.ndarray  # mu_B, (C,)
    var: np.ndarray  # sigma2_B, biased (divide by m'), (C,)
    x_hat: np.ndarray  # (m', C)
    gamma: np.ndarray  # (C,)
    eps: float


def forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, Cache]:
    """Algorithm 1 (BN transform) over a mini-batch; returns y and the cache for the backward."""
    rows = to_rows(x)
    m = rows.shape[0]
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    mu = rows.sum(axis=0) / m  # mini-batch mean
    var = ((rows - mu) ** 2).sum(axis=0) / m  # mini-batch variance (biased)
    x_hat = (rows - mu) / np.sqrt(var + eps)  # normalize
    y = gamma * x_hat + beta  # scale and shift
    cache = Cache(tuple(np.shape(x)), rows, mu, var, x_hat, gamma, eps)
    return from_rows(y, cache.shape), cache


def backward_paper(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The six chain-rule formulas of Ioffe & Szegedy Sec. 3 "before simplification" (A.3).

    Returns (dl/dx, dl/dgamma, dl/dbeta).
    """
    g = to_rows(dy)
    x, mu, var, x_hat, gamma, eps = cache.x, cache.mu, cache.var, cache.x_hat, cache.gamma, cache.eps
    m = x.shape[0]
    dx_hat = g * gamma
    dvar = (dx_hat * (x - mu) * -0.5 * (var + eps) ** -1.5).sum(axis=0)
    # The second term is exactly zero (sum_i (x_i - mu_B) = 0); kept because the paper prints it.
    dmu = (dx_hat * (-1.0 / np.sqrt(var + eps))).sum(axis=0) + dvar * (-2.0 * (x - mu)).sum(axis=0) / m
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
    dgamma = (g * x_hat).sum(axis=0)
    dbeta = g.sum(axis=0)
    return from_rows(dx, cache.shape), dgamma, dbeta


def backward_compact(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simplified backward (exact including eps), s = sqrt(sigma2_B + eps):

    dl/dx_i = (1/(m s)) (m dl/dx_hat_i - sum_j dl/dx_hat_j - x_hat_i sum_j dl/dx_hat_j x_hat_j)
    """
    g = to_rows(dy)
    x_hat, gamma = cache.x_hat, cache.gamma
    m = x_hat.shape[0]
    s = np.sqrt(cache.var + cache.eps)
    dx_hat = g * gamma
    dx = (m * dx_hat - dx_hat.sum(axis=0) - x_hat * (dx_hat * x_hat).sum(axis=0)) / (m * s)
    return from_rows(dx, cache.shape), (g * x_hat).sum(axis=0), g.sum(axis=0)


def population_statistics(batches: list[np.ndarray] | tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2, step 10: E[x] = E_B[mu_B] and Var[x] = m/(m-1) * E_B[sigma2_B].

    All batches must have the same size m (the paper's assumption); m counts spatial positions
    for convolutional inputs (m' = m*p*q).
    """
    if len(batches) == 0:
        raise ValueError("population_statistics needs at least one mini-batch")
    rows = [to_rows(b) for b in batches]
    m = rows[0].shape[0]
    if any(r.shape[0] != m for r in rows):
        raise ValueError("Algorithm 2 averages batches of one size m; got batches of different sizes")
    if m < 2:
        raise ValueError("the unbiased variance m/(m-1) needs mini-batches of at least 2 values per channel")
    mus = np.stack([r.mean(axis=0) for r in rows])
    variances = np.stack([((r - r.mean(axis=0)) ** 2).mean(axis=0) for r in rows])
    return mus.mean(axis=0), m / (m - 1) * variances.mean(axis=0)


def inference_affine(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2, step 11: the inference BN is y = a*x + b with a = gamma/sqrt(Var+eps),
    b = beta - gamma*E[x]/sqrt(Var+eps). Returns (a, b), one pair per channel."""
    a = np.asarray(gamma, dtype=np.float64) / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    b = np.asarray(beta, dtype=np.float64) - a * np.asarray(mean, dtype=np.float64)
    return a, b


def inference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Inference-mode BN: x_hat = (x - E[x]) / sqrt(Var[x] + eps), y = gamma x_hat + beta."""
    rows = to_rows(x)
    y = np.asarray(gamma) * (rows - mean) / np.sqrt(np.asarray(var) + eps) + np.asarray(beta)
    return from_rows(y, tuple(np.shape(x)))


def ema_update(running_mean: np.ndarray, running_var: np.ndarray, x: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's running-statistics update (torch.nn's convention) for one training batch x:
    running = (1 - factor) * running + factor * batch, with the *unbiased* batch variance.
    ``factor`` is the momentum, or 1/num_batches_tracked for the cumulative average (momentum=None).
    """
    rows = to_rows(x)
    m = rows.shape[0]
    mu = rows.mean(axis=0)
    unbiased = ((rows - mu) ** 2).sum(axis=0) / (m - 1)
    return (1 - factor) * running_mean + factor * mu, (1 - factor) * running_var + factor * unbiased
