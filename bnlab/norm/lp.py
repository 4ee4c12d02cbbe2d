"""ℓp batch normalization (Santurkar, Tsipras, Ilyas & Madry 2018, Sec. 3.3, Figs. 5, 6, 12, 13).

The paper's schemes "fix the first order moment of the activations, as BatchNorm does, and then
normalize them by the average of their ℓp-norm (before shifting the mean), for p = 1, 2, ∞". Per unit
j (a feature, or a channel whose n = N*H*W values count as its batch, as in BN), with batch mean mu_j:

    d_bj  = x_bj - mu_j
    D_1,j = sqrt(pi/2) * mean_b |d_bj|          E|Z| = sqrt(2/pi) * sigma for Z ~ N(0, sigma^2)
    D_2,j = sqrt(mean_b d_bj^2)                 the biased standard deviation BN divides by
    D_inf,j = max_b |d_bj| / c_n                c_n = E[max of n |N(0, 1)|] (``gaussian_max_abs_mean``)
    y_bj  = gamma_j * d_bj / sqrt(D_p,j^2 + eps) + beta_j

Scaling. Each constant makes D_p,j an estimate of sigma_j when the unit's values are Gaussian, so the
Gaussian case matches BN: p = 2 *is* BN (same output, gradients and running statistics, up to
rounding), p = 1 uses the mean absolute deviation times sqrt(pi/2), and p = inf divides the largest
absolute deviation by the expected maximum of n standard-normal magnitudes,
c_n = integral_0^inf (1 - erf(t/sqrt(2))^n) dt, computed once per n by quadrature (for n = 1,
c_1 = sqrt(2/pi); c_n grows like sqrt(2 log n)). The ε sits where BN's does (inside the square root).

"Before shifting the mean". We read the phrase as: the ℓp statistic is that of the activations
before beta shifts their mean back, i.e. of the centred values d = x - mu, which the scheme has just
produced by "fixing the first order moment". The alternative reading, the norm of the raw x, makes
the scale depend on the unit's mean (a unit with mean 10 and std 1 would come out with std 0.1), so
no constant could make it match BN, and p = 2 would not be BN; the paper's Fig. 5b, where BN and ℓ2
reach the same loss, fits the centred reading. The raw reading is available as ``centered=False``
(then D_p is computed on x, with the same constants).

Inference. Running statistics are kept like BN's, under BN's names: ``running_mean`` tracks mu and
``running_var`` tracks D_p^2 times n/(n-1) (the unbiasing factor BN applies, so that p = 2 matches
BN exactly); eval mode applies BN's inference map gamma * (x - running_mean) / sqrt(running_var +
eps) + beta. The state_dict keys are BN's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so a BN state_dict loads into an ℓp layer and back.

Speed. In eager training (float32/float64, centred, something to differentiate) the forward is one
autograd node whose backward is written out (``_LpTrain``) with gradients bit-identical to those of
the composite of torch ops; on the CPU, with bnlab's C++ operators built (``bnlab.norm.kernels``),
its operations run from C++ (the same ATen calls, so the same numbers) and a module's training step
updates its running statistics in the same call. The composite serves everything else (forward-mode
AD, torch.func transforms, torch.compile, half precision, the uncentred reading) and second
derivatives.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from bnlab.errors import ConfigError, ShapeError
from bnlab.norm import kernels
from bnlab.norm.functional import BatchNormOutput, NonFiniteBatchWarning, batch_norm, check_eps, check_momentum
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["lp_batch_norm", "lp_statistic", "gaussian_max_abs_mean", "LpBatchNorm1d", "LpBatchNorm2d",
           "LpBatchNorm3d", "P_VALUES"]

P_VALUES = (1, 2, math.inf)


def _check_p(p: float) -> float:
    if isinstance(p, str) and p.lower() in ("inf", "linf"):
        return math.inf
    if isinstance(p, bool) or p not in P_VALUES:
        raise ConfigError(f"p must be 1, 2 or math.inf (Santurkar et al. 2018, Sec. 3.3), got p={p!r}")
    return float(p)


@functools.lru_cache(maxsize=256)
def gaussian_max_abs_mean(n: int) -> float:
    """E[max_{i<=n} |Z_i|] for i.i.d. Z_i ~ N(0, 1): the p = inf scaling constant c_n.

    By quadrature of E[M] = int_0^inf P(M > t) dt = int_0^inf (1 - erf(t/sqrt(2))^n) dt in float64
    (trapezoid rule on 40001 points up to t = sqrt(2 log n) + 12, where the integrand is < 1e-30);
    relative error below 1e-7.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int (values per unit), got {n!r}")
    upper = math.sqrt(2 * math.log(max(n, 2))) + 12.0
    t = torch.linspace(0.0, upper, 40001, dtype=torch.float64)
    # log(erf(t/sqrt2)) = log1p(-erfc(t/sqrt2)) keeps erf^n accurate for large n.
    log_cdf = torch.log1p(-torch.special.erfc(t / math.sqrt(2.0)))
    integrand = -torch.expm1(n * log_cdf)  # 1 - erf^n; at t = 0: 1 - 0 = 1
    return float(torch.trapezoid(integrand, t))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def lp_statistic(values: Tensor, p: float, dims: list[int]) -> Tensor:
    """The scaled ℓp statistic D_p over ``dims`` (keepdim) of already centred (or raw) values; an
    estimate of sigma for N(0, sigma^2) values. Shapes: values (N, C, ...), result (1, C, 1, ...)."""
    p = _check_p(p)
    n = math.prod(values.shape[d] for d in dims)
    if p == 1:
        return values.abs().mean(dim=dims, keepdim=True) * math.sqrt(math.pi / 2)
    if p == 2:
        return values.pow(2).mean(dim=dims, keepdim=True).sqrt()
    return values.abs().amax(dim=dims, keepdim=True) / gaussian_max_abs_mean(n)


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def lp_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    p: float,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    centered: bool = True,
) -> BatchNormOutput:
    """ℓp batch normalization of ``x`` (N, C, *spatial) per channel, without side effects.

    training=True: ``gamma * (x - mu) / sqrt(D_p^2 + eps) + beta`` with batch statistics (module
    docstring), and the running statistics returned updated (``running_var`` tracks D_p^2 * n/(n-1)).
    training=False: BN's inference map with the running statistics (batch statistics when there are
    none). Returns ``BatchNormOutput(out, running_mean, running_var, num_batches_tracked)``; the
    arguments are never modified. Raises ConfigError for a bad p/eps/momentum, ShapeError for a bad
    input (non-float, no batch dimension, one value per channel in training, channel mismatch).
    """
    p = _check_p(p)
    if not training and running_mean is not None:
        # BN's inference map: the affine map with the tracked statistics.
        return batch_norm(x, weight, bias, running_mean, running_var, training=False, momentum=momentum,
                          eps=eps, num_batches_tracked=num_batches_tracked)
    # Validation (dtype, rank, channels, eps, momentum) by the BN core on a cheap eval call.
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        batch_norm(x, weight, bias, None, None, training=False, eps=eps)  # raises the right ShapeError
    c = x.shape[1]
    for name, t in (("weight", weight), ("running_mean", running_mean)):
        if t is not None and t.numel() != c:
            raise ShapeError(f"ℓp batch norm expected {t.numel()} channels ({name}) but the input has {c}, shape "
                             f"{tuple(x.shape)}; the channel dimension is dim 1 (use num_features={c})")
    eps = check_eps(eps)  # symbolic-safe under torch.compile(dynamic=True), like the BN core's
    momentum = check_momentum(momentum)
    dims = _reduce_dims(x)
    n = x.numel() // c
    if n <= 1:
        raise ShapeError(f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}; "
                         f"use a batch size > 1, or call model.eval() to use the running statistics")
    if _fused_applies(x, weight, bias, centered):
        out, mu, s2, _ = _LpTrain.apply(x, weight, bias, p, eps, dims, n, kernels.applies(x, weight, bias), None)
    else:
        out, mu, s2 = _lp_train(x, weight, bias, p, eps, dims, centered)

    new_mean, new_var, new_count = running_mean, running_var, num_batches_tracked
    if training and running_mean is not None:
        if running_var is None:
            raise ConfigError("pass both running_mean and running_var, or neither")
        with torch.no_grad():
            bmean, bvar = mu.flatten(), s2.flatten() * (n / (n - 1))
            if bool(torch.isfinite(bmean).all() & torch.isfinite(bvar).all()):
                if num_batches_tracked is not None:
                    new_count = num_batches_tracked + 1
                if momentum is None:
                    if new_count is None:
                        raise ConfigError("momentum=None (cumulative average) needs num_batches_tracked")
                    f = 1.0 / float(new_count)
                else:
                    f = momentum
                new_mean = torch.lerp(running_mean, bmean.to(running_mean.dtype), f)
                new_var = torch.lerp(running_var, bvar.to(running_var.dtype), f)
            else:
                warnings.warn(_NON_FINITE_MESSAGE, NonFiniteBatchWarning, stacklevel=2)
    return BatchNormOutput(out, new_mean, new_var, new_count)


