"""Frozen batch normalization: BN's inference map with fixed statistics and affine parameters.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias        (Ioffe & Szegedy 2015, Alg. 2)

``weight``, ``bias``, ``running_mean`` and ``running_var`` are *buffers*: they are saved, moved and cast
with the model but are not parameters, so no optimizer trains them and ``model.train()`` changes
nothing (a frozen layer always behaves like BN in eval mode). This is the usual way to fine-tune
detection/segmentation backbones with small batches. Unlike torchvision's ``FrozenBatchNorm2d``
(2-D only), FrozenBatchNorm1d/2d/3d cover (N, C[, L]), (N, C, H, W) and (N, C, D, H, W) inputs.

State dict: the same keys as BN's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``; the last is kept, never incremented), so a ``torch.nn.BatchNorm`` state_dict
loads into a frozen layer and a frozen layer's state_dict into BN, both with ``strict=True``. A layer
frozen from BN without affine parameters (``affine=False``) has no ``weight``/``bias`` keys either.

``freeze(model)`` replaces every BN layer of ``model`` (torch.nn's BatchNorm1d/2d/3d, bnlab's and
bnlab's BN variants) *in place* by a frozen copy of its current state and returns the model (or the
frozen layer, when ``model`` itself is a BN layer). ``unfreeze(model)`` puts back a layer of the
original class, with the frozen layer's current statistics and affine values as new Parameters, in
the model's current train/eval mode, also in place. Optimizers built before ``freeze`` still hold
the old BN Parameters, which no longer affect the model: build the optimizer after freezing (and
again after unfreezing).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from bnlab.errors import ChannelError, ConfigError, ConfigTypeError, InputTypeError, ShapeError
from bnlab.norm.functional import batch_norm, check_eps
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _rank_message

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]

_BN = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))


class _FrozenBatchNorm(nn.Module):
    """Shared body of FrozenBatchNorm{1,2,3}d."""

    _RANKS: tuple[int, ...] = ()
    _LAYOUT = ""
    _HINT = ""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise ConfigTypeError(f"num_features must be an int (the number of channels C), got {num_features!r}")
        if num_features < 1:
            raise ConfigError(f"num_features must be a positive int (the number of channels C), got {num_features!r}")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = check_eps(eps)
        self.affine = bool(affine)
        self.register_buffer("weight", torch.ones(num_features, **kw) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **kw) if affine else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self._source: Optional[nn.Module] = None  # the BN layer this one was frozen from (unfreeze restores it)

    def __setattr__(self, name, value):
        if name == "_source":  # kept out of _modules: not a submodule, not in state_dict
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, *spatial) -> same shape; eval-mode BN whatever ``self.training`` says."""
        if not isinstance(x, Tensor):
            raise InputTypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}; convert it "
                                 f"with torch.as_tensor(x, dtype=torch.float32)")
        if x.dim() not in self._RANKS:
            raise ShapeError(_rank_message(type(self).__name__, list(self._RANKS), self._LAYOUT, self._HINT,
                                           list(x.shape)))
        if x.shape[1] != self.num_features:
            raise ChannelError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels, "
                               f"shape {tuple(x.shape)}; the channel dimension is dim 1")
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, training=False,
                          eps=self.eps).out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # BN checkpoints from before torch 0.4.1 have no num_batches_tracked: accept them as BN does.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    @classmethod
    def from_bn(cls, bn: nn.Module) -> "_FrozenBatchNorm":
        """A frozen copy of ``bn``'s current state (same device and dtype); ``bn`` is kept for unfreeze."""
        ref = bn.running_mean
        frozen = cls(bn.num_features, eps=bn.eps, affine=bn.weight is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(bn, name, None), getattr(frozen, name)
                if src is not None and dst is not None:
                    setattr(frozen, name, src.detach().clone())
        frozen.training = bn.training
        frozen._source = bn
        return frozen

    def to_bn(self) -> nn.Module:
        """A trainable BN layer with this layer's current values: the class it was frozen from (with its
        settings: momentum, virtual batch size, ...), or bnlab's BatchNorm of the same dims."""
        if self._source is not None:
            bn = copy.deepcopy(self._source)
        else:
            bn = _UNFROZEN[type(self)](self.num_features, eps=self.eps, affine=self.affine)
        ref = self.running_mean
        bn.to(device=ref.device, dtype=ref.dtype)
        bn.load_state_dict(self.state_dict())
        bn.train(self.training)
        return bn


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """BN's inference map with fixed buffers, (N, C) or (N, C, L) inputs. Constructor:
    ``(num_features, eps=1e-5, affine=True, device=None, dtype=None)``; buffers start at the values of
    a fresh BN (weight 1, bias 0, running_mean 0, running_var 1)."""

    _RANKS = (2, 3)
    _LAYOUT = "(N, C) or (N, C, L)"
    _HINT = "use FrozenBatchNorm2d for images (N, C, H, W), or flatten to (N, C)"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """BN's inference map with fixed buffers, (N, C, H, W) inputs."""

    _RANKS = (4,)
    _LAYOUT = "(N, C, H, W)"
    _HINT = "use FrozenBatchNorm1d for (N, C) or (N, C, L), FrozenBatchNorm3d for (N, C, D, H, W)"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """BN's inference map with fixed buffers, (N, C, D, H, W) inputs."""

    _RANKS = (5,)
    _LAYOUT = "(N, C, D, H, W)"
    _HINT = "use FrozenBatchNorm2d for (N, C, H, W); add a batch dim with x.unsqueeze(0)"


_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_UNFROZEN = {FrozenBatchNorm1d: BatchNorm1d, FrozenBatchNorm2d: BatchNorm2d, FrozenBatchNorm3d: BatchNorm3d}


def _bn_dims(module: nn.Module) -> int | None:
    for cls, dims in _BN:
        if isinstance(module, cls):
            return dims
    return None


def _refusal(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot be frozen, or None."""
    label = f"layer {name!r} ({type(module).__name__})" if name else f"{type(module).__name__}"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return f"{label} is a lazy layer that has not seen an input yet; run one forward pass before freeze()"
    if module.running_mean is None:
        return (f"{label} keeps no running statistics (track_running_stats=False), so there is nothing to freeze; "
                f"build it with track_running_stats=True and train it, or leave it unfrozen")
    if getattr(module, "noise_in_eval", False):
        return (f"{label} adds noise in eval mode (noise_in_eval=True), which a frozen layer would drop; set "
                f"noise_in_eval=False first")
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BN layer of ``model`` by a FrozenBatchNorm of the same dims, in place (module
    docstring); returns ``model``, or the frozen layer when ``model`` is itself a BN layer.

    BN layers: instances of torch.nn.BatchNorm1d/2d/3d (so bnlab's BN and its variants too). Raises
    ConfigError, before changing anything, for a layer without running statistics, an uninitialized
    lazy layer, or a noisy layer that adds noise in eval mode.
    """
    targets = [(name, m, _bn_dims(m)) for name, m in model.named_modules()]
    targets = [(name, m, d) for name, m, d in targets if d is not None]
    for name, m, _ in targets:  # check all before replacing any: a refusal leaves the model as it was
        why = _refusal(name, m)
        if why:
            raise ConfigError(f"freeze: {why}")
    return _replace(model, {name: _FROZEN[d].from_bn(m) for name, m, d in targets})


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm of ``model`` by a trainable BN layer (``to_bn``), in place;
    returns ``model``, or the new layer when ``model`` is itself frozen."""
    return _replace(model, {name: m.to_bn() for name, m in model.named_modules() if isinstance(m, _FrozenBatchNorm)})


def _replace(model: nn.Module, new: dict[str, nn.Module]) -> nn.Module:
    if "" in new:
        return new[""]
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    return model
