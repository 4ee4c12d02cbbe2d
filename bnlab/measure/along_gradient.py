"""The loss landscape along the gradient: loss band, gradient predictiveness, effective β-smoothness
(Santurkar, Tsipras, Ilyas & Madry 2018, Sec. 3.2, App. A.2.2, Figs. 4, 10, 11).

Definition. At parameters w (all trainable parameters, BN's gamma and beta included, flattened) on
one batch, with g = ∇L(w), for each step size η of a grid:

    w_η = w - η g                              a step of the given size along the negative gradient
    L_η = L(w_η),   g_η = ∇L(w_η)              same batch, same noise
    loss band (Fig. 4a, 10a):                  [min_η L_η, max_η L_η]
    gradient predictiveness (Fig. 4b, 10b):    ||g - g_η||_2 per η; its band [min_η, max_η]
    effective β-smoothness (Fig. 4c, 10c):     max_η ||g - g_η||_2 / ||η g||_2
    Fig. 11:                                   ||g - g_η||_2 as a function of η

"'Effective' β-smoothness refers to the maximum difference (in ℓ2-norm) in gradient over distance
moved in that direction" (Fig. 4 caption). For the quadratic L = ½ wᵀAw it is ||A g|| / ||g||
for every η (≥ the curvature gᵀAg/||g||², with equality when g is an eigenvector of A).

The paper's grids: η ∈ [1/2, 4] × the learning rate for VGG, [1/100, 30] × for the deep linear
network; ``santurkar_grid(lr)`` gives {1/2, 1, 2, 4} × lr, the vertices of Fig. 11's curves.

BN layers normalize with the batch's statistics by default (``bn_mode="batch"``, as the training
step that the landscape describes) or with their running statistics (``bn_mode="running"``); running
statistics are never updated. Cost: (1 + len(etas)) forward+backward passes; no side effects.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.measure._objective import LossFn, Objective, flat
from bnlab.measure.cost import Cost, CostModel
from bnlab.measure._util import BnMode

__all__ = ["AlongGradientResult", "along_gradient", "santurkar_grid"]

DEFINITION = ("Santurkar et al. 2018, Sec. 3.2, App. A.2.2, Figs. 4, 10, 11: L(w - eta g), ||g - grad L(w - eta g)||, "
              "effective beta = max_eta ||g - grad L(w - eta g)|| / ||eta g||")


def santurkar_grid(lr: float, multipliers: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> tuple[float, ...]:
    """Step sizes ``multipliers × lr`` (default: Santurkar's VGG range [1/2, 4] × lr at Fig. 11's
    vertices; the deep linear network used (0.01, 0.1, 1, 10, 30))."""
    return tuple(float(m) * float(lr) for m in multipliers)


@dataclasses.dataclass(frozen=True)
class AlongGradientResult:
    """Arrays over the grid, shape (len(etas),), float64.

    ``losses`` L(w - η g); ``grad_change`` ||g - g_η|| (gradient predictiveness, Fig. 11's curve);
    ``beta`` ||g - g_η|| / ||η g||; ``loss0`` L(w), ``grad_norm`` ||g||.
    """

    etas: np.ndarray
    losses: np.ndarray
    grad_change: np.ndarray
    beta: np.ndarray
    loss0: float
    grad_norm: float
    bn_mode: str
    batch_size: int
    n_params: int
    cost: Cost
    definition: str = DEFINITION

    @property
    def loss_band(self) -> tuple[float, float]:
        return float(np.min(self.losses)), float(np.max(self.losses))

    @property
    def predictiveness_band(self) -> tuple[float, float]:
        return float(np.min(self.grad_change)), float(np.max(self.grad_change))

    @property
    def gradient_predictiveness(self) -> float:
        """max_η ||g - g_η|| (the top of the band; smaller = more predictive)."""
        return float(np.max(self.grad_change))

    @property
    def effective_beta(self) -> float:
        return float(np.max(self.beta))

    def summary(self) -> dict[str, float]:
        lo, hi = self.loss_band
        plo, phi = self.predictiveness_band
        return {"loss0": self.loss0, "grad_norm": self.grad_norm, "loss_min": lo, "loss_max": hi,
                "loss_range": hi - lo, "predictiveness_min": plo, "predictiveness_max": phi,
                "effective_beta": self.effective_beta}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"etas": self.etas, "losses": self.losses, "grad_change": self.grad_change, "beta": self.beta}


def _check_etas(etas: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(list(etas), dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"etas must be a sequence of positive step sizes, got {etas!r}") from None
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ConfigError(f"etas must be a non-empty sequence of positive finite step sizes, got {list(np.ravel(arr))}; "
                          f"e.g. santurkar_grid(lr) = (0.5, 1, 2, 4) x lr")
    return arr


def along_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    etas: Sequence[float],
    *,
    bn_mode: BnMode = "batch",
    params: Sequence[str] | None = None,
    seed: int | None = 0,
    cost_model: CostModel | None = None,
) -> AlongGradientResult:
    """Loss, gradient predictiveness and effective β-smoothness along the gradient (module docstring).

    Args:
        loss_fn: ``loss_fn(model(x), y)`` -> scalar; ``batch`` = (x, y).
        etas: positive step sizes (e.g. ``santurkar_grid(lr)``).
        bn_mode: ``"batch"`` (default) or ``"running"``.
        params: parameter names w consists of (default: all that require grad).
        seed: seeds the global RNG inside every pass (all passes draw the same noise).
        cost_model: converts the counted work to passes in ``result.cost`` (default generic; see
            ``calibrate_cost``).

    Raises ConfigError for a bad grid/bn_mode/params, ShapeError for a bad batch or non-scalar loss.
    Cost: ``1 + len(etas)`` forward+backward passes, plus ``3 + 5 len(etas)`` parameter-length
    vector operations (``result.cost``; they matter only when a pass takes about a millisecond).
    """
    grid = _check_etas(etas)
    obj = Objective(model, loss_fn, batch, bn_mode=bn_mode, params=params, seed=seed, cost_model=cost_model)
    losses, change, beta = [], [], []
    with obj.session():
        loss0, g = obj.loss_and_grad()
        g_flat = flat(g)  # float64: the differences below are exact, their norms accumulated in float64
        gnorm = float(torch.linalg.vector_norm(g_flat))
        obj.cost.vector_ops += 3  # flattening (concatenate, convert), norm
        for eta in grid:
            w = [torch.add(t, gi, alpha=-float(eta)) for t, gi in zip(obj.w0, g)]  # g has w's dtypes (autograd)
            loss, g_eta = obj.loss_and_grad(w)
            diff = float(torch.linalg.vector_norm(g_flat - flat(g_eta)))
            obj.cost.vector_ops += 5  # the step, flattening (2), difference, norm
            losses.append(loss)
            change.append(diff)
            beta.append(diff / (float(eta) * gnorm) if gnorm > 0 else float("nan"))
    return AlongGradientResult(
        etas=grid, losses=np.asarray(losses), grad_change=np.asarray(change), beta=np.asarray(beta),
        loss0=loss0, grad_norm=gnorm, bn_mode=bn_mode, batch_size=obj.batch_size, n_params=obj.numel, cost=obj.cost,
    )
