"""Models by name, so an experiment config can say ``model="vgg16", norm="batch"``: with/without BN is a config value.

``build_model`` maps the dataset's shape (``in_shape``, ``num_classes``) onto each constructor's own
arguments and passes the rest (``**kwargs``) through after checking them against the constructor, so a
typo in a config is an error naming the valid keys rather than a silent default.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from torch import nn

from bnlab.errors import ConfigError
from bnlab.models.convnet import ConvNet
from bnlab.models.dln import DLN
from bnlab.models.mlp import IoffeMLP
from bnlab.models.vgg import VGG

IMAGE_DEFAULT_SHAPE = (1, 28, 28)
DEFAULT_NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: the class, the constructor arguments the name fixes, a one-line summary."""

    cls: type[nn.Module]
    fixed: dict[str, object]
    summary: str

    def tunable_kwargs(self) -> tuple[str, ...]:
        """Constructor arguments a caller may pass through ``build_model(**kwargs)``."""
        taken = set(self.fixed) | set(_SHAPE_ARGS[self.cls]) | {"norm"}
        return tuple(p for p in inspect.signature(self.cls).parameters if p not in taken)


MODELS: dict[str, ModelSpec] = {
    "ioffe_mlp": ModelSpec(IoffeMLP, {}, "Ioffe Fig. 1 MLP 784-100-100-100-10, sigmoid"),
    "vgg11": ModelSpec(VGG, {"arch": "vgg11"}, "VGG-11 (8 convs), width multiplier, Glorot init"),
    "vgg16": ModelSpec(VGG, {"arch": "vgg16"}, "VGG-16 (13 convs), Santurkar's VGG"),
    "convnet": ModelSpec(ConvNet, {}, "small conv net, proxy for Ioffe's BN-Inception"),
    "dln": ModelSpec(DLN, {}, "Santurkar's 25-layer 10x10 deep linear network"),
}

# Constructor arguments that build_model derives from in_shape / num_classes, per class.
_SHAPE_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
    IoffeMLP: ("in_features", "num_classes"),
    VGG: ("in_channels", "input_size", "num_classes"),
    ConvNet: ("in_channels", "input_size", "num_classes"),
    DLN: ("width",),
}


def build_model(
    name: str,
    *,
    norm: str = "batch",
    in_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build the model ``name`` (see ``MODELS``) with the norm ``norm`` for data of shape ``in_shape``.

    ``in_shape`` is one example's shape without the batch dimension; ``None`` means (1, 28, 28) for the
    image models and (width,) = (10,) for "dln". ``num_classes`` ``None`` means 10. The mapping:
    "ioffe_mlp": in_features = prod(in_shape); "vgg11"/"vgg16"/"convnet": in_shape = (C, S, S) gives
    in_channels = C, input_size = S; "dln": width = prod(in_shape), and ``num_classes`` (the regression
    output size) must equal it because the layers are square.
    """
    spec = MODELS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    unknown = sorted(set(kwargs) - set(spec.tunable_kwargs()))
    if unknown:
        raise ConfigError(
            f"unknown argument(s) {', '.join(unknown)} for model {name!r}; valid: norm, in_shape, "
            f"num_classes, {', '.join(spec.tunable_kwargs())}"
        )
    shape_args = _shape_args(name, spec.cls, in_shape, num_classes)
    return spec.cls(norm=norm, **spec.fixed, **shape_args, **kwargs)


def _shape_args(
    name: str,
    cls: type[nn.Module],
    in_shape: tuple[int, ...] | None,
    num_classes: int | None,
) -> dict[str, object]:
    if in_shape is not None:
        if not (
            isinstance(in_shape, (tuple, list))
            and len(in_shape) >= 1
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in in_shape)
        ):
            raise ConfigError(f"in_shape must be a tuple of positive ints like (1, 28, 28), got {in_shape!r}")
        in_shape = tuple(in_shape)
    if cls is DLN:
        if in_shape is None:
            return {} if num_classes is None else {"width": num_classes}
        width = math.prod(in_shape)
        if num_classes is not None and num_classes != width:
            raise ConfigError(
                f"model 'dln' has square layers: num_classes ({num_classes}) must equal prod(in_shape) "
                f"({width}); pass matching values or leave num_classes out"
            )
        return {"width": width}
    classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    shape = IMAGE_DEFAULT_SHAPE if in_shape is None else in_shape
    if cls is IoffeMLP:
        return {"in_features": math.prod(shape), "num_classes": classes}
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(
            f"model {name!r} needs square images: in_shape must be (C, S, S), got {shape!r}"
        )
    return {"in_channels": shape[0], "input_size": shape[1], "num_classes": classes}
