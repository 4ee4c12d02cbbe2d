"""Noisy BN (Santurkar et al. 2018, App. A.2.1, Algorithm 1) and ℓp BN (Sec. 3.3).

Oracles: the distributions of Algorithm 1 (Kolmogorov-Smirnov tests with fixed seeds, each paired
with a check that the same test rejects a wrong distribution), torch.nn.BatchNorm in float64 (ℓ2 is
BN), a NumPy float64 implementation of the documented ℓp formulas, Monte Carlo for the ℓ∞ constant,
gradcheck, and state_dict round trips.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import bnlab
from bnlab.errors import ConfigError, ShapeError
from bnlab.norm import make_norm
from bnlab.norm.functional import NonFiniteBatchWarning
from bnlab.norm.lp import LpBatchNorm1d, LpBatchNorm2d, gaussian_max_abs_mean, lp_batch_norm
from bnlab.norm.noisy import NoiseConfig, NoiseOnly, NoisyBatchNorm2d, sample_noise, seed_noise

# ---------------------------------------------------------------------------------------------
# noisy BN: the distributions of Algorithm 1


def _ks(values, dist, args):
    return stats.kstest(np.asarray(values, dtype=np.float64).ravel(), dist, args=args).pvalue


def test_noise_parameters_follow_algorithm_1():
    g = torch.Generator().manual_seed(1)
    noise = sample_noise((64, 3000, 2, 2), generator=g, dtype=torch.float64)
    mu, sig, m, s = (t.numpy() for t in noise)
    assert mu.shape == (3000,) and sig.shape == (3000,) and m.shape == s.shape == (64, 3000, 2, 2)
    assert mu.min() >= -0.5 and mu.max() <= 0.5 and sig.min() >= 1 and sig.max() <= 1.25
    # per unit, per step: mu_t ~ U(-0.5, 0.5), sigma_t ~ U(1, 1.25)
    assert _ks(mu, "uniform", (-0.5, 1.0)) > 0.01
    assert _ks(sig, "uniform", (1.0, 0.25)) > 0.01
    # per element: m - mu_t ~ U(-0.1, 0.1) within [mu_t - 0.1, mu_t + 0.1], (s - sigma_t) / 0.1 ~ N(0, 1)
    dm = m - mu[None, :, None, None]
    ds = (s - sig[None, :, None, None]) / 0.1
    assert np.abs(dm).max() <= 0.1 + 1e-12
    assert _ks(dm[:, :200], "uniform", (-0.1, 0.2)) > 0.01
    assert _ks(ds[:, :200], "norm", (0.0, 1.0)) > 0.01
    # the same tests have the power to reject neighbouring distributions
    assert _ks(sig, "uniform", (1.0, 0.3)) < 1e-6
    assert _ks(ds[:, :200] / 1.05, "norm", (0.0, 1.0)) < 1e-6
    assert _ks(mu, "uniform", (-0.45, 0.9)) < 1e-6


def test_noise_magnitudes_configurable_and_checked():
    cfg = NoiseConfig(n_mu=2.0, n_sigma=3.0, r_mu=0.5, r_sigma=0.0)
    mu, sig, m, s = sample_noise((10, 500), generator=torch.Generator().manual_seed(0), config=cfg)
    assert mu.abs().max() <= 2 and mu.abs().max() > 1.5 and sig.min() >= 1 and sig.max() <= 3 and sig.max() > 2.5
    assert torch.equal(s, sig.expand(10, 500))  # r_sigma = 0: no per-element spread
    assert (m - mu).abs().max() <= 0.5
    for bad in (dict(n_mu=-1), dict(n_sigma=0.5), dict(r_sigma=float("nan"))):
        with pytest.raises(ConfigError):
            NoiseConfig(**bad)


def _bn_pair(c=4, seed=3, **kw):
    noisy = NoisyBatchNorm2d(c, seed=seed, keep_last=True, **kw).double()
    plain = bnlab.BatchNorm2d(c).double()
    with torch.no_grad():
        for t in (noisy.weight, noisy.bias):
            t.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(9))
    plain.load_state_dict(noisy.state_dict(), strict=False)
    return noisy, plain


def test_noisy_bn_is_s_times_bn_output_plus_m_and_gradients_flow():
    noisy, plain = _bn_pair()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = noisy(x)
    mu, sig, m, s = noisy.last_noise
    ref = s * plain(x) + m  # after gamma/beta; plain BN updates its running stats identically
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.equal(noisy.running_mean, plain.running_mean) and torch.equal(noisy.running_var, plain.running_var)
    # spatial positions count as batch: one mu_t/sigma_t per channel shared by all (n, h, w)
    assert ((m - mu.view(1, -1, 1, 1)).abs() <= 0.1 + 1e-12).all()
    r = torch.randn_like(out)
    g1 = torch.autograd.grad((out * r).sum(), [x, noisy.weight])
    g2 = torch.autograd.grad((ref * r).sum(), [x, plain.weight])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2))


def test_noisy_bn_black_box_noise_statistics():
    """gamma = beta = 0 makes the BN output 0, so the layer outputs m alone: per call and channel
    the additive noise spans (almost exactly, with 2,304 draws) 2 * r_mu around a centre mu_t."""
    layer = NoisyBatchNorm2d(50, seed=11)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    x = torch.randn(8, 50, 6, 6)
    centres = []
    for _ in range(40):
        m = layer(x).detach().double()  # (8, 50, 6, 6)
        lo, hi = m.amin(dim=(0, 2, 3)), m.amax(dim=(0, 2, 3))
        assert ((hi - lo) <= 0.2 + 1e-6).all() and ((hi - lo) > 0.18).all()
        centres.append(((lo + hi) / 2).numpy())
    centres = np.concatenate(centres)
    assert np.abs(centres).max() <= 0.5 + 1e-3
    assert _ks(centres, "uniform", (-0.5, 1.0)) > 0.01  # mu_t resampled per call and unit


def test_noise_resampled_every_call_off_in_eval_and_global_rng_untouched():
    layer, plain = _bn_pair()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = layer(x), layer(x)
    assert torch.equal(torch.get_rng_state(), state)  # forward passes never touch the global RNG
    assert not torch.allclose(a, b)
    layer.eval()
    plain.eval()
    plain.load_state_dict(layer.state_dict(), strict=False)
    assert torch.equal(layer(x), plain(x))  # off in eval by default
    layer.noise_in_eval = True
    assert not torch.allclose(layer(x), plain(x))
    assert torch.equal(torch.get_rng_state(), state)


def test_noise_depends_only_on_the_layer_seed():
    x = torch.randn(5, 3, 4, 4)
    torch.manual_seed(0)
    a = NoisyBatchNorm2d(3, seed=7)(x)
    torch.manual_seed(1)
    b = NoisyBatchNorm2d(3, seed=7)(x)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    l1, l2 = NoisyBatchNorm2d(3), NoisyBatchNorm2d(3)  # seeds drawn from the run: reproducible, distinct
    torch.manual_seed(0)
    l3 = NoisyBatchNorm2d(3)
    assert torch.equal(l1(x), l3(x)) and not torch.equal(l1(x), l2(x))
    net = nn.Sequential(NoisyBatchNorm2d(3), NoiseOnly(3))
    assert seed_noise(net, 5) == 2
    ya = net(x)
    seed_noise(net, 5)
    assert torch.equal(net(x), ya)


def test_noise_generator_state_round_trips_through_state_dict():
    a = make_norm("noisy_batch", 3, 2, seed=1)
    x = torch.randn(4, 3, 2, 2)
    a(x)
    b = make_norm("noisy_batch", 3, 2, seed=999)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))  # continues the same noise stream (resume)
    b.load_state_dict(nn.BatchNorm2d(3).state_dict())  # a plain BN state_dict loads too
    assert set(a.state_dict()) == set(nn.BatchNorm2d(3).state_dict()) | {"_extra_state"}


def test_noise_only_is_the_same_noise_without_normalization():
    layer = make_norm("noise_only", 5, 1, seed=2, keep_last=True)
    assert isinstance(layer, NoiseOnly) and not list(layer.parameters())
    x = torch.randn(7, 5) * 10 + 3
    out = layer(x)
    _, _, m, s = layer.last_noise
    assert torch.allclose(out, s * x + m)
    layer.eval()
    assert torch.equal(layer(x), x)
    with pytest.raises(ShapeError, match="num_features"):
        layer.train()(torch.randn(7, 4))


# ---------------------------------------------------------------------------------------------
# ℓp BN


def _lp_numpy(x: np.ndarray, p: float, gamma, beta, eps, centered=True):
    """The documented formulas, in NumPy float64, per channel over (N, *spatial)."""
    c = x.shape[1]
    v = np.moveaxis(x, 1, -1).reshape(-1, c)  # (n, C)
    n = v.shape[0]
    mu = v.mean(0)
    d = v - mu
    w = d if centered else v
    if p == 1:
        stat = np.abs(w).mean(0) * np.sqrt(np.pi / 2)
    elif p == 2:
        stat = np.sqrt((w ** 2).mean(0))
    else:
        stat = np.abs(w).max(0) / gaussian_max_abs_mean(n)
    y = gamma * d / np.sqrt(stat ** 2 + eps) + beta
    y = np.moveaxis(y.reshape(x.shape[0], *x.shape[2:], c), -1, 1)
    return y, mu, stat ** 2 * n / (n - 1)


@pytest.mark.parametrize("name,p", [("l1", 1), ("l2", 2), ("linf", math.inf)])
@pytest.mark.parametrize("shape", [(16, 3), (6, 3, 4, 5), (4, 3, 2, 3, 2)])
@pytest.mark.parametrize("centered", [True, False])
def test_lp_forward_and_running_stats_match_numpy(name, p, shape, centered):
    dims = len(shape) - 2 if len(shape) > 2 else 1
    layer = make_norm(name, 3, dims, centered=centered).double()
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    x = rng.normal(2.0, 3.0, size=shape)
    y = layer(torch.from_numpy(x)).detach().numpy()
    bshape = (1, 3) + (1,) * (len(shape) - 2)
    y_ref, mu, var = _lp_numpy(x, p, 1.0, 0.0, 1e-5, centered)
    y_ref = y_ref * gamma.reshape(bshape) + beta.reshape(bshape)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.9 + 0.1 * var, rtol=1e-12)
    layer.eval()
    z = rng.normal(size=shape)
    rm, rv = layer.running_mean.numpy().reshape(bshape), layer.running_var.numpy().reshape(bshape)
    expect = gamma.reshape(bshape) * (z - rm) / np.sqrt(rv + 1e-5) + beta.reshape(bshape)
    np.testing.assert_allclose(layer(torch.from_numpy(z)).detach().numpy(), expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p,name", [(1, "l1"), (2, "l2"), (math.inf, "linf")])
def test_lp_documented_scale_matches_bn_on_gaussian_data(p, name):
    """D_p estimates sigma for Gaussian data, so the output has unit variance like BN's."""
    layer = make_norm(name, 4, 2).double()
    sig = torch.tensor([0.5, 1.0, 3.0, 20.0], dtype=torch.float64).view(1, 4, 1, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 16, 16, generator=g, dtype=torch.float64) * sig + 5
    y = layer(x)
    std = y.std(dim=(0, 2, 3), unbiased=False)
    tol = {1: 0.01, 2: 5e-5, math.inf: 0.15}[p]  # eps shifts p=2 by eps/(2 sigma^2); a max of 16384 values is noisy
    assert torch.allclose(std, torch.ones(4, dtype=torch.float64), atol=tol), std
    # the raw (uncentred) reading would not: with mean 5 the statistic of x mixes in the mean (l2: sqrt(sigma^2 + 25))
    raw = make_norm(name, 4, 2, centered=False).double()(x).std(dim=(0, 2, 3), unbiased=False)
    assert raw[0] < 0.5


