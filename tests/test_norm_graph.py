"""Family 1: no Python decision on tensor values, so BN works under graph capture and torch.func.

Oracles: the same model run eagerly, torch.nn in float64, and per-task loops.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import bnlab
import bnlab.norm as bn

pytestmark = pytest.mark.usefixtures("bn_path")  # graph capture of the fused kernels and of the composite path


def _conv_model(momentum, second_momentum=None):
    """Conv-BN-ReLU-Conv-BN-Linear-BN1d; the second BN may use another momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), bn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Conv2d(4, 5, 3), bn.BatchNorm2d(5, momentum=momentum if second_momentum is None else second_momentum),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 6), bn.BatchNorm1d(6, momentum=momentum),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    return model


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_dynamo_sees_no_graph_break(training, momentum, dynamic):
    """dynamic=True is what torch.compile(dynamic=True) does: shapes and the layers' float
    attributes (eps, momentum) become symbols, so the argument checks must be comparisons only."""
    model = _conv_model(momentum).train(training)
    x = torch.randn(8, 3, 8, 8)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(assume_static_by_default=not dynamic):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _compiled_equals_eager(train_sizes: tuple[int, ...], eval_sizes: tuple[int, ...], **compile_kw) -> None:
    """Train eager and compiled copies of one model (momentum None and 0.1 layers) on the same
    batches, then evaluate: outputs, gradients, running statistics and counters must agree."""
    torch._dynamo.reset()
    eager = _conv_model(None, second_momentum=0.1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, **compile_kw)
    for step, n in enumerate(train_sizes):
        x = torch.randn(n, 3, 8, 8) * (step + 1) + step
        y_c, y_e = compiled(x), eager(x)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        y_c.pow(2).sum().backward()
        y_e.pow(2).sum().backward()
    for (name, p_c), p_e in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-4, msg=name)
    for k, v in _bn_state(eager).items():
        torch.testing.assert_close(compiled_model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert compiled_model[1].num_batches_tracked.item() == len(train_sizes)
    eager.eval(), compiled_model.eval()
    for n in eval_sizes:
        x = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_equals_eager_in_training_and_eval():
    """Inductor (C++ on CPU), fullgraph, one model with momentum None and 0.1 layers (compiling is
    slow, so one model covers both): outputs, gradients, running statistics and counters equal eager's."""
    _compiled_equals_eager((8, 8), (8,), dynamic=False)


def test_compile_dynamic_fullgraph_equals_eager_in_training_and_eval():
    """torch.compile(dynamic=True, fullgraph=True): symbolic batch size and symbolic eps/momentum.
    AOTAutograd with the eager backend (dynamo capture, functionalization and the joint graph with
    symbols, without Inductor's code generation, which the static test above covers); two batch
    sizes through one compiled graph; momentum None and 0.1 layers in one model."""
    _compiled_equals_eager((8, 5), (8, 3), dynamic=True, backend="aot_eager")


def _pair_1d(track=True):
    """bnlab and torch.nn BatchNorm1d(3) in float64 with the same non-trivial state."""
    torch.manual_seed(1)
    theirs = nn.BatchNorm1d(3, track_running_stats=track).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
        if track:
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours = bn.BatchNorm1d(3, track_running_stats=track).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_matches_torch_nn(training):
    """torch.func.jvp, jacfwd and hessian as jacfwd(jacrev) against torch.nn in float64: batch
    statistics (track_running_stats=False) in training, running statistics in eval; on both paths."""
    x = torch.randn(6, 3, 2, dtype=torch.float64) * 2 + 1
    v = torch.randn_like(x)
    ours, theirs = _pair_1d(track=not training)
    ours.train(training), theirs.train(training)
    for fn in (lambda m: torch.func.jvp(m, (x,), (v,))[1],
               lambda m: torch.func.jacfwd(m)(x),
               lambda m: torch.func.jacfwd(torch.func.jacrev(lambda x: (m(x) ** 3).sum()))(x)):
        torch.testing.assert_close(fn(ours), fn(theirs), rtol=0, atol=1e-10)
    # the same for the pure function with running statistics in training (they are outputs)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    f = lambda x: bnlab.batch_norm(x, None, None, rm, rv, training=True, momentum=0.1).out  # noqa: E731
    g = lambda x: nn.functional.batch_norm(x, None, None, training=True)  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.func.jacfwd(g)(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_forward_ad_dual_tensors_match_torch_nn(training):
    """torch.autograd.forward_ad with running statistics, which torch.nn updates in place in
    training: same tangent, same running statistics, and the statistics carry no tangent."""
    import torch.autograd.forward_ad as fwad

    x = torch.randn(7, 3, 2, dtype=torch.float64) * 2 + 1
    v = torch.randn_like(x)
    ours, theirs = _pair_1d()
    ours.train(training), theirs.train(training)
    results = []
    for layer in (ours, theirs):
        with fwad.dual_level():
            y = layer(fwad.make_dual(x, v))
            primal, tangent = fwad.unpack_dual(y)
            assert fwad.unpack_dual(layer.running_mean).tangent is None
            assert fwad.unpack_dual(layer.running_var).tangent is None
        results.append((primal, tangent, layer.running_mean.clone(), layer.running_var.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


@pytest.mark.parametrize("training", [True, False])
def test_export_equals_eager(training):
    model = _conv_model(0.1)
    model(torch.randn(8, 3, 8, 8))  # non-trivial running statistics
    model.train(training)
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 8, 8)
    program = torch.export.export(model, (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x), reference(x), rtol=1e-6, atol=1e-6)
    if training:  # the exported program updates its buffers like the eager module
        expected = _bn_state(reference)
        got = {k: v for k, v in exported.state_dict().items() if k in expected}
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dims,shape", [(1, (6, 4)), (2, (6, 4, 3, 5)), (3, (5, 4, 2, 3, 2))])
def test_vmap_over_tasks_equals_the_per_task_loop(dims, shape, training):
    """MAML pattern: per-task batch statistics (track_running_stats=False), task-specific params."""
    torch.manual_seed(0)
    tasks = 3
    module = getattr(bn, f"BatchNorm{dims}d")(4, track_running_stats=False).double().train(training)
    xs = torch.randn(tasks, *shape, dtype=torch.float64) * 3 + 1
    params = {
        "weight": torch.rand(tasks, 4, dtype=torch.float64) + 0.5,
        "bias": torch.randn(tasks, 4, dtype=torch.float64),
    }

    def run(p, x):
        return functional_call(module, p, (x,))

    batched = vmap(run)(params, xs)
    loop = torch.stack([run({k: v[t] for k, v in params.items()}, xs[t]) for t in range(tasks)])
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-10)
    # the same through the pure function, with and without running statistics
    fn = vmap(lambda x, w, b: bnlab.batch_norm(x, w, b, None, None, training=True).out)
    loop = torch.stack([bnlab.batch_norm(xs[t], params["weight"][t], params["bias"][t], None, None, training=True).out
                        for t in range(tasks)])
    torch.testing.assert_close(fn(xs, params["weight"], params["bias"]), loop, rtol=0, atol=1e-10)
    rm, rv = torch.randn(tasks, 4, dtype=torch.float64), torch.rand(tasks, 4, dtype=torch.float64) + 0.5
    fn = vmap(lambda x, m, v: tuple(bnlab.batch_norm(x, None, None, m, v, training=True, momentum=0.3)[:3]))
    got = fn(xs, rm, rv)
    for t in range(tasks):
        want = bnlab.batch_norm(xs[t], None, None, rm[t], rv[t], training=True, momentum=0.3)
        for g, w in zip(got, want[:3]):
            torch.testing.assert_close(g[t], w, rtol=0, atol=1e-10)


def test_jacrev_and_hessian_match_torch_nn():
    """Batch statistics (track_running_stats=False) in training; running statistics in eval."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 1
    ours = bn.BatchNorm1d(3, track_running_stats=False).double()
    theirs = nn.BatchNorm1d(3, track_running_stats=False).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(jacrev(lambda x: ours(x))(x), jacrev(lambda x: theirs(x))(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(hessian(lambda x: (ours(x) ** 3).sum())(x),
                               hessian(lambda x: (theirs(x) ** 3).sum())(x), rtol=0, atol=1e-10)
    ours_eval, theirs_eval = bn.BatchNorm1d(3).double().eval(), nn.BatchNorm1d(3).double().eval()
    with torch.no_grad():
        theirs_eval.running_mean.uniform_(-1, 1)
        theirs_eval.running_var.uniform_(0.5, 2)
        theirs_eval.weight.uniform_(0.5, 2)
    ours_eval.load_state_dict(theirs_eval.state_dict())
    jo = jacrev(lambda p: functional_call(ours_eval, p, (x,)))(dict(ours_eval.named_parameters()))
    jt = jacrev(lambda p: functional_call(theirs_eval, p, (x,)))(dict(theirs_eval.named_parameters()))
    for k in jt:
        torch.testing.assert_close(jo[k], jt[k], rtol=0, atol=1e-12)
    # the pure function with running statistics in training: gradients flow, statistics are outputs
    rm, rv, n = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    h = hessian(lambda x: (bnlab.batch_norm(x, None, None, rm, rv, training=True, momentum=None,
                                            num_batches_tracked=n).out ** 3).sum())(x)
    torch.testing.assert_close(h, hessian(lambda x: (theirs(x) ** 3).sum() * 0 + (
        nn.functional.batch_norm(x, None, None, training=True) ** 3).sum())(x), rtol=0, atol=1e-10)


def test_double_backward_of_the_module_matches_torch_nn():
    torch.manual_seed(0)
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    ours, theirs = bn.BatchNorm1d(4).double(), nn.BatchNorm1d(4).double()
    results = []
    for layer in (ours, theirs):
        (g,) = torch.autograd.grad((layer(x) ** 2).sum() / 3 + layer(x).pow(3).mean(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        results.append((g.detach(), gg))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("where", ["meta", "fake", "compile"])
def test_core_reads_no_tensor_values(where):
    """The training and eval paths never call .item()/.tolist()/bool on a tensor (no host sync):
    on the meta device and under FakeTensorMode any value read raises; under
    torch.compile(fullgraph=True) on real CPU tensors it would be a graph break, hence an error.
    NCHW, channels-last and (N, C) inputs (each layout takes its own statistics route)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [(bn.BatchNorm2d, (8, 4, 5, 5), torch.contiguous_format),
             (bn.BatchNorm2d, (8, 4, 5, 5), torch.channels_last), (bn.BatchNorm1d, (8, 4), torch.contiguous_format)]
    for cls, shape, fmt in cases:
        for training in (True, False):
            for momentum in (0.1, None):
                if where == "meta":
                    x = torch.empty(shape, device="meta").contiguous(memory_format=fmt)
                    module = cls(4, momentum=momentum, device="meta").train(training)
                    y = module(x)
                    assert y.device.type == "meta"
                elif where == "fake":
                    with FakeTensorMode():
                        x = torch.randn(shape).contiguous(memory_format=fmt)
                        module = cls(4, momentum=momentum).train(training)
                        y = module(x)
                        res = bnlab.batch_norm(x, module.weight, module.bias, module.running_mean, module.running_var,
                                               training=training, momentum=momentum,
                                               num_batches_tracked=module.num_batches_tracked)
                    assert res.out.shape == x.shape
                else:
                    torch._dynamo.reset()
                    x = torch.randn(shape).contiguous(memory_format=fmt)
                    module = cls(4, momentum=momentum).train(training)
                    y = torch.compile(module, fullgraph=True, backend="eager")(x)
                    assert torch.isfinite(y).all()
                assert y.shape == x.shape
