"""Family 3: bnlab's BN is recognised as BN by the rest of the ecosystem (torch.nn's classes, FX,
TorchScript, fusion, optimizers), with torch.nn's constructor, repr, exceptions and loading."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

import bnlab
import bnlab.norm as bn
from bnlab.errors import ShapeError

PAIRS = [(bn.BatchNorm1d, nn.BatchNorm1d, (6, 4)), (bn.BatchNorm2d, nn.BatchNorm2d, (6, 4, 3, 3)),
         (bn.BatchNorm3d, nn.BatchNorm3d, (6, 4, 2, 3, 2))]


def _resnet_block():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), bn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), bn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), bn.BatchNorm1d(5),
    )
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("ours,theirs,shape", PAIRS)
def test_isinstance_of_torch_nn_classes(ours, theirs, shape):
    m = ours(4)
    assert isinstance(m, theirs) and isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert bn.is_batchnorm(m) and bn.is_batchnorm(theirs(4)) and not bn.is_batchnorm(nn.LayerNorm(4))


@pytest.mark.parametrize("ours,theirs,shape", PAIRS)
def test_constructor_and_repr_match_torch(ours, theirs, shape):
    assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    for kwargs in ({}, {"bias": False}, {"affine": False}, {"momentum": None, "eps": 1e-3, "track_running_stats": False}):
        o, t = ours(4, **kwargs), theirs(4, **kwargs)
        assert o.extra_repr() == t.extra_repr()
        assert repr(o).split("(", 1)[1] == repr(t).split("(", 1)[1]
        assert {k: v.shape for k, v in o.state_dict().items()} == {k: v.shape for k, v in t.state_dict().items()}
    o, t = ours(4, bias=False).double(), theirs(4, bias=False).double()
    with torch.no_grad():
        t.weight.uniform_(0.5, 2)
    o.load_state_dict(t.state_dict())
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(o(x), t(x), rtol=1e-10, atol=1e-10)
    o.eval(), t.eval()
    torch.testing.assert_close(o(x), t(x), rtol=1e-10, atol=1e-10)


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    raise AssertionError("no exception")


@pytest.mark.parametrize("situation", ["channels", "rank", "dtype", "one_value", "one_value_eval_untracked"])
def test_exception_types_include_torch_types(situation):
    """Whatever torch.nn raises in the same situation, bnlab's error is also an instance of it."""
    def run(cls):
        if situation == "channels":
            return cls(8)(torch.randn(2, 4, 3))
        if situation == "rank":
            return cls(4)(torch.randn(2, 4, 3, 3))
        if situation == "dtype":
            return cls(4)(torch.ones(2, 4, dtype=torch.long))
        if situation == "one_value":
            return cls(4)(torch.randn(1, 4))
        return cls(4, track_running_stats=False).eval()(torch.randn(1, 4))

    theirs, ours = _raised(lambda: run(nn.BatchNorm1d)), _raised(lambda: run(bn.BatchNorm1d))
    assert isinstance(ours, type(theirs)), (type(ours).__mro__, type(theirs))
    assert isinstance(ours, bnlab.errors.BnlabError)


