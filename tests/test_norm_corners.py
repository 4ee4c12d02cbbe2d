"""Family 2: corner cases people hit in practice, against torch.nn in float64 or closed forms."""
from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import bnlab.norm as bn
from bnlab.norm.functional import NonFiniteBatchWarning

pytestmark = pytest.mark.usefixtures("bn_path")  # every test on the fused kernels and the composite path


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, NonFiniteBatchWarning)]


# ---- empty batch -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,shape", [(1, (0, 4)), (1, (0, 4, 3)), (2, (0, 4, 3, 3)), (2, (5, 4, 0, 3)), (3, (0, 4, 2, 2, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_in_training_changes_nothing(dims, shape, momentum):
    """torch.nn returns an empty output too but increments num_batches_tracked; bnlab leaves the
    counter alone, so the next momentum=None update weighs the next real batch 1/(k+1)."""
    torch.manual_seed(0)
    ours = getattr(bn, f"BatchNorm{dims}d")(4, momentum=momentum).double()
    theirs = getattr(nn, f"BatchNorm{dims}d")(4, momentum=momentum).double()
    full = (6, 4, *shape[2:]) if shape[0] == 0 else (6, 4, *[s or 2 for s in shape[2:]])
    first = torch.randn(full, dtype=torch.float64)
    ours(first), theirs(first)
    before = _state(ours)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    y.sum().backward()  # backward works; empty gradients
    assert x.grad.shape == x.shape and torch.equal(ours.bias.grad, torch.zeros(4, dtype=torch.float64))
    # the next real batch is weighted as if the empty one never happened (torch.nn without it)
    second = torch.randn(full, dtype=torch.float64) * 2 + 1
    ours(second), theirs(second)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-12)
    assert ours.num_batches_tracked.item() == 2


def test_empty_batch_in_eval_and_functional():
    m = bn.BatchNorm2d(3).eval()
    assert m(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)
    rm, rv, n = torch.zeros(3), torch.ones(3), torch.tensor(5)
    res = bn.batch_norm(torch.randn(0, 3), None, None, rm, rv, training=True, momentum=None, num_batches_tracked=n)
    assert res.out.shape == (0, 3) and torch.equal(res.running_mean, rm) and res.num_batches_tracked.item() == 5


# ---- partial / old state dicts -----------------------------------------------------------------------

def _trained(cls, steps=3):
    torch.manual_seed(0)
    m = cls(3, momentum=None)
    for _ in range(steps):
        m(torch.randn(8, 3, 2, 2) * 2 + 1)
    return m


@pytest.mark.parametrize("drop", [(), ("running_mean", "running_var", "num_batches_tracked"), ("num_batches_tracked",),
                                  ("weight", "bias")])
def test_partial_load_state_dict_keeps_absent_entries(drop):
    """strict=False with entries missing (or an empty dict): what is absent keeps its value, so the
    next momentum=None update still weighs the new batch 1/(k+1); exactly what torch.nn does."""
    ours, theirs = _trained(bn.BatchNorm2d), _trained(nn.BatchNorm2d)
    source = nn.BatchNorm2d(3)
    partial = {k: v for k, v in source.state_dict().items() if k not in drop} if drop else {}
    ours.load_state_dict(partial, strict=False)
    theirs.load_state_dict(partial, strict=False)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == (0 if "num_batches_tracked" not in drop and drop else 3)
    x = torch.randn(8, 3, 2, 2) * 3 - 1
    ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-7)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


def test_meta_module_with_assign_gets_a_real_counter_like_torch():
    sd = OrderedDict((k, v) for k, v in nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked")
    sd._metadata = {"": {"version": 1}}  # an old checkpoint, without the counter
    for cls in (bn.BatchNorm2d, nn.BatchNorm2d):
        with torch.device("meta"):
            m = cls(3)
        m.load_state_dict(sd, assign=True)
        assert m.num_batches_tracked.device.type == "cpu" and m.num_batches_tracked.item() == 0
        assert m.running_mean.device.type == "cpu"
    with torch.device("meta"):
        m = bn.BatchNorm2d(3)
    m.load_state_dict(_trained(nn.BatchNorm2d).state_dict(), assign=True)
    assert m.num_batches_tracked.item() == 3
    m(torch.randn(4, 3, 2, 2))  # usable afterwards
    assert m.num_batches_tracked.item() == 4


# ---- half precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_half_module_with_an_outlier_keeps_finite_float64_accurate_statistics(dtype, momentum):
    """model.half(): one finite batch with a 4000 activation in one channel. The running-average
    update is computed in float32 and cast once, so it equals the float64 value rounded to the
    buffer dtype (within one rounding), and eval outputs stay finite and right."""
    torch.manual_seed(0)
    ours = bn.BatchNorm2d(4, momentum=momentum).to(dtype)
    oracle = nn.BatchNorm2d(4, momentum=momentum).double()
    for step in range(3):
        x = torch.randn(8, 4, 4, 4).to(dtype)
        if step == 1:
            x[0, 1, 0, 0] = 4000.0
        ours(x), oracle(x.double())
    assert torch.isfinite(ours.running_var).all() and torch.isfinite(ours.running_mean).all()
    rel = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7  # half an ulp of the buffer plus float32 slack
    torch.testing.assert_close(ours.running_var.double(), oracle.running_var, rtol=rel, atol=1e-3)
    torch.testing.assert_close(ours.running_mean.double(), oracle.running_mean, rtol=rel, atol=1e-2)
    ours.eval(), oracle.eval()
    x = torch.randn(8, 4, 4, 4).to(dtype)
    y = ours(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), oracle(x.double()), rtol=0.02, atol=0.02)


