"""BN variants through the factory: ghost BN, batch renormalization, frozen BN, layer and group norm.

Oracles: torch.nn.BatchNorm in float64 (whole batch, or a loop over the virtual batches), a NumPy
float64 reference of Ioffe 2017's r/d clipping, a detach-based autograd reference for its gradients,
torch.nn.functional.layer_norm/group_norm and a NumPy group norm.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.norm import (BatchRenorm2d, FrozenBatchNorm1d, FrozenBatchNorm2d, GhostBatchNorm1d, GhostBatchNorm2d,
                        GroupNorm, LayerNorm, RenormSchedule, freeze, is_batchnorm, make_norm, norm_names, unfreeze)
from bnlab.norm.ghost import virtual_batch_sizes
from bnlab.norm.layer_group import default_num_groups
from bnlab.norm.renorm import renorm_correction

TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (), 2: (3, 2), 3: (2, 2, 3)}
TOL = dict(rtol=1e-10, atol=1e-10)


def _x(n: int, c: int, dims: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, *SPATIAL[dims], generator=g, dtype=torch.float64) * scale + shift)


def _randomize(layer: nn.Module, seed: int = 1) -> None:
    """Random affine parameters and running statistics (a fresh layer's would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.2)


def _step(layer: nn.Module, x: torch.Tensor, g_out: torch.Tensor):
    """One forward/backward: (output, dx, dweight, dbias)."""
    x = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(g_out)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def _assert_same_state(a: nn.Module, b: nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **(tol or TOL), msg=k)


# --- ghost BN ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_with_virtual_batch_of_the_whole_batch_is_bn(dims, momentum):
    ours = make_norm("ghost", 5, dims, virtual_batch_size=16, momentum=momentum).double()
    ref = TORCH_BN[dims](5, momentum=momentum).double()
    _randomize(ref)
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        n = 16 - step  # vbs == batch, then vbs > batch
        x, g = _x(n, 5, dims, seed=step, scale=2, shift=3), _x(n, 5, dims, seed=10 + step)
        for a, b in zip(_step(ours, x, g), _step(ref, x, g)):
            torch.testing.assert_close(a, b, **TOL)
    _assert_same_state(ours, ref)
    assert int(ours.num_batches_tracked) == 3


def _chunk_loop(ref: nn.Module, x: torch.Tensor, g_out: torch.Tensor, sizes: list[int]):
    """Oracle: torch.nn BN called on each virtual batch in turn (outputs concatenated)."""
    x = x.clone().requires_grad_(True)
    for p in ref.parameters():
        p.grad = None
    y = torch.cat([ref(chunk) for chunk in torch.split(x, sizes)])
    y.backward(g_out)
    return y.detach(), x.grad, ref.weight.grad.clone(), ref.bias.grad.clone()


@pytest.mark.parametrize("dims,n,vbs,sizes", [
    (2, 130, 32, [32, 32, 32, 32, 2]),  # the remainder is a smaller last virtual batch
    (1, 129, 32, [32, 32, 32, 33]),  # a lone (N, C) example joins the previous virtual batch
    (1, 130, 32, [32, 32, 32, 32, 2]),
    (2, 129, 32, [32, 32, 32, 32, 1]),  # one (C, H, W) example still has H*W values per channel
    (3, 20, 7, [7, 7, 6]),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_equals_a_per_virtual_batch_bn_loop(dims, n, vbs, sizes, momentum):
    ours = make_norm("ghost", 3, dims, virtual_batch_size=vbs, momentum=momentum).double()
    ref = TORCH_BN[dims](3, momentum=momentum).double()
    _randomize(ref)
    ours.load_state_dict(ref.state_dict())
    assert virtual_batch_sizes(n, vbs, 1 if dims == 1 else 6) == sizes
    for step in range(2):
        x, g = _x(n, 3, dims, seed=step, scale=3, shift=-2), _x(n, 3, dims, seed=20 + step)
        for a, b in zip(_step(ours, x, g), _chunk_loop(ref, x, g, sizes)):
            torch.testing.assert_close(a, b, **TOL)
    _assert_same_state(ours, ref)
    assert int(ours.num_batches_tracked) == 2 * len(sizes)  # counts virtual batches
    # and ghost BN is not BN here: the whole-batch normalization differs
    whole = TORCH_BN[dims](3).double()
    assert not torch.allclose(ours(_x(n, 3, dims, seed=5)), whole(_x(n, 3, dims, seed=5)), atol=1e-3)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ghost_eval_is_eval_bn_and_state_dicts_interchange(dims):
    ref = TORCH_BN[dims](4).double()
    _randomize(ref, seed=3)
    ours = make_norm("ghost", 4, dims, virtual_batch_size=2).double()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval(), ref.eval()
    x = _x(9, 4, dims, seed=4, scale=2, shift=1)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ours.train()
    ours(_x(9, 4, dims, seed=5))
    back = TORCH_BN[dims](4).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(back, ours)
    assert is_batchnorm(ours) and isinstance(ours, TORCH_BN[dims])


def test_ghost_without_running_stats_uses_virtual_batches_in_eval_too():
    ours = GhostBatchNorm1d(3, track_running_stats=False, virtual_batch_size=4, dtype=torch.float64).eval()
    x = _x(10, 3, 1, seed=6, scale=2)
    want = torch.cat([F.batch_norm(c, None, None, ours.weight, ours.bias, training=True) for c in x.split([4, 4, 2])])
    torch.testing.assert_close(ours(x), want, **TOL)


def test_ghost_refuses_bad_virtual_batch_size():
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="virtual_batch_size must be >= 1"):
            GhostBatchNorm2d(3, virtual_batch_size=bad)
    with pytest.raises(ConfigError, match="virtual_batch_size must be an int"):
        make_norm("ghost", 3, 2, virtual_batch_size=2.5)
    with pytest.raises(ShapeError, match="more than 1 value per channel"):
        GhostBatchNorm1d(3, virtual_batch_size=4)(torch.randn(1, 3))


# --- batch renormalization ---------------------------------------------------------------------------


def _np_renorm(x, w, b, rm, rv, rmax, dmax, eps):
    """NumPy float64 reference of Ioffe 2017 Alg. 1 (training output), x (N, C, *spatial)."""
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=axes)
    var = ((x - mu.reshape(shape)) ** 2).mean(axis=axes)
    sigma_b, sigma = np.sqrt(var + eps), np.sqrt(rv + eps)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mu - rm) / sigma, -dmax, dmax)
    xhat = (x - mu.reshape(shape)) / sigma_b.reshape(shape)
    y = (xhat * r.reshape(shape) + d.reshape(shape)) * w.reshape(shape) + b.reshape(shape)
    return y, r, d


