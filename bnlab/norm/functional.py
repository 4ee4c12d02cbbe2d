"""Pure functional batch normalization (Ioffe & Szegedy 2015, Alg. 1 and 2).

``batch_norm`` returns the output *and* the updated running statistics instead of mutating them, so
that the same function serves training, probes that must not disturb a model (bnlab.measure) and
``torch.func`` transforms. ``training`` is always explicit: forgetting ``model.eval()`` is the most
common BN bug, and a pure function should not depend on hidden state.

The core makes no Python decision on tensor *values* (only on shapes, dtypes and arguments), so
nothing is read back to the host: it runs unchanged under ``torch.compile(fullgraph=True)`` (also
with ``dynamic=True``: the eps/momentum checks are comparisons, which a symbolic float turns into
guards), ``torch.export``, ``torch.func.vmap``/``grad``/``jacrev``/``hessian``/``jvp``/``jacfwd``,
forward-mode AD and ``torch.jit.script``.

Two paths: on the CPU (float32/float64/float16/bfloat16, non-empty batches, outside ``torch.func``
transforms) the work is done by the fused kernels of :mod:`bnlab.norm.kernels` (``torch.library``
operators; the same semantics and guard, statistics in float64); everywhere else by the composite
torch path below. ``BNLAB_KERNELS=off`` or ``bnlab.norm.kernels.use_mode("off")`` forces the latter.

Numerics (composite path):

* Statistics are computed in float32 for float16/bfloat16 inputs (in the input dtype otherwise); the
  output has the input's dtype and memory format.
* Training ("shifted data"): the batch is first shifted per channel by its first sample's value,
  a detached constant. BN is invariant to that shift (outputs and gradients are unchanged), but
  the deviations are now small numbers, so torch's fused kernel (one-pass forward, fused backward,
  double backward) computes accurate statistics for every input: normalizing ``x - mu`` directly
  loses everything when |mean| >> std in float32 (mean 1e4, std 1e-3: the rounding of mu alone
  is half a standard deviation). The batch variance is the kernel's own two-pass sum of squared
  deviations, never recovered from ``1/invstd**2 - eps`` (which loses the digits of a variance
  small next to eps); a constant channel has variance exactly 0. Where torch's CPU kernel sums
  float32 rows (channels-last images, (N, C) and (N, C, 1, ...) inputs: relative errors of 1e-5 to
  1e-4 at 1e4..1e5 values per channel), the statistics for the running update come from
  ``torch.var_mean`` instead, a Welford pass with float64 accumulators; the contiguous (N, C, H, W)
  kernel already accumulates in float64 and pays nothing extra.
* Evaluation subtracts the running mean before scaling, ``(x - E[x]) * gamma / sqrt(Var[x] + eps)
  + beta``; the folded one-pass form ``a * x + b`` cancels catastrophically when |E[x]| >> std.
* Running statistics are updated in float32 (or wider, the buffer's dtype if wider) and cast to the
  buffer's dtype once. A training batch whose statistics are not finite (NaN/inf inputs, a variance
  that overflows the compute dtype), or whose updated running statistics would not be representable
  in the buffers' dtype (float16 overflow), leaves the running statistics and
  ``num_batches_tracked`` unchanged; the choice is made with ``torch.where`` on the device.
* Warning about such a batch needs its flag on the host. In eager mode on the CPU that read is free
  (the value is already in memory), so ``NonFiniteBatchWarning`` is issued at once, naming what
  overflowed and what to do. On an accelerator the flag is copied to the host asynchronously and
  inspected at a later call once the copy has completed, so the warning never stalls the device.
  Inside ``torch.compile``/``torch.export``/``torch.jit``/``torch.func`` transforms no warning is
  issued; the statistics are protected the same way, the warning is only a report.
* An empty batch (N = 0, or any zero spatial size) in training returns an empty output and leaves
  the running statistics and ``num_batches_tracked`` unchanged: it carries no information about
  the population. (``torch.nn`` increments its counter there, which with ``momentum=None`` makes the
  next real batch weigh 1/(k+2) instead of 1/(k+1) in the cumulative average.)
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from bnlab.errors import ChannelError, ConfigError, DtypeError, InputTypeError, ShapeError
from bnlab.norm import kernels

__all__ = ["BatchNormOutput", "NonFiniteBatchWarning", "batch_norm", "check_eps", "check_momentum", "reduce_dims"]


class NonFiniteBatchWarning(RuntimeWarning):
    """A training batch gave non-finite statistics, or running statistics that the buffers' dtype
    cannot hold; the running statistics were not updated."""


class BatchNormOutput(NamedTuple):
    out: Tensor
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]


def _is_number(value) -> bool:
    """A real number argument: a Python or NumPy int/float (``numbers.Real``, as torch.nn accepts), or
    the symbolic float/int that ``torch.compile`` (``dynamic=True``) and ``torch.export`` pass for a
    module's float attributes (bools refused)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))


