"""Pure functional batch normalization (Ioffe & Szegedy 2015, Alg. 1 and 2).

``batch_norm`` returns the output *and* the updated running statistics instead of mutating them, so
that the same function serves training, probes that must not disturb a model (bnlab.measure) and
``torch.func`` transforms. ``training`` is always explicit: forgetting ``model.eval()`` is the most
common BN bug, and a pure function should not depend on hidden state.

Numerics:

* Statistics are computed in float32 for half/bfloat16 inputs (in the input dtype otherwise) and
  returned in the dtype of the running buffers; the output has the input's dtype and memory format.
* Training uses torch's fused kernel (one pass, fused backward, double backward) when it is
  accurate, and otherwise the "shifted data" algorithm: normalizing ``x - mu`` directly loses
  everything when |mean| >> std in float32 (mean 1e4, std 1e-3: the rounding of mu alone is half a
  standard deviation). The kernel's statistics tell which case applies (|mean|/std above 1e3 in
  float32); then mean and variance are computed on data shifted by one sample per channel, whose
  deviations are small numbers, and the result matches a float64 reference. Half/bfloat16 inputs
  always take that path, with float32 statistics. Evaluation likewise uses torch's one-pass folded
  map only when the running statistics are well conditioned, and subtracts the mean first otherwise.
* A training batch whose statistics are not finite (NaN/inf inputs) leaves the running statistics
  and ``num_batches_tracked`` unchanged and warns; the output of that batch is returned as computed.

Both paths are differentiable torch ops, so autograd, double backward (Hessian-vector products) and
``torch.func`` all work.
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
    if not use_batch_stats:
        return BatchNormOutput(_inference(x, weight, bias, running_mean, running_var, eps), running_mean,
                               running_var, num_batches_tracked)

    count = x.numel() // x.shape[1]
    if count <= 1 and training:
        raise ShapeError(
            f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}: "
            f"the batch variance of a single value is 0 and BN would output beta; use a batch size > 1, "
            f"or call model.eval() to use the running statistics"
        )
    result = _train_native(x, weight, bias, eps) if x.dtype in _NATIVE_RATIO else None
    out, batch_mean, batch_var, finite = result if result is not None else _train_shifted(x, weight, bias, eps)

    new_mean, new_var, new_count = running_mean, running_var, num_batches_tracked
    if training and running_mean is not None:
        if finite:
            with torch.no_grad():
                if num_batches_tracked is not None:
                    new_count = num_batches_tracked + 1
                f = 1.0 / float(new_count) if momentum is None else momentum
                sdt = running_mean.dtype
                new_mean = torch.lerp(running_mean, batch_mean.to(sdt), f)
                new_var = torch.lerp(running_var, (batch_var * (count / (count - 1))).to(sdt), f)
        else:
            warnings.warn(
                "batch norm got a training batch with NaN or inf values; its statistics were not "
                "added to the running mean/variance (they keep their previous values). "
                "Check the input data and the learning rate.",
                NonFiniteBatchWarning,
                stacklevel=2,
            )
    return BatchNormOutput(out, new_mean, new_var, new_count)


# Largest |mean| / std for which torch's fused kernel is accurate: it normalizes x - mean with mean
# rounded to the input precision, an error of about ulp(mean) / std in x_hat (float32: 6e-8 * ratio).
_NATIVE_RATIO = {torch.float32: 1e3, torch.float64: 1e10}


def _train_native(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, bool] | None:
    """torch's fused training kernel (one pass forward, fused backward, double backward supported);
    None when the data is too ill-conditioned for it (then the shifted path recomputes).

    Returns (out, batch mean, biased batch variance, statistics finite). One host sync per call:
    small layers (the Ioffe MLP) are dominated by per-op overhead, so the checks are fused.
    """
    out, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    mean, invstd = mean.detach(), invstd.detach()
    worst_ratio, smallest_invstd = torch.stack(((mean.abs() * invstd).max(), invstd.min())).tolist()
    finite = math.isfinite(worst_ratio) and smallest_invstd > 0  # invstd 0 <=> var inf
    if finite and worst_ratio > _NATIVE_RATIO[x.dtype]:
        return None
    # invstd = 1/sqrt(var + eps) exactly as the kernel used it; recover the biased variance.
    return out, mean, invstd.pow(-2) - eps, finite


def _train_shifted(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Batch statistics by the shifted-data algorithm, composed of differentiable ops."""
    cdtype = _compute_dtype(x)
    xc = x.to(cdtype)
    # Subtract one sample per channel (exact in floating point for values of similar magnitude), so
    # the deviations below are computed from small numbers.
    shift = xc.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)]  # (C,)
    d = xc - _per_channel(shift, x)
    var_d, mean_d = torch.var_mean(d, dim=reduce_dims(x), correction=0, keepdim=True)  # (1, C, 1, ...)
    out = _affine(d - mean_d, torch.rsqrt(var_d + eps), weight, bias, x)
    mean, var = (mean_d.flatten() + shift).detach(), var_d.flatten().detach()
    finite = all(math.isfinite(v) for v in torch.stack((mean.abs().max(), var.max())).tolist())
    return out.to(x.dtype), mean, var, finite


def _inference(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    """Alg. 2's inference map. torch's kernel applies the folded form a*x + b (one pass), which is
    accurate while |E[x]| / std is moderate; beyond that it cancels catastrophically and the map is
    computed as (x - E[x]) * gamma / sqrt(Var[x] + eps) + beta, subtracting first."""
    same_dtype = all(t is None or t.dtype == x.dtype for t in (weight, bias, running_mean, running_var))
    if same_dtype and x.dtype in _NATIVE_RATIO:
        ratio = float((running_mean.abs() * torch.rsqrt(running_var + eps)).max())
        if ratio <= _NATIVE_RATIO[x.dtype]:  # False for NaN too
            return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
    cdtype = _compute_dtype(x)
    scale = _per_channel(torch.rsqrt(running_var.to(cdtype) + eps), x)
    centered = x.to(cdtype) - _per_channel(running_mean.to(cdtype), x)
    return _affine(centered, scale, weight, bias, x).to(x.dtype)


def _affine(centered: Tensor, scale: Tensor, weight: Tensor | None, bias: Tensor | None, x: Tensor) -> Tensor:
    """centered * scale * gamma + beta, with gamma folded into the per-channel scale (one fused pass)."""
    if weight is not None:
        scale = scale * _per_channel(weight.to(scale.dtype), x)
    if bias is None:
        return centered * scale
    return torch.addcmul(_per_channel(bias.to(scale.dtype), x), centered, scale)