_NON_FINITE_MESSAGE = ("ℓp batch norm got a training batch with NaN or inf values; its statistics were not added "
                       "to the running statistics. Check the input data and the learning rate.")


def _lp_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, p: float, eps: float, dims: list[int],
              centered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The training forward in torch ops (differentiable to any order, under every transform):
    (out, mu (1, C, 1, ...), D_p^2 (1, C, 1, ...)). ``_LpTrain`` runs the same ops, so both give the
    same numbers."""
    cdtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xc = x.to(cdtype)
    mu = xc.mean(dim=dims, keepdim=True)  # (1, C, 1, ...)
    d = xc - mu
    stat = lp_statistic(d if centered else xc, p, dims)  # (1, C, 1, ...)
    s2 = stat.pow(2)
    scale = torch.rsqrt(s2 + eps)
    if weight is not None:
        scale = scale * _per_channel(weight.to(cdtype), x.dim())
    out = d * scale
    if bias is not None:
        out = out + _per_channel(bias.to(cdtype), x.dim())
    return out.to(x.dtype), mu, s2


_FUSED_DTYPES = (torch.float32, torch.float64)


def _fused_applies(x: Tensor, weight: Tensor | None, bias: Tensor | None, centered: bool) -> bool:
    """Whether ``_LpTrain`` serves a training call: eager autograd on a float32/float64 input whose
    parameters share its dtype (no casts in the graph), centred statistics, something to differentiate,
    and no torch.func transform, forward-mode AD level, compile or trace active. A decision on metadata
    only; everything else takes ``_lp_train`` (the same numbers)."""
    if not centered or x.dtype not in _FUSED_DTYPES or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)):
        return False
    for t in (weight, bias):
        if t is not None and t.dtype != x.dtype:
            return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    return _forward_ad._current_level < 0  # the Function has no forward-mode (jvp) rule


class _LpTrain(torch.autograd.Function):
    """ℓp BN's training forward (centred) with its backward written out: one autograd node instead of
    about fifteen (mean, sub, abs, mean, mul, pow, add, rsqrt, mul, view, mul, add, ... and their
    backward nodes), which on a small layer (the DLN's 1000 x 10) cost more than the arithmetic.

    The backward applies the very operations autograd's formulas apply to the composite ``_lp_train``
    (same order, same operands; a broadcast (1, C, 1, ...) operand where autograd expands it first,
    which rounds each element the same way), so the gradients are bit-identical to the composite's
    (tested). A second derivative (``create_graph=True``) differentiates the composite again: the
    backward recomputes it from the saved inputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p, eps, dims, n, kernel, update):
        """``kernel``: run the operations through the C++ operators ``bnlab::lp_train``/``lp_train_``
        (the same ATen calls in the same order, without a Python frame around each). ``update``: None,
        or (running_mean, running_var, num_batches_tracked, momentum) updated in place by ``lp_train_``
        (kernel only). Returns (out, mu, s2, accepted), accepted a bool tensor (or None without update)."""
        ctx.p, ctx.eps, ctx.dims, ctx.n, ctx.kernel = p, eps, dims, n, kernel
        cn = gaussian_max_abs_mean(n) if p == math.inf else 0.0
        ctx.cn = cn
        accepted = None
        if kernel:
            if update is None:
                out, mu, s2, d, stat, r, scale, a, top = torch.ops.bnlab.lp_train(x, weight, bias, p, eps, cn)
            else:
                rm, rv, count, momentum = update
                out, mu, s2, d, stat, r, scale, a, top, accepted = torch.ops.bnlab.lp_train_(
                    x, weight, bias, rm, rv, count, p, eps, cn, 0.0 if momentum is None else momentum, momentum is None)
                ctx.mark_non_differentiable(accepted)
            ctx.save_for_backward(x, weight, bias, d, stat, r, scale, a, top)
            ctx.mark_non_differentiable(mu, s2)
            return out, mu, s2, accepted
        mu = x.mean(dim=dims, keepdim=True)
        d = x - mu
        if p == math.inf:  # lp_statistic's ops, keeping |d| and its maximum for the backward
            a = d.abs()
            top = a.amax(dim=dims, keepdim=True)
            stat = top / gaussian_max_abs_mean(n)
        else:
            a = top = None
            stat = lp_statistic(d, p, dims)
        s2 = stat.pow(2)
        r = torch.rsqrt(s2 + eps)
        w = None if weight is None else _per_channel(weight, x.dim())
        scale = r if w is None else r * w
        out = d * scale
        if bias is not None:
            out = out + _per_channel(bias, x.dim())
        ctx.save_for_backward(x, weight, bias, d, stat, r, scale, a, top)
        ctx.mark_non_differentiable(mu, s2)
        return out, mu, s2, accepted

    @staticmethod
    def backward(ctx, g, _gmu, _gs2, _gaccepted):
        x, weight, bias, d, stat, r, scale, a, top = ctx.saved_tensors
        p, eps, dims, n = ctx.p, ctx.eps, ctx.dims, ctx.n
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rest = (None,) * 6  # p, eps, dims, n, kernel, update
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite (any order)
            inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            with torch.enable_grad():
                out = _lp_train(x, weight, bias, p, eps, dims, True)[0]
                grads = iter(torch.autograd.grad(out, inputs, g, create_graph=True, allow_unused=True))
            return (next(grads) if need_x else None, next(grads) if need_w else None,
                    next(grads) if need_b else None, *rest)
        if ctx.kernel:
            gx, gw, gb = torch.ops.bnlab.lp_backward(g, x, weight, d, stat, r, scale, a, top, p, ctx.cn, need_x,
                                                     need_w and weight is not None, need_b and bias is not None)
            return gx, gw, gb, *rest
        c = x.shape[1]
        # out = d * scale (+ b): autograd's MulBackward0/AddBackward0, reduced to the operand's shape.
        gb = g.sum(dims, keepdim=True).reshape(c) if need_b and bias is not None else None
        gscale = (g * d).sum(dims, keepdim=True)
        gw = None
        if weight is not None:
            if need_w:
                gw = (gscale * r).reshape(c)
            gr = gscale * _per_channel(weight, x.dim())
        else:
            gr = gscale
        if not need_x:
            return None, gw, gb, *rest
        gd = g * scale
        # r = rsqrt(s2 + eps), s2 = stat^2: RsqrtBackward0 (-0.5 * grad * r^3), PowBackward0 (grad * 2 stat).
        gstat = ((-0.5 * gr) * r.pow(3)) * (2.0 * stat)
        if p == 1:  # stat = mean|d| * sqrt(pi/2): MulBackward1, MeanBackward1 (grad / n), AbsBackward0 (grad * sgn)
            gd2 = ((gstat * math.sqrt(math.pi / 2)) / n) * d.sgn()
        elif p == 2:  # stat = sqrt(mean d^2): SqrtBackward0 (grad / (2 stat)), MeanBackward1, PowBackward0 (grad * 2 d)
            gd2 = ((gstat / (2 * stat)) / n) * (2.0 * d)
        else:  # stat = amax|d| / c_n: DivBackward1, AmaxBackward0 (grad / count * mask), AbsBackward0
            mask = a == top
            gd2 = ((gstat / gaussian_max_abs_mean(n)) / mask.sum(dims, keepdim=True)) * mask * d.sgn()
        gd = gd + gd2
        # d = x - mu, mu = mean(x): SubBackward0 (-grad, summed to mu's shape), MeanBackward1 (grad / n);
        # negated before the sum, as autograd does (-(sum) would differ in the sign of a zero sum).
        gx = gd + (-gd).sum(dims, keepdim=True) / n
        return gx, gw, gb, *rest


