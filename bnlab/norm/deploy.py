"""BN at deployment: fold it into the neighbouring linear layer, and recalibrate running statistics.

Folding. In eval mode BN is an affine map per channel, y = a * x + b with a = γ / sqrt(running_var +
eps) and b = β - a * running_mean. After a Conv1d/2d/3d or Linear with weight W and bias c (c = 0
without bias), ``BN(conv(x)) = conv'(x)`` with W' = a * W (per output channel) and c' = a * c + b:
exact, whatever the padding. Before such a layer (BN -> Linear, or BN -> conv without padding),
``layer(BN(x)) = layer'(x)`` with W' = W * a (per input channel) and c' = c + W b: exact only where
every input position is a BN output, which zero padding breaks (the padded zeros are not a * 0 + b),
so a padded conv after BN is refused. Both give the same eval outputs up to rounding (float32: about
1e-6 relative), and remove a layer's memory traffic.

Recalibration ("precise BN", as fvcore's ``update_bn_stats``): after the weights change without
train-mode passes over representative data (weight averaging, pruning, a fine-tune in eval mode),
the running statistics are stale. ``recalibrate`` runs the model in training mode over ``batches``
and sets each BN layer's running_mean and running_var to the *population* mean and unbiased
variance of the inputs that layer saw, over all the batches together, accumulated exactly in
float64 (Chan et al.'s pairwise update of count, mean and M2), so batches of unequal sizes are
weighted by their sizes. ``torch.optim.swa_utils.update_bn`` instead averages per-batch statistics
(momentum=None), whose variance misses the spread between batch means.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.norm.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnlab.norm.modules import is_batchnorm

__all__ = ["fold", "fold_pair", "recalibrate"]

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FROZEN = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(a, b) of eval-mode BN as y = a * x + b per channel, in float64."""
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ConfigError(f"{type(bn).__name__} has no running statistics (track_running_stats=False): its eval "
                          "output depends on the batch, so it cannot be folded into a fixed layer")
    var = bn.running_var.double()
    a = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    b = -a * bn.running_mean.double()
    if bn.bias is not None:
        b = b + bn.bias.double()
    return a, b


def _foldable(m: nn.Module) -> bool:
    """BN with running statistics, or frozen BN (fixed statistics and affine as buffers)."""
    return (is_batchnorm(m) or isinstance(m, FROZEN)) and getattr(m, "running_mean", None) is not None


def _check_pair(layer: nn.Module, bn: nn.Module) -> None:
    if not isinstance(layer, _LINEAR):
        raise ConfigError(f"can fold BN only into Linear or Conv1d/2d/3d, got {type(layer).__name__}")
    if not (is_batchnorm(bn) or isinstance(bn, FROZEN)):
        raise ConfigError(f"expected a BatchNorm layer, got {type(bn).__name__}")


def _unpadded(conv: nn.Module) -> bool:
    pad = conv.padding
    return pad == "valid" if isinstance(pad, str) else all(p == 0 for p in pad)


