"""Bad input: one clear error naming the problem and the fix, and nothing half-updated."""
from __future__ import annotations

import warnings

import pytest
import torch

import bnlab.norm as bn
from bnlab.errors import ConfigError, ShapeError
from bnlab.norm.functional import NonFiniteBatchWarning

pytestmark = pytest.mark.usefixtures("bn_path")  # every test on the fused kernels and the composite path


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before):
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_single_value_per_channel_in_training():
    m = bn.BatchNorm1d(4)
    before = _state(m)
    with pytest.raises(ShapeError, match=r"more than 1 value per channel.*batch size > 1.*call \.eval\(\)"):
        m(torch.randn(1, 4))
    assert _unchanged(m, before)
    m.eval()
    assert m(torch.randn(1, 4)).shape == (1, 4)  # fine with running statistics


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_eps_must_be_positive(eps):
    with pytest.raises(ConfigError, match=r"eps must be a positive.*eps=1e-5"):
        bn.BatchNorm2d(4, eps=eps)
    with pytest.raises(ConfigError, match="eps must be a positive"):
        bn.batch_norm(torch.randn(4, 2), None, None, None, None, training=True, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_in_unit_interval(momentum):
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\].*None"):
        bn.BatchNorm2d(4, momentum=momentum)


def test_wrong_number_of_channels_says_expected_and_got():
    m = bn.BatchNorm2d(64)
    before = _state(m)
    with pytest.raises(ShapeError, match=r"expected 64 channels.*got input with 32 channels.*num_features=32"):
        m(torch.randn(2, 32, 4, 4))
    assert _unchanged(m, before)


def test_wrong_rank_names_the_right_class():
    with pytest.raises(ShapeError, match=r"BatchNorm2d expects a 4-D input \(N, C, H, W\), got a 3-D.*BatchNorm1d"):
        bn.BatchNorm2d(3)(torch.randn(2, 3, 5))
    with pytest.raises(ShapeError, match=r"BatchNorm1d expects a 2-D or 3-D input.*BatchNorm2d"):
        bn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_integer_dtype():
    with pytest.raises(ShapeError, match=r"floating-point input, got dtype torch.int64.*x.float\(\)"):
        bn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))


def test_unknown_norm_name_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown norm 'batchnorm'; known norms: batch, (.+, )?none"):
        bn.make_norm("batchnorm", 4, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_does_not_poison_running_stats(bad):
    torch.manual_seed(0)
    m = bn.BatchNorm2d(3, momentum=None)
    m(torch.randn(4, 3, 2, 2))
    before = _state(m)
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: a warning is shown once per call site
        for _ in range(2):
            m(x)  # the warning points at this line (the caller), not inside bnlab
    assert _unchanged(m, before)
    relevant = [w for w in caught if issubclass(w.category, NonFiniteBatchWarning)]
    assert len(relevant) == 1 and "keep their previous values" in str(relevant[0].message)
    assert relevant[0].filename == __file__
    # Training goes on normally afterwards
    m(torch.randn(4, 3, 2, 2))
    assert m.num_batches_tracked.item() == 2 and torch.isfinite(m.running_var).all()
