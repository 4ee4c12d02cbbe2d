"""Tests for bnlab.models: shapes, layer structure, norm placement, parameter counts, init, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.models import DLN, MODELS, VGG, ConvNet, IoffeMLP, build_model
from bnlab.norm.factory import make_norm

NORMS = ("batch", "none")
BN_TYPES = (type(make_norm("batch", 4, 1)), type(make_norm("batch", 4, 2)), nn.modules.batchnorm._BatchNorm)
ACT_TYPES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Identity)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _small(name: str, norm: str, in_shape: tuple[int, ...]) -> nn.Module:
    """Narrow versions for speed; the topology (layer count, pooling) is that of the full model."""
    kwargs: dict[str, object] = {"width": 0.125} if name.startswith("vgg") else {}
    if name == "convnet":
        kwargs = {"widths": (4, 8, 8)}
    return build_model(name, norm=norm, in_shape=in_shape, num_classes=7, **kwargs)


SHAPE_CASES = [
    ("ioffe_mlp", (1, 28, 28)),
    ("ioffe_mlp", (1, 8, 8)),
    ("vgg11", (3, 32, 32)),
    ("vgg11", (1, 28, 28)),
    ("vgg16", (3, 32, 32)),
    ("vgg16", (1, 28, 28)),
    ("vgg16", (1, 8, 8)),
    ("convnet", (1, 28, 28)),
    ("convnet", (3, 32, 32)),
    ("convnet", (1, 8, 8)),
    ("dln", (7,)),
]


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("name", "in_shape"), SHAPE_CASES)
def test_output_shape_and_backward(name: str, in_shape: tuple[int, ...], norm: str) -> None:
    model = _small(name, norm, in_shape)
    x = torch.randn(5, *in_shape)
    y = model(x)
    assert y.shape == (5, 7)
    y.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # every parameter gets a non-zero gradient somewhere (nothing is disconnected)
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_every_registered_model_is_tested() -> None:
    assert {name for name, _ in SHAPE_CASES} == set(MODELS)


def test_default_build_is_the_papers_model() -> None:
    mlp = build_model("ioffe_mlp")
    assert [tuple(m.weight.shape) for m in mlp.weight_layers().values()] == [
        (100, 784), (100, 100), (100, 100), (10, 100)
    ]
    assert all(isinstance(a, nn.Sigmoid) for a in mlp.nonlinearity_inputs().values())
    dln = build_model("dln", norm="none")
    assert len(dln.weight_layers()) == 25
    assert all(tuple(m.weight.shape) == (10, 10) for m in dln.weight_layers().values())
    assert dln(torch.randn(3, 10)).shape == (3, 10)


# --------------------------------------------------------------------------- structure per norm
def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_children())


@pytest.mark.parametrize(("name", "in_shape"), SHAPE_CASES)
def test_norm_none_has_no_norm_modules_and_keeps_biases(name: str, in_shape: tuple[int, ...]) -> None:
    model = _small(name, "none", in_shape)
    assert model.norm_layers() == {}
    assert not any(isinstance(m, BN_TYPES) for m in model.modules())
    expect_bias = name != "dln"  # the DLN is bias-free by definition (Santurkar et al. 2018, App. A.1)
    for lname, layer in model.weight_layers().items():
        assert (layer.bias is not None) == expect_bias, lname


@pytest.mark.parametrize(("name", "in_shape"), SHAPE_CASES)
def test_batch_norm_sits_before_every_nonlinearity_without_bias(name: str, in_shape: tuple[int, ...]) -> None:
    model = _small(name, "batch", in_shape)
    children = _children(model)
    acts = model.nonlinearity_inputs()
    assert len(acts) == len(model.norm_layers()) > 0
    for i, (cname, child) in enumerate(children):
        if cname not in acts:
            continue
        (norm_name, norm), (weight_name, weight) = children[i - 1], children[i - 2]
        assert isinstance(norm, BN_TYPES), (cname, norm_name)
        assert isinstance(weight, (nn.Conv2d, nn.Linear)) and weight.bias is None, weight_name
        out = weight.out_channels if isinstance(weight, nn.Conv2d) else weight.out_features
        assert norm.num_features == out, (norm_name, weight_name)
    # the output layer keeps its bias (no norm after it), except in the bias-free DLN
    last = list(model.weight_layers().values())[-1]
    assert (last.bias is not None) == (name != "dln")


@pytest.mark.parametrize(("name", "in_shape"), SHAPE_CASES)
def test_norm_choice_does_not_change_layer_names(name: str, in_shape: tuple[int, ...]) -> None:
    """With/without BN is a config value: same named layers, norm slots hold nn.Identity."""
    with_bn, without = _small(name, "batch", in_shape), _small(name, "none", in_shape)
    assert [n for n, _ in _children(with_bn)] == [n for n, _ in _children(without)]
    assert list(with_bn.weight_layers()) == list(without.weight_layers())
    assert list(with_bn.nonlinearity_inputs()) == list(without.nonlinearity_inputs())


@pytest.mark.parametrize(("name", "in_shape"), SHAPE_CASES)
def test_nonlinearity_input_is_the_normalized_preactivation(name: str, in_shape: tuple[int, ...]) -> None:
    """Hook each activation's input: with BN in training mode (γ=1, β=0) it has per-feature batch mean 0
    and variance ≈ 1, and it is exactly the output of the norm before it (forward really runs in the
    listed order)."""
    model = _small(name, "batch", in_shape).double()
    captured: dict[str, torch.Tensor] = {}
    norm_out: dict[str, torch.Tensor] = {}
    for aname, act in model.nonlinearity_inputs().items():
        act.register_forward_pre_hook(lambda m, args, aname=aname: captured.__setitem__(aname, args[0]))
    for nname, norm in model.norm_layers().items():
        norm.register_forward_hook(lambda m, args, out, nname=nname: norm_out.__setitem__(nname, out))
    model(torch.randn(16, *in_shape, dtype=torch.float64))
    assert list(captured) == list(model.nonlinearity_inputs())
    for (aname, z), nname in zip(captured.items(), model.norm_layers()):
        assert z is norm_out[nname], (aname, nname)
        dims = [0, 2, 3] if z.dim() == 4 else [0]
        if z.dim() == 4 and z.shape[0] * z.shape[2] * z.shape[3] < 2:
            continue
        torch.testing.assert_close(z.mean(dims), torch.zeros(z.shape[1], dtype=z.dtype), atol=1e-9, rtol=0)
        var = z.var(dims, unbiased=False)
        assert ((var > 0.9) & (var < 1.0 + 1e-9)).all(), (aname, var)  # σ²/(σ²+ε) ≤ 1


def test_activation_modules_are_distinct_instances() -> None:
    for model in (IoffeMLP(), VGG("vgg11", width=0.125), ConvNet(widths=(2, 2)), DLN(depth=4)):
        acts = list(model.nonlinearity_inputs().values())
        assert len({id(a) for a in acts}) == len(acts)
        assert not any(getattr(a, "inplace", False) for a in acts)


# ------------------------------------------------------------------------------ ordering, counts
def test_vgg16_layer_views() -> None:
    model = VGG("vgg16", width=0.125, in_channels=3, input_size=32)
    weights = model.weight_layers()
    assert list(weights) == [f"conv{k}" for k in range(1, 14)] + ["fc14"]
    assert sum(isinstance(m, nn.Conv2d) for m in weights.values()) == 13
    assert list(model.norm_layers()) == [f"norm{k}" for k in range(1, 14)]
    assert list(model.nonlinearity_inputs()) == [f"act{k}" for k in range(1, 14)]
    # Santurkar's "Layer #13" = 13th weight layer = the last conv
    assert list(weights.values())[12] is model.conv13
    mlp_head = VGG("vgg16", width=0.125, head="mlp")
    assert list(mlp_head.weight_layers()) == [f"conv{k}" for k in range(1, 14)] + ["fc14", "fc15", "fc16"]
    assert list(mlp_head.norm_layers())[-2:] == ["norm14", "norm15"]
    assert isinstance(mlp_head.norm14, BN_TYPES) and mlp_head.fc14.bias is None
    assert mlp_head.fc14.out_features == mlp_head.fc15.out_features == 64  # H = last conv width


def test_vgg11_layer_views_and_pools() -> None:
    model = VGG("vgg11", width=0.125)
    assert list(model.weight_layers()) == [f"conv{k}" for k in range(1, 9)] + ["fc9"]
    names = [n for n, _ in _children(model)]
    # pools after conv1, conv2, conv4, conv6, conv8 (configuration A)
    after = {"pool1": "act1", "pool2": "act2", "pool3": "act4", "pool4": "act6", "pool5": "act8"}
    for pool, act in after.items():
        assert names.index(pool) == names.index(act) + 1


@pytest.mark.parametrize(("size", "pools"), [(32, 5), (28, 4), (8, 3), (1, 0), (64, 5)])
def test_vgg_skips_pools_on_small_inputs(size: int, pools: int) -> None:
    model = VGG("vgg16", width=0.125, in_channels=1, input_size=size)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    expect_final = 2 if size == 64 else 1
    assert model.feature_size == expect_final
    assert model.fc14.in_features == 64 * expect_final**2
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_ioffe_mlp_and_dln_views() -> None:
    mlp = IoffeMLP(norm="batch")
    assert list(mlp.weight_layers()) == ["fc1", "fc2", "fc3", "fc4"]
    assert list(mlp.norm_layers()) == ["norm1", "norm2", "norm3"]
    assert list(mlp.nonlinearity_inputs()) == ["act1", "act2", "act3"]
    dln = DLN(norm="batch")
    assert list(dln.weight_layers()) == [f"fc{k}" for k in range(1, 26)]
    assert list(dln.norm_layers()) == [f"norm{k}" for k in range(1, 25)]  # none after the last layer
    assert all(isinstance(a, nn.Identity) for a in dln.nonlinearity_inputs().values())
    assert all(layer.bias is None for layer in dln.weight_layers().values())
    assert all(n.weight is not None and n.bias is not None for n in dln.norm_layers().values())  # γ, β


def test_convnet_views_and_dropout() -> None:
    net = ConvNet()
    assert list(net.weight_layers()) == ["conv1", "conv2", "conv3", "fc4"]
    assert [m.out_channels for m in list(net.weight_layers().values())[:3]] == [32, 64, 64]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2  # between stages only
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    with_dropout = ConvNet(dropout=0.4)
    names = [n for n, _ in _children(with_dropout)]
    assert names[-2:] == ["dropout", "fc4"] and with_dropout.dropout.p == 0.4


# ---------------------------------------------------------------------------- parameter counts
def _vgg_hand_count(convs: list[tuple[int, int]], norm: str, fc_in: int = 512, classes: int = 10) -> int:
    weights = sum(9 * cin * cout for cin, cout in convs)
    per_channel = sum(cout for _, cout in convs)  # conv bias (no norm) or γ and β (norm)
    extra = 2 * per_channel if norm == "batch" else per_channel
    return weights + extra + fc_in * classes + classes


VGG11_CONVS = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
               (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("arch", "convs"), [("vgg11", VGG11_CONVS), ("vgg16", VGG16_CONVS)])
def test_vgg_parameter_count(arch: str, convs: list[tuple[int, int]], norm: str) -> None:
    model = build_model(arch, norm=norm, in_shape=(3, 32, 32), num_classes=10)
    assert _n_params(model) == _vgg_hand_count(convs, norm)


def test_vgg_parameter_count_matches_known_cifar_vgg() -> None:
    """Independent oracle: the common CIFAR VGG (kuangliu/pytorch-cifar: conv bias *and* BN, linear
    512->10) has 9,231,114 (VGG-11) and 14,728,266 (VGG-16) parameters; ours drops the conv biases."""
    vgg11 = _n_params(VGG("vgg11", norm="batch"))
    vgg16 = _n_params(VGG("vgg16", norm="batch"))
    assert vgg11 + sum(c for _, c in VGG11_CONVS) == 9_231_114
    assert vgg16 + sum(c for _, c in VGG16_CONVS) == 14_728_266


def test_vgg_mlp_head_parameter_count() -> None:
    model = VGG("vgg11", norm="batch", head="mlp")
    head = (512 * 512 + 2 * 512) * 2 + 512 * 10 + 10  # two bias-free FC 512 + BN (γ, β), then 512->10
    assert _n_params(model) == _vgg_hand_count(VGG11_CONVS, "batch") - (512 * 10 + 10) + head


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (0.25, [16, 32, 64, 64, 128, 128, 128, 128]),
        (0.125, [8, 16, 32, 32, 64, 64, 64, 64]),
        (0.1, [6, 13, 26, 26, 51, 51, 51, 51]),  # rounded half up
        (2.0, [128, 256, 512, 512, 1024, 1024, 1024, 1024]),
        (0.001, [1] * 8),  # at least one channel
    ],
)
def test_vgg_width_multiplier_scales_channels(width: float, expected: list[int]) -> None:
    model = VGG("vgg11", width=width, norm="batch", input_size=8)
    convs = [m for m in model.weight_layers().values() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == expected
    assert [n.num_features for n in model.norm_layers().values()] == expected
    assert model.fc9.in_features == expected[-1]


def test_mlp_parameter_count() -> None:
    hidden = 784 * 100 + 100 * 100 * 2 + 100 * 10 + 10
    assert _n_params(IoffeMLP(norm="none")) == hidden + 3 * 100
    assert _n_params(IoffeMLP(norm="batch")) == hidden + 3 * 2 * 100


# -------------------------------------------------------------------------------------- init
def test_mlp_gaussian_init_std() -> None:
    default = IoffeMLP(norm="none")
    assert abs(default.fc1.weight.std().item() * math.sqrt(784) - 1) < 0.02
    assert abs(default.fc2.weight.std().item() * math.sqrt(100) - 1) < 0.05
    assert abs(default.fc1.weight.mean().item()) < 0.01 / math.sqrt(784) * 10
    assert torch.all(default.fc1.bias == 0)
    r2rt = IoffeMLP(norm="none", init_std=1.0)
    assert abs(r2rt.fc1.weight.std().item() - 1) < 0.02
    glorot = IoffeMLP(norm="none", init="glorot")
    bound = math.sqrt(6 / (784 + 100))
    assert glorot.fc1.weight.abs().max() <= bound and glorot.fc1.weight.abs().max() > 0.95 * bound


def test_glorot_init_of_vgg_and_dln() -> None:
    model = VGG("vgg11", width=0.25)
    w = model.conv2.weight  # (32, 16, 3, 3): fan_in 16*9, fan_out 32*9
    bound = math.sqrt(6 / (16 * 9 + 32 * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.var().item() / (bound**2 / 3) - 1) < 0.1  # uniform variance b²/3
    dln = DLN()
    assert all(layer.weight.abs().max() <= math.sqrt(6 / 20) for layer in dln.weight_layers().values())


def test_vgg_he_init_keeps_the_relu_signal_that_glorot_loses() -> None:
    """init="kaiming": N(0, 2/fan_in) weights; without a norm, the variance of the last conv's output
    stays O(1) with He init, while Glorot multiplies it by about C_in/(C_in + C_out) per conv+ReLU
    (1/2 at equal widths, 1/3 where the width doubles): the reason the standard VGG-16 does not train
    at 1/8 width (santurkar_vgg's He-init setting)."""
    torch.manual_seed(0)
    he = VGG("vgg16", width=0.25, norm="none", init="kaiming")
    w = he.conv9.weight  # (128, 128, 3, 3) at width 1/4: fan_in 128*9
    assert abs(w.std().item() / math.sqrt(2 / (128 * 9)) - 1) < 0.03
    assert all(layer.bias is None or not layer.bias.any() for layer in he.weight_layers().values())
    torch.manual_seed(0)
    glorot = VGG("vgg16", width=0.25, norm="none")
    x = torch.randn(64, 3, 32, 32)

    def conv13_var(model: VGG) -> float:
        seen: dict[str, float] = {}

        def keep(module, inputs, output) -> None:  # returns None: a hook's return value replaces the output
            seen["v"] = output.var().item()

        handle = model.conv13.register_forward_hook(keep)
        with torch.no_grad():
            model(x)
        handle.remove()
        return seen["v"]

    # closed form of Glorot's shrinkage of the second moment through 13 conv+ReLU layers: C_in/(C_in+C_out)
    # each (conv13's output is taken before its ReLU, a factor 2 up; the pools change it little)
    widths = [3, 16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    shrink = math.prod(widths[k] / (widths[k] + widths[k + 1]) for k in range(13))
    assert shrink < 1e-4
    assert 0.1 * shrink < conv13_var(glorot) < 10 * shrink
    assert 0.05 < conv13_var(he) < 20

    # Fashion-MNIST's shape: convs 11-13 see 1x1 maps, where padding leaves 1 of the 9 taps; both inits
    # lose ~1/9 per conv there, He stays ~1e5 x above Glorot
    x = torch.randn(64, 1, 28, 28)
    torch.manual_seed(0)
    he28 = conv13_var(VGG("vgg16", width=0.125, norm="none", in_channels=1, input_size=28, init="kaiming"))
    torch.manual_seed(0)
    glorot28 = conv13_var(VGG("vgg16", width=0.125, norm="none", in_channels=1, input_size=28))
    assert 1e-4 < he28 < 0.05 and glorot28 < 1e-6 and he28 / glorot28 > 1e4


def test_convnet_init_depends_on_activation() -> None:
    relu = ConvNet(widths=(64, 64), activation="relu", norm="none")
    std = relu.conv2.weight.std().item()  # kaiming: sqrt(2 / fan_in), fan_in = 64 * 9
    assert abs(std / math.sqrt(2 / (64 * 9)) - 1) < 0.05
    sig = ConvNet(widths=(64, 64), activation="sigmoid", norm="none")
    bound = math.sqrt(6 / (64 * 9 + 64 * 9))
    assert sig.conv2.weight.abs().max() <= bound
    assert isinstance(sig.act1, nn.Sigmoid)


def test_build_is_reproducible_under_a_seed() -> None:
    torch.manual_seed(3)
    a = build_model("convnet", widths=(4, 4))
    torch.manual_seed(3)
    b = build_model("convnet", widths=(4, 4))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ------------------------------------------------------------------------------- dln, float64
@pytest.mark.parametrize("norm", NORMS)
def test_dln_float64_gradient_descent_decreases_loss(norm: str) -> None:
    """Santurkar's DLN setting (Santurkar et al. 2018, App. A.1): summed squared loss to A x, full-batch GD, float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g, dtype=torch.float64)  # (1000, 10)
    a = torch.randn(10, 10, generator=g, dtype=torch.float64)
    y = x @ a.T  # (1000, 10)
    model = DLN(norm=norm).double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    lr = 1e-6
    losses = []
    for _ in range(10):
        model.zero_grad()
        loss = (model(x) - y).square().sum()
        assert loss.dtype == torch.float64
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        losses.append(loss.item())
    assert 1e4 < losses[0] < 1e6  # ≈ 1000 samples x E||Ax||^2 = 1e5 at init
    assert losses[-1] < losses[0], losses
    if norm == "none":  # plain GD on the standard DLN is monotone at this LR; with BN the early
        assert all(b < a for a, b in zip(losses, losses[1:])), losses  # steps may wiggle (pilot, F)


# ----------------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda: VGG("vgg11", width=0.125, input_size=32),
        lambda: VGG("vgg16", width=0.125, in_channels=1, input_size=28, head="mlp"),
        lambda: ConvNet(widths=(8, 16, 16), in_channels=3, input_size=32),
        lambda: ConvNet(widths=(8, 16), activation="sigmoid", norm="none", in_channels=3, input_size=32),
    ],
)
def test_channels_last_matches_contiguous(make, train: bool) -> None:
    # float64: in float32 the two layouts sum in different orders and 13 train-mode BNs over a batch
    # of 6 amplify that rounding to ~1e-4, which would hide a real layout bug in the tolerance.
    model = make().double()
    shape = (model.in_channels, model.input_size, model.input_size)
    model.train(train)
    if not train:  # give the running statistics something other than their initial values
        model.train()
        model(torch.randn(8, *shape, dtype=torch.float64))
        model.eval()
    x = torch.randn(6, *shape, dtype=torch.float64)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    ref = model(x)
    out_cl_input = model(x.to(memory_format=torch.channels_last))  # contiguous weights, NHWC input
    out_cl_both = cl_model(x.to(memory_format=torch.channels_last))
    assert out_cl_both.shape == ref.shape
    torch.testing.assert_close(out_cl_input, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_cl_both, ref, rtol=1e-9, atol=1e-10)
    # float32, the dtype training uses: runs and agrees to float32 tolerance on a shallow net
    if isinstance(model, ConvNet):
        model32 = model.float()
        torch.testing.assert_close(
            model32(x.float().to(memory_format=torch.channels_last)), model32(x.float()), rtol=1e-4, atol=1e-5
        )


# ----------------------------------------------------------------------------------------- errors
def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet18")
    for name in MODELS:
        assert name in str(err.value)


def test_unknown_kwarg_lists_valid_kwargs() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("vgg16", widht=0.5)
    msg = str(err.value)
    assert "widht" in msg and "width" in msg and "head" in msg and "activation" in msg
    with pytest.raises(ConfigError, match="arch"):
        build_model("vgg16", arch="vgg11")  # fixed by the name
    with pytest.raises(ConfigError) as err:
        build_model("ioffe_mlp", dropout=0.1)
    assert "init_std" in str(err.value) and "hidden" in str(err.value)


def test_unknown_norm_names_valid_norms() -> None:
    for name in MODELS:
        with pytest.raises(ConfigError) as err:
            build_model(name, norm="batchnorm")
        assert "batch" in str(err.value) and "none" in str(err.value)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: VGG("vgg19"), ["vgg11", "vgg16"]),
        (lambda: VGG(head="conv"), ["linear", "mlp"]),
        (lambda: VGG(init="he"), ["glorot", "kaiming"]),
        (lambda: VGG(init="kaiming", activation="tanh"), ["ReLU", "glorot"]),
        (lambda: VGG(width=0), ["width"]),
        (lambda: VGG(activation="gelu"), ["relu", "sigmoid"]),
        (lambda: IoffeMLP(activation="softplus"), ["relu", "sigmoid"]),
        (lambda: IoffeMLP(init="he"), ["gaussian", "glorot"]),
        (lambda: IoffeMLP(init="glorot", init_std=0.1), ["init_std"]),
        (lambda: IoffeMLP(init_std=-1.0), ["init_std"]),
        (lambda: IoffeMLP(hidden=(100, 0)), ["hidden"]),
        (lambda: ConvNet(widths=()), ["widths"]),
        (lambda: ConvNet(dropout=1.0), ["dropout"]),
        (lambda: ConvNet(activation="elu"), ["relu", "sigmoid"]),
        (lambda: DLN(depth=0), ["depth"]),
        (lambda: build_model("vgg11", in_shape=(3, 32, 28)), ["square"]),
        (lambda: build_model("convnet", in_shape=(784,)), ["(C, S, S)"]),
        (lambda: build_model("dln", in_shape=(10,), num_classes=3), ["square"]),
        (lambda: build_model("dln", in_shape=(0,)), ["in_shape"]),
    ],
)
def test_bad_config_raises_config_error(build, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        build()
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (IoffeMLP(), torch.randn(2, 1, 8, 8)),
        (VGG("vgg11", width=0.125), torch.randn(2, 1, 32, 32)),
        (VGG("vgg11", width=0.125), torch.randn(2, 3, 28, 28)),
        (VGG("vgg11", width=0.125), torch.randn(3, 32, 32)),
        (ConvNet(), torch.randn(2, 3, 28, 28)),
        (DLN(depth=2), torch.randn(2, 9)),
    ],
)
def test_bad_input_shape_raises_shape_error(model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(ShapeError, match="build it with|reshape|add the channel"):
        model(x)


def test_build_model_shape_mapping() -> None:
    assert build_model("ioffe_mlp", in_shape=(1, 8, 8)).fc1.in_features == 64
    vgg = build_model("vgg11", in_shape=(3, 32, 32), num_classes=100, width=0.125)
    assert (vgg.in_channels, vgg.input_size, vgg.fc9.out_features) == (3, 32, 100)
    assert build_model("dln", in_shape=(10,)).width == 10
    assert build_model("dln", depth=3, norm="batch").depth == 3
    assert build_model("convnet").in_channels == 1  # default in_shape (1, 28, 28)
