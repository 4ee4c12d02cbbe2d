"""Pure functional batch normalization (Ioffe & Szegedy 2015, Alg. 1 and 2).

``batch_norm`` returns the output *and* the updated running statistics instead of mutating them, so
that the same function serves training, probes that must not disturb a model (bnlab.measure) and
``torch.func`` transforms. ``training`` is always explicit: forgetting ``model.eval()`` is the most
common BN bug, and a pure function should not depend on hidden state.

Numerics:

* Statistics are computed in float32 for half/bfloat16 inputs (in the input dtype otherwise) and
  returned in the dtype of the running buffers; the output has the input's dtype and memory format.
* Mean and variance are computed on data shifted by one sample per channel (the "shifted data"
  algorithm). Normalizing ``x - mu`` directly loses everything when |mean| >> std in float32
  (mean 1e4, std 1e-3: the rounding of mu alone is half a standard deviation); after the shift the
  deviations are small numbers and the result matches a float64 reference.
* A training batch whose statistics are not finite (NaN/inf inputs) leaves the running statistics
  and ``num_batches_tracked`` unchanged and warns; the output of that batch is returned as computed.

The forward is composed of differentiable torch ops, so autograd, double backward (Hessian-vector
products in bnlab.measure) and ``torch.func`` all work; fused kernels are a later, optional path.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from bnlab.errors import ConfigError, ShapeError

__all__ = ["BatchNormOutput", "NonFiniteBatchWarning", "batch_norm", "check_eps", "check_momentum", "reduce_dims"]


class NonFiniteBatchWarning(RuntimeWarning):
    """A training batch produced NaN/inf statistics; the running statistics were not updated."""


class BatchNormOutput(NamedTuple):
    out: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None


def check_eps(eps: float) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(
            f"eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite for constant "
            f"channels), got eps={eps!r}; use e.g. eps=1e-5 (the torch.nn default)"
        )
    return float(eps)


def check_momentum(momentum: float | None) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ConfigError(
            f"momentum must be in [0, 1] (weight of the new batch in the running average) or None "
            f"(cumulative average), got momentum={momentum!r}; torch.nn's default is 0.1"
        )
    return float(momentum)


def reduce_dims(x: Tensor) -> list[int]:
    """Dimensions BN reduces over: the batch and every spatial position (m' = m*p*q, A.5)."""
    return [0, *range(2, x.dim())]


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half precision has too few mantissa bits for sums over m' values: statistics in float32.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_input(x: Tensor, weight: Tensor | None, running_mean: Tensor | None) -> None:
    if not isinstance(x, Tensor):
        raise ShapeError(f"batch_norm expects a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ShapeError(
            f"batch norm needs a floating-point input, got dtype {x.dtype}; convert it first, e.g. x.float()"
        )
    if x.dim() < 2:
        raise ShapeError(
            f"batch norm expects an input of shape (N, C, ...) with a batch dimension, got shape "
            f"{tuple(x.shape)}; add the batch dimension, e.g. x.unsqueeze(0)"
        )
    c = x.shape[1]
    for name, t in (("weight", weight), ("running_mean", running_mean)):
        if t is not None and t.numel() != c:
            raise ShapeError(
                f"batch norm expected {t.numel()} channels ({name} has {t.numel()} entries) but got input "
                f"with {c} channels, shape {tuple(x.shape)}; the channel dimension is dim 1 "
                f"(use num_features={c}, or permute a channels-last array to (N, C, ...))"
            )


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """(C,) -> broadcastable against x of shape (N, C, *spatial)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> BatchNormOutput:
    """Batch normalization of ``x`` (N, C, *spatial) per channel, without side effects.

    training=True: normalize with the biased batch statistics (Alg. 1) and, when running statistics
    are given, return them updated as ``(1 - f) * running + f * batch`` with the *unbiased* batch
    variance, f = momentum, or f = 1/num_batches_tracked when momentum is None (cumulative average,
    which equals Alg. 2's population statistics after a reset). training=False: normalize with the
    running statistics (the Alg. 2 inference map); without running statistics, use batch statistics
    (torch.nn semantics of track_running_stats=False).

    Returns ``BatchNormOutput(out, running_mean, running_var, num_batches_tracked)``: new tensors,
    the arguments are never modified.
    """
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    _check_input(x, weight, running_mean)
    if (running_mean is None) != (running_var is None):
        raise ConfigError("pass both running_mean and running_var, or neither")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ConfigError("momentum=None (cumulative average) needs num_batches_tracked; pass the counter tensor")

    use_batch_stats = training or running_mean is None
    cdtype = _compute_dtype(x)
    xc = x.to(cdtype)
    dims = reduce_dims(x)
    new_mean, new_var, new_count = running_mean, running_var, num_batches_tracked

    if use_batch_stats:
        count = x.numel() // x.shape[1]
        if count <= 1 and training:
            raise ShapeError(
                f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}: "
                f"the batch variance of a single value is 0 and BN would output beta; use a batch size > 1, "
                f"or call model.eval() to use the running statistics"
            )
        # Shifted-data algorithm: subtract one sample per channel (exact in floating point for
        # values of similar magnitude), so the deviations below are computed from small numbers.
        shift = xc.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)]  # (C,)
        d = xc - _per_channel(shift, x)
        var_d, mean_d = torch.var_mean(d, dim=dims, correction=0, keepdim=True)  # (1, C, 1, ...)
        if training and running_mean is not None:
            with torch.no_grad():
                batch_mean = mean_d.flatten() + shift  # (C,)
                batch_var = var_d.flatten()
                if bool(torch.isfinite(batch_mean).all()) and bool(torch.isfinite(batch_var).all()):
                    if num_batches_tracked is not None:
                        new_count = num_batches_tracked + 1
                    f = 1.0 / float(new_count) if momentum is None else momentum
                    unbiased = batch_var * (count / (count - 1))
                    sdt = running_mean.dtype
                    new_mean = running_mean * (1 - f) + batch_mean.to(sdt) * f
                    new_var = running_var * (1 - f) + unbiased.to(sdt) * f
                else:
                    warnings.warn(
                        "batch norm got a training batch with NaN or inf values; its statistics were not "
                        "added to the running mean/variance (they keep their previous values). "
                        "Check the input data and the learning rate.",
                        NonFiniteBatchWarning,
                        stacklevel=3,
                    )
        scale = torch.rsqrt(var_d + eps)  # (1, C, 1, ...)
        centered = d - mean_d
    else:
        scale = _per_channel(torch.rsqrt(running_var.to(cdtype) + eps), x)
        centered = xc - _per_channel(running_mean.to(cdtype), x)

    # Fold gamma into the per-channel scale so the affine map costs one fused pass (addcmul).
    if weight is not None:
        scale = scale * _per_channel(weight.to(cdtype), x)
    if bias is not None:
        out = torch.addcmul(_per_channel(bias.to(cdtype), x), centered, scale)
    else:
        out = centered * scale
    return BatchNormOutput(out.to(x.dtype), new_mean, new_var, new_count)
