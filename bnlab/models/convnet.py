"""Small conv net: the CPU proxy for Ioffe & Szegedy's BN-Inception experiments (Sec. 4.2).

Inception on ImageNet is out of CPU scope; we use a small conv net instead, the one our
pilot runs used: conv 3x3 (32-64-64) -> norm -> activation per stage, 2x2
max-pool between stages, global average pool, linear classifier. It keeps the traits of Inception that
matter for Sec. 4.2: norm at the input of every nonlinearity, convolutional BN over
(N, H, W), no FC layers except the top classifier, ReLU or (for BN-x5-Sigmoid) sigmoid.

Choices the papers leave open, and ours:
- One conv per stage, pools only *between* stages (none after the last: global average pooling
  follows); a pool is skipped once the map is 1x1 (tiny inputs such as 8x8 digits with many stages).
- Dropout (Inception used 40%, BN-x5 removes it, Sec. 4.2.1) is a ``dropout`` layer right
  before the classifier, present only when ``dropout > 0`` so that ``dropout=0`` runs exactly the same
  code (and consumes no random numbers) as a net built without it.
- Init: He (kaiming-normal, fan_in) for the convs with ReLU, Glorot uniform with sigmoid/tanh, since
  each keeps its activation's pre-activations O(1) at step 0; the classifier (no nonlinearity after it)
  always Glorot uniform. Biases zero; conv biases dropped when a norm follows (Ioffe & Szegedy 2015, Sec. 3.2).

Layer names (widths of length 3): ``conv1 norm1 act1 pool1 conv2 norm2 act2 pool2 conv3 norm3 act3 gap
flatten [dropout] fc4``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.models._activations import make_activation
from bnlab.models._base import (
    ACT,
    NORM,
    WEIGHT,
    LayeredModel,
    check_image_input,
    check_positive_int,
    uses_norm,
)
from bnlab.models._init import glorot_, kaiming_
from bnlab.models.pool import MaxPool2d
from bnlab.norm.factory import make_norm


class ConvNet(LayeredModel):
    """conv3x3 -> norm -> act stages with max-pools between, global average pool, (dropout), linear.

    Args:
        widths: output channels of the conv stages (pilot: 32-64-64; quick profile e.g. 16-32-32).
        activation: "relu" (Inception, BN-x5/x30) or "sigmoid" (BN-x5-Sigmoid); "tanh" also accepted.
        norm_kwargs: options of every norm layer, passed to ``make_norm`` (e.g. ``virtual_batch_size`` for
            "ghost", ``momentum``); None = the layer's defaults.
        norm: norm name for ``make_norm``.
        in_channels, input_size: input image shape (grey 28x28 by default). Any spatial size >= 1
            works (global average pooling); ``input_size`` only decides which pools are skipped.
        num_classes: output units.
        dropout: drop probability before the classifier, in [0, 1).
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 64),
        activation: str = "relu",
        norm: str = "batch",
        in_channels: int = 1,
        input_size: int = 28,
        num_classes: int = 10,
        dropout: float = 0.0,
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if len(widths) == 0:
            raise ConfigError("widths must list at least one conv stage, e.g. (32, 64, 64)")
        for w in widths:
            check_positive_int("each conv width", w)
        check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size)
        check_positive_int("num_classes", num_classes)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            math.isfinite(dropout) and 0.0 <= dropout < 1.0
        ):
            raise ConfigError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.norm_name, self.activation = norm, activation
        self.in_channels, self.input_size = in_channels, input_size

        bias = not uses_norm(norm)
        init_conv = kaiming_ if activation == "relu" else glorot_
        size, channels, n_pools = input_size, in_channels, 0
        for k, out in enumerate(widths, start=1):
            if k > 1 and size >= 2:  # pool between stages; a 1x1 map is not pooled further
                n_pools += 1
                self._add(f"pool{n_pools}", MaxPool2d(kernel_size=2, stride=2))  # (N, C, s/2, s/2)
                size //= 2
            conv = nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=bias)
            init_conv(conv)
            self._add(f"conv{k}", conv, WEIGHT)  # (N, out, s, s)
            self._add(f"norm{k}", make_norm(norm, out, 2, **(norm_kwargs or {})), NORM)  # (N, out, s, s)
            self._add(f"act{k}", make_activation(activation), ACT)  # (N, out, s, s)
            channels = out
        self._add("gap", nn.AdaptiveAvgPool2d(1))  # (N, C, 1, 1)
        self._add("flatten", nn.Flatten())  # (N, C)
        if dropout > 0:
            self._add("dropout", nn.Dropout(dropout))  # (N, C)
        fc = nn.Linear(channels, num_classes)
        glorot_(fc)
        self._add(f"fc{len(widths) + 1}", fc, WEIGHT)  # (N, num_classes)

    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, self.in_channels, None, "ConvNet")