def check_eps(eps: float) -> float:
    """eps must be a positive finite number. Written with comparisons only (``0 < eps < inf`` is
    False for NaN), so a symbolic eps under ``torch.compile(dynamic=True)`` becomes a guard instead
    of a graph break (``math.isfinite`` cannot take a SymFloat)."""
    if not _is_number(eps) or not 0.0 < eps < math.inf:
        raise ConfigError(
            f"eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite for constant "
            f"channels), got eps={eps!r}; use e.g. eps=1e-5 (the torch.nn default)"
        )
    return eps if isinstance(eps, torch.SymFloat) else float(eps)


def check_momentum(momentum: float | None) -> float | None:
    """momentum must be None or in [0, 1]; symbolic-safe like :func:`check_eps`."""
    if momentum is None:
        return None
    if not _is_number(momentum) or not 0.0 <= momentum <= 1.0:
        raise ConfigError(
            f"momentum must be in [0, 1] (weight of the new batch in the running average) or None "
            f"(cumulative average), got momentum={momentum!r}; torch.nn's default is 0.1"
        )
    return momentum if isinstance(momentum, torch.SymFloat) else float(momentum)


def reduce_dims(x: Tensor) -> list[int]:
    """Dimensions BN reduces over: the batch and every spatial position (m' = m*p*q, A.5)."""
    return [0, *range(2, x.dim())]


