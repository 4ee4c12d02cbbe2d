"""Activation modules by name: one fresh instance per layer.

Each layer gets its own module (never a functional call, never a shared instance) so that a probe can
hook the input of one particular nonlinearity (Ioffe Fig. 1 measures the input of a sigmoid,
Ioffe & Szegedy 2015, Sec. 4.1). ReLU is built with ``inplace=False``: an in-place ReLU would overwrite the norm output
that a hook on the norm (or on the ReLU's input) has just recorded.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bnlab.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """A new activation module for ``name`` ("relu", "sigmoid" or "tanh")."""
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ConfigError(f"unknown activation {name!r}; valid activations: {valid}") from None