def _detached_renorm(x, w, b, rm, rv, rmax, dmax, eps):
    """Autograd reference: plain torch ops, r and d built from detached values (stop_gradient)."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu = x.mean(dims)
    var = x.var(dims, unbiased=False)
    sigma_b, sigma = torch.sqrt(var + eps), torch.sqrt(rv + eps)
    r = (sigma_b.detach() / sigma).clamp(1 / rmax, rmax)
    d = ((mu.detach() - rm) / sigma).clamp(-dmax, dmax)
    xhat = (x - mu.view(shape)) / sigma_b.view(shape)
    return (xhat * r.view(shape) + d.view(shape)) * w.view(shape) + b.view(shape)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_renorm_with_rmax_1_dmax_0_is_bn(dims):
    ours = make_norm("renorm", 4, dims, rmax=1.0, dmax=0.0, momentum=0.3).double()
    ref = TORCH_BN[dims](4, momentum=0.3).double()
    _randomize(ref, seed=7)  # running statistics far from the batch's: r and d would be far from 1 and 0
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x, g = _x(12, 4, dims, seed=step, scale=3, shift=2), _x(12, 4, dims, seed=30 + step)
        for a, b in zip(_step(ours, x, g), _step(ref, x, g)):
            torch.testing.assert_close(a, b, **TOL)
    _assert_same_state(ours, ref)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_renorm_matches_the_numpy_reference_and_detached_gradients(dims):
    rmax, dmax, eps = 1.5, 0.5, 1e-5
    layer = make_norm("renorm", 6, dims, rmax=rmax, dmax=dmax).double()
    _randomize(layer, seed=8)
    with torch.no_grad():  # channels 0-2 near the batch statistics (no clipping), 3-5 far (clipped)
        layer.running_mean.copy_(torch.tensor([0.05, -0.1, 0.1, 3.0, -4.0, 2.0], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([1.1, 0.9, 1.2, 9.0, 0.05, 1.0], dtype=torch.float64))
    before = copy.deepcopy(layer)
    x, g = _x(16, 6, dims, seed=9), _x(16, 6, dims, seed=19)
    y, dx, dw, db = _step(layer, x, g)

    ny, r, d = _np_renorm(x.numpy(), before.weight.detach().numpy(), before.bias.detach().numpy(),
                          before.running_mean.numpy(), before.running_var.numpy(), rmax, dmax, eps)
    np.testing.assert_allclose(y.numpy(), ny, rtol=1e-10, atol=1e-10)
    clipped = (np.isclose(r, rmax) | np.isclose(r, 1 / rmax)) | np.isclose(np.abs(d), dmax)
    assert clipped[3:].all() and not clipped[:3].any()  # both regimes are exercised

    xr = x.clone().requires_grad_(True)
    w, b = before.weight.detach().clone().requires_grad_(True), before.bias.detach().clone().requires_grad_(True)
    _detached_renorm(xr, w, b, before.running_mean, before.running_var, rmax, dmax, eps).backward(g)
    for ours, want in ((dx, xr.grad), (dw, w.grad), (db, b.grad)):
        torch.testing.assert_close(ours, want, **TOL)
    # the stop-gradient matters: differentiating through r and d gives another dx
    xs = x.clone().requires_grad_(True)
    mu, var = xs.mean([0, *range(2, xs.dim())]), xs.var([0, *range(2, xs.dim())], unbiased=False)
    rr, dd = renorm_correction(mu, var, before.running_mean, before.running_var, rmax, dmax, eps)
    assert not rr.requires_grad and not dd.requires_grad
    np.testing.assert_allclose(rr.numpy(), r, rtol=1e-12)
    np.testing.assert_allclose(dd.numpy(), d, rtol=1e-12, atol=1e-12)

    # running statistics: BN's update
    ref = TORCH_BN[dims](6).double()
    ref.load_state_dict(before.state_dict())
    ref(x)
    _assert_same_state(layer, ref)
    # eval: BN's inference map
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x), **TOL)


@pytest.mark.parametrize("dims", [1, 2])
def test_renorm_without_clipping_trains_with_the_inference_map(dims):
    """rmax = dmax = inf: r = sigma_B / sigma and d = (mu_B - mu) / sigma exactly, so the training output
    is BN's inference map with the running statistics before the update (Ioffe 2017, Sec. 3)."""
    layer = make_norm("renorm", 4, dims, rmax=float("inf"), dmax=float("inf")).double()
    _randomize(layer, seed=23)
    ref = TORCH_BN[dims](4).double()
    ref.load_state_dict(layer.state_dict())
    x = _x(10, 4, dims, seed=24, scale=3, shift=2)
    torch.testing.assert_close(layer(x), ref.eval()(x), **TOL)


