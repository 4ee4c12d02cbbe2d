"""``MaxPool2d``: ``torch.nn.MaxPool2d`` whose common 2x2, stride-2 case runs a faster exact CPU kernel.

VGG (Simonyan & Zisserman 2015) and the small ConvNet halve their feature maps with 2x2, stride-2 max
pools. torch's CPU kernel serves every window, stride, padding and dilation with per-output index
arithmetic and took about 4 ms for one (128, 8, 28, 28) float32 map on one core, 14 times a
ReLU over the same tensor and about 8 % of a quick-profile VGG training step.
``bnlab::max_pool2x2`` (C++, ``bnlab.norm.kernels``) does that case in one pass with torch's own
selection rule (the first of tied maxima, NaN wins), so outputs, the element each window picks, and
therefore the gradients equal torch's bit for bit (tested, ties, NaN and infinities included); the
model's numbers do not depend on which path ran. In a quick-profile VGG-16 training step (batch 128,
one thread, torch.profiler) the four pools' forward and backward took 9.4 ms with torch's kernel and
5.2 ms with this one, of about 70 ms.

The kernel path is taken in eager mode for a contiguous (N, C, H, W) float32/float64 CPU input with
H, W >= 2, ``kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False,
return_indices=False``, the kernels built and no torch.func transform, forward-mode AD, compile or
trace active; everything else (other settings, layouts, dtypes, devices, TorchScript, FX,
``torch.compile``, ``torch.export``) runs ``torch.nn.MaxPool2d``'s forward unchanged. It is a
subclass, so ``isinstance(m, torch.nn.MaxPool2d)``, ``repr`` and state_dicts (empty) are torch's.
Second derivatives (``create_graph=True``) go through torch's own backward operator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from bnlab.norm import kernels

__all__ = ["MaxPool2d"]


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out, offsets = torch.ops.bnlab.max_pool2x2(x)
        ctx.save_for_backward(offsets)
        ctx.in_shape = x.shape
        ctx.mark_non_differentiable(offsets)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (offsets,) = ctx.saved_tensors
        n, c, h, w = ctx.in_shape
        if torch.is_grad_enabled():  # create_graph=True: torch's differentiable backward with full indices
            oh, ow = offsets.shape[2], offsets.shape[3]
            off = offsets.long()
            rows = torch.arange(oh).view(oh, 1) * 2 + torch.div(off, 2, rounding_mode="floor")
            cols = torch.arange(ow).view(1, ow) * 2 + off % 2
            indices = rows * w + cols
            like = torch.empty((n, c, h, w), dtype=grad.dtype)
            return torch.ops.aten.max_pool2d_with_indices_backward(grad, like, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                                   indices)
        return torch.ops.bnlab.max_pool2x2_backward(grad, offsets, h, w)


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` (same constructor, attributes and behaviour) with the exact fast CPU path
    for 2x2, stride-2 pooling described in the module docstring. Input (N, C, H, W) -> (N, C, H // 2,
    W // 2) on that path; torch's shapes and errors elsewhere."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                ceil_mode=self.ceil_mode, return_indices=self.return_indices)
        out = self._kernel_forward(input)
        if out is not None:
            return out
        return super().forward(input)

    @torch.jit.unused
    def _kernel_forward(self, x: Tensor) -> Tensor | None:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) is not Tensor or x.dim() != 4
                or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.shape[2] < 2
                or x.shape[3] < 2 or self.ceil_mode or self.return_indices or _pair(self.kernel_size) != (2, 2)
                or _pair(self.stride) != (2, 2) or _pair(self.padding) != (0, 0) or _pair(self.dilation) != (1, 1)
                or not kernels.applies(x)):
            return None
        return _MaxPool2x2.apply(x)
