"""The Hessian of the loss on one batch: top eigenvalues by Lanczos, trace by Hutchinson, both on
Hessian-vector products by double backward (Santurkar, Tsipras, Ilyas & Madry 2018, Sec. 3.1 and
4.2: the smoothness BN is claimed to improve is a bound on these eigenvalues).

Hessian-vector products. H v = ∇_w <∇_w L(w), v> (Pearlmutter 1994): the gradient is computed once
with its graph, and every product is one more backward pass through that graph. This is exact
(up to rounding) through training-mode BN. ``torch.func.hessian`` and ``jacrev(jacrev(f))`` are
not: in torch 2.13 their vmap-based Hessians of a network with training-mode BN (torch.nn's and
bnlab's alike) have wrong, non-symmetric entries, e.g. a nonzero cross term between a convolution's
bias and the following BN's weight, which is exactly 0 because BN removes that bias (see
docs/instruments.md; tested in tests/test_instruments_hessian.py).

Top eigenvalues. Lanczos iteration with full reorthogonalization from a seeded Gaussian start
vector drawn from the instrument's own ``torch.Generator``; after every iteration the Ritz values of
the tridiagonal matrix are computed, and the wanted k (algebraically largest, or largest in
magnitude) count as converged when their residual norms |β_j s_j| are at most ``tol`` times
max(|θ|, max Ritz magnitude * 1e-3). It stops when they converge, when an invariant subspace is
found (exact; with fewer than k Ritz values it continues from a fresh random direction orthogonal to
that subspace), after ``max_iter`` iterations, or at the number of parameters. Like every
single-vector Krylov method it finds one copy of a repeated eigenvalue: for H = diag(5, 5, 3) and
k = 2 it returns (5, 3); use it for the top of the spectrum, not for multiplicities.

Trace. Hutchinson's estimator tr(H) ≈ mean_i v_iᵀ H v_i with Rademacher v_i (the unbiased estimator
of least variance among i.i.d. choices: Var = 2 Σ_{i≠j} H_ij²), reported with its standard error
s / sqrt(n) and a 95 % Student-t confidence interval.

Both take an explicit ``bn_mode`` (``"batch"`` default: the Hessian of the training objective) and
never change the model. Cost, counted in ``result.cost`` and converted to passes by a
``CostModel`` (bnlab.measure.cost): 1 forward + 1 backward that keeps its graph (about 1.5 passes
together) + 1 double backward per iteration or sample (generic constant 3 passes: 2.3-3.3 measured
on a conv net with BN, 1.6-2.1 on a small MLP, so pass ``cost_model=calibrate_cost(...)`` for a
statement within 25 % on your model) + the parameter-length vector work (conversions, and for
Lanczos its orthogonalization, 4(j+1) dot products/axpys in iteration j; negligible unless a pass
takes about a millisecond).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.measure._objective import LossFn, Objective, flat, unflat
from bnlab.measure.cost import Cost, CostModel
from bnlab.measure._util import BnMode, check_choice

__all__ = ["HessianEigenResult", "HessianTraceResult", "hessian_eigenvalues", "hessian_trace",
           "hessian_vector_product"]

EIG_DEFINITION = "top Hessian eigenvalues by Lanczos on double-backward Hessian-vector products (Santurkar et al. 2018, Sec. 3.1, 4.2)"
TRACE_DEFINITION = "Hutchinson's trace estimator, Rademacher probes, on double-backward Hessian-vector products"


@dataclasses.dataclass(frozen=True)
class HessianEigenResult:
    """``eigenvalues`` (k,) float64, largest first (by value, or by magnitude with
    which="magnitude"); ``residuals`` (k,) the Lanczos residual norms ||H y - θ y|| of their Ritz
    vectors; ``iterations`` = Hessian-vector products used."""

    eigenvalues: np.ndarray
    residuals: np.ndarray
    iterations: int
    converged: bool
    which: str
    tol: float
    seed: int
    bn_mode: str
    batch_size: int
    n_params: int
    cost: Cost
    definition: str = EIG_DEFINITION

    def summary(self) -> dict[str, float]:
        out = {f"eig{i}": float(v) for i, v in enumerate(self.eigenvalues)}
        out.update(iterations=float(self.iterations), converged=float(self.converged))
        return out


@dataclasses.dataclass(frozen=True)
class HessianTraceResult:
    """``trace`` the Hutchinson estimate, ``stderr`` its standard error (sample std / sqrt(n)),
    ``ci95`` a 95 % Student-t interval, ``values`` (n,) the per-probe v^T H v."""

    trace: float
    stderr: float
    ci95: tuple[float, float]
    samples: int
    values: np.ndarray
    seed: int
    bn_mode: str
    batch_size: int
    n_params: int
    cost: Cost
    definition: str = TRACE_DEFINITION

    def summary(self) -> dict[str, float]:
        return {"trace": self.trace, "trace_stderr": self.stderr, "trace_ci95_low": self.ci95[0],
                "trace_ci95_high": self.ci95[1]}


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    v: Sequence[Tensor] | Tensor,
    *,
    bn_mode: BnMode = "batch",
    params: Sequence[str] | None = None,
    seed: int | None = 0,
) -> list[Tensor]:
    """H v at the model's current parameters; ``v`` is a list shaped like the parameters (``params``
    order, default all trainable) or one flat vector. Returns a list shaped like the parameters.
    Cost: 1 forward + 1 graph-keeping backward + 1 double backward."""
    obj = Objective(model, loss_fn, batch, bn_mode=bn_mode, params=params, seed=seed)
    if isinstance(v, Tensor):
        if v.numel() != obj.numel:
            raise ShapeError(f"v has {v.numel()} entries but the parameters have {obj.numel}")
        v = unflat(v.reshape(-1), obj.w0)
    elif len(v) != len(obj.w0) or any(a.shape != b.shape for a, b in zip(v, obj.w0)):
        raise ShapeError(f"v must be shaped like the parameters {[tuple(t.shape) for t in obj.w0]}")
    with obj.session():
        leaves, grads = obj.gradient_graph()
        return obj.hvp(leaves, grads, v)


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = np.argsort(-theta) if which == "largest" else np.argsort(-np.abs(theta))
    return order[:k]


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    *,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    bn_mode: BnMode = "batch",
    params: Sequence[str] | None = None,
    cost_model: CostModel | None = None,
) -> HessianEigenResult:
    """The ``k`` top eigenvalues of the loss Hessian on ``batch`` (module docstring).

    Args:
        which: ``"largest"`` (algebraic, the "top" eigenvalue) or ``"magnitude"``.
        tol: relative residual at which a Ritz value counts as converged.
        max_iter: most Hessian-vector products (Lanczos iterations).
        seed: seeds the start vector (the instrument's own generator) and the global RNG of the passes.
        params: parameter names (default all trainable); the Hessian is over their flattening.
        cost_model: converts the counted work to passes in ``result.cost`` (default generic; see
            ``calibrate_cost``).

    Cost: 1 forward + 1 graph-keeping backward + ``iterations`` double backward passes, plus per
    iteration j 10 parameter-length vector operations and 1 + 4(j+1) dot products/axpys with the
    Lanczos basis (``result.cost``).
    """
    k = _check_int("k", k, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    check_choice("which", which, ("largest", "magnitude"))
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ConfigError(f"tol must be a positive number (relative residual), got {tol!r}")
    obj = Objective(model, loss_fn, batch, bn_mode=bn_mode, params=params, seed=seed, cost_model=cost_model)
    n = obj.numel
    if k > n:
        raise ConfigError(f"k={k} exceeds the number of parameters ({n})")
    device = obj.w0[0].device
    gen = torch.Generator().manual_seed(int(seed))
    m = min(max_iter, n)
    basis = torch.empty(m + 1, n, dtype=torch.float64, device=device)  # Lanczos vectors, preallocated
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta = np.zeros(0)
    resid = np.zeros(0)
    converged = False
    with obj.session():
        leaves, grads = obj.gradient_graph()
        for j in range(m):
            w = flat(obj.hvp(leaves, grads, unflat(basis[j], obj.w0)))
            if j > 0:
                w -= betas[j - 1] * basis[j - 1]
            alpha = float(w @ basis[j])
            w -= alpha * basis[j]
            Q = basis[:j + 1]  # (j+1, n)
            for _ in range(2):  # full reorthogonalization, twice is enough (Kahan-Parlett)
                w -= Q.T @ (Q @ w)
            beta = float(w.norm())
            # vector work of this iteration besides the product (whose conversions calibrate_cost times
            # with it): 10 whole-vector operations (the recurrence's two scaled vectors and subtractions,
            # the Gram-Schmidt results and subtractions, the scaled new basis vector and its copy) and
            # 1 + 4(j+1) dots/axpys with the basis (alpha; two classical Gram-Schmidt passes)
            obj.cost.vector_ops += 10
            obj.cost.basis_dots += 1 + 4 * (j + 1)
            alphas.append(alpha)
            T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
            ritz, vecs = np.linalg.eigh(T)
            sel = _wanted(ritz, k, which)
            theta = ritz[sel]
            resid = np.abs(beta * vecs[-1, sel])
            scale = max(np.abs(ritz).max(), np.finfo(np.float64).tiny)
            done_subspace = beta <= 1e-12 * scale
            if len(alphas) >= k and (done_subspace or np.all(resid <= tol * np.maximum(np.abs(theta), 1e-3 * scale))):
                converged = True
                break
            if j + 1 == n:
                converged = True  # the whole space: T is similar to H
                break
            if done_subspace:
                # An invariant subspace with fewer than k Ritz values (e.g. H = cI): go on from a fresh
                # random direction orthogonal to it; T becomes block diagonal (a zero off-diagonal).
                q = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
                for _ in range(2):
                    q -= Q.T @ (Q @ q)
                obj.cost.basis_dots += 4 * (j + 1)
                betas.append(0.0)
                basis[j + 1] = q / q.norm()
                continue
            betas.append(beta)
            basis[j + 1] = w / beta
    return HessianEigenResult(
        eigenvalues=np.asarray(theta, dtype=np.float64), residuals=np.asarray(resid, dtype=np.float64),
        iterations=len(alphas), converged=bool(converged), which=which, tol=float(tol), seed=int(seed),
        bn_mode=bn_mode, batch_size=obj.batch_size, n_params=n, cost=obj.cost,
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    *,
    samples: int = 100,
    seed: int = 0,
    bn_mode: BnMode = "batch",
    params: Sequence[str] | None = None,
    cost_model: CostModel | None = None,
) -> HessianTraceResult:
    """Hutchinson estimate of tr(H) with its standard error (module docstring).

    ``samples`` Rademacher probes (at least 2, for a standard error) drawn from the instrument's
    own generator seeded with ``seed``. Cost: 1 forward + 1 graph-keeping backward + ``samples``
    double backward passes, plus 3 parameter-length vector operations and 1 dot product per sample.
    """
    samples = _check_int("samples", samples, 2)
    obj = Objective(model, loss_fn, batch, bn_mode=bn_mode, params=params, seed=seed, cost_model=cost_model)
    gen = torch.Generator().manual_seed(int(seed))
    values = []
    n = obj.numel
    with obj.session():
        leaves, grads = obj.gradient_graph()
        for _ in range(samples):
            # one draw for all parameters (the same values, in the same order, as one draw per tensor)
            v = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
            hv = obj.hvp(leaves, grads, unflat(v, obj.w0))
            hv = flat(hv)
            values.append(float(torch.dot(v.to(hv.device), hv)))  # exact products ±(Hv)_i, float64 sum
            obj.cost.vector_ops += 3  # the probe: draw, scale, shift (conversions: timed with the product)
            obj.cost.basis_dots += 1
    vals = np.asarray(values)
    est = float(vals.mean())
    se = float(vals.std(ddof=1) / math.sqrt(samples))
    half = float(stats.t.ppf(0.975, samples - 1)) * se
    return HessianTraceResult(
        trace=est, stderr=se, ci95=(est - half, est + half), samples=samples, values=vals, seed=int(seed),
        bn_mode=bn_mode, batch_size=obj.batch_size, n_params=obj.numel, cost=obj.cost,
    )
