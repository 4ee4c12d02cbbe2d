"""Parity with torch.nn 2.13 (the oracle) where issue 11 found gaps: vmap over a layer with shared
running statistics, zero channels, non-tensor input, mixed dtypes, channels-last outputs; each on the
fused kernels and on the composite path (``bn_path``)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

import bnlab.norm as bn
from bnlab.errors import BnlabError

pytestmark = pytest.mark.usefixtures("bn_path")

_SHAPES = {1: (6, 3, 4), 2: (4, 3, 3, 2), 3: (3, 3, 2, 2, 2)}


def _pair(dims, *args, **kwargs):
    return (getattr(torch.nn, f"BatchNorm{dims}d")(*args, **kwargs),
            getattr(bn, f"BatchNorm{dims}d")(*args, **kwargs))


def _raises_like(torch_call, ours_call):
    """Both raise; ours is an instance of torch's exception type (and a BnlabError with a message)."""
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(type(theirs.value)) as mine:
        ours_call()
    assert isinstance(mine.value, BnlabError)
    return str(mine.value)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_vmap_over_shared_running_stats_raises_like_torch_and_names_the_fix(dims):
    xs = torch.randn(3, *_SHAPES[dims], dtype=torch.float64)
    t, o = (m.double() for m in _pair(dims, 3))
    for how in ("direct", "functional_call"):
        def run(m):
            if how == "direct":
                return lambda: vmap(m)(xs)
            state = ({k: v for k, v in m.named_parameters()}, {k: v for k, v in m.named_buffers()})
            return lambda: vmap(lambda x: functional_call(m, state, (x,)))(xs)
        before = copy.deepcopy(o.state_dict())
        msg = _raises_like(run(t), run(o))
        for cause in ("running_mean", "vmap", "track_running_stats=False", "functional_call",
                      "replace_all_batch_norm_modules_"):
            assert cause in msg
        assert all(torch.equal(v, before[k]) for k, v in o.state_dict().items())  # nothing half-written


def test_vmap_with_per_task_buffers_equals_the_per_task_loop():
    """The fix the message names: buffers stacked along the vmapped dim, updated per task."""
    torch.manual_seed(0)
    xs = torch.randn(4, 8, 3, 2, 2, dtype=torch.float64) * 2 + 1
    models = [bn.BatchNorm2d(3).double() for _ in range(4)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    ys = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xs)
    loop = [m(x) for m, x in zip(models, xs)]
    torch.testing.assert_close(ys, torch.stack(loop), rtol=1e-10, atol=1e-10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[name], torch.stack([getattr(m, name) for m in models]), rtol=1e-10,
                                   atol=1e-12)


def test_replace_all_batch_norm_modules_then_vmap_equals_the_per_task_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), bn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 9, 6), bn.BatchNorm1d(6)).double()
    replace_all_batch_norm_modules_(model)
    for m in (model[1], model[5]):
        assert m.running_mean is None and m.running_var is None and not m.track_running_stats
    xs = torch.randn(3, 5, 2, 3, 3, dtype=torch.float64)
    params = dict(model.named_parameters())
    ys = vmap(lambda x: functional_call(model, params, (x,)))(xs)
    torch.testing.assert_close(ys, torch.stack([model(x) for x in xs]), rtol=1e-10, atol=1e-10)
    ys.sum().backward()  # still differentiable


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_zero_channels_construct_and_fail_like_torch(dims, training):
    t, o = _pair(dims, 0)
    assert repr(o) == repr(t) and o.weight.shape == t.weight.shape == (0,)
    t.train(training), o.train(training)
    x = torch.randn(_SHAPES[dims][:1] + (0,) + _SHAPES[dims][2:])
    msg = _raises_like(lambda: t(x), lambda: o(x))
    assert "num_features=0" in msg and "x.shape[1]" in msg
    with pytest.raises(RuntimeError):  # a negative count: torch's RuntimeError too
        getattr(bn, f"BatchNorm{dims}d")(-1)


@pytest.mark.parametrize("bad", [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.ones((2, 3), dtype=np.float32), None, 1.5])
def test_non_tensor_input_raises_torch_exception_type(bad):
    t, o = _pair(1, 3)
    msg = _raises_like(lambda: t(bad), lambda: o(bad))
    assert "torch.Tensor" in msg and "torch.as_tensor" in msg