def test_renorm_schedule_values():
    s = RenormSchedule()  # Ioffe 2017: BN for 5k steps, rmax 3 at 40k, dmax 5 at 25k
    want = {0: (1, 0), 4999: (1, 0), 5000: (1, 0), 22500: (1 + 2 * 17500 / 35000, 5 * 17500 / 20000),
            25000: (1 + 2 * 20000 / 35000, 5), 40000: (3, 5), 10**6: (3, 5)}
    for t, (rmax, dmax) in want.items():
        got = s.at(t)
        assert (float(got[0]), float(got[1])) == pytest.approx((rmax, dmax), abs=1e-12), t
        got_t = s.at(torch.tensor(t))
        assert (float(got_t[0]), float(got_t[1])) == pytest.approx((rmax, dmax), abs=1e-12), t
    custom = RenormSchedule(rmax=2, dmax=1, warmup_steps=10, rmax_steps=20, dmax_steps=10)
    assert [tuple(float(v) for v in custom.at(t)) for t in (9, 10, 15, 20)] == [(1, 0), (1, 1), (1.5, 1), (2, 1)]
    assert tuple(float(v) for v in RenormSchedule.constant(4, 2).at(0)) == (4, 2)
    assert tuple(float(v) for v in RenormSchedule(rmax=float("inf"), dmax=float("inf"), warmup_steps=1,
                                                  rmax_steps=5, dmax_steps=5).at(2)) == (float("inf"), float("inf"))


