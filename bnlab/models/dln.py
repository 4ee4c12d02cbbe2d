"""Santurkar et al. 2018's 25-layer deep linear network (App. A.1).

f(x) = W_25 ... W_2 W_1 x with square bias-free 10x10 layers, trained to fit A x with a summed l2 loss
(the loss and data live in the experiment, not here). Inputs are (N, width) rows; weights act as
``nn.Linear`` (x @ W^T).

Choices the paper leaves open, and ours (as in our pilot runs):
- Norm placement: after every linear layer except the last, with its affine (γ, β); the output layer
  stays unnormalized so the net can still represent any scale of A x.
- Biases: none, with or without a norm (the paper's objective is the product W_1 ... W_k).
- Init: Glorot uniform, gain 1 (see ``_init``).
- No nonlinearity; ``act{k}`` are ``nn.Identity`` placeholders after each norm so that activation probes
  written for the other models (``nonlinearity_inputs()``, Santurkar Fig. 9's layer activations) work on
  the DLN unchanged. They compute nothing.

Precision: the experiment runs in float64 (``model.double()``); nothing here fixes a dtype.
Layer names: ``fc1 norm1 act1 fc2 norm2 act2 ... fc24 norm24 act24 fc25``.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnlab.errors import ShapeError
from bnlab.models._base import ACT, NORM, WEIGHT, LayeredModel, check_positive_int
from bnlab.models._init import glorot_
from bnlab.norm.factory import make_norm


class DLN(LayeredModel):
    """``depth`` bias-free ``width`` x ``width`` linear layers with a norm after all but the last.

    Args:
        depth: number of linear layers k (paper: 25).
        width: input = hidden = output size (paper: 10).
        norm_kwargs: options of every norm layer, passed to ``make_norm`` (e.g. ``virtual_batch_size`` for
            "ghost", ``momentum``); None = the layer's defaults.
        norm: norm name for ``make_norm`` (default "none": the paper's "standard" DLN).
    """

    def __init__(self, depth: int = 25, width: int = 10, norm: str = "none", norm_kwargs: dict | None = None) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        check_positive_int("width", width)
        self.depth, self.width, self.norm_name = depth, width, norm
        for k in range(1, depth + 1):
            fc = nn.Linear(width, width, bias=False)
            glorot_(fc)
            self._add(f"fc{k}", fc, WEIGHT)  # (N, width)
            if k < depth:
                self._add(f"norm{k}", make_norm(norm, width, 1, **(norm_kwargs or {})), NORM)  # (N, width)
                self._add(f"act{k}", nn.Identity(), ACT)  # (N, width), a hook point only

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.width:
            raise ShapeError(
                f"DLN expects (N, {self.width}) inputs but got shape {tuple(x.shape)}; "
                f"reshape to (N, {self.width}) or build it with width={x.shape[-1] if x.dim() else 1}"
            )