_MIXED = [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.float16),
          (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
          (torch.bfloat16, torch.float16), (torch.float32, torch.float32)]


@pytest.mark.parametrize("x_dtype,p_dtype", _MIXED)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dims", [1, 2])
def test_mixed_dtypes_match_torch(x_dtype, p_dtype, training, dims):
    """Same result (half input with float32 parameters, as autocast-free modules run) or the same
    exception type (RuntimeError "mixed dtype") as torch.nn, with the buffers left untouched."""
    torch.manual_seed(0)
    t, o = (m.to(p_dtype) for m in _pair(dims, 3))
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5), t.bias.uniform_(-1, 1)
        t.running_mean.uniform_(-1, 1), t.running_var.uniform_(0.5, 2)
    o.load_state_dict(t.state_dict())
    t.train(training), o.train(training)
    x = (torch.randn(_SHAPES[dims]) * 2 + 0.5).to(x_dtype)
    try:
        expected = t(x)
    except RuntimeError:
        before = copy.deepcopy(o.state_dict())
        msg = _raises_like(lambda: t(x), lambda: o(x))
        assert "torch.autocast" in msg and str(x_dtype).replace("torch.", "") in msg
        assert all(torch.equal(v, before[k]) for k, v in o.state_dict().items())
        return
    y = o(x)
    assert y.dtype == expected.dtype
    # torch's half kernels round their float32 result once to x's dtype; ours too: one rounding apart.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(x_dtype, 1e-5)
    torch.testing.assert_close(y.float(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(o.running_mean, t.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o.running_var, t.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims,fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_output_has_torch_strides(dims, fmt, dtype, training):
    torch.manual_seed(0)
    t, o = _pair(dims, 3)
    if dtype == torch.float64:
        t, o = t.double(), o.double()
    t.train(training), o.train(training)
    x = (torch.randn(_SHAPES[dims]) * 3).to(dtype).contiguous(memory_format=fmt)
    expected, y = t(x), o(x)
    assert y.stride() == expected.stride() and y.is_contiguous(memory_format=fmt)
    tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), expected.float(), rtol=tol, atol=tol)


# ---- torch.jit.trace ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (6, 3, 5)), ("BatchNorm2d", (4, 3, 5, 5)),
                                       ("BatchNorm3d", (3, 3, 2, 3, 4))])
def test_jit_trace_gives_torch_nn_result(cls, shape, mode):
    """torch.jit.trace (with its own re-run check) works as for torch.nn, and the traced module equals
    torch.nn's in float64 on a new batch."""
    torch.manual_seed(0)
    ours, ref = getattr(bn, cls)(3).double(), getattr(torch.nn, cls)(3).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0), ours.bias.uniform_(-1, 1)
        ours.running_mean.uniform_(-1, 1), ours.running_var.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    getattr(ours, mode)(), getattr(ref, mode)()
    traced = torch.jit.trace(ours, torch.randn(*shape, dtype=torch.float64))
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(traced(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("value", [np.float32(1e-3), np.float64(1e-3), np.int64(1)])
def test_numpy_scalar_hyperparameters_are_accepted_like_torch(value):
    """torch.nn takes NumPy scalars for eps and momentum (e.g. from a config loaded with NumPy);
    bnlab's result equals torch.nn's with the same values."""
    eps, momentum = (value, 0.1) if float(value) < 0.5 else (1e-5, value)
    torch.manual_seed(0)
    ours, ref = bn.BatchNorm1d(3, eps=eps, momentum=momentum), torch.nn.BatchNorm1d(3, eps=eps, momentum=momentum)
    x = torch.randn(8, 3, dtype=torch.float32)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eps = np.float32(1e-4)  # set after construction: still a valid layer
    bn.convert(torch.nn.Sequential(ours))


def test_convert_refusing_a_layer_converts_none():
    """convert checks every layer before changing any: a refused layer (eps=0) leaves the whole
    model as it was, not half converted."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, eps=0.0))
    with pytest.raises(BnlabError, match="eps"):
        bn.convert(model)
    assert [type(m) for m in model] == [torch.nn.BatchNorm2d, torch.nn.BatchNorm2d]