def test_renorm_schedule_follows_num_batches_tracked_through_checkpoints():
    sched = RenormSchedule(rmax=3, dmax=5, warmup_steps=2, rmax_steps=6, dmax_steps=4)
    a = BatchRenorm2d(3, schedule=sched, dtype=torch.float64)
    _randomize(a, seed=11)
    seen = []
    for step in range(4):
        seen.append(a.clipping())
        a(_x(8, 3, 2, seed=step, scale=2, shift=1))
    assert seen == [(1, 0), (1, 0), (1, 0), (1.5, 2.5)]
    b = BatchRenorm2d(3, schedule=sched, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    assert b.clipping() == a.clipping() == (2.0, 5.0)
    x = _x(8, 3, 2, seed=42, scale=3, shift=-1)
    torch.testing.assert_close(b(x), a(x), **TOL)
    # a torch.nn BN checkpoint at step 25k loads with its step count; a fresh default layer is plain BN
    bn = nn.BatchNorm2d(3).double()
    bn.num_batches_tracked.fill_(25000)
    c = make_norm("renorm", 3, 2).double()
    assert c.clipping() == (1.0, 0.0)
    c.load_state_dict(bn.state_dict(), strict=True)
    assert c.clipping() == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert list(c.state_dict()) == list(bn.state_dict())


def test_renorm_refuses_bad_settings():
    with pytest.raises(ConfigError, match="rmax must be a number >= 1"):
        make_norm("renorm", 3, 2, rmax=0.5, dmax=0)
    with pytest.raises(ConfigError, match="pass both rmax and dmax"):
        make_norm("renorm", 3, 2, rmax=2)
    with pytest.raises(ConfigError, match="track_running_stats=True"):
        make_norm("renorm", 3, 2, track_running_stats=False)
    with pytest.raises(ConfigError, match=">= warmup_steps"):
        RenormSchedule(warmup_steps=5000, rmax_steps=100)
    with pytest.raises(ConfigError, match="either fixed clipping"):
        make_norm("renorm", 3, 2, rmax=2, dmax=1, schedule=RenormSchedule())


# --- frozen BN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_is_eval_bn_even_in_train_mode(dims, affine):
    ref = TORCH_BN[dims](5, affine=affine).double()
    if affine:
        _randomize(ref, seed=12)
    else:
        ref.running_mean.normal_(), ref.running_var.uniform_(0.3, 2)
    ref.eval()
    frozen = make_norm("frozen", 5, dims, affine=affine).double()
    assert list(frozen.state_dict()) == list(ref.state_dict())
    frozen.load_state_dict(ref.state_dict(), strict=True)
    assert list(frozen.parameters()) == []
    frozen.train()
    x, g = _x(7, 5, dims, seed=13, scale=2, shift=4), _x(7, 5, dims, seed=14)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = frozen(xa), ref(xb)
    torch.testing.assert_close(ya, yb, **TOL)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    _assert_same_state(frozen, ref)  # nothing was updated by the train-mode forward
    back = TORCH_BN[dims](5, affine=affine).double()
    back.load_state_dict(frozen.state_dict(), strict=True)
    _assert_same_state(back, frozen)
    assert not is_batchnorm(frozen)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         make_norm("ghost", 4, 2, virtual_batch_size=3),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 6), make_norm("batch", 6, 1, momentum=0.2),
                         make_norm("renorm", 6, 1, rmax=2.0, dmax=1.0), make_norm("l1", 6, 1)).double()


