"""bnlab.models.pool.MaxPool2d: the exact fast 2x2, stride-2 CPU path against torch's own max pooling.

Oracle: ``torch.nn.functional.max_pool2d`` itself. The kernel path must give the same outputs and the
same input gradients bit for bit (sign of zero included), since it picks the same element of every
window (first of tied maxima, the last NaN); ties, NaN, +-inf and odd sizes are built in on purpose.
Every call the path does not serve must run torch's forward unchanged; second derivatives, vmap,
TorchScript and torch.compile keep working.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models.pool import MaxPool2d
from bnlab.norm import kernels
from conftest import require_kernels  # noqa: E402


@pytest.fixture(autouse=True)
def kernels_on():
    require_kernels()
    with kernels.use_mode("on"):
        yield


def _hard_input(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).relu().to(dtype)  # many tied zeros
    flat = x.view(-1)
    flat[3::17] = 1.0  # ties at a positive value
    flat[::11] = float("inf")
    flat[5::13] = -float("inf")
    if seed % 2:
        flat[::7] = float("nan")
    return x


def _grad(fn, x, g):
    x = x.clone().requires_grad_()
    out = fn(x)
    (gx,) = torch.autograd.grad(out, x, g)
    return out, gx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 2, 7, 5), (1, 1, 2, 2), (2, 2, 3, 3), (4, 8, 28, 28),
                                   (2, 3, 6, 1 + 6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_path_equals_torch_bit_for_bit(dtype, shape, seed):
    x = _hard_input(shape, dtype, seed)
    pool = MaxPool2d(kernel_size=2, stride=2)
    out = pool(x.clone().requires_grad_())
    assert type(out.grad_fn).__name__ == "_MaxPool2x2Backward", "the kernel path was not taken"
    gen = torch.Generator().manual_seed(seed + 10)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    g.view(-1)[::3] = -0.0  # torch's backward turns -0.0 into +0.0 (0 + g)
    ref, gref = _grad(lambda t: F.max_pool2d(t, 2, 2), x, g)
    got, ggot = _grad(pool, x, g)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ggot, gref) and torch.equal(ggot.signbit(), gref.signbit())


def test_the_chosen_element_is_torchs_index():
    x = _hard_input((3, 4, 9, 8), torch.float32, 1)
    _, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    _, offsets = torch.ops.bnlab.max_pool2x2(x)
    oh, ow = offsets.shape[2:]
    rows = torch.arange(oh).view(oh, 1) * 2 + offsets.long() // 2
    cols = torch.arange(ow).view(1, ow) * 2 + offsets.long() % 2
    assert torch.equal(rows * x.shape[3] + cols, idx)


@pytest.mark.parametrize("make, x", [
    (lambda: MaxPool2d(2, 2), torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)),
    (lambda: MaxPool2d(2, 2), torch.randn(2, 3, 8, 8).transpose(2, 3)),  # non-contiguous
    (lambda: MaxPool2d(2, 2), torch.randn(2, 3, 8, 8).half()),
    (lambda: MaxPool2d(2, 2), torch.randn(2, 3, 8, 8).bfloat16()),
    (lambda: MaxPool2d(2, 2), torch.randn(3, 8, 8)),  # unbatched (C, H, W)
    (lambda: MaxPool2d(2, 2), torch.randn(2, 3, 1, 8)),  # H = 1: torch's error
    (lambda: MaxPool2d(3, 2), torch.randn(2, 3, 9, 9)),
    (lambda: MaxPool2d(2, 1), torch.randn(2, 3, 6, 6)),
    (lambda: MaxPool2d(2, 2, padding=1), torch.randn(2, 3, 6, 6)),
    (lambda: MaxPool2d(2, 2, dilation=2), torch.randn(2, 3, 9, 9)),
    (lambda: MaxPool2d(2, 2, ceil_mode=True), torch.randn(2, 3, 7, 7)),
    (lambda: MaxPool2d((2, 3), 2), torch.randn(2, 3, 8, 8)),
])
def test_other_calls_run_torchs_forward(make, x):
    ours, theirs = make(), nn.MaxPool2d(**{k: getattr(make(), k) for k in
                                           ("kernel_size", "stride", "padding", "dilation", "ceil_mode")})
    try:
        expected = theirs(x)
    except RuntimeError as err:
        with pytest.raises(RuntimeError, match=str(err).split("(")[0][:30]):
            ours(x)
        return
    xr = x.clone().requires_grad_() if x.is_floating_point() else x
    got = ours(xr)
    assert type(got.grad_fn).__name__ != "_MaxPool2x2Backward"
    assert torch.equal(got.detach(), expected)


def test_return_indices_and_no_kernels_run_torchs_forward():
    x = torch.randn(2, 3, 8, 8)
    out, idx = MaxPool2d(2, 2, return_indices=True)(x)
    ref, ref_idx = F.max_pool2d(x, 2, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    with kernels.use_mode("off"):
        y = MaxPool2d(2, 2)(x.clone().requires_grad_())
    assert type(y.grad_fn).__name__ != "_MaxPool2x2Backward"


def test_is_a_torch_max_pool_with_torchs_repr_and_state():
    m = MaxPool2d(kernel_size=2, stride=2)
    assert isinstance(m, nn.MaxPool2d)
    assert repr(m) == repr(nn.MaxPool2d(kernel_size=2, stride=2))
    assert m.state_dict() == {}


def test_second_derivatives_through_the_kernel_path():
    x = _hard_input((2, 2, 4, 6), torch.float64, 0).clamp(-5, 5) + torch.linspace(0, 1e-3, 96,
                                                                                 dtype=torch.float64).view(2, 2, 4, 6)
    x.requires_grad_()
    pool = MaxPool2d(2, 2)
    assert type(pool(x).grad_fn).__name__ == "_MaxPool2x2Backward"
    assert torch.autograd.gradgradcheck(lambda t: pool(t) ** 2, (x,))
    v = torch.randn(2, 2, 4, 6, dtype=torch.float64)

    def hvp(fn):
        (gx,) = torch.autograd.grad((fn(x) ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx * v).sum(), x)[0]

    assert torch.equal(hvp(pool), hvp(lambda t: F.max_pool2d(t, 2, 2)))


def test_vmap_torchscript_and_compile_keep_working():
    x = torch.randn(3, 2, 4, 6, 6)
    pool = MaxPool2d(2, 2)
    expected = torch.stack([F.max_pool2d(t, 2, 2) for t in x])
    assert torch.equal(torch.func.vmap(pool)(x), expected)
    scripted = torch.jit.script(pool)
    assert torch.equal(scripted(x[0]), expected[0])
    compiled = torch.compile(pool, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x[0]), expected[0])


def test_vgg_uses_it():
    from bnlab.models import build_model

    model = build_model("vgg11", norm="batch", in_shape=(3, 32, 32), num_classes=10, width=0.125)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(isinstance(m, MaxPool2d) for m in pools)


def test_pool_operators_pass_torch_library_opcheck():
    for dtype, shape in [(torch.float32, (2, 3, 4, 6)), (torch.float64, (1, 2, 5, 7))]:
        x = torch.randn(shape, dtype=dtype)
        torch.library.opcheck(torch.ops.bnlab.max_pool2x2.default, (x,))
        out, offsets = torch.ops.bnlab.max_pool2x2(x)
        torch.library.opcheck(torch.ops.bnlab.max_pool2x2_backward.default,
                              (torch.randn_like(out), offsets, shape[2], shape[3]))
    out, offsets = torch.ops.bnlab.max_pool2x2(torch.randn(1, 2, 6, 6))
    with pytest.raises(RuntimeError, match="does not give"):  # sizes that would write out of bounds
        torch.ops.bnlab.max_pool2x2_backward(torch.randn_like(out), offsets, 4, 6)
