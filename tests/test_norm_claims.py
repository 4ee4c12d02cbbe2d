"""Claims D.1-D.5 (docs/claims.md), numerical stability, low precision, properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab.norm as bn
from bnlab.norm import reference as ref
from bnlab.norm.functional import batch_norm

pytestmark = pytest.mark.usefixtures("bn_path")  # every test on the fused kernels and the composite path


@pytest.mark.parametrize("shape", [(64, 5), (16, 5, 4, 4)])
def test_d1_normalized_batch_has_zero_mean_and_near_unit_variance(shape):
    """D.1: before gamma/beta the batch mean is 0 and the biased variance is sigma^2/(sigma^2+eps);
    conv BN uses statistics over (N, H, W) per channel."""
    torch.manual_seed(0)
    scale = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * scale.view(1, -1, *[1] * (len(shape) - 2)) + 3.0
    eps = 1e-3
    y = batch_norm(x, None, None, None, None, training=True, eps=eps).out
    dims = [0, *range(2, len(shape))]
    assert y.mean(dims).abs().max().item() < 1e-6
    sigma2 = x.var(dims, unbiased=False)
    torch.testing.assert_close(y.var(dims, unbiased=False), sigma2 / (sigma2 + eps), rtol=1e-10, atol=0)


def test_d3_inference_is_the_affine_map_and_per_example():
    """D.3: after Alg. 2's population statistics, eval output = gamma/sqrt(Var+eps) x + (beta - ...),
    and one example's output does not depend on the rest of the batch."""
    torch.manual_seed(0)
    module = bn.BatchNorm2d(3, momentum=None).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        module.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    batches = [torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1 for _ in range(6)]
    for b in batches:
        module(b)
    mean, var = ref.population_statistics([b.numpy() for b in batches])
    a, c = ref.inference_affine(module.weight.detach().numpy(), module.bias.detach().numpy(), mean, var, module.eps)
    module.eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    y = module(x)
    expected = a.reshape(1, 3, 1, 1) * x.numpy() + c.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-12)
    other = torch.cat([x[:1], torch.randn(4, 3, 4, 4, dtype=torch.float64) * 50])
    assert torch.equal(module(other)[0], y[0])
    assert torch.equal(module(x[:1])[0], y[0])


@pytest.mark.parametrize("a", [0.1, 10.0])
def test_d4_scale_invariance(a):
    """D.4 (Ioffe 3.3): BN((aW)u) = BN(Wu), d/du unchanged, d/d(aW) = (1/a) d/dW."""
    torch.manual_seed(0)
    u = torch.randn(32, 7, dtype=torch.float64)
    w = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(32, 5, dtype=torch.float64)
    gamma, beta = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    eps = 1e-12  # the identity is exact only as eps -> 0 (Ioffe & Szegedy 2015, Sec. 3.3)

    def run(weight):
        weight = weight.clone().requires_grad_()
        uu = u.clone().requires_grad_()
        y = batch_norm(uu @ weight.T, gamma, beta, None, None, training=True, eps=eps).out
        y.backward(g)
        return y.detach(), weight.grad, uu.grad

    y1, dw1, du1 = run(w)
    y2, dw2, du2 = run(a * w)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-8)
    torch.testing.assert_close(du2, du1, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(dw2, dw1 / a, rtol=1e-7, atol=1e-9)


def test_d5_santurkar_theorem_4_1_gradient_norm_identity():
    """D.5: ||dL/dy_j||^2 = (gamma^2/sigma_j^2)(||g||^2 - <1,g>^2/m - <g, y_hat_j>^2/m), eps = 0."""
    torch.manual_seed(0)
    m = 50
    y = (torch.randn(m, 1, dtype=torch.float64) * 3 + 2).requires_grad_()
    g = torch.randn(m, 1, dtype=torch.float64)
    gamma = torch.tensor([1.7], dtype=torch.float64)
    # eps must be positive in bnlab; 1e-300 is zero at float64 precision for sigma^2 ~ 9
    z = batch_norm(y, gamma, torch.zeros(1, dtype=torch.float64), None, None, training=True, eps=1e-300).out
    z.backward(g)
    sigma2 = y.detach().var(unbiased=False)
    y_hat = (y.detach() - y.detach().mean()) / sigma2.sqrt()
    gv, yh = g.flatten(), y_hat.flatten()
    rhs = gamma**2 / sigma2 * (gv @ gv - gv.sum() ** 2 / m - (gv @ yh) ** 2 / m)
    lhs = y.grad.flatten() @ y.grad.flatten()
    torch.testing.assert_close(lhs, rhs.flatten()[0], rtol=1e-12, atol=0)
    assert lhs.sqrt() <= gamma / sigma2.sqrt() * gv.norm()


def test_float32_large_mean_small_std_has_no_catastrophic_cancellation():
    torch.manual_seed(0)
    x = (torch.randn(128, 4, 8, 8, dtype=torch.float64) * 1e-3 + 1e4).float()
    y = bn.BatchNorm2d(4)(x)
    y_ref, _ = ref.forward(x.double().numpy(), np.ones(4), np.zeros(4), eps=1e-5)
    assert np.abs(y.detach().numpy() - y_ref).max() < 1e-3


def test_float32_eval_with_large_running_mean_stays_accurate():
    """The folded inference map a*x + b cancels when |E[x]| >> std; bnlab subtracts first there."""
    torch.manual_seed(0)
    m = bn.BatchNorm2d(4).eval()
    with torch.no_grad():
        m.running_mean.fill_(1e4)
        m.running_var.fill_(1e-6)
    x = (torch.randn(16, 4, 5, 5, dtype=torch.float64) * 1e-3 + 1e4).float()
    expected = ref.inference(x.double().numpy(), np.ones(4), np.zeros(4), np.full(4, 1e4), np.full(4, 1e-6), eps=1e-5)
    assert np.abs(m(x).detach().numpy() - expected).max() < 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 8e-2)])
