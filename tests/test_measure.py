"""Tests of the activation and drift probes (bnlab.measure.activations, bnlab.measure.drift).

Oracles: NumPy (percentile, mean, var) on activations captured by an independent hook on a deep
copy of the model, torch's own train/eval modes, and bit-equality of the training trajectory with
and without probes.
"""
from __future__ import annotations

import copy
import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.measure import (
    LayerActivations,
    covariate_shift,
    is_batchnorm,
    moment_drift,
    percentile_drift,
    percentile_trace,
    record_activations,
)
from bnlab.measure.activations import percentiles_linear


# ---------------------------------------------------------------------------------------------
# models


class FakeBnlabBN(nn.Module):
    """Stands in for bnlab's own BN modules: not a _NormBase, marked by a class attribute.

    It *reassigns* its buffers (instead of updating in place) and draws noise from a generator it
    owns, the two ways a custom BN could escape the probes' isolation.
    """

    _is_bnlab_batchnorm = True

    def __init__(self, n: int, momentum: float = 0.1, eps: float = 1e-5, noise: float = 0.1):
        super().__init__()
        self.momentum, self.eps, self.noise = momentum, eps, noise
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.gen = torch.Generator().manual_seed(1234)

    def forward(self, x):
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean.detach()
            self.running_var = (1 - m) * self.running_var + m * x.var(0, unbiased=True).detach()
            self.num_batches_tracked = self.num_batches_tracked + 1
            noise = self.noise * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        else:
            mean, var, noise = self.running_mean, self.running_var, 0.0
        return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias + noise


def mlp(seed: int = 0, *, dropout: bool = False, fake_bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = OrderedDict(fc1=nn.Linear(8, 16), bn1=nn.BatchNorm1d(16), sig=nn.Sigmoid())
    if dropout:
        layers["drop"] = nn.Dropout(0.3)
    layers["fc2"] = nn.Linear(16, 12)
    if fake_bn:
        layers["bn2"] = FakeBnlabBN(12)
        layers["relu"] = nn.ReLU()
    layers["out"] = nn.Linear(12, 3)
    return nn.Sequential(layers)


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), bn1=nn.BatchNorm2d(6), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(6, 4, 3), bn2=nn.BatchNorm2d(4), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 3),
    ))


def warmed(model: nn.Module, shape: tuple[int, ...], steps: int = 3) -> nn.Module:
    """A few train-mode forwards so that running statistics differ from any one batch's."""
    g = torch.Generator().manual_seed(7)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for _ in range(steps):
            model(2.0 * torch.randn(shape, generator=g).to(dtype) + 1.0)
    return model


def probe_x(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# independent reference: hook on a deep copy, activations as NumPy (samples, units)


def ref_capture(model: nn.Module, x: torch.Tensor, name: str, where: str, train: bool) -> np.ndarray:
    m = copy.deepcopy(model)
    m.train(train)
    sub = dict(m.named_modules())[name]
    got = []

    def grab(t):
        a = t.detach().numpy().astype(np.float64)  # astype copies: in-place ReLU can't alter it
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])

    if where == "input":
        h = sub.register_forward_pre_hook(lambda mod, args: got.append(grab(args[0])))
    else:
        h = sub.register_forward_hook(lambda mod, args, out: got.append(grab(out)))
    with torch.no_grad():
        m(x)
    h.remove()
    return np.concatenate(got, axis=0)


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
        torch.get_rng_state().clone(),
        [g.get_state().clone() for m in model.modules() for g in vars(m).values() if isinstance(g, torch.Generator)],
    )


def assert_same_snapshot(a, b) -> None:
    (sa, fa, ra, ga), (sb, fb, rb, gb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert fa == fb
    assert torch.equal(ra, rb)
    assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))


# ---------------------------------------------------------------------------------------------
# (1) side-effect freedom


def test_is_batchnorm():
    assert is_batchnorm(nn.BatchNorm1d(3)) and is_batchnorm(nn.BatchNorm2d(3))
    assert is_batchnorm(FakeBnlabBN(3))
    assert not is_batchnorm(nn.LayerNorm(3)) and not is_batchnorm(nn.Linear(3, 3))