def test_half_overflow_of_the_running_variance_keeps_the_statistics_and_says_why():
    """A batch whose unbiased variance (~3e7) exceeds float16's max 65504: not representable, so
    the statistics keep their values and the warning names the overflow and the fix."""
    torch.manual_seed(0)
    m = bn.BatchNorm2d(3).half()
    m(torch.randn(8, 3, 2, 2).half())
    before = _state(m)
    x = torch.randn(8, 3, 2, 2).half()
    x[0, 2, 0, 0] = 30000.0
    y, caught = _caught(lambda: m(x))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "channels 2 " in msg and "torch.float16" in msg and ".float()" in msg and "NaN" not in msg
    assert torch.isfinite(y).all()  # the output itself is computed in float32 and representable
    m.float()  # the advised fix: float32 buffers, half inputs still accepted
    m(x)
    assert torch.isfinite(m.running_var).all() and m.running_var[2] > 65504


# ---- low variance --------------------------------------------------------------------------------------

@pytest.mark.parametrize("std,eps", [(1e-4, 1e-3), (1e-5, 1e-5), (1e-6, 1e-5), (1e-6, 1e-1), (3e-2, 1e-5)])
@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_low_variance_running_var_is_float64_accurate(std, eps, mean):
    """float32: running variance within 1e-5 relative of float64 on the same data, even when the
    variance is far below eps (it is computed directly, never from 1/invstd^2 - eps)."""
    torch.manual_seed(0)
    x = (torch.randn(64, 3, 4, 4, dtype=torch.float64) * std + mean).float()
    ours = bn.BatchNorm2d(3, eps=eps, momentum=None)
    ours(x)
    expected = x.double().var(dim=(0, 2, 3), unbiased=True)
    rel = ((ours.running_var.double() - expected).abs() / expected).max().item()
    assert rel < 1e-5
    torch.testing.assert_close(ours.running_mean.double(), x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6 * std)


# (class, shape, memory format): the layouts torch's CPU kernel reduces row by row (channels-last
# images, (N, C) with large N), the contiguous ones, and (N, C, L).
LAYOUTS = [
    (bn.BatchNorm2d, (64, 3, 16, 16), torch.channels_last),
    (bn.BatchNorm3d, (8, 3, 8, 8, 8), torch.channels_last_3d),
    (bn.BatchNorm1d, (64, 3, 128), torch.contiguous_format),
    (bn.BatchNorm1d, (100_000, 3), torch.contiguous_format),
    (bn.BatchNorm2d, (20_000, 3, 1, 1), torch.contiguous_format),
]


@pytest.mark.parametrize("cls,shape,fmt", LAYOUTS, ids=lambda v: str(v) if isinstance(v, tuple) else None)
@pytest.mark.parametrize("std,mean", [(1e-6, 1.0), (1e-4, 0.0), (1e-3, 1e4), (1.0, 0.0)])
def test_running_var_is_float64_accurate_in_every_layout(cls, shape, fmt, std, mean):
    """float32, 1e4..1e5 values per channel: running variance within 1e-5 relative of the float64
    variance of the same float32 values, running mean within 1e-6 relative (or 1e-6 std)."""
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).float().contiguous(memory_format=fmt)
    ours = cls(3, eps=1e-5, momentum=None)
    ours(x)
    dims = [0, *range(2, x.dim())]
    expected = x.double().var(dim=dims, unbiased=True)
    rel = ((ours.running_var.double() - expected).abs() / expected).max().item()
    assert rel < 1e-5
    torch.testing.assert_close(ours.running_mean.double(), x.double().mean(dim=dims), rtol=1e-6, atol=1e-6 * std)


