"""The layout every bnlab model shares: a flat, ordered chain of named layers.

Why a flat chain with stable names (``fc1, norm1, act1, fc2, ...``)?

- Probes hook layers by name. Ioffe Fig. 1 measures the *input of the sigmoid*, i.e. the
  BN output; Santurkar Figs. 1-3, 6, 8 index weight layers as "Layer #k". So each
  model names its weight layers ``conv{k}`` / ``fc{k}`` with one 1-based ``k`` over *all* weight layers,
  and the norm and activation that follow weight layer ``k`` are ``norm{k}`` and ``act{k}``: the number
  in a name is the paper's layer number.
- With/without BN is a config value, never a code fork: every norm slot is built by
  ``make_norm`` and stays in the chain even for ``norm="none"`` (then an ``nn.Identity``), so the module
  names, and the code that runs, are the same for every norm.
- ``bnlab.norm.factory.convert`` may swap norm modules in place later; ``norm_layers()`` therefore looks
  at what sits in each slot now instead of remembering what was built.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnlab.errors import ConfigError, ShapeError

# What a named layer is, for the three probe views below.
WEIGHT, NORM, ACT, OTHER = "weight", "norm", "act", "other"


def uses_norm(norm: str) -> bool:
    """True if ``norm`` puts a normalization layer into each slot whose learnable shift β subsumes the
    bias of the preceding conv/linear layer, which is then dropped (Ioffe & Szegedy 2015, Sec. 3.2):
    the per-channel batch statistics remove any per-channel constant, and β adds one back.

    False (the layers keep their biases) for ``"none"``; ``"noise_only"`` (Santurkar Fig. 2's "standard
    network + the same noise"), whose random, time-varying shift cannot learn an offset; ``"frozen"``
    (BN's inference map with fixed buffers), whose shift is fixed; and ``"layer"``/``"group"``, whose
    per-example statistics pool several channels, so a per-channel bias before them is not removed
    and β cannot stand in for it.
    """
    return norm not in _KEEPS_BIAS


_KEEPS_BIAS = frozenset({"none", "noise_only", "frozen", "layer", "group"})  # norm names after which biases stay


class LayeredModel(nn.Module):
    """A model that is a chain of named layers, run in the order they were added.

    Subclasses call ``_add`` in forward order and ``_check_input`` for their input contract; ``forward``
    then applies the children one after another, like ``nn.Sequential`` but without its slicing
    constructor (which would call the subclass constructor with an ``OrderedDict``).
    """

    def __init__(self) -> None:
        super().__init__()
        # Plain tuples, not modules: they survive state_dict round trips and deep copies unchanged.
        self._names_by_kind: dict[str, tuple[str, ...]] = {WEIGHT: (), NORM: (), ACT: (), OTHER: ()}

    def _add(self, name: str, module: nn.Module, kind: str = OTHER) -> None:
        if name in self._modules:
            raise AssertionError(f"layer name {name!r} used twice")  # a bug in a model, not user input
        self.add_module(name, module)
        self._names_by_kind[kind] = self._names_by_kind[kind] + (name,)

    def _check_input(self, x: Tensor) -> None:
        """Raise ShapeError with a fix for an input the model cannot take (overridden per model)."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        for layer in self.children():
            x = layer(x)
        return x

    def weight_layers(self) -> dict[str, nn.Module]:
        """Conv/linear layers in forward order; Santurkar's "Layer #k" is the k-th entry (1-based)."""
        return {name: self.get_submodule(name) for name in self._names_by_kind[WEIGHT]}

    def norm_layers(self) -> dict[str, nn.Module]:
        """Norm modules in forward order; empty for ``norm="none"`` (slots holding ``nn.Identity``)."""
        out = {name: self.get_submodule(name) for name in self._names_by_kind[NORM]}
        return {name: m for name, m in out.items() if not isinstance(m, nn.Identity)}

    def nonlinearity_inputs(self) -> dict[str, nn.Module]:
        """Activation modules in forward order: the *input* of each is the pre-activation after the norm.

        Hook with ``register_forward_pre_hook`` (or a forward hook's ``args[0]``) to read e.g. the
        sigmoid input of Ioffe Fig. 1.
        """
        return {name: self.get_submodule(name) for name in self._names_by_kind[ACT]}


def check_image_input(x: Tensor, in_channels: int, input_size: int | None, model: str) -> None:
    """Shared input contract of the conv models: (N, C, H, W) with C = in_channels (and H = W = size)."""
    if x.dim() != 4:
        raise ShapeError(
            f"{model} expects a 4-D (N, C, H, W) image batch, got shape {tuple(x.shape)}; "
            "add the channel dimension (x.unsqueeze(1) for grey images)"
        )
    if x.shape[1] != in_channels:
        raise ShapeError(
            f"{model} was built for {in_channels} input channel(s) but got {x.shape[1]} "
            f"(shape {tuple(x.shape)}); build it with in_channels={x.shape[1]}"
        )
    if input_size is not None and tuple(x.shape[2:]) != (input_size, input_size):
        raise ShapeError(
            f"{model} was built for {input_size}x{input_size} inputs but got "
            f"{x.shape[2]}x{x.shape[3]}; build it with input_size={x.shape[2]} (square inputs only)"
        )


def check_positive_int(what: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is an int >= 1 (bools are rejected: True is not a width)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
