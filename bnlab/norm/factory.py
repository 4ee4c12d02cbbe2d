"""Norm layers chosen by name, and conversion of existing models.

With/without BN is a config value, never a code fork: models call ``make_norm(cfg.norm, C, dims)``.
``convert`` swaps the BN layers of an existing model between torch.nn and bnlab in place, keeping the
very Parameter and buffer objects (and so statistics, device, dtype, mode and optimizer state), so
bnlab's layers (and probes) can be used on models built elsewhere.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Iterable, Optional

from torch import nn

from bnlab.errors import ConfigError
from bnlab.norm.functional import check_eps, check_momentum
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["make_norm", "norm_names", "convert", "register_norm"]

_BNLAB_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# name -> builder(num_features, dims, **kwargs), and the keyword options it accepts (None: not checked).
_NORMS: dict[str, Callable[..., nn.Module]] = {}
_OPTIONS: dict[str, Optional[frozenset]] = {}


def _options_of(cls: type, *fixed: str) -> frozenset:
    """The keyword options of ``cls``'s constructor, less ``num_features`` and the ones a norm name fixes."""
    params = inspect.signature(cls).parameters.values()
    return frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                     and p.name not in ("num_features", *fixed))


def register_norm(name: str, builder: Callable[..., nn.Module], options: Optional[Iterable[str]] = None) -> None:
    """Add a norm layer to the factory: ``builder(num_features, dims, **kwargs) -> nn.Module``.

    ``options``: the keyword arguments the builder accepts; ``make_norm`` refuses any other with a
    ConfigError. None takes them from the builder's signature when it has no ``**kwargs`` (otherwise
    they are not checked)."""
    if options is None:
        params = list(inspect.signature(builder).parameters.values())[2:]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            options = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    _NORMS[name] = builder
    _OPTIONS[name] = None if options is None else frozenset(options)


def norm_names() -> list[str]:
    return sorted(_NORMS)


def make_norm(name: str, num_features: int, dims: int, **kwargs) -> nn.Module:
    """Build the norm layer ``name`` for ``num_features`` channels.

    dims: 1 for (N, C) / (N, C, L) inputs, 2 for (N, C, H, W), 3 for (N, C, D, H, W).
    ``"none"`` gives ``nn.Identity`` so a model without normalization has no extra modules.
    kwargs: the layer's constructor options (e.g. ``eps``, ``momentum``, ``virtual_batch_size`` for
    "ghost", ``num_groups`` for "group"); the README's norm table lists them per name.

    Raises ConfigError for an unknown name, a bad dims, or an option the layer does not take (the
    message lists the options it takes).
    """
    if name not in _NORMS:
        raise ConfigError(f"unknown norm {name!r}; known norms: {', '.join(norm_names())}")
    if dims not in _BNLAB_BN:
        raise ConfigError(f"dims must be 1 (N,C[,L]), 2 (N,C,H,W) or 3 (N,C,D,H,W), got {dims!r}")
    allowed = _OPTIONS.get(name)
    unknown = sorted(set(kwargs) - allowed) if allowed is not None else []
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, n=1)) else repr(k)
                 for k in unknown]
        takes = ", ".join(sorted(allowed)) if allowed else "no options"
        raise ConfigError(f"make_norm({name!r}) got unknown option(s) {', '.join(hints)}; {name!r} takes: {takes}")
    return _NORMS[name](num_features, dims, **kwargs)


def _dims_of(module: nn.Module) -> int | None:
    for dims in (1, 2, 3):
        if type(module) in (_TORCH_BN[dims], _BNLAB_BN[dims]):
            return dims
    return None


register_norm("batch", lambda num_features, dims, **kw: _BNLAB_BN[dims](num_features, **kw), _options_of(BatchNorm1d))
register_norm("none", lambda num_features, dims: nn.Identity())


def _swap_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """Make ``module`` an instance of ``cls`` in place: bnlab's BN classes subclass torch.nn's and add
    no state, so the same object keeps its Parameters, buffers, hooks, device, dtype and mode."""
    module.__class__ = cls  # eps/momentum checked by convert first (bnlab refuses eps <= 0, momentum > 1)
    return module