def fold_pair(layer: nn.Module, bn: nn.Module, *, bn_first: bool = False) -> nn.Module:
    """A new layer equal, in eval mode, to ``bn(layer(x))`` (or ``layer(bn(x))`` with ``bn_first``).

    ``layer``: nn.Linear or nn.Conv1d/2d/3d (groups=1 for ``bn_first``); ``bn``: a BatchNorm with
    running statistics over the layer's output (input) channels. The result always has a bias, in
    the layer's dtype. Raises ConfigError for other layers, a channel mismatch, BN without running
    statistics, or ``bn_first`` with a padded or grouped conv (not exact)."""
    _check_pair(layer, bn)
    a, b = _bn_affine(bn)
    out = copy.deepcopy(layer)
    w = layer.weight.detach().double()
    c = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                 device=w.device)
    if not bn_first:
        if a.numel() != w.shape[0]:
            raise ConfigError(f"BN has {a.numel()} channels but the layer has {w.shape[0]} outputs")
        shape = (-1,) + (1,) * (w.dim() - 1)
        new_w, new_c = w * a.reshape(shape), a * c + b
    else:
        if not isinstance(layer, nn.Linear) and (not _unpadded(layer) or layer.groups != 1):
            raise ConfigError(f"folding BN into the following {type(layer).__name__} is exact only without "
                              "padding and groups (padded zeros are not BN outputs); fold it into the layer "
                              "before it instead, or keep it")
        if a.numel() != w.shape[1]:
            raise ConfigError(f"BN has {a.numel()} channels but the layer has {w.shape[1]} inputs")
        shape = (1, -1) + (1,) * (w.dim() - 2)
        # layer(a x + b) = layer(a x) + Σ_{i,k} W[o, i, k] b_i
        new_w, new_c = w * a.reshape(shape), c + (w * b.reshape(shape)).sum(dim=tuple(range(1, w.dim())))
    dtype = layer.weight.dtype
    out.weight = nn.Parameter(new_w.to(dtype), requires_grad=layer.weight.requires_grad)
    out.bias = nn.Parameter(new_c.to(dtype), requires_grad=layer.weight.requires_grad)
    return out


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BN (frozen BN included) that directly follows (or, exactly, precedes) a Linear/Conv layer inside an
    ``nn.Sequential`` of ``model``; the BN is replaced by ``nn.Identity``. Returns the folded model (a
    copy unless ``inplace``) in eval mode. BN layers elsewhere (e.g. called from a custom forward)
    are left as they are: use ``fold_pair`` for those. Raises ConfigError as ``fold_pair``."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        i = 0
        while i < len(names) - 1:
            first, second = seq._modules[names[i]], seq._modules[names[i + 1]]
            if isinstance(first, _LINEAR) and _foldable(second):
                seq._modules[names[i]] = fold_pair(first, second).eval()
                seq._modules[names[i + 1]] = nn.Identity()
                i += 2
                continue
            if (_foldable(first) and isinstance(second, _LINEAR)
                    and (isinstance(second, nn.Linear) or (_unpadded(second) and second.groups == 1))):
                seq._modules[names[i]] = nn.Identity()
                seq._modules[names[i + 1]] = fold_pair(second, first, bn_first=True).eval()
                i += 2
                continue
            i += 1
    return model


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_batchnorm(m) and getattr(m, "running_mean", None) is not None]


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any], *, num_batches: int | None = None,
                forward: Callable[[nn.Module, Any], Any] | None = None, progress: bool = False) -> dict[str, int]:
    """Set every BN layer's running statistics to the population statistics of its inputs over
    ``batches`` (module docstring), in place.

    Args:
        batches: an iterable of inputs (a tensor, or what ``forward`` takes, e.g. ``(x, y)`` pairs
            from a DataLoader: by default the first element of a tuple/list is the input).
        num_batches: use at most this many batches (default: all).
        forward: ``forward(model, batch)`` runs the model on one batch (default ``model(x)``).
        progress: show a tqdm progress bar.

    Returns {layer name: number of values per channel it saw}. The model's train/eval flags and its
    parameters are unchanged; BN layers' ``num_batches_tracked`` advances by the number of batches.
    Raises ConfigError when the model has no BN with running statistics or no batch was given."""
    layers = _bn_layers(model)
    if not layers:
        raise ConfigError("the model has no BatchNorm layer with running statistics to recalibrate")
    forward = forward or (lambda m, b: m(b[0] if isinstance(b, (tuple, list)) else b))
    acc: dict[str, list] = {n: [0, None, None] for n, _ in layers}  # count, mean, M2 (float64)

    def hook(name: str):
        def fn(module, args) -> None:
            x = args[0].detach()
            c = x.shape[1]
            v = x.transpose(0, 1).reshape(c, -1).double()  # (C, N * spatial)
            n_b = v.shape[1]
            if n_b == 0:
                return
            mean_b = v.mean(dim=1)
            m2_b = ((v - mean_b[:, None]) ** 2).sum(dim=1)
            n, mean, m2 = acc[name]
            if mean is None:
                acc[name] = [n_b, mean_b, m2_b]
            else:  # Chan, Golub & LeVeque: the exact merge of two groups' (count, mean, M2)
                total = n + n_b
                delta = mean_b - mean
                acc[name] = [total, mean + delta * (n_b / total), m2 + m2_b + delta ** 2 * (n * n_b / total)]
        return fn

    flags = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    seen = 0
    try:
        model.train()
        it = iter(batches)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=num_batches, desc="recalibrate BN", unit="batch")
        for batch in it:
            if num_batches is not None and seen >= num_batches:
                break
            forward(model, batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    if seen == 0:
        raise ConfigError("recalibrate got no batch; pass an iterable of inputs (e.g. a DataLoader)")
    for name, bn in layers:
        n, mean, m2 = acc[name]
        if mean is None or n < 2:
            raise ConfigError(f"BN layer {name!r} saw {n} value(s) per channel; recalibration needs at least 2")
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((m2 / (n - 1)).to(bn.running_var.dtype))
    return {name: acc[name][0] for name, _ in layers}