def _kernel_forward(module, x: Tensor) -> Tensor | None:
    """A training step of an ℓp layer in one C++ call (``bnlab::lp_train_``: the forward's operations
    and the running-statistics update in place), the same numbers as the functional path (tested bit
    for bit). Taken for an eager training call with running statistics on a valid CPU input whose
    dtype the parameters and buffers share, centred statistics and something to differentiate; None
    for everything else, which the general path handles (and explains, for bad input). Small layers
    are dominated by per-call overhead, so this reads the module's dicts directly."""
    if not module.training or not module.centered or not module.track_running_stats:
        return None
    params, buffers = module._parameters, module._buffers
    weight, bias = params.get("weight"), params.get("bias")
    if module.affine and (weight is None or bias is None):
        return None  # weight/bias reparametrized (torch.nn.utils.parametrize, weight_norm): the general path reads them
    rm, rv, count = buffers.get("running_mean"), buffers.get("running_var"), buffers.get("num_batches_tracked")
    eps, momentum = module.eps, module.momentum
    if (rm is None or rv is None or type(x) is not Tensor or x.dim() not in module._ranks()
            or x.shape[1] != module.num_features or rm.dtype != x.dtype or rv.dtype != x.dtype
            or not (isinstance(eps, float) and 0 < eps < math.inf)
            or not (momentum is None or (isinstance(momentum, float) and 0.0 <= momentum <= 1.0))
            or (momentum is None and count is None)
            or not _fused_applies(x, weight, bias, True) or not kernels.applies(x, weight, bias, rm, rv)):
        return None
    n = x.numel() // x.shape[1]
    if n <= 1:
        return None
    out, _, _, accepted = _LpTrain.apply(x, weight, bias, module.p, eps, _reduce_dims(x), n, True,
                                         (rm, rv, count, momentum))
    if not accepted:
        warnings.warn(_NON_FINITE_MESSAGE, NonFiniteBatchWarning, stacklevel=2)
    return out


