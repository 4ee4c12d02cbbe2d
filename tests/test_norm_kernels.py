"""The fused CPU kernels (bnlab.norm.kernels): operator registration (torch.library.opcheck), every
layout, dtype and parallel path against torch.nn in float64, what backward saves, graph capture of
the operators, the switch, and an experiment that gives the same metrics on both paths."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bnlab.norm as bn
from bnlab.norm import kernels
from bnlab.norm.functional import batch_norm
from bnlab.norm.lp import gaussian_max_abs_mean
from conftest import require_kernels  # noqa: E402


@pytest.fixture(autouse=True)
def kernels_on():
    require_kernels()
    with kernels.use_mode("on"):
        yield


def _ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("bnlab::")}


def _layer(dims, c, dtype=torch.float64):
    torch.manual_seed(1)
    ours = getattr(bn, f"BatchNorm{dims}d")(c).to(dtype)
    ref = getattr(nn, f"BatchNorm{dims}d")(c).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.uniform_(-1.0, 1.0)
        ours.weight.copy_(ref.weight)
        ours.bias.copy_(ref.bias)
    return ours, ref


# Shapes that reach every code path: planar fused per channel, planar two-phase (a channel larger
# than the cache budget), rows (channels_last, (N, C)) with one and many row blocks (few and many
# channels), 3-D images, non-contiguous inputs (made contiguous), several threads.
LAYOUTS = [
    ("planar", (6, 5, 4, 7), None),
    ("planar_big_channel", (130, 2, 40, 20), None),
    ("channels_last", (8, 5, 6, 7), torch.channels_last),
    ("channels_last_many_blocks", (64, 32, 16, 16), torch.channels_last),
    ("channels_last_wide", (40, 256, 3, 3), torch.channels_last),  # > 128 channels: 64-row statistics blocks
    ("rows_nc", (60, 100), None),
    ("ncl", (6, 4, 9), None),
    ("channels_last_3d", (3, 4, 2, 3, 2), torch.channels_last_3d),
    ("transposed", (7, 5, 3, 4), "transposed"),
]


def _input(shape, fmt, dtype):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 7
    if fmt == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # strides of neither layout
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x.to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,shape,fmt", LAYOUTS)
def test_train_eval_and_backward_match_torch_nn_float64(name, shape, fmt, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
        ours, ref = _layer(dims, shape[1])
        x = _input(shape, fmt, torch.float64).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        g = torch.randn(shape, dtype=torch.float64)
        called = _ops_called(lambda: ours(x).backward(g))
        assert {"bnlab::bn_train_", "bnlab::bn_backward"} <= called  # eager: the in-place variant
        y = ours(x.detach())
        ref(xr).backward(g)
        yr = ref(xr.detach())
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-10, atol=1e-12)
        if fmt in (torch.channels_last, torch.channels_last_3d):
            assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
        ours.eval(), ref.eval()
        with torch.no_grad():
            assert "bnlab::bn_eval" in _ops_called(lambda: ours(x))
            torch.testing.assert_close(ours(x), ref(xr), rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name,shape,fmt", LAYOUTS[::2])
def test_float32_within_1e5_of_float64(name, shape, fmt):
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    ours, ref = _layer(dims, shape[1], torch.float32)
    x = _input(shape, fmt, torch.float32)
    y = ours(x)
    yr = ref(x.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_half_precision_inputs_use_float32_statistics(dtype, tol, fmt):
    """Half-precision input and module (model.half()): statistics in float32 or wider, so the result
    is the float64 result rounded to the dtype, for a channel with |mean| >> std too."""
    ours, ref = _layer(2, 3, dtype)
    x = torch.randn(16, 3, 5, 5, dtype=torch.float64) * 0.5 + torch.tensor([0.0, 30.0, -200.0]).view(1, 3, 1, 1)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    xl = x.to(dtype).requires_grad_()
    y = ours(xl)
    assert y.dtype == dtype
    yr = ref(xl.detach().double())
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=tol, atol=tol)
    y.double().sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all()


@pytest.mark.parametrize("shape,fmt", [((4, 3, 5, 5), None), ((4, 3, 5, 5), torch.channels_last), ((6, 3), None)])
@pytest.mark.parametrize("affine", [True, False])
def test_operators_pass_torch_library_opcheck(shape, fmt, affine):
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of each operator."""
    torch.manual_seed(0)
    x = _input(shape, fmt, torch.float64).requires_grad_()
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv, count = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), torch.tensor(3)
    torch.library.opcheck(torch.ops.bnlab.bn_train.default, (x, w, b, rm, rv, count, 0.1, False, 1e-5))
    torch.library.opcheck(torch.ops.bnlab.bn_train.default, (x, w, b, None, None, None, 0.0, False, 1e-5))
    stats = torch.ops.bnlab.bn_train(x.detach(), w, b, None, None, None, 0.0, False, 1e-5)[1]
    # bn_backward runs inside backward without grad mode (double backward differentiates the
    # composite formula instead), so its inputs never require grad.
    torch.library.opcheck(torch.ops.bnlab.bn_backward.default,
                          (torch.randn_like(x).detach(), x.detach(), None if w is None else w.detach(), stats, True))
    torch.library.opcheck(torch.ops.bnlab.bn_eval.default, (x.detach(), w, b, rm, rv, 1e-5))
    # the in-place variant (eager module forward): declared mutations, fake impl, autograd
    torch.library.opcheck(torch.ops.bnlab.bn_train_.default, (x, w, b, rm.clone(), rv.clone(), count.clone(), 0.1,
                                                               False, 1e-5))
    torch.library.opcheck(torch.ops.bnlab.bn_train_.default, (x, w, b, rm.clone(), rv.clone(), None, 0.0, True,
                                                               1e-5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_in_place_training_op_equals_the_functional_one(dtype):
    """bn_train_ writes into the buffers exactly what bn_train returns, bumps their version counters
    (so autograd notices the in-place change) and leaves them alone for a rejected batch."""
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64).mul(3).add(7).to(dtype)
    bdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.rand(5, dtype=bdt) + 0.5, torch.randn(5, dtype=bdt)
    rm, rv, count = torch.randn(5, dtype=bdt), torch.rand(5, dtype=bdt) + 0.5, torch.tensor(4)
    for momentum, cumulative in ((0.1, False), (0.0, True)):
        ref = torch.ops.bnlab.bn_train(x, w, b, rm, rv, count, momentum, cumulative, 1e-5)
        m2, v2, c2 = rm.clone(), rv.clone(), count.clone()
        versions = (m2._version, v2._version, c2._version)
        out, stats, accepted = torch.ops.bnlab.bn_train_(x, w, b, m2, v2, c2, momentum, cumulative, 1e-5)
        assert torch.equal(out, ref[0]) and torch.equal(stats, ref[1]) and bool(accepted)
        assert torch.equal(m2, ref[2]) and torch.equal(v2, ref[3]) and torch.equal(c2, ref[4])
        assert all(new > old for new, old in zip((m2._version, v2._version, c2._version), versions))
    bad = x.clone()
    bad[3, 2] = float("nan")
    m2, v2, c2 = rm.clone(), rv.clone(), count.clone()
    out, stats, accepted = torch.ops.bnlab.bn_train_(bad, w, b, m2, v2, c2, 0.1, False, 1e-5)
    assert not bool(accepted) and torch.equal(m2, rm) and torch.equal(v2, rv) and int(c2) == 4


def test_module_warns_and_keeps_statistics_for_a_nan_batch_on_the_eager_path():
    from bnlab.norm.functional import NonFiniteBatchWarning

    layer = bn.BatchNorm1d(4)
    layer(torch.randn(8, 4))
    before = (layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked))
    x = torch.randn(8, 4)
    x[0, 1] = float("inf")
    with pytest.warns(NonFiniteBatchWarning):
        assert "bnlab::bn_train_" in _ops_called(lambda: layer(x))
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == before[2]


