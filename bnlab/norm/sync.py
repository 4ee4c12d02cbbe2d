"""Synchronized BN: batch statistics over every process of a data-parallel job, on CPU (gloo) and CUDA.

Each process computes, per channel, its count n_p, mean μ_p and M2_p = Σ (x - μ_p)² in float64; one
``all_gather`` brings every (n_p, μ_p, M2_p) to every process, which merges them exactly (Chan, Golub
& LeVeque's pairwise update): the global mean and biased variance are those of the concatenated
batch, for unequal per-process batch sizes and for a process with an empty batch. (torch's
``nn.SyncBatchNorm`` gathers mean and 1/√(var+eps) and rebuilds each variance from the latter, and
refuses CPU tensors.) The backward pass all-reduces the two per-channel sums Σ dy and Σ dy·x̂ and
applies BN's compact backward formula with the global count, so input gradients equal those of BN on
the concatenated batch; weight and bias gradients are each process's share (their sum over processes
is the full-batch gradient; DistributedDataParallel's gradient all-reduce averages them, as with
torch's SyncBatchNorm).

Without an initialized process group, with one process, in eval mode, or inside ``local_statistics()``
(one process measuring the model alone, e.g. rank 0 running probes while the others train on), the
layer is ordinary BN over this process's batch.
A collective that fails (a process died or stalls past the group's timeout) raises a
``SyncBatchNormError`` naming the timeout and the fix instead of hanging: set ``timeout=`` in
``torch.distributed.init_process_group`` to bound the wait.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.errors import BnlabError, ConfigError
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["SyncBatchNorm", "SyncBatchNormError", "convert_sync", "local_statistics", "merge_moments"]

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d)


class SyncBatchNormError(BnlabError, RuntimeError):
    """A collective of synchronized BN failed (another process died, or stalled past the timeout)."""


_local = threading.local()


@contextlib.contextmanager
def local_statistics() -> Iterator[None]:
    """Within this block every ``SyncBatchNorm`` of this thread uses this process's batch alone and
    starts no collective: one process can run a model in training mode (a probe, a measurement) while
    the other processes are not in the same forward pass, which would otherwise wait for them forever
    (or until the process group's timeout)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of per-group (count (G,), mean (G, C), M2 (G, C)) into the whole's (n, mean (C,),
    M2 (C,)), float64, groups of count 0 ignored (Chan, Golub & LeVeque 1979)."""
    n = torch.zeros((), dtype=torch.float64, device=means.device)
    mean = torch.zeros(means.shape[1], dtype=torch.float64, device=means.device)
    m2 = torch.zeros_like(mean)
    for k in range(counts.shape[0]):
        n_k = counts[k]
        if n_k <= 0:
            continue
        total = n + n_k
        delta = means[k] - mean
        mean = mean + delta * (n_k / total)
        m2 = m2 + m2s[k] + delta * delta * (n * n_k / total)
        n = total
    return n, mean, m2


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        raise SyncBatchNormError(
            f"synchronized BN: a collective with the other processes failed ({str(err).strip().splitlines()[0]}); "
            "another process died or stalled past the process group's timeout. Check the other processes' "
            "logs; bound the wait with torch.distributed.init_process_group(timeout=...)") from None


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, group: Any
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = x.shape[1]
        v = x.detach().transpose(0, 1).reshape(c, -1).double()  # (C, n_p)
        n_p = v.shape[1]
        mean_p = v.mean(dim=1) if n_p else torch.zeros(c, dtype=torch.float64, device=x.device)
        m2_p = ((v - mean_p[:, None]) ** 2).sum(dim=1) if n_p else torch.zeros_like(mean_p)
        mine = torch.cat([torch.tensor([float(n_p)], dtype=torch.float64, device=x.device), mean_p, m2_p])
        world = dist.get_world_size(group)
        parts = [torch.empty_like(mine) for _ in range(world)]
        _collective(dist.all_gather, parts, mine, group=group)
        allp = torch.stack(parts)  # (P, 1 + 2C)
        n, mean, m2 = merge_moments(allp[:, 0], allp[:, 1:1 + c], allp[:, 1 + c:])
        if n < 2:
            raise ConfigError(f"synchronized BN needs more than 1 value per channel over all processes, got {int(n)}")
        invstd = torch.rsqrt(m2 / n + eps)
        shape = (1, c) + (1,) * (x.dim() - 2)
        xhat = (x.double() - mean.reshape(shape)) * invstd.reshape(shape)
        y = xhat
        if weight is not None:
            y = y * weight.double().reshape(shape)
        if bias is not None:
            y = y + bias.double().reshape(shape)
        ctx.save_for_backward(xhat.to(x.dtype), invstd, weight)
        ctx.n, ctx.group, ctx.has_bias = n, group, bias is not None
        ctx.mark_non_differentiable(mean, m2, n)
        return y.to(x.dtype), mean, m2, n

    @staticmethod
    def backward(ctx: Any, gy: Tensor, *_: Any):
        xhat, invstd, weight = ctx.saved_tensors
        c = gy.shape[1]
        shape = (1, c) + (1,) * (gy.dim() - 2)
        dims = [0] + list(range(2, gy.dim()))
        g = gy.double()
        xh = xhat.double()
        local = torch.stack([g.sum(dim=dims), (g * xh).sum(dim=dims)])  # (2, C): Σ dy, Σ dy x̂ (this process)
        total = local.clone()
        _collective(dist.all_reduce, total, group=ctx.group)
        w = weight.double().reshape(shape) if weight is not None else 1.0
        gx = (w * invstd.reshape(shape) / ctx.n) * (ctx.n * g - total[0].reshape(shape) - xh * total[1].reshape(shape))
        gw = local[1].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = local[0].to(gy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx.to(gy.dtype), gw, gb, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN over the batch of every process of ``process_group`` (default: the world); (N, C, *) inputs,
    1-D to 3-D. Same parameters, buffers and state_dict keys as ``nn.BatchNorm*d``; the running
    variance is the unbiased variance of the whole batch. Source: Ioffe & Szegedy 2015, Alg. 1 over
    the union of the processes' batches (module docstring for the algorithm and errors)."""

    _is_bnlab_batchnorm = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def _synced(self) -> bool:
        return self.training and not getattr(_local, "depth", 0) and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input of shape {tuple(input.shape)}")
        if not self._synced():
            return super().forward(input)
        y, mean, m2, n = _SyncBN.apply(input, self.weight, self.bias, self.eps, self.process_group)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_((m2 / (n - 1)).to(self.running_var.dtype), alpha=m)
        return y


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every plain BatchNorm1d/2d/3d (torch.nn's and bnlab's; not the variants) of ``model``
    by ``SyncBatchNorm`` with the same parameters, buffers, eps, momentum and train/eval mode, in
    place; returns the model (like ``nn.SyncBatchNorm.convert_sync_batchnorm``, without its
    CUDA-only restriction)."""
    if isinstance(model, SyncBatchNorm):
        return model
    if type(model) in _PLAIN_BN:  # not the variants (ghost, renorm, noisy, ℓp): their statistics differ
        new = SyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats,
                            process_group)
        if model.affine:
            new.weight, new.bias = model.weight, model.bias
        new.running_mean, new.running_var = model.running_mean, model.running_var
        new.num_batches_tracked = model.num_batches_tracked
        new.train(model.training)
        return new
    for name, child in list(model.named_children()):
        model._modules[name] = convert_sync(child, process_group)
    return model