def test_freeze_model_matches_eval_in_train_mode_and_unfreeze_round_trips():
    model = _model()
    for step in range(3):  # non-trivial running statistics
        model(_x(10, 2, 2, seed=step).view(10, 2, 3, 2).repeat(1, 1, 2, 3))
    x = _x(5, 2, 2, seed=50).repeat(1, 1, 2, 3)
    want = copy.deepcopy(model).eval()(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model]

    out = freeze(model)
    assert out is model
    assert [type(m).__name__ for m in model if "Frozen" in type(m).__name__] == [
        "FrozenBatchNorm2d", "FrozenBatchNorm2d", "FrozenBatchNorm1d", "FrozenBatchNorm1d", "FrozenBatchNorm1d"]
    assert not any(is_batchnorm(m) for m in model.modules())
    model.train()
    torch.testing.assert_close(model(x), want, **TOL)
    assert list(model.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], **TOL)
    assert sum(p.numel() for p in model.parameters()) == 2 * 4 * 9 + 4 + 64 * 6 + 6  # conv and linear only

    unfreeze(model)
    assert [type(m) for m in model] == classes
    assert model[3].virtual_batch_size == 3 and model[6].momentum == 0.2 and model[7].schedule.rmax == 2.0
    assert model[8].p == 1
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], **TOL)
    model.eval()
    torch.testing.assert_close(model(x), want, **TOL)


def test_freeze_a_single_layer_and_unfreeze_a_built_frozen_layer():
    bn = nn.BatchNorm1d(3).double()
    _randomize(bn, seed=15)
    frozen = freeze(bn)
    assert isinstance(frozen, FrozenBatchNorm1d)
    built = FrozenBatchNorm2d(3, dtype=torch.float64)
    restored = unfreeze(built)
    assert type(restored).__name__ == "BatchNorm2d" and isinstance(restored, nn.BatchNorm2d)
    assert restored.weight.dtype == torch.float64 and restored.weight.requires_grad


def test_freeze_refuses_a_layer_without_running_stats_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ConfigError, match=r"layer '2' \(BatchNorm1d\) keeps no running statistics"):
        freeze(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.Linear, nn.BatchNorm1d]
    with pytest.raises(ShapeError, match="FrozenBatchNorm2d expects a 4-D input"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))


# --- layer and group norm ----------------------------------------------------------------------------