@pytest.mark.parametrize("train_flag", [True, False])
def test_probes_leave_model_and_rng_bit_identical(train_flag):
    model = warmed(mlp(dropout=True, fake_bn=True), (32, 8))
    model.train(train_flag)
    model.fc2.training = not train_flag  # a mixed flag pattern must come back exactly
    x = probe_x((40, 8))
    before = snapshot(model)
    for bn_mode in ("batch", "running"):
        for where in ("input", "output"):
            record_activations(model, x, ["bn1", "sig", "bn2", "drop"], where=where, bn_mode=bn_mode,
                               units=[0, 2], chunk_size=None)
            record_activations(model, x, {"a": "sig"}, where=where, bn_mode=bn_mode, chunk_size=15)
    covariate_shift(model, x)
    covariate_shift(model, x, chunk_size=20)
    assert_same_snapshot(before, snapshot(model))

    # the check above can fail: an ordinary train-mode forward moves buffers, RNG and generator
    model.train()
    with torch.no_grad():
        model(x)
    with pytest.raises(AssertionError):
        assert_same_snapshot(before, snapshot(model))


def test_probe_failure_restores_flags_and_removes_hooks():
    model = mlp()
    model.eval()
    bad = probe_x((10, 5))
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        record_activations(model, bad, ["sig"])  # wrong width: forward raises
    assert_same_snapshot(before, snapshot(model))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------
# (2) training trajectory bit-identical with probes on