@pytest.mark.parametrize("cls,shape,fmt", LAYOUTS, ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_constant_channel_is_exactly_zero_in_every_layout(cls, shape, fmt):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    x[:, 1] = 1234.5
    ours = cls(3, momentum=None)
    ours(x)
    assert ours.running_var[1].item() == 0.0 and (ours.running_var >= 0).all()


@pytest.mark.parametrize("value", [0.3, -1234.5, 1e-20])
@pytest.mark.parametrize("eps", [3e-4, 1e-5])
def test_constant_channel_has_exactly_zero_variance(value, eps):
    m = bn.BatchNorm2d(2, eps=eps, momentum=None)
    x = torch.randn(16, 2, 3, 3)
    x[:, 1] = value
    y = m(x)
    assert m.running_var[1].item() == 0.0 and (m.running_var >= 0).all()
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))  # beta, with no NaN
    m.eval()
    assert torch.isfinite(m(x)).all()


# ---- finite but huge inputs ----------------------------------------------------------------------------

HUGE_LAYOUTS = {  # every layout family: NCHW (float64 sums in torch's kernel), (N, C) and channels-last
    "nchw": (lambda: bn.BatchNorm2d(3), (8, 3, 4, 4), None),
    "nc": (lambda: bn.BatchNorm1d(3), (64, 3), None),
    "ncl": (lambda: bn.BatchNorm1d(3), (8, 3, 5), None),
    "channels_last": (lambda: bn.BatchNorm2d(3), (16, 3, 4, 4), torch.channels_last),
}


@pytest.mark.parametrize("scale", [3e18, 1e20])
@pytest.mark.parametrize("layout", list(HUGE_LAYOUTS))
def test_huge_finite_input_is_right_or_warns_about_overflow_never_silent(bn_path, layout, scale):
    """float32 values ~1e18-1e20: a float32 sum of squares overflows (the variance itself may fit).
    Either the output matches the float64 oracle (the fused kernels keep float64 statistics) or a
    warning names the overflow (never "NaN or inf values") and the running statistics are kept;
    never a silently wrong output. float64 (the advised fix) gives the oracle's result."""
    make, shape, fmt = HUGE_LAYOUTS[layout]
    torch.manual_seed(0)
    m = make()
    before = _state(m)
    x64 = torch.randn(*shape, dtype=torch.float64) * scale + 3 * scale
    x32 = x64.float() if fmt is None else x64.float().contiguous(memory_format=fmt)
    y, caught = _caught(lambda: m(x32))
    expected = nn.functional.batch_norm(x64, None, None, training=True, eps=m.eps)
    if caught:
        assert len(caught) == 1
        msg = str(caught[0].message)
        assert "overflows" in msg and "although the" in msg and "float64" in msg, msg
        assert "NaN or inf values" not in msg
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
        if "normalized this batch with float64 statistics" in msg:  # the kernels: output is right
            torch.testing.assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
    m.double()
    y, caught = _caught(lambda: m(x64))
    assert not caught
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_named_as_such(bad):
    m = bn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[3, 1] = bad
    _, caught = _caught(lambda: m(x))
    assert len(caught) == 1 and "NaN or inf values (channels 1)" in str(caught[0].message)
    assert m.num_batches_tracked.item() == 0


def test_warning_on_accelerators_is_deferred_not_synchronous(monkeypatch):
    """Off the CPU the flag is copied to the host without blocking and read by a later call once
    its event reports completion; nothing is read before. The queue logic, run on the CPU with an
    event that completes when told to."""
    from bnlab.norm import functional as F

    monkeypatch.setattr(F, "_pending", [])
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    res = F.train_core(x, None, None, torch.zeros(3), torch.ones(3), torch.tensor(0), 0.1, 1e-5)
    stats = torch.stack((res.batch_mean, res.batch_var, res.proposed_mean, res.proposed_var))
    done = {"flag": False}
    F._pending.append((lambda: done["flag"], res.accepted.clone(), stats, x.dtype, torch.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F._flush_pending()
        assert not caught and len(F._pending) == 1  # the copy has not completed: nothing is read
        done["flag"] = True
        F._flush_pending()
    assert [str(w.message) for w in caught if issubclass(w.category, NonFiniteBatchWarning)][0].startswith(
        "batch norm got a training batch with NaN or inf values (channels 0)")
    assert not F._pending


# ---- error messages that fit the layer's state ---------------------------------------------------------

def test_batch_of_one_in_eval_without_running_stats_names_the_real_cause():
    m = bn.BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"eval mode but keeps no running statistics.*track_running_stats=True") as e:
        m(torch.randn(1, 4))
    assert "call .eval()" not in str(e.value) and "model.eval()" not in str(e.value)
    m.train()
    with pytest.raises(ValueError, match=r"batch size > 1; this layer keeps no running statistics"):
        m(torch.randn(1, 4))
    m = bn.BatchNorm1d(4).eval()
    assert m(torch.randn(1, 4)).shape == (1, 4)  # with running statistics eval takes one example
