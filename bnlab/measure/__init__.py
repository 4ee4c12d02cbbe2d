"""Probes on any nn.Module; each module's docstring states its definition and its cost in passes.

Activation statistics and drift (``activations``, ``drift``) need forward passes only; the landscape
instruments differentiate the loss on one batch: ``ics`` (Santurkar et al. 2018, Def. 2.1),
``along_gradient`` (loss band, gradient predictiveness, effective β-smoothness; Figs. 4, 10, 11) and
``hessian`` (top eigenvalues by Lanczos, Hutchinson trace). None of them changes the model. Each
result's ``cost`` counts the work done and converts it to passes with a ``CostModel``: generic
constants by default, or ``calibrate_cost(model, loss_fn, batch)`` for the model at hand (``cost``).
"""
from bnlab.measure.calibrate import calibrate_cost
from bnlab.measure.cost import Cost, CostModel
from bnlab.measure._util import is_batchnorm
from bnlab.measure.activations import LayerActivations, record_activations
from bnlab.measure.along_gradient import AlongGradientResult, along_gradient, santurkar_grid
from bnlab.measure.drift import covariate_shift, moment_drift, percentile_drift, percentile_trace
from bnlab.measure.hessian import (
    HessianEigenResult,
    HessianTraceResult,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from bnlab.measure.ics import ICSResult, ics

__all__ = [
    "AlongGradientResult",
    "Cost",
    "CostModel",
    "HessianEigenResult",
    "HessianTraceResult",
    "ICSResult",
    "LayerActivations",
    "along_gradient",
    "calibrate_cost",
    "covariate_shift",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "ics",
    "is_batchnorm",
    "moment_drift",
    "percentile_drift",
    "percentile_trace",
    "record_activations",
    "santurkar_grid",
]
