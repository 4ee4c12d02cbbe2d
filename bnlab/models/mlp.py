"""Ioffe & Szegedy 2015, Sec. 4.1 / Fig. 1: the MNIST network 784-100-100-100-10.

Each hidden layer is z = g(BN(W u)): the norm sits immediately before the nonlinearity and normalizes
x = W u, and the bias b of W u + b is dropped because BN's β subsumes it (Ioffe & Szegedy 2015, Sec. 3.2). Without a norm
(``norm="none"``) the layer is the paper's baseline z = g(W u + b). The output layer is a plain linear
layer with bias (no norm, no nonlinearity): the softmax lives in the cross-entropy loss.

Layer names: ``flatten, fc1, norm1, act1, fc2, norm2, act2, fc3, norm3, act3, fc4``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.models._activations import make_activation
from bnlab.models._base import ACT, NORM, WEIGHT, LayeredModel, check_positive_int, uses_norm
from bnlab.models._init import gaussian_, glorot_
from bnlab.norm.factory import make_norm

INITS = ("gaussian", "glorot")


class IoffeMLP(LayeredModel):
    """Fully connected net with a norm before every hidden nonlinearity (Ioffe Fig. 1).

    Args:
        norm_kwargs: options of every norm layer, passed to ``make_norm`` (e.g. ``virtual_batch_size`` for
            "ghost", ``momentum``); None = the layer's defaults.
        norm: norm name for ``make_norm`` ("batch", "none", ...); with a norm the hidden layers have
            no bias.
        in_features: input size; any input (N, *) with prod(*) = in_features is flattened
            (e.g. (N, 1, 28, 28) -> (N, 784)).
        hidden: widths of the hidden layers (paper: three of 100).
        num_classes: output units (paper: 10).
        activation: "sigmoid" (paper), "relu" or "tanh".
        init: "gaussian" (paper: "small random Gaussian values", std not given) or
            "glorot" (uniform Glorot, as the Santurkar models).
        init_std: std of the Gaussian init. ``None`` (default) is 1/sqrt(fan_in) per layer, i.e. 0.036
            for the 784-input layer and 0.1 for the 100-input layers: "small" as the paper says and the
            our CPU scale-down's suggestion; it keeps the baseline's sigmoid inputs near unit scale at step 0
            (not saturated), so the BN/no-BN comparison is not decided by a bad init. ``1.0`` gives the
            r2rt community setting N(0, 1) used in our pilot runs (a community reproduction's choice, not the paper's); with
            784 inputs that starts the baseline's first-layer sigmoids deep in saturation.
    """

    def __init__(
        self,
        norm: str = "batch",
        in_features: int = 784,
        hidden: tuple[int, ...] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        init: str = "gaussian",
        init_std: float | None = None,
        norm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("num_classes", num_classes)
        for width in hidden:
            check_positive_int("each hidden width", width)
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}; valid inits: {', '.join(INITS)}")
        if init_std is not None:
            if init != "gaussian":
                raise ConfigError(f"init_std applies only to init='gaussian' (got init={init!r}); drop it")
            if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
                raise ConfigError(f"init_std must be a positive finite number or None, got {init_std!r}")
        self.in_features = in_features
        self.norm_name = norm
        self.init = init
        self.init_std = init_std

        self._add("flatten", nn.Flatten())  # (N, *) -> (N, in_features)
        fan_in = in_features
        for k, width in enumerate(hidden, start=1):
            self._add(f"fc{k}", nn.Linear(fan_in, width, bias=not uses_norm(norm)), WEIGHT)  # (N, width)
            self._add(f"norm{k}", make_norm(norm, width, 1, **(norm_kwargs or {})), NORM)  # (N, width)
            self._add(f"act{k}", make_activation(activation), ACT)  # (N, width)
            fan_in = width
        self._add(f"fc{len(hidden) + 1}", nn.Linear(fan_in, num_classes), WEIGHT)  # (N, num_classes)

        for layer in self.weight_layers().values():
            if init == "gaussian":
                gaussian_(layer, init_std)  # the output layer too: the paper says "weights W", all of them
            else:
                glorot_(layer)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ShapeError(
                f"IoffeMLP was built for {self.in_features} input features but got shape "
                f"{tuple(x.shape)}; pass (N, {self.in_features}) or (N, C, H, W) with C*H*W = "
                f"{self.in_features}, or build it with in_features=prod(x.shape[1:])"
            )

