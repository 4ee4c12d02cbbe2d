"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better", Sec. 4).

A training batch of N examples is split, in order, into *virtual* ("ghost") batches of
``virtual_batch_size`` examples, and each virtual batch is batch-normalized with its own statistics;
gamma, beta and the running statistics are shared. This keeps the noise of small-batch statistics in
large-batch training.

    virtual batches:  x[0:v], x[v:2v], ..., x[kv:N]      (v = virtual_batch_size)
    output:           concat_k BN_train(x[kv:(k+1)v])     (each with its own mean and biased variance)

Remainder. When v does not divide N, the last virtual batch is smaller: N = 130, v = 32 gives four
batches of 32 and one of 2. A last virtual batch with a single value per channel (one example of an
(N, C) input) has no batch variance; it joins the previous virtual batch instead (N = 129, v = 32:
32, 32, 32, 33), so a data loader's odd last batch does not stop training.

Running statistics. Updated once per virtual batch, in order, exactly as ``torch.nn.BatchNorm`` would
update them if it were called on the virtual batches one after another (each ghost batch is a BN
batch; the alternative, one update per step with averaged statistics, is not what we do).
``num_batches_tracked`` therefore counts virtual batches, and ``momentum`` weighs each virtual batch
(with momentum=None, the cumulative average over all virtual batches seen). Eval mode normalizes with the running statistics (BN's inference map); a
layer without running statistics (``track_running_stats=False``) uses virtual-batch statistics in
eval too, as torch.nn's BN uses batch statistics.

With ``virtual_batch_size >= N`` ghost BN is BN (same outputs, gradients and running statistics).
The parameters, buffers and ``state_dict`` keys are BN's, so a ``torch.nn.BatchNorm`` state_dict
loads into a ghost layer and back; ``virtual_batch_size`` is a constructor setting, not state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnlab.errors import ConfigError, ConfigTypeError
from bnlab.norm.functional import BatchNormOutput, batch_norm, check_input
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, store_statistics

__all__ = ["ghost_batch_norm", "virtual_batch_sizes", "check_virtual_batch_size", "GhostBatchNorm1d",
           "GhostBatchNorm2d", "GhostBatchNorm3d", "DEFAULT_VIRTUAL_BATCH_SIZE"]

DEFAULT_VIRTUAL_BATCH_SIZE = 32


def check_virtual_batch_size(virtual_batch_size: int) -> int:
    """virtual_batch_size must be a positive int (examples per virtual batch)."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise ConfigTypeError(f"virtual_batch_size must be an int (examples per virtual batch), got "
                              f"{virtual_batch_size!r}; e.g. virtual_batch_size=32")
    if virtual_batch_size < 1:
        raise ConfigError(f"virtual_batch_size must be >= 1 (examples per virtual batch), got {virtual_batch_size}; "
                          f"e.g. virtual_batch_size=32 (use a value >= the batch size for plain BN)")
    return virtual_batch_size


def virtual_batch_sizes(n: int, virtual_batch_size: int, values_per_example: int = 2) -> list[int]:
    """Sizes of the virtual batches a batch of ``n`` examples is split into (module docstring):
    full batches of ``virtual_batch_size``, then the remainder; a remainder holding a single value per
    channel (``values_per_example == 1`` and one example left) joins the previous virtual batch.
    ``virtual_batch_sizes(130, 32) == [32, 32, 32, 32, 2]``; ``(129, 32, 1) -> [32, 32, 32, 33]``."""
    v = check_virtual_batch_size(virtual_batch_size)
    if n <= v:
        return [n]
    sizes = [v] * (n // v)
    rest = n - v * len(sizes)
    if rest == 1 and values_per_example == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


def ghost_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    virtual_batch_size: int,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> BatchNormOutput:
    """Ghost batch normalization of ``x`` (N, C, *spatial), without side effects.

    training=True: each virtual batch (module docstring) is normalized by :func:`batch_norm` with its
    own statistics, and the running statistics (when given) are returned updated once per virtual
    batch, in order. training=False with running statistics: BN's inference map. training=False
    without: virtual-batch statistics, no update.

    Shapes: x (N, C, *spatial); weight, bias, running_mean, running_var (C,); num_batches_tracked a
    0-dim integer tensor (counts virtual batches). Returns ``BatchNormOutput``; the arguments are never
    modified. Raises ConfigError for a bad virtual_batch_size/eps/momentum, and batch_norm's errors
    (ShapeError, ChannelError, DtypeError) for a bad input.
    """
    v = check_virtual_batch_size(virtual_batch_size)
    if not training and running_mean is not None:
        return batch_norm(x, weight, bias, running_mean, running_var, training=False, momentum=momentum, eps=eps,
                          num_batches_tracked=num_batches_tracked)
    check_input(x, weight, running_mean)
    per_example = x[0].numel() // x.shape[1] if x.shape[0] and x.shape[1] else 0
    sizes = virtual_batch_sizes(x.shape[0], v, per_example)
    if len(sizes) == 1:
        return batch_norm(x, weight, bias, running_mean, running_var, training=True, momentum=momentum, eps=eps,
                          num_batches_tracked=num_batches_tracked)
    rm, rv, count = running_mean, running_var, num_batches_tracked
    outs = []
    for chunk in torch.split(x, sizes, dim=0):
        res = batch_norm(chunk, weight, bias, rm, rv, training=True, momentum=momentum, eps=eps,
                         num_batches_tracked=count)
        outs.append(res.out)
        rm, rv, count = res.running_mean, res.running_var, res.num_batches_tracked
    return BatchNormOutput(torch.cat(outs, dim=0), rm, rv, count)


class _GhostBatchNorm:
    """Shared forward of the GhostBatchNorm shells (parameters, buffers and checks are BN's)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 virtual_batch_size: int = DEFAULT_VIRTUAL_BATCH_SIZE) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        update = self.training and self.track_running_stats
        use_batch = self.training or self.running_mean is None
        result = ghost_batch_norm(
            x, self.weight, self.bias,
            self.running_mean if update or not use_batch else None,
            self.running_var if update or not use_batch else None,
            virtual_batch_size=self.virtual_batch_size, training=use_batch, momentum=self.momentum, eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if update else None,
        )
        if update:
            store_statistics(self, result)
        return result.out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost BN of (N, C) or (N, C, L) inputs: BatchNorm1d's constructor plus ``virtual_batch_size``
    (default 32; Hoffer et al. 2017 use 128 on ImageNet-scale batches). A ``torch.nn.BatchNorm1d``
    subclass with BN's parameters, buffers and state_dict keys."""


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost BN of (N, C, H, W) inputs; statistics per channel over each virtual batch's N, H, W."""


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    """Ghost BN of (N, C, D, H, W) inputs; statistics per channel over each virtual batch's N, D, H, W."""