def _train(probe: str, steps: int = 20):
    torch.manual_seed(0)
    model = mlp(seed=1, dropout=True, fake_bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs, ys = torch.randn(200, 8), torch.randint(0, 3, (200,))
    px = torch.randn(48, 8)
    for _ in range(steps):
        idx = torch.randint(0, 200, (32,))
        if probe == "bnlab":
            record_activations(model, px, ["sig", "bn2"], bn_mode="batch", units=[0, 1])
            record_activations(model, px, ["sig"], where="output", bn_mode="running", chunk_size=16)
            covariate_shift(model, px)
        elif probe == "naive":
            with torch.no_grad():
                model(px)
        out = model(xs[idx])
        if probe == "bnlab":  # between forward and backward: the autograd graph must be untouched
            record_activations(model, px, ["fc2"], bn_mode="running")
        loss = F.cross_entropy(out, ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()


def test_training_trajectory_bit_identical_with_probes():
    plain, rng_plain = _train("none")
    probed, rng_probed = _train("bnlab")
    assert plain.keys() == probed.keys()
    for k in plain:
        assert torch.equal(plain[k], probed[k]), k
    assert torch.equal(rng_plain, rng_probed)
    # sensitivity: a naive probe (plain forward in train mode) does change the trajectory
    naive, _ = _train("naive", steps=3)
    short, _ = _train("none", steps=3)
    assert not all(torch.equal(naive[k], short[k]) for k in short)


# ---------------------------------------------------------------------------------------------
# (3) percentiles == numpy.percentile, (4) mean/var == numpy, (5) bn_mode semantics


CASES = [
    ("fc", lambda: warmed(mlp(), (32, 8)), (50, 8), ["bn1", "sig", "fc2"]),
    ("conv", lambda: warmed(convnet(), (8, 3, 6, 6)), (5, 3, 6, 6), ["bn1", "relu1", "bn2", "relu2"]),
]


@pytest.mark.parametrize("kind,make,shape,names", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("where", ["input", "output"])
@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_statistics_equal_numpy_and_torch_modes(kind, make, shape, names, where, bn_mode):
    model = make()
    model.train()  # the probe must not follow the model's own mode
    x = probe_x(shape)
    levels = (15, 50, 85, 0, 100, 33.3)
    got = record_activations(model, x, names, where=where, bn_mode=bn_mode, percentiles=levels)
    for name in names:
        ref = ref_capture(model, x, name, where, train=(bn_mode == "batch"))  # (S, U)
        la = got[name]
        assert la.n_samples == ref.shape[0] and la.n_units == ref.shape[1]
        np.testing.assert_array_equal(la.percentiles, np.percentile(ref, levels, axis=0))
        np.testing.assert_allclose(la.mean, ref.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(la.var, ref.var(axis=0), rtol=1e-12, atol=1e-15)
    if kind == "conv" and where == "input":
        # relu1 is in-place: its recorded input must still hold negative values
        assert got["relu1"].percentiles[0].min() < 0


def test_bn_modes_differ():
    """Guards the mode tests against vacuity: batch and running statistics really differ here."""
    model = warmed(mlp(), (32, 8))
    x = probe_x((50, 8))
    b = record_activations(model, x, ["sig"], bn_mode="batch")["sig"]
    r = record_activations(model, x, ["sig"], bn_mode="running")["sig"]
    assert np.abs(b.mean - r.mean).max() > 1e-2


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    u=st.integers(1, 4),
    levels=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_percentiles_linear_matches_numpy(n, u, levels, seed, ties):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, u)) * 10 ** rng.uniform(-3, 3)
    if ties:
        a = np.round(a, 0)
    got = percentiles_linear(torch.from_numpy(a), levels).numpy()
    np.testing.assert_array_equal(got, np.percentile(a, levels, axis=0))


def test_percentiles_nan_column_like_numpy():
    a = np.array([[1.0, 2.0], [np.nan, 3.0], [0.5, 4.0]])
    got = percentiles_linear(torch.from_numpy(a), [15, 50]).numpy()
    np.testing.assert_array_equal(got, np.percentile(a, [15, 50], axis=0))


def test_histograms_samples_and_storage():
    model = warmed(convnet(), (8, 3, 6, 6))
    x = probe_x((4, 3, 6, 6))
    la = record_activations(model, x, {"b2": "bn2"}, where="output", units={"b2": [1, 3]}, bins=10)["b2"]
    ref = ref_capture(model, x, "bn2", "output", train=True)
    counts, edges = np.histogram(ref, bins=10)
    np.testing.assert_array_equal(la.hist_counts, counts)
    np.testing.assert_allclose(la.hist_edges, edges, rtol=1e-12)
    np.testing.assert_array_equal(la.sample, ref[:, [1, 3]])
    assert la.unit_hist_counts.shape == (2, 10)
    np.testing.assert_array_equal(la.unit_hist_counts.sum(axis=1), [ref.shape[0]] * 2)
    # a fixed range keeps histograms comparable across probes; out-of-range values are dropped
    fixed = record_activations(model, x, ["bn2"], where="output", bins=4, hist_range=(-1, 1))["bn2"]
    np.testing.assert_array_equal(fixed.hist_counts, np.histogram(ref, bins=4, range=(-1, 1))[0])

    arrays = la.to_arrays("step10.b2")
    assert {"step10.b2.mean", "step10.b2.var", "step10.b2.percentiles", "step10.b2.hist_counts",
            "step10.b2.sample", "step10.b2.n_samples"} <= set(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    loaded = np.load(buf)
    np.testing.assert_array_equal(loaded["step10.b2.percentiles"], la.percentiles)
    s = la.summary()
    assert set(s) >= {"mean", "var", "std", "p15", "p50", "p85"}
    assert all(isinstance(v, float) for v in s.values())
    assert s["p50"] == pytest.approx(float(np.percentile(ref, 50, axis=0).mean()))
    no_hist = record_activations(model, x, ["bn2"], bins=None)["bn2"]
    assert no_hist.hist_counts is None and no_hist.sample is None


# ---------------------------------------------------------------------------------------------
# (6) drift


def test_moment_drift_hand_made():
    means = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 3.0]])
    vars_ = np.array([[1.0, 1.0], [2.0, 1.0], [2.0, 5.0]])
    d = moment_drift({"L": (means, vars_)})["L"]
    np.testing.assert_allclose(d["dmean"], [0.5, 1.0])
    np.testing.assert_allclose(d["dvar"], [0.5, 2.0])
    np.testing.assert_allclose(d["mean"], [0.5, 1.0, 2.0])
    np.testing.assert_allclose(d["dmean_units"], [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(moment_drift({"L": (means, vars_)}, units=[1])["L"]["dvar"], [0.0, 4.0])

    def la(mu, var):
        z = np.zeros((1, 2))
        return LayerActivations("L", "input", "batch", 4, np.array(mu), np.array(var), np.array([50.0]), z)

    hist = [{"L": la(m, v)} for m, v in zip(means, vars_)]
    d2 = moment_drift(hist)["L"]
    np.testing.assert_array_equal(d2["dmean"], d["dmean"])
    np.testing.assert_array_equal(d2["dvar"], d["dvar"])
    assert moment_drift(hist[:1])["L"]["dmean"].shape == (0,)
    with pytest.raises(ConfigError):
        moment_drift([{"L": la(means[0], vars_[0])}, {"M": la(means[1], vars_[1])}])


def test_percentile_drift():
    t = np.arange(10, dtype=float)
    trace = np.stack([np.r_[100.0, t[1:]], -t, np.zeros(10)], axis=1)  # (T=10, P=3): a transient first
    np.testing.assert_allclose(percentile_drift(trace, 0.1), [8.0, 8.0, 0.0])  # skips the 100
    np.testing.assert_allclose(percentile_drift(trace, 0.0), [99.0, 9.0, 0.0])
    np.testing.assert_allclose(percentile_drift(trace, 0.5), [4.0, 4.0, 0.0])
    # (T, P, U): averaged over units, or per unit
    tpu = np.stack([trace, 2 * trace], axis=2)
    np.testing.assert_allclose(percentile_drift(tpu, 0.1), [12.0, 12.0, 0.0])
    assert percentile_drift(tpu, 0.1, reduce_units=False).shape == (3, 2)
    # with log-spaced steps the skip is by training step, not by probe count
    steps = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 1000])
    np.testing.assert_allclose(percentile_drift(trace, 0.1, steps=steps), [1.0, 1.0, 0.0])  # 128, 1000
    with pytest.raises(ConfigError):
        percentile_drift(trace, 1.0)
    # percentile_trace stacks record_activations results
    model = warmed(mlp(), (32, 8))
    hist = [record_activations(model, probe_x((30, 8), s), ["sig"]) for s in range(3)]
    tr = percentile_trace(hist, "sig", units=[0, 5])
    assert tr.shape == (3, 3, 2)
    np.testing.assert_array_equal(tr[1], hist[1]["sig"].percentiles[:, [0, 5]])