def test_fx_symbolic_trace_and_fuse_give_the_eager_result():
    from torch.fx.experimental.optimization import fuse

    model = _resnet_block()
    x = torch.randn(4, 3, 6, 6)
    expected = model(x)
    # independent oracle: the same weights as torch.nn layers, in float64
    oracle = bn.convert(copy.deepcopy(model).double(), to="torch")(x.double())
    torch.testing.assert_close(expected.double(), oracle, rtol=1e-5, atol=1e-5)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)
    # bnlab BN is traced through (not a leaf module: torch's tracer keeps only torch.nn's own
    # modules whole), so fuse() leaves it unfused; the result is still the eager one
    fused = fuse(model)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    # after convert(to="torch") FX fusion folds the BN layers away; same result
    folded = fuse(bn.convert(copy.deepcopy(model), to="torch"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    # traced in training mode, the graph updates the module's statistics like eager
    train_model, reference = _resnet_block().train(), _resnet_block().train()
    traced = torch.fx.symbolic_trace(train_model)
    torch.testing.assert_close(traced(x), reference(x), rtol=0, atol=0)
    assert torch.equal(traced.get_submodule("1").running_var, reference[1].running_var)
    assert traced.get_submodule("1").num_batches_tracked.item() == 4


def test_fuse_conv_bn_eval_gives_the_eager_result():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = _resnet_block()
    x = torch.randn(4, 3, 6, 6)
    conv = fuse_conv_bn_eval(model[3], model[4])
    torch.testing.assert_close(conv(model[0:3](x)), model[0:5](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_jit_script_runs_the_same_core(training, momentum, track, bn_path):
    """TorchScript runs the composite core; eager mode runs the fused kernels where they apply, which
    round differently (float64 statistics): equal to float32 rounding then, bit-near otherwise."""
    rtol = 1e-6 if bn_path == "kernels" else 0.0
    torch.manual_seed(0)
    eager = bn.BatchNorm2d(4, momentum=momentum, track_running_stats=track)
    eager(torch.randn(8, 4, 3, 3) * 2 + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript itself
        scripted = torch.jit.script(copy.deepcopy(eager))
    eager.train(training), scripted.train(training)
    for step in range(3):  # TorchScript optimizes from the second call on
        x = torch.randn(8, 4, 3, 3) * (step + 1) + step
        torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=1e-6)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(scripted.state_dict()[k], v, rtol=rtol, atol=1e-7)
    with pytest.raises(Exception, match="more than 1 value per channel"):
        scripted.train()(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize("name,bad", [("BatchNorm1d", (2, 3, 4, 5)), ("BatchNorm1d", (3,)), ("BatchNorm2d", (2, 3, 4)),
                                      ("BatchNorm3d", (2, 3, 4, 5))])
@pytest.mark.parametrize("training", [True, False])
def test_jit_script_refuses_a_wrong_rank_like_eager(name, bad, training):
    """A scripted layer raises what a scripted torch.nn layer raises (torch.jit.Error), carrying the
    eager layer's exception class and message."""
    x = torch.randn(bad)
    eager = getattr(bn, name)(3).train(training)
    with pytest.raises(ShapeError) as eager_error:
        eager(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(getattr(bn, name)(3)).train(training)
        scripted_torch = torch.jit.script(getattr(nn, name)(3)).train(training)
    with pytest.raises(Exception) as ours:
        scripted(x)
    with pytest.raises(Exception) as theirs:
        scripted_torch(x)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value).rstrip().endswith(f"bnlab.errors.ShapeError: {eager_error.value}")


@pytest.mark.parametrize("direction", ["bnlab", "torch"])
def test_convert_keeps_parameters_buffers_and_optimizer(direction):
    torch.manual_seed(0)
    model = _resnet_block().train()
    if direction == "bnlab":
        bn.convert(model, to="torch")
    source = nn.BatchNorm2d if direction == "bnlab" else bn.BatchNorm2d
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    layer = model[1]
    assert type(layer) is source
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bn.convert(model, to=direction)
    target = {"bnlab": bn.BatchNorm2d, "torch": nn.BatchNorm2d}[direction]
    assert type(model[1]) is target and model[1] is layer and type(model[8]) is (
        bn.BatchNorm1d if direction == "bnlab" else nn.BatchNorm1d)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    weight_before = model[1].weight.detach().clone()
    model(torch.randn(8, 3, 6, 6)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, weight_before)  # the old optimizer updated the BN weight
    torch.testing.assert_close(model[1].weight, weight_before - 0.5 * model[1].weight.grad)


def test_convert_refuses_what_bnlab_cannot_hold():
    model = nn.Sequential(nn.BatchNorm1d(3, eps=0.0))
    with pytest.raises(bnlab.errors.ConfigError, match="eps must be a positive"):
        bn.convert(model)
    assert type(model[0]) is nn.BatchNorm1d  # left as it was
