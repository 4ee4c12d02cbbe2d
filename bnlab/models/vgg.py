"""VGG (Simonyan & Zisserman) for the Santurkar et al. 2018 experiments (App. A, Figs. 1-6).

Santurkar uses a "VGG-like network" on CIFAR-10 with Glorot init and plain SGD; the exact variant and
width are not stated in the paper. Their figures index layers up to "Layer #13", which matches the
13 conv layers of VGG-16, so VGG-16 is the default reproduction topology (our inference); VGG-11
(configuration "A", 8 convs) is what the public reproductions use. ``width`` scales
every conv channel count for the CPU scale-down (widths /4 or /8).

Choices the papers leave open, and ours:
- Norm placement: after each conv, before the ReLU; the conv bias is dropped when a norm follows
  (Ioffe & Szegedy 2015, Sec. 3.2; Santurkar et al. 2018: "before the non-linearity").
- Max-pools on small inputs: a 2x2 max-pool is skipped once the feature map is 1x1 (it would make it
  0x0). On 32x32 inputs all five pools run (32 -> 1); on 28x28 the fifth is skipped (28-14-7-3-1); on
  8x8 the last two are. Skipping keeps the conv stack and the weight-layer count unchanged for every
  dataset; adaptive pooling at the end would also work but would average the spatial positions that a
  larger input keeps, changing the head's input.
- Head: ``"linear"`` (default) is one linear layer from the flattened features to the classes, the
  usual CIFAR VGG head (512 -> 10 at width 1 on 32x32); weight layer #14 of VGG-16. ``"mlp"`` is the
  classic CIFAR head FC H-H-classes with H = the last conv width (512 at width 1, as in the
  public reproductions), each hidden FC followed by the norm and the activation, like the
  convs. Whether Santurkar's FC layers had BN is not stated in the paper. No dropout (plain SGD, no
  regularizers, App. A.1).
- Init: Glorot uniform for every conv and linear weight, zero biases (App. A.1, see ``_init``);
  norm γ = 1, β = 0 (the factory's default). ``init="kaiming"`` (He et al. 2015, N(0, 2/fan_in), for
  ReLU only) is not the paper's. Without a norm, Glorot multiplies the second moment of the ReLU
  signal by C_in/(C_in + C_out) per conv (1/2 at equal widths, 1/3 where the width doubles): about
  1e-5 over VGG-16's 13 convs at any width (width enters only through the first layer), where He keeps
  it near 1. On 28x28 inputs convs 11-13 run on 1x1 maps, where the zero padding leaves only the
  centre tap of each 3x3 kernel (1/9 of the fan-in), so both lose another ~1/9 per conv there: for
  unit-variance inputs conv13's output variance at 1/8 width is ~5e-3 with He and ~1e-8 with Glorot
  (tests/test_models.py). The
  Santurkar VGG experiment uses He init as a declared deviation (rule R-S2 in docs/claims.md).

Layer names (VGG-11, linear head): ``conv1 norm1 act1 pool1 conv2 norm2 act2 pool2 conv3 ... conv8 norm8
act8 pool5 flatten fc9``; the number in ``conv{k}``/``fc{k}``/``norm{k}``/``act{k}`` is the weight-layer
index k ("Layer #k").
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

# Conv channel counts at width 1; "M" is a 2x2 max-pool (Simonyan & Zisserman Table 1, configs A and D).
ARCHS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
HEADS = ("linear", "mlp")
INITS = ("glorot", "kaiming")


def scaled_channels(channels: int, width: float) -> int:
    """channels * width rounded half up, at least 1 (so width 1/8 gives 8-16-32-64-64 for VGG)."""
    return max(1, math.floor(channels * width + 0.5))


class VGG(LayeredModel):
    """VGG-11/16 conv stack with a norm before every activation and a small classifier head.

    Args:
        arch: "vgg11" or "vgg16".
        width: channel multiplier (> 0) applied to every conv (and to the "mlp" head's hidden width).
        norm_kwargs: options of every norm layer, passed to ``make_norm`` (e.g. ``virtual_batch_size`` for
            "ghost", ``momentum``); None = the layer's defaults.
        norm: norm name for ``make_norm`` ("batch", "none", ...).
        in_channels, input_size: shape of the (square) input images, e.g. 3 and 32 for CIFAR-10.
        num_classes: output units.
        activation: "relu" (default), "sigmoid" or "tanh".
        head: "linear" or "mlp" (see the module docstring).
        init: "glorot" (the paper's, default) or "kaiming" (He init, ReLU only; see the module docstring).

    Raises:
        ConfigError: an unknown arch, head or init, or a width/size that is not positive.

    Works with ``channels_last`` inputs (and weights): nothing in the chain assumes a memory format.
    """

    def __init__(
        self,
        arch: str = "vgg16",
        width: float = 1.0,
        norm: str = "batch",
        in_channels: int = 3,
        input_size: int = 32,
        num_classes: int = 10,
        activation: str = "relu",
        head: str = "linear",
        init: str = "glorot",
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown VGG arch {arch!r}; valid archs: {', '.join(ARCHS)}")
        if head not in HEADS:
            raise ConfigError(f"unknown VGG head {head!r}; valid heads: {', '.join(HEADS)}")
        if init not in INITS:
            raise ConfigError(f"unknown VGG init {init!r}; valid inits: {', '.join(INITS)}")
        if init == "kaiming" and activation != "relu":
            raise ConfigError(f"init='kaiming' is He init for ReLU; with activation={activation!r} use "
                              "init='glorot'")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not (
            math.isfinite(width) and width > 0
        ):
            raise ConfigError(f"width must be a positive finite number, got {width!r}")
        check_positive_int("in_channels", in_channels)
        check_positive_int("input_size", input_size)
        check_positive_int("num_classes", num_classes)
        self.arch, self.width, self.head, self.norm_name, self.init = arch, width, head, norm, init
        self.in_channels, self.input_size = in_channels, input_size

        bias = not uses_norm(norm)
        k, n_pools, size, channels = 0, 0, input_size, in_channels
        for item in ARCHS[arch]:
            if item == "M":
                if size >= 2:  # a 1x1 map cannot be pooled further: skip (module docstring)
                    n_pools += 1
                    self._add(f"pool{n_pools}", MaxPool2d(kernel_size=2, stride=2))  # (N, C, s/2, s/2)
                    size //= 2
                continue
            k += 1
            out = scaled_channels(int(item), width)
            self._add(f"conv{k}", nn.Conv2d(channels, out, 3, padding=1, bias=bias), WEIGHT)  # (N, out, s, s)
            self._add(f"norm{k}", make_norm(norm, out, 2, **(norm_kwargs or {})), NORM)  # (N, out, s, s)
            self._add(f"act{k}", make_activation(activation), ACT)  # (N, out, s, s)
            channels = out
        self.feature_size = size  # spatial size of the last feature map

        self._add("flatten", nn.Flatten())  # (N, C * s * s)
        features = channels * size * size
        if head == "mlp":
            hidden = channels  # H = last conv width (512 at width 1)
            for _ in range(2):
                k += 1
                self._add(f"fc{k}", nn.Linear(features, hidden, bias=bias), WEIGHT)  # (N, H)
                self._add(f"norm{k}", make_norm(norm, hidden, 1, **(norm_kwargs or {})), NORM)  # (N, H)
                self._add(f"act{k}", make_activation(activation), ACT)  # (N, H)
                features = hidden
        self._add(f"fc{k + 1}", nn.Linear(features, num_classes), WEIGHT)  # (N, num_classes)

        init_layer = glorot_ if init == "glorot" else kaiming_
        for layer in self.weight_layers().values():
            init_layer(layer)

    def _check_input(self, x: Tensor) -> None:
        check_image_input(x, self.in_channels, self.input_size, f"VGG({self.arch!r})")