@pytest.mark.parametrize("make,shape", [(lambda: mlp(), (40, 8)), (lambda: convnet(), (6, 3, 6, 6))])
def test_covariate_shift_zero_iff_running_equals_batch(make, shape):
    model = warmed(make().double(), tuple(shape))
    x = probe_x(shape).double()
    shifted = covariate_shift(model, x)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert set(shifted) == set(bns)
    for v in shifted.values():
        assert v["mean_shift"] > 1e-3 and v["max_mean_shift"] >= v["mean_shift"]
        assert v["max_abs_log_var_ratio"] > 1e-3
    # set every layer's running statistics to the batch statistics of its own (train-mode) input
    stats = record_activations(model, x, bns, where="input", bn_mode="batch")
    with torch.no_grad():
        for n in bns:
            bn = model.get_submodule(n)
            bn.running_mean.copy_(torch.from_numpy(stats[n].mean))
            bn.running_var.copy_(torch.from_numpy(stats[n].var))
    for v in covariate_shift(model, x).values():
        assert v["mean_shift"] == pytest.approx(0.0, abs=1e-12)
        assert v["max_mean_shift"] == pytest.approx(0.0, abs=1e-12)
        assert v["var_ratio"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ConfigError):
        covariate_shift(model, x, modules=["fc1" if "fc1" in dict(model.named_modules()) else "conv1"])


# ---------------------------------------------------------------------------------------------
# (7) chunking


@pytest.mark.parametrize("make,shape,name", [(lambda: mlp(), (50, 8), "sig"),
                                             (lambda: convnet(), (10, 3, 6, 6), "relu2")])