class _LpBatchNorm:
    """Shared forward of the LpBatchNorm shells (parameters, buffers and checks come from BN)."""

    def __init__(self, num_features: int, p: float = 2, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 centered: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.p = _check_p(p)
        self.centered = bool(centered)

    def forward(self, x: Tensor) -> Tensor:
        out = _kernel_forward(self, x)
        if out is not None:
            return out
        self._check_input_dim(x)
        update = self.training and self.track_running_stats
        keep_running = not self.training or self.track_running_stats
        result = lp_batch_norm(
            x, self.weight, self.bias,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            p=self.p, training=self.training or self.running_mean is None, momentum=self.momentum,
            eps=self.eps, num_batches_tracked=self.num_batches_tracked if update else None,
            centered=self.centered,
        )
        if update:
            with torch.no_grad():  # in place, like BN: functional_call with cloned buffers updates the clones
                self.running_mean.copy_(result.running_mean)
                self.running_var.copy_(result.running_var)
                self.num_batches_tracked.copy_(result.num_batches_tracked)
        return result.out

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return f"{super().extra_repr()}, p={p}, centered={self.centered}"


class LpBatchNorm1d(_LpBatchNorm, BatchNorm1d):
    """ℓp batch normalization of (N, C) or (N, C, L) inputs (``p`` in 1, 2, math.inf); BN's
    constructor plus ``p`` and ``centered``; BN's parameters, buffers and state_dict keys."""


class LpBatchNorm2d(_LpBatchNorm, BatchNorm2d):
    """ℓp batch normalization of (N, C, H, W) inputs, statistics per channel over N, H, W."""


class LpBatchNorm3d(_LpBatchNorm, BatchNorm3d):
    """ℓp batch normalization of (N, C, D, H, W) inputs, statistics per channel over N, D, H, W."""