@pytest.mark.parametrize("affine", ["both", "frozen_weight", "none"])
def test_eager_backward_node_has_torch_nn_autograd_semantics(affine):
    """The eager module forward's backward node (bn_train_'s, written like torch's generated nodes):
    gradients for exactly the inputs that need them, double backward, a second backward without
    retain_graph refused, an input changed in place after the forward refused, hooks called, all as
    with torch.nn.BatchNorm1d in float64 (the oracle)."""
    ours, ref = _layer(1, 5)
    if affine == "none":
        ours, ref = bn.BatchNorm1d(5, affine=False).double(), nn.BatchNorm1d(5, affine=False).double()
    elif affine == "frozen_weight":
        ours.weight.requires_grad_(False)
        ref.weight.requires_grad_(False)
    torch.manual_seed(3)
    x0 = torch.randn(9, 5, dtype=torch.float64) * 2 + 1
    g = torch.randn(9, 5, dtype=torch.float64)
    results = []
    for layer in (ours, ref):
        x = x0.clone().requires_grad_()
        y = layer(x)
        seen = []
        y.register_hook(lambda t: seen.append(t.shape) or None)
        (gx,) = torch.autograd.grad(y, x, g, create_graph=True, retain_graph=True)
        second = torch.autograd.grad((gx * gx).sum(), [x] + [p for p in layer.parameters() if p.requires_grad],
                                     allow_unused=True)  # dL/dx does not depend on the bias
        y.backward(g, retain_graph=True)
        params = [None if p.grad is None else p.grad.clone() for p in layer.parameters()]
        y.backward(g)
        with pytest.raises(RuntimeError, match="second time"):
            y.backward(g)
        y2 = layer(x)
        with torch.no_grad():
            x.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y2.backward(g)
        results.append((gx.detach(), second, params, x.grad, seen))
    (gx, second, params, xgrad, seen), (rgx, rsecond, rparams, rxgrad, rseen) = results
    assert "bnlab::bn_train_" in _ops_called(lambda: ours(x0.clone().requires_grad_()))
    assert ours(x0.clone().requires_grad_()).grad_fn.name() == "BnTrainBackward"
    torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-12)
    assert len(second) == len(rsecond)
    for a, b in zip(second + tuple(params), rsecond + tuple(rparams)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(xgrad, rxgrad, rtol=1e-10, atol=1e-12)
    assert seen == rseen == [x0.shape] * 4  # the refused backward runs the hook too, in both


def test_eager_forward_records_no_graph_when_nothing_needs_a_gradient():
    layer = bn.BatchNorm1d(5)
    for p in layer.parameters():
        p.requires_grad_(False)
    assert layer(torch.randn(8, 5)).grad_fn is None
    layer.weight.requires_grad_(True)
    y = layer(torch.randn(8, 5))
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is None
    with torch.no_grad():
        assert layer(torch.randn(8, 5, requires_grad=True)).grad_fn is None


def test_compiled_autograd_needs_the_composite_path():
    """The kernels' autograd nodes have no compiled-autograd support (documented in
    bnlab.norm.kernels); with the kernels off, a backward compiled by compiled autograd gives
    torch.nn's gradients (float64)."""
    import torch._dynamo.compiled_autograd as ca

    torch.manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    grads = []
    for layer, mode in ((nn.BatchNorm2d(4).double(), "on"), (bn.BatchNorm2d(4).double(), "off")):
        x = x0.clone().requires_grad_()
        with kernels.use_mode(mode), ca._enable(torch.compile(backend="eager")):
            (layer(x) ** 3).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    x = x0.clone().requires_grad_()
    with pytest.raises(Exception, match="compiled_args not implemented: BnTrainBackward"):
        with ca._enable(torch.compile(backend="eager")):
            bn.BatchNorm2d(4).double()(x).sum().backward()


def test_gradcheck_through_the_kernels():
    torch.manual_seed(0)
    for shape, fmt in (((5, 3, 2, 3), None), ((5, 3, 2, 3), torch.channels_last), ((7, 4), None)):
        x = _input(shape, fmt, torch.float64).requires_grad_()
        w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, w, b: batch_norm(x, w, b, None, None, training=True).out, (x, w, b))