def test_l2_is_torch_batchnorm():
    for dims, shape in ((1, (10, 3)), (2, (5, 3, 4, 4)), (3, (3, 3, 2, 3, 2))):
        ours = make_norm("l2", 3, dims).double()
        ref = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](3).double()
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        r = torch.randn(shape, dtype=torch.float64)
        ya, yb = ours(x), ref(x)
        ga = torch.autograd.grad((ya * r).sum(), [x, ours.weight, ours.bias])
        gb = torch.autograd.grad((yb * r).sum(), [x, ref.weight, ref.bias])
        assert torch.allclose(ya, yb, atol=1e-12)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ga, gb))
        assert torch.allclose(ours.running_var, ref.running_var, atol=1e-12)


def test_gaussian_max_constant_against_monte_carlo():
    assert gaussian_max_abs_mean(1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-7)
    rng = np.random.default_rng(0)
    for n, reps in ((2, 400_000), (10, 100_000), (1000, 2000)):
        mx = np.abs(rng.standard_normal((reps, n))).max(1)
        se = mx.std() / math.sqrt(reps)
        assert abs(gaussian_max_abs_mean(n) - mx.mean()) < 4 * se
    assert gaussian_max_abs_mean(10**6) == pytest.approx(math.sqrt(2 * math.log(10**6)), rel=0.1)


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("centered", [True, False])
def test_lp_gradcheck(p, centered):
    g = torch.Generator().manual_seed(1)
    for shape in ((6, 2), (3, 2, 2, 3)):
        x = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
        w = torch.rand(2, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
        b = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()
        f = lambda x, w, b: lp_batch_norm(x, w, b, None, None, p=p, training=True, centered=centered).out  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, b))


