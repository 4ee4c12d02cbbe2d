"""ℓp BN's one-node training path (``bnlab.norm.lp._LpTrain``) against its composite of torch ops.

The one-node path only saves autograd overhead (and, with bnlab's C++ operators built, the Python
frame around each operation: ``bnlab::lp_train``/``lp_train_``/``lp_backward`` run the same ATen
calls), so the oracle is exact, for both ways of running it (``kernel_mode`` "auto" and "off"): the
composite ``_lp_train`` differentiated by autograd must give bit-identical outputs, running statistics and gradients
(``torch.equal``), for every p, dtype, layout and affine setting, ties of the ℓ∞ maximum, constant
channels and broadcast (stride-0) output gradients; a DLN trained a few steps either way must end
with identical weights. Second derivatives go through the composite (gradgradcheck), and calls the
one-node path does not serve (forward-mode AD, torch.func, half precision, uncentred statistics,
no gradient) take the composite and still match the documented formulas' gradients (gradcheck).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from bnlab.models import build_model
from bnlab.norm import kernels, lp
from bnlab.norm.functional import NonFiniteBatchWarning
from bnlab.norm.lp import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, lp_batch_norm
from conftest import require_kernels  # noqa: E402

P_VALUES = (1, 2, math.inf)


@pytest.fixture(params=["auto", "off"], autouse=True)
def kernel_mode(request):
    """Every test runs with the C++ operators (auto) and with the one-node path's Python body (off)."""
    if request.param == "auto":
        require_kernels()  # skips without a compiler on a user's machine, fails in CI
    with kernels.use_mode(request.param):
        yield request.param


@contextlib.contextmanager
def composite_only():
    """Route every call to the composite of torch ops (the reference)."""
    orig = lp._fused_applies
    lp._fused_applies = lambda *args: False
    try:
        yield
    finally:
        lp._fused_applies = orig


def _bits_equal(a, e) -> bool:
    view = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    return torch.equal(a.contiguous().view(view), e.contiguous().view(view))


def _used_kernel(x, w, b, p) -> bool:
    out = lp_batch_norm(x.clone().requires_grad_(), w, b, None, None, p=p, training=True).out
    return bool(out.grad_fn.kernel)


def _run(x, w, b, p, g, fused: bool):
    x = x.clone().requires_grad_()
    w = None if w is None else w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    c = x.shape[1]
    rm, rv = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
    with contextlib.nullcontext() if fused else composite_only():
        r = lp_batch_norm(x, w, b, rm, rv, p=p, training=True)
        node = type(r.out.grad_fn).__name__
        grads = torch.autograd.grad(r.out, [t for t in (x, w, b) if t is not None], g)
    return node, (r.out, r.running_mean, r.running_var, *grads)