def test_backward_saves_one_input_sized_tensor():
    """Only x is saved at input size, plus per-channel tensors (weight, the (3, C) float64 statistics);
    the composite path also keeps its shifted copy of the input."""
    saved = []
    layer = bn.BatchNorm2d(8)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved if t.numel() != x.numel()) <= 4 * 8
    y.sum().backward()


def test_export_and_compile_capture_the_operators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5),
                          bn.BatchNorm1d(5))
    x = torch.randn(8, 3, 6, 6)
    ep = torch.export.export(model.eval(), (x,))
    assert "bnlab.bn_eval" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), model(x))
    ep = torch.export.export(model.train(), (x,))
    assert "bnlab.bn_train" in str(ep.graph)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_switch_by_function_context_and_environment():
    layer = bn.BatchNorm1d(4)
    x = torch.randn(6, 4)
    assert "bnlab::bn_train_" in _ops_called(lambda: layer(x))
    with kernels.use_mode("off"):
        assert kernels.mode() == "off" and not _ops_called(lambda: layer(x))
    assert kernels.mode() == "on"
    with pytest.raises(ValueError, match="auto, on, off"):
        kernels.set_mode("fast")
    code = "import bnlab.norm.kernels as k; print(k.mode())"
    env = dict(os.environ, BNLAB_KERNELS="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "off"


def test_functorch_transforms_use_the_composite_path():
    """vmap over tasks (the MAML pattern) and hessians go through the composite core (no kernel)."""
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    fn = lambda t: batch_norm(t, None, None, None, None, training=True).out  # noqa: E731
    called = _ops_called(lambda: torch.func.vmap(fn)(x))
    assert not any(name.startswith("bnlab::bn_train") for name in called)
    torch.testing.assert_close(torch.func.vmap(fn)(x), torch.stack([fn(t) for t in x]), rtol=1e-10, atol=1e-10)


def _metrics(root):
    rows = []
    for path in sorted(root.rglob("metrics.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def test_ioffe_mnist_smoke_gives_the_same_metrics_on_both_paths(tmp_path, monkeypatch):
    from bnlab.cli import main

    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("BNLAB_KERNELS", mode)
        with kernels.use_mode(mode):
            out = tmp_path / mode
            assert main(["run", "ioffe_mnist", "--profile", "smoke", "--seeds", "0", "--quiet", "--out", str(out)]) == 0
        results[mode] = _metrics(out)
    assert results["on"] and len(results["on"]) == len(results["off"])
    for a, b in zip(results["on"], results["off"]):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
            else:
                assert value == b[key], key


def test_bench_kernels_reports_every_key_and_the_cli_knows_it():
    """The benchmark's machinery on tiny shapes (fresh regime only, so the test process's allocator
    policy is left alone); the timing itself is checked by running the benchmark, not by tests."""
    from bnlab.bench_kernels import format_table, run
    from bnlab.cli import build_parser

    shapes = [("8x4x5x5", (8, 4, 5, 5), torch.contiguous_format), ("8x4x5x5 cl", (8, 4, 5, 5), torch.channels_last),
              ("60x100", (60, 100), torch.contiguous_format)]
    summary = run(repeats=1, small_repeats=1, shapes=shapes, regimes=("fresh",))
    for key in ("train_fwd_bwd_speedup", "eval_fwd_speedup", "small_layer_fwd_bwd_speedup", "train_fwd_speedup"):
        assert summary[key] > 0 and summary[key] == summary[key], key
    assert "bandwidth_fraction" in summary and summary["machine"]["fresh"]["copy_gbps"] > 0
    assert summary["eval_fwd_speedup_ceiling"] > 0 and summary["train_fwd_bwd_speedup_ceiling"] > 0
    assert all(r["bound_ms"] > 0 and r["ceiling"] > 0 for r in summary["rows"] if r["shape"] != "60x100")
    assert len(summary["rows"]) == 3 * 3 and "train_fwd_bwd" in format_table(summary)
    json.dumps(summary)
    args = build_parser().parse_args(["bench", "kernels", "--json"])
    assert args.json and args.what == "kernels"


def test_bench_bound_counts_passes_and_fresh_outputs_per_round():
    """The bound of a round, by hand: forward+backward = 4 reads + 2 copies, plus 2 fresh outputs
    (fresh copy minus copy) when outputs are fresh; eval = 1 copy + 1 output."""
    from bnlab.bench_kernels import _bound_per_round

    t = {"_read": [1.0, 2.0], "_copy": [3.0, 5.0]}
    assert _bound_per_round("train_fwd_bwd", t) == [4 * 1 + 2 * 3, 4 * 2 + 2 * 5]
    t["_fresh_copy"] = [10.0, 4.0]  # a fresh copy faster than a warm one counts as no cost
    assert _bound_per_round("train_fwd_bwd", t) == [4 + 6 + 2 * 7, 8 + 10]
    assert _bound_per_round("eval_fwd", t) == [3 + 7, 5]


def test_bench_fresh_outputs_ask_for_huge_pages_on_their_aligned_interior(monkeypatch):
    """The bound's fresh training outputs are allocated as the kernels allocate theirs (madvise on the
    2 MiB-aligned interior of outputs of at least 8 MiB, unless BNLAB_HUGE_PAGES=0), so the bound does
    not charge 4 KiB page faults that bnlab does not pay."""
    import sys as _sys
    from bnlab import bench_kernels

    calls = []

    class FakeLibc:
        def madvise(self, start, length, advice):
            calls.append((start.value, length.value, advice))
            return 0

    monkeypatch.setattr(bench_kernels, "_libc", lambda: FakeLibc())
    monkeypatch.setattr(_sys, "platform", "linux")
    monkeypatch.setenv("BNLAB_HUGE_PAGES", "0")  # the kernels' opt-out applies to the bound too
    bench_kernels._ask_huge_pages(torch.empty(5 << 20))
    assert calls == []
    monkeypatch.delenv("BNLAB_HUGE_PAGES")
    small = torch.empty(1 << 20)  # 4 MiB: left alone
    assert bench_kernels._ask_huge_pages(small) is small and calls == []
    big = torch.empty(5 << 20)  # 20 MiB
    bench_kernels._ask_huge_pages(big)
    (start, length, advice), = calls
    huge = 1 << 21
    assert advice == 14 and start % huge == 0 and length % huge == 0 and length > 0
    assert big.data_ptr() <= start < big.data_ptr() + huge and start + length <= big.data_ptr() + big.nbytes


def test_training_under_fake_tensor_mode_reads_no_values():
    """Memory estimators and tracers run modules under FakeTensorMode: the kernel path must not read
    its accept flag there (torch.nn works; a host read raises DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        layer = bn.BatchNorm2d(4)
        out = layer(torch.randn(8, 4, 3, 3))
    assert out.shape == (8, 4, 3, 3)


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path, monkeypatch):
    """torch waits forever on a build folder's lock file; one left by a killed build must not hang
    every later process (it did, twice, on the project's own machine)."""
    import os
    import threading
    import time

    from bnlab.norm import kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "bnlab_kernels_test"
    folder.mkdir()
    lock = folder / "lock"
    lock.touch()
    old = time.time() - kernels.STALE_LOCK_SECONDS - 10
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        kernels._clear_stale_lock("bnlab_kernels_test")
    assert not lock.exists()
    lock.touch()  # a live build: its lock goes away when it ends, and nothing warns
    builder = threading.Timer(1.5, lock.unlink)
    builder.start()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # removing the live lock itself would warn: an error here
        kernels._clear_stale_lock("bnlab_kernels_test")
    # it returned only once the "build" had removed its own lock (not by removing it, not at once)
    assert builder.finished.is_set() and not lock.exists()


def test_the_build_name_depends_on_the_python_environment(monkeypatch):
    from bnlab.norm import kernels

    a = kernels._build_name()
    monkeypatch.setattr("sys.prefix", "/some/other/venv")
    assert kernels._build_name() != a


def test_two_copies_of_the_same_source_build_apart(tmp_path, monkeypatch):
    """Same bytes at another path (a worktree, an installed copy): its own build folder, since torch's
    build file names the source path and the two would otherwise rebuild each other's in turn."""
    from bnlab.norm import kernels

    a = kernels._build_name()
    copy = tmp_path / "_kernels.cpp"
    copy.write_bytes(kernels._SOURCE.read_bytes())
    monkeypatch.setattr(kernels, "_SOURCE", copy)
    assert kernels._build_name() != a
    monkeypatch.setattr(kernels, "_SOURCE", copy.parent / "." / copy.name)  # the same file, spelled otherwise
    b = kernels._build_name()
    monkeypatch.setattr(kernels, "_SOURCE", copy)
    assert kernels._build_name() == b


def test_a_lock_held_by_a_live_announced_builder_is_kept_and_a_dead_ones_removed_at_once(tmp_path, monkeypatch):
    """On a loaded machine a build can outlast the age rule: a lock whose announced builder process
    still runs is waited for however old it is; one whose builder is gone is stale at once."""
    import os
    import platform
    import subprocess
    import sys
    import threading
    import time
    import warnings

    from bnlab.norm import kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "bnlab_kernels_test"
    folder.mkdir()
    lock, owner = folder / "lock", folder / "bnlab_builder"
    old = time.time() - kernels.STALE_LOCK_SECONDS - 10
    # a live builder (this process's child), lock older than the age rule: kept until the build ends
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner.write_text(f"{platform.node()} {child.pid}")
        lock.touch()
        os.utime(lock, (old, old))
        builder = threading.Timer(1.5, lock.unlink)
        builder.start()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kernels._clear_stale_lock("bnlab_kernels_test")
        assert builder.finished.is_set() and not lock.exists()
    finally:
        child.kill()
        child.wait()
    # the same builder, now dead, and a fresh lock: removed at once, not after the age rule
    lock.touch()
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="builder process is gone"):
        kernels._clear_stale_lock("bnlab_kernels_test")
    assert not lock.exists() and time.monotonic() - t0 < 10.0  # at once, not after the 300-s age rule


def test_lp_operators_pass_torch_library_opcheck():
    """ℓp's operators (bnlab::lp_train, lp_train_, lp_backward; bnlab.norm.lp): schema, fake
    implementations and dispatch."""
    gen = torch.Generator().manual_seed(5)
    for p, shape in [(1.0, (7, 3)), (2.0, (4, 3, 5)), (math.inf, (2, 3, 4, 2))]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        w, b = torch.rand(3, dtype=torch.float64).add(0.5), torch.randn(3, dtype=torch.float64)
        cn = gaussian_max_abs_mean(x.numel() // 3) if math.isinf(p) else 0.0
        torch.library.opcheck(torch.ops.bnlab.lp_train.default, (x, w, b, p, 1e-5, cn))
        torch.library.opcheck(torch.ops.bnlab.lp_train_.default,
                              (x, w, b, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                               torch.zeros((), dtype=torch.int64), p, 1e-5, cn, 0.1, False))
        out, mu, s2, d, stat, r, scale, a, top = torch.ops.bnlab.lp_train(x, w, b, p, 1e-5, cn)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        torch.library.opcheck(torch.ops.bnlab.lp_backward.default,
                              (g, x, w, d, stat, r, scale, a, top, p, cn, True, True, True))


@pytest.mark.parametrize("cls, shape", [(bn.BatchNorm1d, (16, 4)), (bn.BatchNorm2d, (4, 4, 3, 3))])
def test_a_reparametrized_weight_is_used(cls, shape):
    """torch.nn.utils.parametrize moves ``weight`` out of ``_parameters``: the kernel path must not
    then normalize without it (it hands the call to the general path, which reads the parametrized
    value); compared with torch.nn's layer holding the tripled weight."""
    from torch.nn.utils import parametrize

    class Triple(nn.Module):
        def forward(self, w):
            return 3 * w

    x = torch.randn(shape, dtype=torch.float64)
    ours = cls(4).double()
    ref = getattr(nn, cls.__name__)(4).double()
    with torch.no_grad():
        ref.weight.mul_(3)
    parametrize.register_parametrization(ours, "weight", Triple())
    for mode in (ours.train, ours.eval):
        mode()
        ref.train(ours.training)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
