"""Batch renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", Algorithm 1).

Training normalizes with the batch statistics and then corrects towards the running ones:

    sigma_B = sqrt(var_B + eps)                     (biased batch variance, as BN)
    sigma   = sqrt(running_var + eps)               (the denominator of BN's inference map)
    r       = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
    d       = stop_gradient(clip((mu_B - running_mean) / sigma, -dmax, dmax))
    y       = gamma * ((x - mu_B) / sigma_B * r + d) + beta

r and d are constants in the backward pass (Alg. 1's stop_gradient), so the gradient is BN's
gradient of ``gamma * r * x_hat`` with r fixed. With rmax = 1 and dmax = 0, r = 1 and d = 0 and batch
renorm is BN. With no clipping, y equals BN's inference map on the running statistics, so training
and inference compute the same function. r and d use the running statistics *before* this batch's
update, then the running statistics are updated as BN's (``running_mean``/``running_var`` with the
unbiased batch variance, ``momentum``, the non-finite-batch guard).

Deviation from the paper, on purpose: Alg. 1 keeps a moving average of sigma_B; we keep BN's
``running_var`` so that sigma = sqrt(running_var + eps) is exactly the denominator BN uses at
inference and the ``state_dict`` (keys and meaning) is BN's: a ``torch.nn.BatchNorm`` state_dict loads
into a renorm layer and back. The paper uses a moving-average rate 0.01 (momentum=0.01 here); the
default stays torch.nn's 0.1 so the layer is a drop-in.

Schedule (:class:`RenormSchedule`). Ioffe 2017 (Sec. 4) trains with rmax = 1, dmax = 0 (plain BN) for
the first 5000 steps, then relaxes them gradually, reaching rmax = 3 at 40k steps and dmax = 5 at 25k
steps. We make "gradually" linear:

    f_r(t) = clip((t - warmup_steps) / (rmax_steps - warmup_steps), 0, 1)    rmax(t) = 1 + (rmax - 1) f_r(t)
    f_d(t) = clip((t - warmup_steps) / (dmax_steps - warmup_steps), 0, 1)    dmax(t) = dmax f_d(t)

t is the layer's ``num_batches_tracked`` (training batches already seen), so the schedule is part of
the checkpoint: a resumed run continues where it stopped, and a BN checkpoint loaded into a renorm
layer starts at its step count. Step counts are configurable; fixed clipping is
``rmax=..., dmax=...`` (no schedule).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from bnlab.errors import ConfigError
from bnlab.norm.functional import BatchNormOutput, batch_norm, check_input, compute_dtype, reduce_dims
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, store_statistics

__all__ = ["RenormSchedule", "renorm_correction", "batch_renorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _check_limit(name: str, value, low: float, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not value >= low:
        raise ConfigError(f"{name} must be a number >= {low:g}, got {name}={value!r}; {example}")
    return float(value)


def _check_steps(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} must be an int >= 0 (a count of training steps), got {name}={value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class RenormSchedule:
    """The rmax/dmax ramp of batch renormalization (module docstring; defaults: Ioffe 2017, Sec. 4).

    rmax: final r clipping (>= 1); dmax: final d clipping (>= 0; math.inf allowed for either);
    warmup_steps: steps with rmax = 1, dmax = 0 (plain BN); rmax_steps / dmax_steps: the step at which
    rmax / dmax reach their final values (>= warmup_steps). Raises ConfigError for anything else.
    """

    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 5000
    rmax_steps: int = 40000
    dmax_steps: int = 25000

    def __post_init__(self) -> None:
        _check_limit("rmax", self.rmax, 1.0, "rmax = 1 means no r correction (Ioffe 2017 ends at rmax = 3)")
        _check_limit("dmax", self.dmax, 0.0, "dmax = 0 means no d correction (Ioffe 2017 ends at dmax = 5)")
        warm = _check_steps("warmup_steps", self.warmup_steps)
        for name in ("rmax_steps", "dmax_steps"):
            if _check_steps(name, getattr(self, name)) < warm:
                raise ConfigError(f"{name} ({getattr(self, name)}) is the step at which the ramp ends, so it must be "
                                  f">= warmup_steps ({warm}); e.g. RenormSchedule(warmup_steps=5000, rmax_steps=40000, "
                                  f"dmax_steps=25000)")

    @classmethod
    def constant(cls, rmax: float, dmax: float) -> "RenormSchedule":
        """Fixed clipping from step 0 on."""
        return cls(rmax=rmax, dmax=dmax, warmup_steps=0, rmax_steps=0, dmax_steps=0)

    @staticmethod
    def _fraction(step: Tensor, start: int, end: int) -> Tensor:
        if end <= start:  # no ramp: the final value from `start` on
            return (step >= start).to(torch.float64)
        return ((step.to(torch.float64) - start) / (end - start)).clamp(0.0, 1.0)

    def at(self, step: int | Tensor) -> tuple[Tensor, Tensor]:
        """(rmax(t), dmax(t)) at step t as float64 0-dim tensors (on the step's device when t is a tensor,
        so a module reads no value back to the host)."""
        t = step if isinstance(step, Tensor) else torch.tensor(int(step), dtype=torch.int64)
        fr = self._fraction(t, self.warmup_steps, self.rmax_steps)
        fd = self._fraction(t, self.warmup_steps, self.dmax_steps)
        # inf * 0 would be NaN: a final value of inf is reached at once when the ramp has started.
        rmax = 1.0 + (self.rmax - 1.0) * fr if math.isfinite(self.rmax) else torch.where(fr > 0, math.inf, 1.0)
        dmax = self.dmax * fd if math.isfinite(self.dmax) else torch.where(fd > 0, math.inf, 0.0)
        return rmax.to(torch.float64), dmax.to(torch.float64)


def renorm_correction(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
                      rmax: float | Tensor, dmax: float | Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Ioffe 2017's r and d (Alg. 1), detached. All tensors (C,); batch_var is the biased batch
    variance; rmax >= 1 and dmax >= 0 (floats or 0-dim tensors). Returns (r, d), each (C,), in the
    dtype of batch_mean."""
    dtype = batch_mean.dtype
    rmax = torch.as_tensor(rmax, dtype=dtype, device=batch_mean.device)
    dmax = torch.as_tensor(dmax, dtype=dtype, device=batch_mean.device)
    with torch.no_grad():
        sigma = torch.sqrt(running_var.to(dtype) + eps)
        sigma_b = torch.sqrt(batch_var.to(dtype) + eps)
        r = torch.minimum(torch.maximum(sigma_b / sigma, 1.0 / rmax), rmax)
        d = torch.minimum(torch.maximum((batch_mean - running_mean.to(dtype)) / sigma, -dmax), dmax)
    return r.detach(), d.detach()