def _assert_identical(x, w, b, p, g):
    node_f, fused = _run(x, w, b, p, g, fused=True)
    assert _used_kernel(x, w, b, p) == (kernels.mode() == "auto")
    node_c, comp = _run(x, w, b, p, g, fused=False)
    assert node_f == "_LpTrainBackward", f"the one-node path was not taken ({node_f})"
    assert node_c != node_f
    for i, (a, e) in enumerate(zip(fused, comp)):
        assert a.dtype == e.dtype and a.shape == e.shape
        # exact to the bit: signs of zeros and NaN payloads too (NaN where the composite has NaN: l2's
        # sqrt has an infinite slope at a constant channel)
        assert _bits_equal(a, e), f"tensor {i} differs"


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1000, 10), (7, 3), (4, 3, 5), (3, 3, 4, 5), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_one_node_path_is_bit_identical_to_the_composite(p, dtype, shape, affine):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    c = shape[1]
    w = torch.rand(c, generator=gen, dtype=torch.float64).add(0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if affine else None
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    _assert_identical(x, w, b, p, g)


@pytest.mark.parametrize("p", P_VALUES)
def test_ties_constant_channels_and_broadcast_gradients(p):
    # channel 0: the maximum |d| is attained by several values (l-inf splits the gradient among them);
    # channel 1: constant (d = 0, sgn 0, stat 0: eps alone keeps it finite); channel 2: ordinary
    x = torch.tensor([[3.0, 2.0, 0.1], [-3.0, 2.0, 0.7], [3.0, 2.0, -1.3], [0.0, 2.0, 0.4], [-3.0, 2.0, 2.2]],
                     dtype=torch.float64)
    w, b = torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    _assert_identical(x, w, b, p, torch.randn(x.shape, dtype=torch.float64))
    _assert_identical(x, w, b, p, torch.ones(()).double().expand(x.shape))  # the gradient of out.sum()
    # all upstream gradients -0.0: the gradient's zero sums keep autograd's signs
    _assert_identical(torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64), None, None, p,
                      torch.full((3, 1), -0.0, dtype=torch.float64))


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_a_dln_trains_to_identical_weights_either_way(norm):
    """Santurkar et al. 2018's deep linear network (App. A.1) with an ℓp layer after each linear layer:
    a few full-batch SGD steps give the same weights and running statistics bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(10, 10, generator=gen, dtype=torch.float64).T

    def train(fused: bool):
        torch.manual_seed(0)
        model = build_model("dln", norm=norm, in_shape=(10,), num_classes=10, depth=6).double()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        with contextlib.nullcontext() if fused else composite_only():
            for _ in range(5):
                loss = torch.nn.functional.mse_loss(model(x), y, reduction="sum")
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.state_dict()

    a, b = train(True), train(False)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("p", P_VALUES)
def test_second_derivatives_through_the_one_node_path(p):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.rand(2, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        out = lp_batch_norm(x, w, b, None, None, p=p, training=True).out
        assert type(out.grad_fn).__name__ == "_LpTrainBackward"
        return out

    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # the Hessian-vector product equals the composite's (to rounding: the outer gradient also flows
    # back through the one-node path's first-order backward, which sums in another order)
    v = torch.randn(6, 2, generator=gen, dtype=torch.float64)

    def hvp(fused: bool):
        with contextlib.nullcontext() if fused else composite_only():
            out = lp_batch_norm(x, w, b, None, None, p=p, training=True).out
            (gx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
            return torch.autograd.grad((gx * v).sum(), [x, w, b])

    for a, e in zip(hvp(True), hvp(False)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_calls_the_one_node_path_does_not_serve_take_the_composite():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64).add(0.5), torch.randn(3, dtype=torch.float64)

    def node(x, w, b, **kw):
        out = lp_batch_norm(x, w, b, None, None, p=1, training=True, **kw).out
        return type(out.grad_fn).__name__ if out.grad_fn is not None else None

    xr = x.clone().requires_grad_()
    assert node(xr, w, b) == "_LpTrainBackward"
    assert node(xr, w, b, centered=False) != "_LpTrainBackward"  # uncentred: three paths into x
    assert node(x, w, b) is None  # nothing to differentiate
    assert node(xr.half(), w.float(), b.float()) != "_LpTrainBackward"  # casts stay in the graph
    with torch.no_grad():
        assert node(xr, w, b) is None
    # forward-mode AD: the composite has the jvp rules
    import torch.autograd.forward_ad as fwad

    t = torch.randn_like(x)
    with fwad.dual_level():
        out = lp_batch_norm(fwad.make_dual(x, t), w, b, None, None, p=1, training=True).out
        jvp = fwad.unpack_dual(out).tangent
    _, jvp_ref = torch.func.jvp(lambda x: lp_batch_norm(x, w, b, None, None, p=1, training=True).out, (x,), (t,))
    assert torch.allclose(jvp, jvp_ref, rtol=1e-12, atol=1e-12)
    # torch.func.grad against the one-node path's gradient
    f = lambda x: (lp_batch_norm(x, w, b, None, None, p=1, training=True).out ** 3).sum()  # noqa: E731
    (g_ref,) = torch.autograd.grad(f(xr), xr)
    assert torch.allclose(torch.func.grad(f)(x), g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls, shape", [(LpBatchNorm1d, (32, 4)), (LpBatchNorm1d, (6, 4, 5)),
                                        (LpBatchNorm2d, (3, 4, 5, 2)), (LpBatchNorm3d, (2, 4, 2, 3, 2))])
@pytest.mark.parametrize("momentum, affine", [(0.1, True), (None, True), (0.3, False)])
def test_module_training_steps_identical_either_way(p, dtype, cls, shape, momentum, affine):
    """A module's training steps (the in-place path ``bnlab::lp_train_`` under "auto"): outputs, input
    and parameter gradients, running statistics and num_batches_tracked equal the composite's bit for
    bit, including the cumulative average (momentum=None)."""
    gen = torch.Generator().manual_seed(4)
    xs = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype) for _ in range(3)]
    a = cls(4, p=p, momentum=momentum, affine=affine).to(dtype)
    b = cls(4, p=p, momentum=momentum, affine=affine).to(dtype)
    for x in xs:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = a(xa)
        assert type(ya.grad_fn).__name__ == "_LpTrainBackward"
        with composite_only():
            yb = b(xb)
        assert _bits_equal(ya, yb)
        g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        ya.backward(g)
        yb.backward(g)
        assert _bits_equal(xa.grad, xb.grad)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert int(a.num_batches_tracked) == 3
    if affine:
        assert torch.equal(a.weight.grad, b.weight.grad) and torch.equal(a.bias.grad, b.bias.grad)


@pytest.mark.parametrize("p", P_VALUES)
def test_module_non_finite_batch_warns_and_keeps_the_statistics(p):
    m = LpBatchNorm1d(3, p=p).double()
    m(torch.randn(8, 3, dtype=torch.float64, requires_grad=True))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = torch.randn(8, 3, dtype=torch.float64)
    bad[2, 1] = float("nan")
    with pytest.warns(NonFiniteBatchWarning, match="not added to the running statistics"):
        m(bad.requires_grad_())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked not advanced either


@pytest.mark.parametrize("p", P_VALUES)
def test_a_reparametrized_weight_is_used(p):
    """torch.nn.utils.parametrize moves ``weight`` out of ``_parameters``: the layer must still use the
    parametrized value (the general path), never train without its weight."""
    from torch.nn.utils import parametrize

    class Triple(torch.nn.Module):
        def forward(self, w):
            return 3 * w

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    plain, reparam = LpBatchNorm1d(4, p=p).double(), LpBatchNorm1d(4, p=p).double()
    with torch.no_grad():
        plain.weight.mul_(3)
    parametrize.register_parametrization(reparam, "weight", Triple())
    assert _bits_equal(reparam(x.clone().requires_grad_()), plain(x.clone().requires_grad_()))
    assert torch.equal(reparam.running_var, plain.running_var)
