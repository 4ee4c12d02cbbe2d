"""Layer and group normalization, for comparison with BN: statistics per example, not per batch.

Group normalization (Wu & He 2018, "Group Normalization", Eq. 1-3 with S_i = the channels of one group
of one example): the C channels of each example are split into ``num_groups`` groups, and each group
is normalized over its channels and all spatial positions with its own mean and biased variance;
then a per-channel gamma, beta. Layer normalization (Ba, Kiros & Hinton 2016) over channels and
spatial positions is the one-group case (Wu & He 2018, Sec. 3.1), which for (N, C) inputs is
``torch.nn.LayerNorm(C)``.

Both are ``torch.nn.GroupNorm`` subclasses (``torch.nn.functional.group_norm`` does the work; state_dict
keys ``weight``, ``bias``), with no running statistics: train and eval mode compute the same function,
and ``is_batchnorm`` is False for them. What bnlab adds: the rank check of the dims they were built for
and a default number of groups.

Default ``num_groups``: Wu & He's G = 32 where C allows it: the largest divisor of C that is at most 32
and leaves at least 2 channels per group (C = 64 -> 32, 48 -> 24, 32 -> 16, 10 -> 5, 7 -> 1), so a
small layer does not silently become instance normalization (one channel per group); C = 1 -> 1.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from bnlab.errors import ChannelError, ConfigError, ConfigTypeError, InputTypeError, ShapeError

__all__ = ["GroupNorm", "LayerNorm", "default_num_groups", "DEFAULT_MAX_GROUPS"]

DEFAULT_MAX_GROUPS = 32
_RANKS = {1: (2, 3), 2: (4,), 3: (5,)}
_LAYOUT = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def default_num_groups(num_channels: int) -> int:
    """The largest divisor of ``num_channels`` that is at most 32 (Wu & He 2018's G = 32) and leaves at
    least 2 channels per group (1 for a single channel)."""
    if num_channels < 2:
        return 1
    return max(g for g in range(1, min(DEFAULT_MAX_GROUPS, num_channels // 2) + 1) if num_channels % g == 0)


class GroupNorm(nn.GroupNorm):
    """Group normalization of (N, C, *spatial) inputs with per-channel affine parameters.

    ``GroupNorm(num_features, num_groups=None, eps=1e-5, affine=True, device=None, dtype=None, *, dims=None)``:
    num_groups must divide num_features (None: :func:`default_num_groups`); dims (1, 2, 3 or None for
    any rank >= 2) selects the accepted input rank as for BatchNorm{dims}d. Raises ConfigError for a
    bad setting, ShapeError/ChannelError for an input of the wrong rank or channel count.
    """

    def __init__(self, num_features: int, num_groups: Optional[int] = None, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, dims: Optional[int] = None) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise ConfigTypeError(f"num_features must be an int (the number of channels C), got {num_features!r}")
        if num_features < 1:
            raise ConfigError(f"num_features must be a positive int (the number of channels C), got {num_features!r}")
        if num_groups is None:
            num_groups = default_num_groups(num_features)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 \
                or num_features % num_groups:
            raise ConfigError(f"num_groups must be a positive int dividing num_features={num_features}, got "
                              f"num_groups={num_groups!r}; e.g. num_groups={default_num_groups(num_features)}, "
                              f"or None for that default")
        if dims is not None and dims not in _RANKS:
            raise ConfigError(f"dims must be 1, 2, 3 or None, got {dims!r}")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < float("inf")):
            raise ConfigError(f"eps must be a positive finite number, got eps={eps!r}; e.g. eps=1e-5")
        super().__init__(num_groups, num_features, eps=float(eps), affine=affine, device=device, dtype=dtype)
        self.dims = dims

    @property
    def num_features(self) -> int:
        return self.num_channels

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, *spatial) -> the same shape."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise InputTypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}; convert it with "
                                 f"torch.as_tensor(x, dtype=torch.float32)")
        ranks = _RANKS[self.dims] if self.dims is not None else None
        if (ranks is not None and x.dim() not in ranks) or x.dim() < 2:
            layout = _LAYOUT[self.dims] if self.dims is not None else "(N, C, ...)"
            raise ShapeError(f"{name} (dims={self.dims}) expects a {layout} input, got shape {tuple(x.shape)}; "
                             f"build it with the dims of the input (make_norm(..., dims=...))")
        if x.shape[1] != self.num_channels:
            raise ChannelError(f"{name}({self.num_channels}) got an input with {x.shape[1]} channels, shape "
                               f"{tuple(x.shape)}; the channel dimension is dim 1")
        return super().forward(x)


class LayerNorm(GroupNorm):
    """Layer normalization over the channels and spatial positions of each example (one group), with
    per-channel affine parameters. ``LayerNorm(num_features, eps=1e-5, affine=True, device=None,
    dtype=None, *, dims=None)``; for (N, C) inputs it equals ``torch.nn.LayerNorm(C)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None, *,
                 dims: Optional[int] = None) -> None:
        super().__init__(num_features, 1, eps=eps, affine=affine, device=device, dtype=dtype, dims=dims)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