def check_input(x: Tensor, weight: Tensor | None, running_mean: Tensor | None) -> None:
    """Validate a BN input (N, C, *spatial) against the per-channel tensors; the exception types are
    those torch raises in the same situation (bnlab's classes subclass them)."""
    if not isinstance(x, Tensor):
        raise InputTypeError(f"batch_norm expects a torch.Tensor input, got {type(x).__name__}; convert it with "
                             f"torch.as_tensor(x, dtype=torch.float32)")
    if not x.is_floating_point():
        raise DtypeError(
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
            raise ChannelError(
                f"batch norm expected {t.numel()} channels ({name} has {t.numel()} entries) but got input "
                f"with {c} channels, shape {tuple(x.shape)}; the channel dimension is dim 1 "
                f"(use num_features={c}, or permute a channels-last array to (N, C, ...))"
            )


def values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


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
    variance, f = momentum, or f = 1/(num_batches_tracked + 1) when momentum is None (cumulative
    average, which equals Alg. 2's population statistics after a reset). training=False: normalize
    with the running statistics (the Alg. 2 inference map); without running statistics, use batch
    statistics (torch.nn semantics of track_running_stats=False).

    Shapes: x (N, C, *spatial); weight, bias, running_mean, running_var (C,); num_batches_tracked a
    0-dim integer tensor. Returns ``BatchNormOutput(out, running_mean, running_var,
    num_batches_tracked)``: new tensors (out has x's shape, dtype and memory format), the arguments
    are never modified. An empty batch returns the statistics unchanged (see the module docstring).

    Raises ConfigError (a ValueError) for a bad eps/momentum or missing arguments, ShapeError (a
    ValueError) for a bad rank or a single value per channel with batch statistics, ChannelError (a
    RuntimeError, as in torch) for a channel-count mismatch, DtypeError (a NotImplementedError, as
    in torch) for a non-floating input. Warns NonFiniteBatchWarning (eager mode) when a training
    batch's statistics were not added to the running statistics.
    """
    eps = check_eps(eps)
    momentum = check_momentum(momentum)
    check_input(x, weight, running_mean)
    if (running_mean is None) != (running_var is None):
        raise ConfigError("pass both running_mean and running_var, or neither")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ConfigError("momentum=None (cumulative average) needs num_batches_tracked; pass the counter tensor")

    if not training and running_mean is not None and running_var is not None:
        if kernels.applies(x, weight, bias, running_mean, running_var):
            out = torch.ops.bnlab.bn_eval(x, weight, bias, running_mean, running_var, eps)
        else:
            out = eval_core(x, weight, bias, running_mean, running_var, eps)
        return BatchNormOutput(out, running_mean, running_var, num_batches_tracked)
    if values_per_channel(x) == 1:
        fix = ("use a batch size > 1, or training=False with running statistics" if running_mean is not None
               else "use a batch size > 1, or pass running statistics with training=False")
        raise ShapeError(
            f"expected more than 1 value per channel to compute batch statistics, got input of shape "
            f"{tuple(x.shape)}: the batch variance of a single value is 0 and BN would output beta; {fix}"
        )
    update = training and running_mean is not None
    if kernels.applies(x, weight, bias, running_mean, running_var):
        return _kernel_train(x, weight, bias, running_mean, running_var, num_batches_tracked, update, momentum, eps)
    res = train_core(x, weight, bias, running_mean if update else None, running_var if update else None,
                     num_batches_tracked if update else None, momentum, eps)
    if update:
        report_rejected_batch(res, x.dtype, running_mean.dtype)
        return BatchNormOutput(res.out, res.running_mean, res.running_var,
                               res.num_batches_tracked if num_batches_tracked is not None else None)
    return BatchNormOutput(res.out, running_mean, running_var, num_batches_tracked)


def _kernel_train(x, weight, bias, running_mean, running_var, num_batches_tracked, update, momentum, eps):
    """Training mode through the fused kernel (bnlab.norm.kernels): the same semantics and guard."""
    (out, stats, new_mean, new_var, new_count,
     accepted) = torch.ops.bnlab.bn_train(x, weight, bias, running_mean if update else None,
                                          running_var if update else None,
                                          num_batches_tracked if update else None,
                                          0.0 if momentum is None else momentum, momentum is None, eps)
    if not update:
        return BatchNormOutput(out, running_mean, running_var, num_batches_tracked)
    if not _traced(accepted):
        report_kernel_rejection(accepted, stats, x.dtype, running_mean, running_var, num_batches_tracked, momentum)
    return BatchNormOutput(out, new_mean, new_var, new_count if num_batches_tracked is not None else None)


def report_kernel_rejection(accepted: Tensor, stats: Tensor, x_dtype: torch.dtype, running_mean: Tensor,
                            running_var: Tensor, num_batches_tracked: Tensor | None, momentum: float | None) -> None:
    """Warn when the kernel's guard kept a batch out of the running statistics (eager mode; the
    statistics before the update are passed). The kernels run on the CPU only, so reading the flag
    is a memory read, not a device sync."""
    if bool(accepted):
        return
    f = (1.0 / (float(num_batches_tracked) + 1.0)) if momentum is None else momentum
    cdtype = compute_dtype(x_dtype)
    mean, var = stats[0], stats[2]
    diag = torch.stack((mean.to(cdtype).double(), var.to(cdtype).double(),
                        torch.lerp(running_mean.double(), mean, f), torch.lerp(running_var.double(), var, f)))
    _warn(diag, x_dtype, running_mean.dtype, normalized=True)


# --------------------------------------------------------------------------------------------------
# The core: tensor ops only, TorchScript-compatible (typing.Optional, no Python reads of values), so
# that eager, compiled, exported, vmapped and scripted BN all run the same code.


class TrainResult(NamedTuple):
    out: Tensor
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    accepted: Optional[Tensor]  # 0-dim bool: the batch entered the running statistics
    batch_mean: Optional[Tensor]  # (C,) compute dtype, for the warning's diagnosis only
    batch_var: Optional[Tensor]  # (C,) unbiased, compute dtype
    proposed_mean: Optional[Tensor]  # (C,) the update before the guard and the cast, float32 or wider
    proposed_var: Optional[Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision has too few mantissa bits for sums over m' values: statistics in float32."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    return dtype


def per_channel(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...), broadcastable against an input of ``ndim`` dims."""
    shape: List[int] = [1, -1]
    for _ in range(ndim - 2):
        shape.append(1)
    return t.reshape(shape)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if t is None:
        return t
    return t.to(dtype)


def train_core(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
) -> TrainResult:
    """Batch statistics (shifted data, torch's fused kernel) and the guarded running-stat update."""
    cdtype = compute_dtype(x.dtype)
    w = _cast(weight, cdtype)
    b = _cast(bias, cdtype)
    if x.numel() == 0:
        # No values, no statistics: an empty output that is still part of the autograd graph.
        out = x.to(cdtype) * 0.0
        if w is not None:
            out = out * per_channel(w, x.dim())
        if b is not None:
            out = out + per_channel(b, x.dim())
        return TrainResult(out.to(x.dtype), running_mean, running_var, num_batches_tracked,
                           None, None, None, None, None)
    # Per-channel shift: the first sample's value (a view, detached: the output does not depend on it).
    shift = x.detach().select(0, 0)
    while shift.dim() > 1:
        shift = shift.select(1, 0)
    shift = shift.to(cdtype)
    d = x - per_channel(shift, x.dim())  # promotes half precision to float32 in the same pass
    if running_mean is None or running_var is None:
        out = torch.native_batch_norm(d, w, b, None, None, True, 0.0, eps)[0]
        return TrainResult(out.to(x.dtype), running_mean, running_var, num_batches_tracked,
                           None, None, None, None, None)
    # momentum 1 makes the kernel return the batch mean and the *unbiased* variance (from its own
    # sum of squared deviations) as "running statistics": accurate statistics at no extra pass over
    # the data. The functional variant returns them instead of writing into buffers. Everything
    # below derives from detached tensors, so no autograd graph is recorded for it.
    zero = torch.zeros_like(shift)
    out, _, _, shifted_mean, batch_var = torch.ops.aten._native_batch_norm_legit_functional(
        d, w, b, zero, zero, True, 1.0, eps)
    if _stats_need_wide_accumulation(d):
        # torch's CPU kernel sums channels-last (and (N, C), (N, C, 1, ...)) layouts row by row in
        # float32: relative errors of 1e-5..1e-4 in the variance for 1e4..1e5 values per channel.
        # Welford with float64 accumulators (torch.var_mean on the CPU) is exact to float32 rounding;
        # it runs only for these layouts, so the contiguous (N, C, H, W) path costs nothing more.
        kernel_var = batch_var
        batch_var, shifted_mean = torch.var_mean(d.detach(), _stat_dims(d.dim()), correction=1)
        # The output still comes from the kernel's statistics: where its float32 sums overflowed
        # (finite inputs ~1e18 and up), the output is wrong although var_mean's variance is finite,
        # so those channels must be refused (and warned about) as the kernel saw them.
        batch_var = torch.where(torch.isfinite(kernel_var), batch_var, kernel_var)
    batch_mean = shifted_mean + shift
    sdtype = running_mean.dtype
    udtype = torch.promote_types(sdtype, torch.float32)  # update in float32 at least
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None needs num_batches_tracked")
        f = torch.reciprocal((num_batches_tracked + 1).to(udtype))
    else:
        f = torch.full((), momentum, dtype=udtype, device=x.device)
    proposed_mean = torch.lerp(running_mean.to(udtype), batch_mean.to(udtype), f)
    proposed_var = torch.lerp(running_var.to(udtype), batch_var.to(udtype), f)
    cast_mean = proposed_mean.to(sdtype)  # the one rounding to the buffers' dtype
    cast_var = proposed_var.to(sdtype)
    accepted = torch.isfinite(torch.stack((batch_mean, batch_var))).all() & torch.isfinite(
        torch.stack((cast_mean, cast_var))).all()
    new_mean = torch.where(accepted, cast_mean, running_mean)
    new_var = torch.where(accepted, cast_var, running_var)
    new_count = num_batches_tracked
    if num_batches_tracked is not None:
        new_count = num_batches_tracked + accepted.to(num_batches_tracked.dtype)
    return TrainResult(out.to(x.dtype), new_mean, new_var, new_count, accepted, batch_mean, batch_var,
                       proposed_mean, proposed_var)


def _stat_dims(ndim: int) -> List[int]:
    """reduce_dims written for TorchScript (no star-unpacking of a range)."""
    dims: List[int] = [0]
    for i in range(2, ndim):
        dims.append(i)
    return dims


def _stats_need_wide_accumulation(d: Tensor) -> bool:
    """Whether torch's batch-norm kernel would accumulate the statistics of ``d`` in float32 rows
    (a decision on device, layout and shape only). Its contiguous-(N, C, H, W) CPU kernel
    accumulates in float64 and is exact to float32 rounding; other devices use a parallel Welford."""
    if d.device.type != "cpu" or d.dtype == torch.float64:
        return False
    return d.dim() == 2 or d.numel() == d.shape[0] * d.shape[1] or not d.is_contiguous()


def eval_core(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """Alg. 2's inference map, (x - E[x]) * gamma / sqrt(Var[x] + eps) + beta, subtracting first."""
    cdtype = compute_dtype(x.dtype)
    scale = torch.rsqrt(running_var.to(cdtype) + eps)
    if weight is not None:
        scale = scale * weight.to(cdtype)
    scale = per_channel(scale, x.dim())
    centered = x - per_channel(running_mean.to(cdtype), x.dim())  # promotes half precision
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad))
    # Out of place also while tracing: torch.jit.trace's check re-runs the graph and refuses the
    # in-place tail below (torch.nn's eval BN traces fine, so ours must too).
    if needs_grad or torch.jit.is_tracing():
        if bias is None:
            return (centered * scale).to(x.dtype)
        return torch.addcmul(per_channel(bias.to(cdtype), x.dim()), centered, scale).to(x.dtype)
    # No autograd: finish in place in the one temporary (one allocation, like torch's kernel).
    centered.mul_(scale)
    if bias is not None:
        centered.add_(per_channel(bias.to(cdtype), x.dim()))
    return centered.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Reporting a rejected batch (eager mode only; never affects the statistics).

_pending: list = []  # (ready() -> bool, host flag tensor, host stats tensor, x dtype, buffer dtype)


def _traced(t: Tensor) -> bool:
    """True while tracing/compiling/transforming, when a host read is impossible or would be baked in."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return True
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def report_rejected_batch(res: TrainResult, x_dtype: torch.dtype, buffer_dtype: torch.dtype) -> None:
    """Warn (eager mode) when a training batch did not enter the running statistics.

    CPU: the flag is read at once (no device to synchronize with). Other devices: the small flag
    and statistics are copied to pinned host memory without blocking, and inspected by a later call
    once an event says the copy is complete."""
    if res.accepted is None or _traced(res.accepted):
        return
    dtype = res.proposed_mean.dtype
    if res.accepted.device.type == "cpu":
        if not bool(res.accepted):
            _warn(torch.stack((res.batch_mean.to(dtype), res.batch_var.to(dtype), res.proposed_mean,
                               res.proposed_var)), x_dtype, buffer_dtype)
        return
    stats = torch.stack((res.batch_mean.to(dtype), res.batch_var.to(dtype), res.proposed_mean, res.proposed_var))
    _flush_pending()
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
    flag.copy_(res.accepted, non_blocking=True)
    host.copy_(stats, non_blocking=True)
    event = torch.Event(device=res.accepted.device)
    event.record()
    _pending.append((event.query, flag, host, x_dtype, buffer_dtype))


def _flush_pending() -> None:
    while _pending and _pending[0][0]():
        _, flag, host, x_dtype, buffer_dtype = _pending.pop(0)
        if not bool(flag):
            _warn(host, x_dtype, buffer_dtype)


def _channels(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:8])) + (f", ... ({len(idx)} in all)" if len(idx) > 8 else "")


def _user_stacklevel() -> int:
    """warnings.warn stacklevel of the first caller outside bnlab.norm and torch.nn's Module call
    machinery, so the warning points at the user's line (batch_norm or a module call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(here) or name.endswith(os.path.join("torch", "nn", "modules", "module.py"))):
            return level
        frame, level = frame.f_back, level + 1
    return level


def _warn(stats: Tensor, x_dtype: torch.dtype, buffer_dtype: torch.dtype, normalized: bool = False) -> None:
    """Name the real cause from the per-channel statistics (no pass over the data). ``normalized``:
    the batch's output was computed from float64 statistics (the fused kernels) and is right."""
    mean, var, new_mean, new_var = stats.unbind(0)
    cdtype = compute_dtype(x_dtype)
    keep = "the running statistics and num_batches_tracked keep their previous values"
    if not torch.isfinite(mean).all():
        # A NaN/inf input makes the mean non-finite; finite inputs give a finite mean.
        msg = (f"batch norm got a training batch with NaN or inf values (channels {_channels(~torch.isfinite(mean))}); "
               f"{keep}. Check the input data and the learning rate.")
    elif not torch.isfinite(var).all():
        bad = ~torch.isfinite(var)
        output = ("the fused kernel normalized this batch with float64 statistics, but" if normalized
                  else "this batch's output is not normalized and")
        msg = (f"the batch variance of channels {_channels(bad)} cannot be computed in {cdtype} although the "
               f"input is finite: its sum of squared deviations overflows (|values| around "
               f"{mean[bad].abs().max().item():.3g}); {output} {keep}. Scale the input down (e.g. standardize "
               f"the data) or run this layer in float64 (layer.double() and x.double()).")
    else:
        top = torch.finfo(buffer_dtype).max
        bad = ~(torch.isfinite(new_mean) & torch.isfinite(new_var)) | (new_mean.abs() > top) | (new_var > top)
        big = torch.maximum(new_mean.abs(), new_var)[bad].max().item()
        msg = (f"the updated running statistics of channels {_channels(bad)} (up to {big:.4g}) overflow the "
               f"buffers' dtype {buffer_dtype} (largest finite value {torch.finfo(buffer_dtype).max:.4g}); "
               f"{keep}. Keep this BN layer's parameters and buffers in float32 (e.g. call .float() on it "
               f"after model.half(); it still takes {x_dtype} inputs), or scale the input down.")
    warnings.warn(msg, NonFiniteBatchWarning, stacklevel=_user_stacklevel())