def batch_renorm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    rmax: float | Tensor,
    dmax: float | Tensor,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> BatchNormOutput:
    """Batch renormalization of ``x`` (N, C, *spatial), without side effects (module docstring).

    training=True needs the running statistics (r and d are measured against them); they are
    returned updated as BN's. training=False: BN's inference map with the running statistics.
    Shapes: x (N, C, *spatial); weight, bias, running_mean, running_var (C,); rmax, dmax numbers or
    0-dim tensors. Returns ``BatchNormOutput``; the arguments are never modified. Raises ConfigError
    for missing running statistics or rmax < 1 / dmax < 0, and batch_norm's errors for a bad input.
    """
    if not training:
        if running_mean is None:
            raise ConfigError("batch renorm in eval mode needs running_mean and running_var (its inference map)")
        return batch_norm(x, weight, bias, running_mean, running_var, training=False, momentum=momentum, eps=eps,
                          num_batches_tracked=num_batches_tracked)
    if running_mean is None or running_var is None:
        raise ConfigError("batch renorm measures the batch statistics against the running statistics: pass "
                          "running_mean and running_var (a layer needs track_running_stats=True)")
    for name, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if not isinstance(value, Tensor):
            _check_limit(name, value, low, f"e.g. the schedule RenormSchedule().at(step)")
    check_input(x, weight, running_mean)
    # BN without the affine part gives x_hat = (x - mu_B) / sigma_B (with its backward) and the guarded
    # running-statistics update; r and d then only scale and shift it.
    res = batch_norm(x, None, None, running_mean, running_var, training=True, momentum=momentum, eps=eps,
                     num_batches_tracked=num_batches_tracked)
    if x.numel() == 0:
        return _affine(res.out, weight, bias, res)
    cdtype = compute_dtype(x.dtype)
    dims = reduce_dims(x)
    with torch.no_grad():
        batch_var, batch_mean = torch.var_mean(x.detach().to(cdtype), dim=dims, unbiased=False)  # (C,)
    r, d = renorm_correction(batch_mean, batch_var, running_mean, running_var, rmax, dmax, eps)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    y = res.out.to(cdtype) * r.view(shape) + d.view(shape)
    return _affine(y, weight, bias, res, x.dtype)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, res: BatchNormOutput,
            dtype: torch.dtype | None = None) -> BatchNormOutput:
    shape = (1, -1, *([1] * (y.dim() - 2)))
    if weight is not None:
        y = y * weight.view(shape).to(y.dtype)
    if bias is not None:
        y = y + bias.view(shape).to(y.dtype)
    return BatchNormOutput(y.to(dtype or y.dtype), res.running_mean, res.running_var, res.num_batches_tracked)


