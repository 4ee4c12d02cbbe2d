"""Weight initializations used by the models, each tied to the paper that asks for it.

Biases (present only where no norm follows, Ioffe & Szegedy 2015, Sec. 3.2) start at zero in every scheme, so that the
with/without-norm networks differ only by the norm and the bias, not by random offsets.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _zero_bias(layer: nn.Module) -> None:
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def glorot_(layer: nn.Conv2d | nn.Linear) -> None:
    """Glorot & Bengio (2010) "normalized initialization": U(±sqrt(6 / (fan_in + fan_out))), gain 1.

    Santurkar et al. 2018 (App. A) say "Glorot initialization" for both the VGG and the DLN without naming
    the uniform or normal form; we take the uniform one, the form of Glorot's paper (also Keras' default
    and what our DLN pilot runs used).
    """
    nn.init.xavier_uniform_(layer.weight)
    _zero_bias(layer)


def gaussian_(layer: nn.Linear, std: float | None) -> None:
    """N(0, std²) weights; ``std=None`` means 1/sqrt(fan_in) (see ``IoffeMLP`` for why)."""
    fan_in = layer.weight.shape[1]
    with torch.no_grad():
        layer.weight.normal_(0.0, 1.0 / math.sqrt(fan_in) if std is None else std)
    _zero_bias(layer)


def kaiming_(layer: nn.Conv2d | nn.Linear) -> None:
    """He et al. (2015) normal init for ReLU layers: N(0, 2 / fan_in), keeping ReLU activations O(1)."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    _zero_bias(layer)
