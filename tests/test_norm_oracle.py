"""bnlab BN against independent oracles: torch.nn, the NumPy reference, autograd gradcheck."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.norm as bn
from bnlab.norm import reference as ref
from bnlab.norm.functional import batch_norm

pytestmark = pytest.mark.usefixtures("bn_path")  # every test on the fused kernels and the composite path

SHAPES = {1: [(16, 6), (8, 6, 5)], 2: [(4, 6, 5, 3)], 3: [(2, 6, 3, 2, 4)]}
CASES = [
    (dims, shape, momentum, affine, track)
    for dims, shapes in SHAPES.items()
    for shape in shapes
    for momentum, affine, track in itertools.product([0.1, 0.5, None], [True, False], [True, False])
]


def _pair(dims, momentum, affine, track):
    torch_bn = getattr(nn, f"BatchNorm{dims}d")(6, momentum=momentum, affine=affine, track_running_stats=track).double()
    ours = getattr(bn, f"BatchNorm{dims}d")(6, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:  # non-trivial gamma/beta so their gradients and effect are tested
        with torch.no_grad():
            torch_bn.weight.uniform_(0.5, 2.0)
            torch_bn.bias.uniform_(-1.0, 1.0)
    ours.load_state_dict(torch_bn.state_dict())
    return torch_bn, ours


@pytest.mark.parametrize("dims,shape,momentum,affine,track", CASES)
def test_matches_torch_nn_over_several_steps(dims, shape, momentum, affine, track):
    torch.manual_seed(0)
    torch_bn, ours = _pair(dims, momentum, affine, track)
    for step in range(4):
        x = (torch.randn(shape, dtype=torch.float64) * (1 + step) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(shape, dtype=torch.float64)
        y_t, y_o = torch_bn(x), ours(x2)
        assert (y_t - y_o).abs().max().item() <= 1e-10
        y_t.backward(g)
        y_o.backward(g)
        assert (x.grad - x2.grad).abs().max().item() <= 1e-10
        if affine:
            for p_t, p_o in ((torch_bn.weight, ours.weight), (torch_bn.bias, ours.bias)):
                assert (p_t.grad - p_o.grad).abs().max().item() <= 1e-10
                p_t.grad = p_o.grad = None
        if track:
            assert (torch_bn.running_mean - ours.running_mean).abs().max().item() <= 1e-10
            assert (torch_bn.running_var - ours.running_var).abs().max().item() <= 1e-10
            assert torch_bn.num_batches_tracked.item() == ours.num_batches_tracked.item() == step + 1
    torch_bn.eval(), ours.eval()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    assert (torch_bn(x) - ours(x)).abs().max().item() <= 1e-10
    assert set(torch_bn.state_dict()) == set(ours.state_dict())


@pytest.mark.parametrize("dims,shape", [(d, s) for d, ss in SHAPES.items() for s in ss])
def test_matches_numpy_reference(dims, shape):
    rng = np.random.default_rng(1)
    module = getattr(bn, f"BatchNorm{dims}d")(6).double()
    gamma, beta = rng.uniform(0.5, 2, 6), rng.normal(size=6)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma))
        module.bias.copy_(torch.from_numpy(beta))
    run_mean, run_var = np.zeros(6), np.ones(6)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=shape)
        g = rng.normal(size=shape)
        y_ref, cache = ref.forward(x, gamma, beta, eps=1e-5)
        dx_ref, dgamma_ref, dbeta_ref = ref.backward_compact(g, cache)
        run_mean, run_var = ref.ema_update(run_mean, run_var, x, 0.1)
        xt = torch.from_numpy(x).requires_grad_()
        y = module(xt)
        y.backward(torch.from_numpy(g))
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(xt.grad.numpy(), dx_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(module.weight.grad.numpy(), dgamma_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(module.bias.grad.numpy(), dbeta_ref, rtol=0, atol=1e-10)
        module.zero_grad()
        np.testing.assert_allclose(module.running_mean.numpy(), run_mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(module.running_var.numpy(), run_var, rtol=0, atol=1e-10)
    module.eval()
    x = rng.normal(size=shape)
    np.testing.assert_allclose(
        module(torch.from_numpy(x)).detach().numpy(),
        ref.inference(x, gamma, beta, run_mean, run_var, eps=1e-5),
        rtol=0,
        atol=1e-10,
    )


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (3, 3, 2, 4)])
def test_gradcheck_functional_training_and_eval(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def train(x, w, b):
        return batch_norm(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5).out

    def evaluate(x, w, b):
        return batch_norm(x, w, b, rm, rv, training=False, eps=1e-5).out

    assert torch.autograd.gradcheck(train, (x, w, b))
    assert torch.autograd.gradgradcheck(train, (x, w, b))  # Hessian-vector products need this
    assert torch.autograd.gradcheck(evaluate, (x, w, b))


def test_functional_does_not_mutate_its_arguments():
    x = torch.randn(8, 4, dtype=torch.float64)
    w, b = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    rm, rv, n = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.tensor(0)
    before = [t.clone() for t in (x, w, b, rm, rv, n)]
    res = batch_norm(x, w, b, rm, rv, training=True, momentum=None, num_batches_tracked=n)
    for t, t0 in zip((x, w, b, rm, rv, n), before):
        assert torch.equal(t, t0)
    assert res.num_batches_tracked.item() == 1
    # momentum=None after one batch: the running stats are that batch's statistics
    torch.testing.assert_close(res.running_mean, x.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.running_var, x.var(0, unbiased=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("source", ["paper", "compact"])
@pytest.mark.parametrize("shape", [(9, 4), (3, 4, 2, 3)])
def test_reference_backward_equals_autograd(source, shape):
    rng = np.random.default_rng(2)
    x, g = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2.0, size=4), rng.normal(size=4)
    _, cache = ref.forward(x, gamma, beta)
    dx, dgamma, dbeta = (ref.backward_paper if source == "paper" else ref.backward_compact)(g, cache)
    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    dims = [0, *range(2, len(shape))]
    view = (1, -1) + (1,) * (len(shape) - 2)
    mu = xt.mean(dims, keepdim=True)
    var = ((xt - mu) ** 2).mean(dims, keepdim=True)
    y = (xt - mu) / torch.sqrt(var + 1e-5) * wt.view(view) + bt.view(view)
    y.backward(torch.tensor(g))
    for ours, theirs in ((dx, xt.grad), (dgamma, wt.grad), (dbeta, bt.grad)):
        rel = np.abs(ours - theirs.numpy()).max() / np.abs(theirs.numpy()).max()
        assert rel < 1e-8


def test_population_statistics_is_algorithm_2():
    rng = np.random.default_rng(3)
    batches = [rng.normal(1.5, 2.0, size=(10, 3, 2, 2)) for _ in range(5)]
    mean, var = ref.population_statistics(batches)
    m = 10 * 2 * 2
    rows = [ref.to_rows(b) for b in batches]
    np.testing.assert_allclose(mean, np.mean([r.mean(0) for r in rows], axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, m / (m - 1) * np.mean([r.var(0) for r in rows], axis=0), rtol=1e-14)
    # bnlab's module with momentum=None after reset_running_stats computes the same thing
    module = bn.BatchNorm2d(3, momentum=None).double()
    for b in batches:
        module(torch.from_numpy(b))
    np.testing.assert_allclose(module.running_mean.numpy(), mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(module.running_var.numpy(), var, rtol=0, atol=1e-12)


def test_state_dict_round_trip_with_torch_nn():
    torch.manual_seed(0)
    src = nn.BatchNorm2d(5)
    for _ in range(3):
        src(torch.randn(4, 5, 3, 3))
    ours = bn.BatchNorm2d(5)
    ours.load_state_dict(src.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]) and torch.equal(v, back.state_dict()[k])
    # Old checkpoints (metadata version < 2, no num_batches_tracked) load like in torch.nn
    from collections import OrderedDict

    sd = OrderedDict((k, v) for k, v in src.state_dict().items() if k != "num_batches_tracked")
    sd._metadata = {"": {"version": 1}}
    ours.load_state_dict(sd)
    back.load_state_dict(sd)
    assert torch.equal(ours.num_batches_tracked, back.num_batches_tracked)
    fresh_ours, fresh_torch = bn.BatchNorm2d(5), nn.BatchNorm2d(5)
    fresh_ours.load_state_dict(sd)
    fresh_torch.load_state_dict(sd)
    assert fresh_ours.num_batches_tracked.item() == fresh_torch.num_batches_tracked.item() == 0


def test_convert_swaps_both_ways_keeping_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=None))
    x = torch.randn(8, 3, 8, 8)
    model(x)
    model.eval()
    expected = model(x)
    bn.convert(model, to="bnlab")
    assert isinstance(model[1], bn.BatchNorm2d) and isinstance(model[5], bn.BatchNorm1d)
    assert model[5].momentum is None and not model[1].training
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    bn.convert(model, to="torch")
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is nn.BatchNorm1d
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_make_norm_builds_known_layers():
    assert isinstance(bn.make_norm("batch", 4, 2), bn.BatchNorm2d)
    assert isinstance(bn.make_norm("batch", 4, 1), bn.BatchNorm1d)
    assert isinstance(bn.make_norm("none", 4, 2), nn.Identity)


def test_channels_last_input_keeps_its_layout_and_values():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    m1, m2 = bn.BatchNorm2d(6), bn.BatchNorm2d(6)
    y = m1(x)
    y_cl = m2(x.to(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m1.running_var, m2.running_var)