class _BatchRenorm:
    """Shared forward of the BatchRenorm shells (parameters, buffers and checks are BN's)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, rmax: float | None = None,
                 dmax: float | None = None, schedule: RenormSchedule | None = None) -> None:
        if not track_running_stats:
            raise ConfigError("batch renorm corrects the batch statistics towards the running statistics, so it "
                              "needs track_running_stats=True; without running statistics use BN (make_norm('batch'))")
        if (rmax is None) != (dmax is None):
            raise ConfigError(f"pass both rmax and dmax for fixed clipping (got rmax={rmax!r}, dmax={dmax!r}), or "
                              f"neither to use a schedule (default: RenormSchedule(), Ioffe 2017's ramp)")
        if rmax is not None and schedule is not None:
            raise ConfigError("pass either fixed clipping (rmax=, dmax=) or schedule=, not both")
        if schedule is not None and not isinstance(schedule, RenormSchedule):
            raise ConfigError(f"schedule must be a RenormSchedule, got {type(schedule).__name__}; e.g. "
                              f"RenormSchedule(rmax=3, dmax=5, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000)")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)
        self.schedule = RenormSchedule.constant(rmax, dmax) if rmax is not None else (schedule or RenormSchedule())

    def clipping(self) -> tuple[float, float]:
        """The (rmax, dmax) the next training batch uses (the schedule at ``num_batches_tracked``)."""
        rmax, dmax = self.schedule.at(self.num_batches_tracked)
        return float(rmax), float(dmax)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, training=False,
                              eps=self.eps).out
        rmax, dmax = self.schedule.at(self.num_batches_tracked)
        result = batch_renorm(x, self.weight, self.bias, self.running_mean, self.running_var, rmax=rmax, dmax=dmax,
                              training=True, momentum=self.momentum, eps=self.eps,
                              num_batches_tracked=self.num_batches_tracked)
        store_statistics(self, result)
        return result.out

    def extra_repr(self) -> str:
        s = self.schedule
        return (f"{super().extra_repr()}, rmax={s.rmax:g}, dmax={s.dmax:g}, warmup_steps={s.warmup_steps}, "
                f"rmax_steps={s.rmax_steps}, dmax_steps={s.dmax_steps}")


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch renormalization of (N, C) or (N, C, L) inputs: BatchNorm1d's constructor (it needs
    track_running_stats=True) plus ``rmax``/``dmax`` (fixed clipping) or ``schedule`` (a
    :class:`RenormSchedule`; default Ioffe 2017's ramp). BN's parameters, buffers, state_dict keys."""


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch renormalization of (N, C, H, W) inputs, statistics per channel over N, H, W."""


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    """Batch renormalization of (N, C, D, H, W) inputs, statistics per channel over N, D, H, W."""
