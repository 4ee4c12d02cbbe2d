"""Thin ``nn.Module`` shells around :func:`bnlab.norm.functional.batch_norm`.

``BatchNorm1d/2d/3d`` are drop-in replacements for the ``torch.nn`` classes: same constructor
arguments and defaults, same parameters, buffers and ``state_dict`` keys (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), same momentum semantics (``None`` = the
cumulative average), unbiased running variance, and ``track_running_stats=False`` meaning batch
statistics in eval too. A state_dict saved from one loads into the other.

What they add over ``torch.nn``: validation with messages that say how to fix the input, running
statistics that a NaN/inf batch cannot poison, and numerically stable statistics for inputs whose
mean is large relative to their spread.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.errors import ShapeError
from bnlab.norm.functional import batch_norm, check_eps, check_momentum

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "is_batchnorm"]


class _BatchNorm(nn.Module):
    """Shared parameters/buffers and forward of the BatchNorm{1,2,3}d shells."""

    _is_bnlab_batchnorm = True  # lets probes recognise bnlab BN without importing it
    _version = 2  # same state_dict version as torch.nn (num_batches_tracked present)
    _ranks: tuple[int, ...] = ()
    _layout = ""
    _hint = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ShapeError(f"num_features must be a positive int (the number of channels C), got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Zero mean, unit variance, zero count; with momentum=None the next batches then give
        exactly Alg. 2's population statistics."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ShapeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in self._ranks:
            raise ShapeError(
                f"{type(self).__name__} expects a {' or '.join(f'{r}-D' for r in self._ranks)} input "
                f"{self._layout}, got a {x.dim()}-D input of shape {tuple(x.shape)}; {self._hint}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # torch.nn semantics: batch statistics in training, and in eval when no running stats are kept.
        update = self.training and self.track_running_stats
        keep_running = not self.training or self.track_running_stats
        result = batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            training=self.training or self.running_mean is None,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if update else None,
        )
        if update:
            # In place, like torch.nn: functional_call with cloned buffers then updates the clones.
            with torch.no_grad():
                self.running_mean.copy_(result.running_mean)
                self.running_var.copy_(result.running_var)
                self.num_batches_tracked.copy_(result.num_batches_tracked)
        return result.out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints written before torch 0.4.1 have no num_batches_tracked; torch.nn fills in 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class BatchNorm1d(_BatchNorm):
    """BN over (N, C) or (N, C, L) inputs; drop-in for ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"
    _hint = "use BatchNorm2d for images (N, C, H, W), or flatten to (N, C)"


class BatchNorm2d(_BatchNorm):
    """BN over (N, C, H, W) inputs, per channel over N, H, W; drop-in for ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)
    _layout = "(N, C, H, W)"
    _hint = "use BatchNorm1d for (N, C) or (N, C, L), BatchNorm3d for (N, C, D, H, W); add a batch dim with x.unsqueeze(0)"


class BatchNorm3d(_BatchNorm):
    """BN over (N, C, D, H, W) inputs; drop-in for ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
    _hint = "use BatchNorm2d for (N, C, H, W); add a batch dim with x.unsqueeze(0)"


def is_batchnorm(module: nn.Module) -> bool:
    """True for bnlab's BN modules (marked by ``_is_bnlab_batchnorm``, so other code need not import
    them) and torch.nn's BatchNorm1d/2d/3d, SyncBatchNorm and lazy variants; not for layer, group or
    instance norm, whose statistics are per example."""
    return getattr(module, "_is_bnlab_batchnorm", False) or isinstance(module, nn.modules.batchnorm._BatchNorm)
