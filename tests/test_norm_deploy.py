"""Deployment: folding BN into a neighbouring linear layer, and precise recalibration of running
statistics. Oracles: the unfolded model in eval mode (float64), NumPy population statistics of the
concatenated data, and a full-batch pass that gives exact population statistics."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.errors import ConfigError
from bnlab.norm import make_norm
from bnlab.norm.deploy import fold, fold_pair, recalibrate


def _random_stats(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn.eval()


LAYERS = [
    (lambda bias: nn.Linear(6, 5, bias=bias), (7, 6), 1),
    (lambda bias: nn.Conv1d(3, 5, 3, padding=1, bias=bias), (4, 3, 9), 1),
    (lambda bias: nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=bias), (4, 3, 8, 8), 2),
    (lambda bias: nn.Conv3d(3, 5, 2, bias=bias), (2, 3, 4, 5, 5), 3),
]


@pytest.mark.parametrize("kind", ["torch", "bnlab"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("make,shape,dims", LAYERS)
def test_fold_after_a_layer_equals_the_eval_pair(make, shape, dims, bias, affine, kind):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = make(bias)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](5, affine=affine) if kind == "torch" \
        else make_norm("batch", 5, dims, affine=affine)
    _random_stats(bn, gen)
    x = torch.randn(shape, generator=gen)
    ref = bn(layer(x))
    folded = fold_pair(layer, bn)
    assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # float64: the fold itself is exact up to rounding
    l64, b64 = layer.double(), bn.double()
    x64 = x.double()
    assert torch.allclose(fold_pair(l64, b64)(x64), b64(l64(x64)), rtol=1e-12, atol=1e-12)
    assert folded.bias is not None and layer.weight.data_ptr() != folded.weight.data_ptr()  # a new layer


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(5, 4), (7, 5)), (lambda: nn.Conv2d(5, 4, 3), (2, 5, 6, 6)),
                                        (lambda: nn.Conv1d(5, 4, 1, bias=False), (3, 5, 8))])
def test_fold_before_a_layer_is_exact_without_padding(make, shape):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    layer = make().double()
    bn = _random_stats(nn.BatchNorm1d(5) if len(shape) < 4 else nn.BatchNorm2d(5), gen).double()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert torch.allclose(fold_pair(layer, bn, bn_first=True)(x), layer(bn(x)), rtol=1e-12, atol=1e-12)


def test_fold_refuses_what_is_not_exact():
    bn = _random_stats(nn.BatchNorm2d(3), torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="exact only without padding"):
        fold_pair(nn.Conv2d(3, 4, 3, padding=1), bn, bn_first=True)
    with pytest.raises(ConfigError, match="running statistics"):
        fold_pair(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ConfigError, match="channels"):
        fold_pair(nn.Conv2d(3, 4, 1), bn)
    with pytest.raises(ConfigError, match="Linear or Conv"):
        fold_pair(nn.ReLU(), bn)


def test_fold_a_model_replaces_bn_by_identity_and_keeps_eval_outputs():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), make_norm("batch", 8, 2), nn.ReLU(), nn.Flatten(),
                          nn.BatchNorm1d(8 * 16), nn.Linear(8 * 16, 10))
    for m in model:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _random_stats(m, gen)
    x = torch.randn(5, 3, 4, 4, generator=gen)
    ref = model.eval()(x)
    folded = fold(model)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()) == 0
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 3  # a copy
    assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_recalibrate_sets_population_mean_and_unbiased_variance_over_unequal_batches():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6))
    data = torch.randn(25, 4, generator=gen) * torch.tensor([1.0, 3.0, 0.5, 10.0]) + torch.tensor([0.0, 5.0, -2.0, 1.0])
    batches = [data[:7], data[7:20], data[20:]]  # 7, 13 and 5 examples
    # oracle for the second BN: the inputs it sees in training mode, batch by batch, on a copy
    seen = []
    ref = copy.deepcopy(model).train()
    ref[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().numpy()))
    with torch.no_grad():
        for b in batches:
            ref(b)
    model.eval()
    counts = recalibrate(model, batches)
    assert counts == {"0": 25, "3": 25} and not model.training  # flags restored
    d = data.double().numpy()
    assert np.allclose(model[0].running_mean.numpy(), d.mean(0), rtol=1e-6, atol=1e-6)
    assert np.allclose(model[0].running_var.numpy(), d.var(0, ddof=1), rtol=1e-6)
    h2 = np.concatenate(seen)
    assert np.allclose(model[3].running_mean.numpy(), h2.mean(0), rtol=1e-6, atol=1e-6)
    assert np.allclose(model[3].running_var.numpy(), h2.var(0, ddof=1), rtol=1e-6, atol=1e-7)
    # torch's update_bn averages per-batch variances: not the population variance here
    with pytest.raises(ConfigError, match="no batch"):
        recalibrate(model, [])
    with pytest.raises(ConfigError, match="no BatchNorm"):
        recalibrate(nn.Linear(2, 2), [torch.zeros(3, 2)])


def test_recalibration_restores_eval_accuracy_after_stale_statistics():
    """Weights changed without a train-mode pass (here: the first layer rescaled and shifted) leave the
    running statistics stale and eval accuracy low; recalibration over mini-batches brings it to within
    1 point of exact population statistics (one full-batch training-mode pass with momentum 1)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64),
                          nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    def acc(m):
        with torch.no_grad():
            return (m.eval()(x).argmax(1) == y).float().mean().item()

    with torch.no_grad():  # a weight change without any train-mode pass
        model[0].weight.mul_(3.0)
        model[0].bias.add_(1.0)
    stale = acc(model)
    exact = copy.deepcopy(model)
    for m in exact.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 1.0
    with torch.no_grad():
        exact.train()(x)  # one batch = the whole data: BN normalizes with the population statistics
    target = acc(exact)
    recalibrate(model, torch.split(x, 64))
    assert target - stale > 0.05, (stale, target)  # the statistics really were stale
    assert abs(acc(model) - target) <= 0.01, (acc(model), target)


def test_fold_folds_frozen_bn_too():
    from bnlab.norm import freeze

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    _random_stats(model[1], gen)
    freeze(model)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    folded = fold(model)
    assert isinstance(folded[1], nn.Identity) and torch.allclose(folded(x), model.eval()(x), rtol=1e-5, atol=1e-6)