def test_chunked_equals_manual_chunks(make, shape, name):
    model = warmed(make(), shape)
    x = probe_x(shape)
    size = 20 if shape[0] == 50 else 4  # leaves a smaller last chunk (10 / 2 samples)
    got = record_activations(model, x, [name], chunk_size=size)[name]
    ref = np.concatenate([ref_capture(model, xc, name, "input", train=True) for xc in torch.split(x, size)])
    np.testing.assert_array_equal(got.percentiles, np.percentile(ref, (15, 50, 85), axis=0))
    np.testing.assert_allclose(got.mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(got.var, ref.var(0), rtol=1e-12)
    whole = record_activations(model, x, [name])[name]
    # chunking really changes batch statistics (pooled BN outputs keep mean 0, so compare percentiles)
    assert np.abs(whole.percentiles - got.percentiles).max() > 1e-3


def test_chunk_of_one_is_a_clear_error():
    with pytest.raises(ShapeError, match="chunk_size"):
        record_activations(mlp(), probe_x((41, 8)), ["sig"], chunk_size=20)
    # in running mode a single sample is fine
    record_activations(mlp(), probe_x((41, 8)), ["sig"], chunk_size=20, bn_mode="running")


# ---------------------------------------------------------------------------------------------
# (8) bad input


def test_unknown_module_name_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        record_activations(mlp(), probe_x((10, 8)), ["bn_1"])
    assert "bn_1" in str(e.value) and "bn1" in str(e.value) and "fc1" in str(e.value)


@pytest.mark.parametrize("kwargs", [
    dict(bn_mode="train"), dict(where="inside"), dict(percentiles=(15, 150)), dict(chunk_size=0),
    dict(bins=0), dict(units=[99]), dict(hist_range=(1, 0)),
])
def test_bad_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        record_activations(mlp(), probe_x((10, 8)), ["sig"], **kwargs)


def test_no_bn_model_covariate_shift_error():
    with pytest.raises(ConfigError, match="no BN"):
        covariate_shift(nn.Sequential(nn.Linear(3, 3)), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------
# a module called more than once per forward: one result per call site, never pooled


class SharedReluBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ``relu`` module called twice per forward."""

    def __init__(self, c=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def _hook_one_call(model, x, name, call, where):
    """Independent oracle: hook only the ``call``-th call of module ``name`` on a deep copy."""
    model = copy.deepcopy(model)
    seen, counter = [], [0]
    module = dict(model.named_modules())[name]

    def grab(t):
        if counter[0] == call:
            seen.append(t.detach().clone())
        counter[0] += 1

    if where == "input":
        h = module.register_forward_pre_hook(lambda m, args: grab(args[0]))
    else:
        h = module.register_forward_hook(lambda m, args, out: grab(out))
    with torch.no_grad():
        model(x)
    h.remove()
    t = seen[0]
    return t.movedim(1, -1).reshape(-1, t.shape[1]).double().numpy()


@pytest.mark.parametrize("where", ["input", "output"])
def test_module_called_twice_is_recorded_per_call_site(where):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(stem=nn.Conv2d(2, 3, 1), block=SharedReluBlock())).train()
    x = torch.randn(6, 2, 5, 5)
    res = record_activations(model, x, ["block.relu", "block.bn1"], where=where, bins=None, units=[0, 2])
    assert set(res) == {"block.relu#0", "block.relu#1", "block.bn1"}
    for call in (0, 1):
        vals = _hook_one_call(model, x, "block.relu", call, where)
        r = res[f"block.relu#{call}"]
        assert r.n_samples == 6 * 25 == vals.shape[0]  # not 2 x 6 x 25: the two call sites are not pooled
        np.testing.assert_allclose(r.percentiles, np.percentile(vals, [15, 50, 85], axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(r.mean, vals.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.sample, vals[:, [0, 2]])
    # chunks: each call site pooled over chunks, still separately
    chunked = record_activations(model, x, "block.relu", where=where, bins=None, chunk_size=3)
    for call in (0, 1):
        parts = [_hook_one_call(model, xc, "block.relu", call, where) for xc in torch.split(x, 3)]
        np.testing.assert_allclose(chunked[f"block.relu#{call}"].mean, np.concatenate(parts).mean(0), atol=1e-12)
    # probes that must pool one activation refuse instead of mixing call sites
    from bnlab.measure._util import capture
    with pytest.raises(ConfigError, match="called 2 times"):
        capture(model, x, {"relu": model.block.relu})