def _affine_layer(layer: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_channels, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(layer.num_channels, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_layer_norm_is_torch_layer_norm_over_channels_and_space(dims):
    layer = make_norm("layer", 6, dims).double()
    _affine_layer(layer, 16)
    x = _x(4, 6, dims, seed=17, scale=3, shift=2)
    shape = (6,) + (1,) * (x.dim() - 2)
    want = F.layer_norm(x, x.shape[1:], layer.weight.view(shape).expand(x.shape[1:]),
                        layer.bias.view(shape).expand(x.shape[1:]), eps=1e-5)
    torch.testing.assert_close(layer(x), want, **TOL)
    torch.testing.assert_close(layer.eval()(x), want, **TOL)  # no running statistics: same in eval
    if dims == 1:
        ln = nn.LayerNorm(6).double()
        ln.load_state_dict(layer.state_dict())
        torch.testing.assert_close(ln(x), want, **TOL)
    assert not is_batchnorm(layer)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [None, 3])
def test_group_norm_matches_functional_and_numpy(dims, groups):
    kwargs = {} if groups is None else {"num_groups": groups}
    layer = make_norm("group", 6, dims, **kwargs).double()
    g = groups or default_num_groups(6)  # 3: two channels per group
    assert layer.num_groups == g
    _affine_layer(layer, 18)
    x = _x(4, 6, dims, seed=19, scale=2, shift=-3)
    want = F.group_norm(x, g, layer.weight, layer.bias, eps=1e-5)
    torch.testing.assert_close(layer(x), want, **TOL)
    a = x.numpy().reshape(4, g, -1)
    z = ((a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    shape = (1, 6) + (1,) * (x.dim() - 2)
    w, b = (t.detach().numpy().reshape(shape) for t in (layer.weight, layer.bias))
    np.testing.assert_allclose(layer(x).detach().numpy(), z * w + b, rtol=1e-10, atol=1e-10)


def test_default_num_groups_and_group_errors():
    assert [default_num_groups(c) for c in (64, 32, 48, 10, 7, 1, 96, 2)] == [32, 16, 24, 5, 1, 1, 32, 1]
    with pytest.raises(ConfigError, match="num_groups must be a positive int dividing num_features=6"):
        GroupNorm(6, num_groups=4)
    with pytest.raises(ShapeError, match=r"expects a \(N, C, H, W\) input"):
        make_norm("group", 6, 2)(torch.randn(2, 6))
    assert isinstance(LayerNorm(4), nn.GroupNorm)


# --- the factory -------------------------------------------------------------------------------------


def test_factory_knows_the_variants_and_refuses_unknown_options():
    assert {"ghost", "renorm", "frozen", "layer", "group"} <= set(norm_names())
    for name in norm_names():
        with pytest.raises(ConfigError, match=rf"make_norm\('{name}'\) got unknown option\(s\) 'bogus'"):
            make_norm(name, 4, 2, bogus=1)
    with pytest.raises(ConfigError, match="'momentun' \\(did you mean 'momentum'\\?\\)"):
        make_norm("batch", 4, 2, momentun=0.1)
    with pytest.raises(ConfigError, match="'num_group' \\(did you mean 'num_groups'\\?\\)"):
        make_norm("group", 4, 2, num_group=2)
    assert make_norm("batch", 4, 2, momentum=0.2).momentum == 0.2


@pytest.mark.parametrize("name,kwargs", [("ghost", {"virtual_batch_size": 4}), ("renorm", {"rmax": 2.0, "dmax": 1.0}),
                                         ("frozen", {}), ("layer", {}), ("group", {"num_groups": 2})])
def test_float32_bfloat16_and_channels_last_agree_with_float64(name, kwargs):
    """The same layer in float32, with bfloat16 inputs (float32 parameters, as under autocast) and on a
    channels-last input gives the float64 result up to the dtype's rounding."""
    layer64 = make_norm(name, 4, 2, **kwargs).double()
    if hasattr(layer64, "running_mean"):
        _randomize(layer64, seed=21)
    layer32 = copy.deepcopy(layer64).float()
    x = _x(10, 4, 2, seed=22, scale=2, shift=1)
    want = copy.deepcopy(layer64)(x)
    torch.testing.assert_close(copy.deepcopy(layer32)(x.float()).double(), want, rtol=1e-5, atol=1e-5)
    got_cl = copy.deepcopy(layer32)(x.float().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got_cl.double(), want, rtol=1e-5, atol=1e-5)
    got_bf = copy.deepcopy(layer32)(x.to(torch.bfloat16))
    assert got_bf.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf.double(), want, rtol=0.05, atol=0.05)


def test_readme_norm_table_lists_every_factory_name():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("### Norm layers by name", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `\"")]
    listed = {name for row in rows for name in re.findall(r'`"(\w+)"`', row.split("|")[1])}
    assert listed == set(norm_names())


def test_models_keep_the_biases_that_no_learnable_beta_subsumes():
    """A frozen layer's shift is a fixed buffer, and layer/group norm pool channels, so the bias before
    them stays; ghost BN and renorm have BN's per-channel beta, which subsumes it (Ioffe & Szegedy 2015,
    Sec. 3.2)."""
    from bnlab.models.registry import build_model

    for norm, has_bias in (("frozen", True), ("ghost", False), ("renorm", False), ("layer", True), ("group", True)):
        model = build_model("ioffe_mlp", norm=norm)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]  # hidden layers
        assert linears and all((m.bias is not None) == has_bias for m in linears), norm