def test_half_precision_keeps_float32_statistics(dtype, tol):
    torch.manual_seed(0)
    x32 = torch.randn(32, 6, 5, 5) * 2 + 1
    m32, mlow = bn.BatchNorm2d(6), bn.BatchNorm2d(6)  # float32 parameters and statistics
    y32 = m32(x32)
    ylow = mlow(x32.to(dtype))
    assert ylow.dtype == dtype
    assert mlow.running_mean.dtype == torch.float32 and mlow.running_var.dtype == torch.float32
    torch.testing.assert_close(ylow.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(mlow.running_mean, m32.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(mlow.running_var, m32.running_var, rtol=tol, atol=tol)
    ylow.float().sum().backward()  # gradients flow in low precision too


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 9),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    momentum=st.one_of(st.none(), st.floats(0.0, 1.0)),
    eps=st.floats(1e-8, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch_nn(n, c, spatial, momentum, eps, seed):
    shape = (n, c, *spatial)
    dims = {0: 1, 1: 1, 2: 2}[len(spatial)]  # (N,C) and (N,C,L) are BatchNorm1d inputs
    torch.manual_seed(seed)
    t = getattr(torch.nn, f"BatchNorm{dims}d")(c, eps=eps, momentum=momentum).double()
    o = getattr(bn, f"BatchNorm{dims}d")(c, eps=eps, momentum=momentum).double()
    # float64 tolerances from the conditioning, not a blanket 1e-9: both compute x - mean (error
    # ~ u * max|x|, u = 2^-53) and divide by sqrt(var + eps), so the output's absolute error is
    # ~ u * max|x| / sqrt(var + eps), times the summation length m for the statistics (m <= 144
    # here); 64 * m * u * cond leaves a margin of ~64 ulps for the different summation orders.
    u = torch.finfo(torch.float64).eps
    dims_ = [0, *range(2, len(shape))]
    m = int(np.prod([shape[d] for d in dims_]))
    if m == 1:
        return  # a single value per channel is an error in both (tested in test_norm_errors)
    if m == 0:
        # Empty batch: torch.nn returns an empty output and leaves running_mean/var alone but counts
        # the batch in num_batches_tracked; bnlab does not count it (README: an empty batch
        # carries no statistics, so momentum=None must not weigh it).
        for mode in (True, False):
            o.train(mode), t.train(mode)
            x = torch.randn(shape, dtype=torch.float64)
            assert o(x).shape == t(x).shape == x.shape
        assert torch.equal(o.running_mean, t.running_mean) and torch.equal(o.running_var, t.running_var)
        assert o.num_batches_tracked.item() == 0 and t.num_batches_tracked.item() == 1
        return
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64) * 3
        cond = (x.abs().amax(dims_) / torch.sqrt(x.var(dims_, unbiased=False) + eps)).max().item()
        torch.testing.assert_close(o(x), t(x), rtol=0, atol=64 * m * u * max(cond, 1.0))
    # Running statistics: lerps of the batch mean (|mean| <= max|x|) and unbiased variance, each
    # accurate to ~m u relative (of max|x| and of max|x|^2 respectively).
    torch.testing.assert_close(o.running_mean, t.running_mean, rtol=64 * m * u, atol=64 * m * u * 15)
    torch.testing.assert_close(o.running_var, t.running_var, rtol=64 * m * u, atol=64 * m * u * 15**2)
    o.eval(), t.eval()
    x = torch.randn(shape, dtype=torch.float64)
    # Eval is one affine map per element: a few roundings of |x - running_mean| / sqrt(running_var + eps).
    scale = ((x.abs().amax() + t.running_mean.abs().max()) / torch.sqrt(t.running_var + eps).min()).item()
    torch.testing.assert_close(o(x), t(x), rtol=0, atol=16 * u * max(scale, 1.0))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Statistics tolerances. float16/bfloat16: statistics are computed in float32 and rounded once into
# the dtype's buffers, on top of the previous value's rounding: two roundings, 2 u (u = 2^-11, 2^-8).
# float32: the composite path sums up to m' = 81 values per channel in float32, whose worst-case
# relative error is ~m' u = 81 * 2^-24 ~ 5e-6 (the fused kernels use float64 and are far closer);
# 1e-5 is that bound with a factor 2, not a blanket tolerance.
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 9),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    dtype=st.sampled_from(sorted(_DTYPES)),
    log_scale=st.sampled_from([-6, -3, 0, 3, 18, 20]),
    offset=st.sampled_from([0.0, 1.0, 100.0]),
    momentum=st.one_of(st.none(), st.sampled_from([0.1, 0.5])),
    seed=st.integers(0, 2**16),
)
def test_property_dtypes_scales_and_empty_batches(n, c, spatial, dtype, log_scale, offset, momentum, seed):
    """A module converted to ``dtype`` (parameters and buffers, like model.half()) against torch.nn
    in float64 on the same rounded input, over empty batches, tiny and huge scales. Whatever the
    input: the running statistics stay finite; they match float64 within the dtype's rounding when
    the float64 update is representable (and the float32 variance does not overflow), and are
    unchanged with a NonFiniteBatchWarning otherwise; an empty batch changes nothing."""
    import warnings

    dt = _DTYPES[dtype]
    dims = {0: 1, 1: 1, 2: 2}[len(spatial)]
    shape = (n, c, *spatial)
    count = n * int(np.prod(spatial)) if spatial else n
    if count == 1:
        return  # a single value per channel is an error in both (tested in test_norm_errors)
    torch.manual_seed(seed)
    ours = getattr(bn, f"BatchNorm{dims}d")(c, momentum=momentum).to(dt)
    oracle = getattr(torch.nn, f"BatchNorm{dims}d")(c, momentum=momentum).double()
    warm = torch.randn(4, c, *spatial).to(dt)
    ours(warm), oracle(warm.double())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = (torch.randn(shape, dtype=torch.float64) * 10.0**log_scale + offset * 10.0**log_scale).to(dt)
    if not torch.isfinite(x).all():
        return  # not a finite input in this dtype; the NaN/inf guard is tested on its own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ours(x)
    warned = [w for w in caught if issubclass(w.category, bn.NonFiniteBatchWarning)]
    assert y.shape == x.shape and y.dtype == dt
    assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()
    if count == 0:
        assert not warned and all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
        return
    oracle(x.double())  # the running statistics' oracle
    # The output's oracle is NumPy's two-pass float64 formula, not torch.nn: for a constant channel
    # at |x| ~ 1e20 torch's float64 mean is off by an ulp (~1e4), which 1/sqrt(eps) turns into an
    # output of ~1e6 where the exact answer is 0 (bnlab returns 0).
    y_ref = torch.from_numpy(ref.forward(x.double().numpy(), ours.weight.double().detach().numpy(),
                                         ours.bias.double().detach().numpy(), eps=ours.eps)[0])
    batch_var = x.double().var(dim=[0, *range(2, x.dim())], unbiased=False)
    limit = torch.finfo(dt).max
    representable = bool((oracle.running_var.abs() <= limit).all() and (oracle.running_mean.abs() <= limit).all()
                         and (batch_var * count <= torch.finfo(torch.float32).max / 4).all())
    if not representable:
        if warned:  # rejected: nothing moved
            assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
            return
    assert not warned, [str(w.message) for w in warned]
    tol = _TOL[dt]
    # The previous statistics were stored in ``dt`` (the oracle keeps float64): their rounding, up to
    # tol * |previous value|, carries into the update, which can cancel (old -0.099, batch +0.1).
    old_mean = before["running_mean"].double().abs().max().item()
    old_var = before["running_var"].double().abs().max().item()
    torch.testing.assert_close(ours.running_mean.double(), oracle.running_mean, rtol=tol,
                               atol=tol * (10.0**log_scale + old_mean))
    torch.testing.assert_close(ours.running_var.double(), oracle.running_var, rtol=tol,
                               atol=tol * (10.0 ** (2 * log_scale) + old_var) + 1e-45)
    assert ours.num_batches_tracked.item() == 2
    # The output is O(1) (normalized) and is rounded once to ``dt``; the statistics behind it are
    # accurate to ~tol relative, so |y| * tol plus one rounding of the dtype bounds the error.
    torch.testing.assert_close(y.double(), y_ref, rtol=2 * tol, atol=2 * tol)