def test_lp_state_dict_round_trip_and_keys():
    a = LpBatchNorm2d(3, p=1)
    a(torch.randn(4, 3, 5, 5) * 2 + 1)
    t = nn.BatchNorm2d(3)
    assert list(a.state_dict()) == list(t.state_dict())
    t.load_state_dict(a.state_dict())
    b = LpBatchNorm2d(3, p=1)
    b.load_state_dict(t.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    a.eval(), b.eval(), t.eval()
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(a(x), b(x)) and torch.allclose(a(x), t(x), atol=1e-6)
    assert bnlab.is_batchnorm(a)


def test_lp_cumulative_momentum_bad_input_and_nan_batches():
    layer = LpBatchNorm1d(2, p=1, momentum=None).double()
    xs = [torch.randn(8, 2, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        layer(x)
    means = torch.stack([x.mean(0) for x in xs]).mean(0)
    assert torch.allclose(layer.running_mean, means) and int(layer.num_batches_tracked) == 3
    before = layer.running_var.clone()
    with pytest.warns(NonFiniteBatchWarning):
        layer(torch.full((8, 2), float("nan"), dtype=torch.float64))
    assert torch.equal(layer.running_var, before) and int(layer.num_batches_tracked) == 3
    with pytest.raises(ConfigError, match="p must be"):
        LpBatchNorm1d(2, p=3)
    with pytest.raises(ShapeError, match="more than 1 value"):
        layer(torch.randn(1, 2, dtype=torch.float64))
    with pytest.raises(ShapeError):
        layer(torch.randn(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 8, 7, 7), (5, 3), (4, 6, 9)])
def test_sample_noise_equals_algorithm_1_written_out(shape, dtype):
    """The sampler works in place on its draws; the values are those of Algorithm 1's formulas
    written out plainly (m = mu_t + (2u - 1) r_mu, s = sigma_t + z r_sigma), bit for bit."""
    from bnlab.norm.noisy import NoiseConfig, sample_noise

    cfg = NoiseConfig()
    g = torch.Generator().manual_seed(7)
    c = shape[1]
    mu_t = (torch.rand(c, generator=g, dtype=dtype) * 2 - 1) * cfg.n_mu
    sigma_t = 1 + torch.rand(c, generator=g, dtype=dtype) * (cfg.n_sigma - 1)
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    m = mu_t.reshape(per_channel) + (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * cfg.r_mu
    s = sigma_t.reshape(per_channel) + torch.randn(shape, generator=g, dtype=dtype) * cfg.r_sigma
    got = sample_noise(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    for a, b in zip(got, (mu_t, sigma_t, m, s)):
        assert a.dtype == dtype and torch.equal(a, b)