def convert(model: nn.Module, to: str = "bnlab") -> nn.Module:
    """Swap every BatchNorm1d/2d/3d of ``model`` for bnlab's (``to="bnlab"``) or torch.nn's
    (``to="torch"``), in place, and return the model.

    The layers stay the same Python objects (only their class changes), so their Parameter and
    buffer objects, hooks and train/eval mode are kept: an optimizer built before ``convert`` keeps
    updating the BN weights, and a state_dict is unchanged. Subclasses (SyncBatchNorm, lazy or
    custom BN layers) are left alone: their behaviour is not that of the plain class.

    Raises ConfigError for an unknown ``to``, or (to="bnlab") for a layer whose eps or momentum
    bnlab refuses (the message names the value and the fix); then no layer has been converted.
    """
    if to not in ("bnlab", "torch"):
        raise ConfigError(f"convert(to=...) must be 'bnlab' or 'torch', got {to!r}")
    target = _BNLAB_BN if to == "bnlab" else _TORCH_BN
    source = _TORCH_BN if to == "bnlab" else _BNLAB_BN
    layers = [(m, _dims_of(m)) for m in model.modules()]
    layers = [(m, d) for m, d in layers if d is not None and type(m) is source[d]]
    if to == "bnlab":  # check every layer before changing any: a refused layer leaves the model as it was
        for module, _ in layers:
            check_eps(module.eps)
            check_momentum(module.momentum)
    for module, dims in layers:
        _swap_class(module, target[dims])
    return model


# --- Santurkar et al. 2018 variants: noisy BN (App. A.2.1, Algorithm 1) and ℓp BN (Sec. 3.3) ---------
import math as _math  # noqa: E402

from bnlab.norm.lp import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d  # noqa: E402
from bnlab.norm.noisy import NoiseOnly, NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d  # noqa: E402

_NOISY_BN = {1: NoisyBatchNorm1d, 2: NoisyBatchNorm2d, 3: NoisyBatchNorm3d}
_LP_BN = {1: LpBatchNorm1d, 2: LpBatchNorm2d, 3: LpBatchNorm3d}
register_norm("noisy_batch", lambda num_features, dims, **kw: _NOISY_BN[dims](num_features, **kw),
              _options_of(NoisyBatchNorm1d))
register_norm("noise_only", lambda num_features, dims, **kw: NoiseOnly(num_features, **kw), _options_of(NoiseOnly))
for _name, _p in (("l1", 1), ("l2", 2), ("linf", _math.inf)):
    register_norm(_name, lambda num_features, dims, _p=_p, **kw: _LP_BN[dims](num_features, p=_p, **kw),
                  _options_of(LpBatchNorm1d, "p"))

# --- BN variants: ghost BN, batch renormalization, frozen BN; layer and group norm for comparison ----
from bnlab.norm.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d  # noqa: E402
from bnlab.norm.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d  # noqa: E402
from bnlab.norm.layer_group import GroupNorm, LayerNorm  # noqa: E402
from bnlab.norm.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d  # noqa: E402

_GHOST_BN = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
_RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_FROZEN_BN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
register_norm("ghost", lambda num_features, dims, **kw: _GHOST_BN[dims](num_features, **kw),
              _options_of(GhostBatchNorm1d))
register_norm("renorm", lambda num_features, dims, **kw: _RENORM[dims](num_features, **kw), _options_of(BatchRenorm1d))
register_norm("frozen", lambda num_features, dims, **kw: _FROZEN_BN[dims](num_features, **kw),
              _options_of(FrozenBatchNorm1d))
register_norm("layer", lambda num_features, dims, **kw: LayerNorm(num_features, dims=dims, **kw),
              _options_of(LayerNorm, "dims"))
register_norm("group", lambda num_features, dims, **kw: GroupNorm(num_features, dims=dims, **kw),
              _options_of(GroupNorm, "dims"))
