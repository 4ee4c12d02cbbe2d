"""Contracts of every landscape instrument (ics, along_gradient, hessian): no side effects on the
model, its gradients, flags, optimizer or any RNG; explicit bn_mode; typed results that state their
definition and cost; bnlab and torch.nn BN alike; bit-identical training with the instruments
scheduled as probes."""
from __future__ import annotations

import copy
import math
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.experiments.base import Experiment
from bnlab.measure import (CostModel, along_gradient, calibrate_cost, hessian_eigenvalues, hessian_trace,
                           hessian_vector_product, ics, santurkar_grid)
from bnlab.norm import convert, make_norm
from bnlab.train.config import TrainConfig
from bnlab.train.probes import instrument_probe
from bnlab.train.results import load_results
from bnlab.train.rundir import read_metrics
from bnlab.train.runner import run_experiment
from bnlab.train.task import build_network

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def small_cnn(norm: str = "batch", kind: str = "bnlab") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), make_norm(norm, 4, 2), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(4, 4, 3, padding=1), make_norm(norm, 4, 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    return convert(net, to="torch") if kind == "torch" else net


def snapshot(model, opt):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "req": [p.requires_grad for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "gens": [m.generator.get_state() for m in model.modules() if hasattr(m, "generator")],
        "opt": copy.deepcopy(opt.state_dict()),
    }


def assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for ga, gb in zip(a["grad"], b["grad"]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a["req"] == b["req"] and a["flags"] == b["flags"]
    assert torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(x, y) for x, y in zip(a["gens"], b["gens"]))
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]


def run_all(model, batch, opt, bn_mode):
    lf = nn.functional.cross_entropy
    return [
        ics(model, lf, batch, ["0", "4", "9"], update=opt, bn_mode=bn_mode),
        ics(model, lf, batch, {"conv2": "4"}, update=0.1, bn_mode=bn_mode),
        along_gradient(model, lf, batch, santurkar_grid(0.1), bn_mode=bn_mode),
        hessian_eigenvalues(model, lf, batch, k=2, max_iter=8, bn_mode=bn_mode),
        hessian_trace(model, lf, batch, samples=3, bn_mode=bn_mode),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,kind", [("batch", "bnlab"), ("batch", "torch"), ("noisy_batch", "bnlab"), ("l1", "bnlab")])
def test_instruments_have_no_side_effects(norm, kind, device):
    model = small_cnn(norm, kind).to(device)
    x, y = torch.randn(8, 2, 5, 5, device=device), torch.randint(0, 3, (8,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers exist; .grad is set and must survive untouched
    model[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    model[3].eval()  # a mixed train/eval state is restored exactly
    before = snapshot(model, opt)
    for bn_mode in ("batch", "running"):
        results = run_all(model, (x, y), opt, bn_mode)
        assert_same(before, snapshot(model, opt))
        for r in results:
            assert r.bn_mode == bn_mode and r.batch_size == 8 and r.cost.passes > 0
            assert "Santurkar" in r.definition or "Hutchinson" in r.definition
        cm = calibrate_cost(model, nn.functional.cross_entropy, (x, y), bn_mode=bn_mode, repeats=1)
        assert_same(before, snapshot(model, opt))
        # wall-clock ratios vary with load (no timed assertion): only that each is a finite number >= 0
        consts = (cm.forward, cm.backward, cm.graph_backward, cm.double_backward, cm.vector_op, cm.basis_dot, cm.setup)
        assert all(math.isfinite(c) and c >= 0 for c in consts)
        assert f"bn_mode {bn_mode}" in cm.source and "batch 8" in cm.source
    # bn_mode matters (batch vs running statistics) and results are reproducible
    a = along_gradient(model, nn.functional.cross_entropy, (x, y), [0.1])
    b = along_gradient(model, nn.functional.cross_entropy, (x, y), [0.1], bn_mode="running")
    c = along_gradient(model, nn.functional.cross_entropy, (x, y), [0.1])
    assert a.loss0 != b.loss0 and a.loss0 == c.loss0 and np.array_equal(a.grad_change, c.grad_change)


def test_running_mode_equals_the_model_in_eval_mode():
    model = small_cnn()
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    model.train()(x)  # move the running statistics away from their initial values
    ref = copy.deepcopy(model).eval()
    loss = nn.functional.cross_entropy(ref(x), y)
    g = torch.autograd.grad(loss, list(ref.parameters()))
    res = along_gradient(model, nn.functional.cross_entropy, (x, y), [1e-3], bn_mode="running")
    assert res.loss0 == pytest.approx(float(loss.detach()), rel=1e-6)
    assert res.grad_norm == pytest.approx(float(torch.sqrt(sum((t.double() ** 2).sum() for t in g))), rel=1e-5)


def test_costs_are_counted_as_stated():
    model = small_cnn()
    batch = (torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,)))
    lf = nn.functional.cross_entropy
    r = ics(model, lf, batch, ["0", "4"], update=0.1)
    assert (r.cost.forward, r.cost.backward) == (3, 3) and r.cost.passes == pytest.approx(3, rel=1e-12)
    r = along_gradient(model, lf, batch, [0.1, 0.2, 0.4])
    assert (r.cost.forward, r.cost.backward, r.cost.vector_ops) == (4, 4, 3 + 5 * 3)
    assert r.cost.passes == pytest.approx(4, rel=1e-12)  # generic: vector work not counted
    e = hessian_eigenvalues(model, lf, batch, k=1, max_iter=5, tol=1e-12)
    assert (e.cost.forward, e.cost.backward, e.cost.graph_backward, e.cost.double_backward) == (1, 0, 1, 5)
    assert e.iterations == 5 and e.cost.vector_ops == 5 * 10 and e.cost.basis_dots == sum(1 + 4 * (j + 1) for j in range(5))
    t = hessian_trace(model, lf, batch, samples=4)
    assert (t.cost.forward, t.cost.backward, t.cost.graph_backward, t.cost.double_backward, t.cost.vector_ops,
            t.cost.basis_dots) == (1, 0, 1, 4, 12, 4)
    # passes are the counts weighted by the cost model, which the caller may give
    cm = CostModel(forward=0.25, graph_backward=2.0, double_backward=5.0, vector_op=0.01, basis_dot=0.001,
                   setup=0.5, source="test")
    t = hessian_trace(model, lf, batch, samples=4, cost_model=cm)
    assert t.cost.model is cm
    assert t.cost.setups == 1
    assert t.cost.passes == pytest.approx(0.25 + 2.0 + 4 * 5.0 + 12 * 0.01 + 4 * 0.001 + 0.5, rel=1e-12)
    assert t.cost.as_dict()["cost_model"] == "test"
    with pytest.raises(ConfigError, match="CostModel"):
        hessian_trace(model, lf, batch, samples=4, cost_model={"double_backward": 2.0})


def test_bad_arguments_are_clear_errors():
    model = small_cnn()
    batch = (torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,)))
    lf = nn.functional.cross_entropy
    with pytest.raises(ConfigError, match="bn_mode"):
        along_gradient(model, lf, batch, [0.1], bn_mode="eval")
    with pytest.raises(ConfigError, match="etas"):
        along_gradient(model, lf, batch, [0.1, -1])
    with pytest.raises(ConfigError, match="no trainable parameter 'weight'"):
        ics(model, lf, batch, ["2"], update=0.1)
    with pytest.raises(ConfigError, match="unknown module name"):
        ics(model, lf, batch, ["conv9"], update=0.1)
    with pytest.raises(ConfigError, match="update must be"):
        ics(model, lf, batch, ["4"], update="sgd")
    with pytest.raises(ConfigError, match="LBFGS: its step needs a closure"):
        ics(model, lf, batch, ["4"], update=torch.optim.LBFGS(model.parameters()))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.raises(ConfigError, match=r"its 'weight' is the parameter '0.weight' \(tied weights\).*'0'"):
        ics(tied, lf, (torch.randn(8, 4), torch.randint(0, 4, (8,))), ["2"], update=0.1)
    with pytest.raises(ConfigError, match="unknown parameter names"):
        hessian_trace(model, lf, batch, params=["nope"])
    with pytest.raises(ConfigError, match="samples"):
        hessian_trace(model, lf, batch, samples=1)
    with pytest.raises(ShapeError, match="scalar"):
        along_gradient(model, lambda out, y: out, batch, [0.1])
    with pytest.raises(ShapeError, match="pair"):
        hessian_vector_product(model, lf, batch[0], [p.detach() for p in model.parameters()])
    with pytest.raises(ConfigError, match="unknown instrument"):
        instrument_probe("hessian")
    with pytest.raises(ConfigError, match="layers"):
        instrument_probe("ics")
    with pytest.raises(ConfigError, match="unknown options"):
        instrument_probe("hessian_trace", k=3)


# --- the engine: instruments as scheduled probes change nothing ------------------------------------------

TINY = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(16, 16), batch_size=32, lr=0.2, momentum=0.9,
                   steps=12, eval_every=6, eval_subset=100, checkpoint_every=100, probe_schedule="every",
                   probe_every=4, probe_batch_size=64)

PROBES = (
    instrument_probe("ics", layers=["fc2", "fc3"]),
    instrument_probe("along_gradient", multipliers=(0.5, 1, 2)),
    instrument_probe("hessian_eigenvalues", k=2, max_iter=4, batch="probe"),
    instrument_probe("hessian_trace", samples=3, bn_mode="running", schedule="log", points=3),
)


def _torch_bn_model(cfg, task):
    return convert(build_network(cfg, task.in_shape, task.num_classes), to="torch")


def _experiment(probes, torch_bn: bool) -> Experiment:
    return Experiment(name="instr", description="instrument probes", base=TINY,
                      variants={"bn": {"norm": "batch"}, "noisy": {"norm": "noisy_batch"}, "plain": {"norm": "none"}},
                      probes=tuple(probes), build_model=_torch_bn_model if torch_bn else None)


@pytest.mark.parametrize("torch_bn", [False, True])
def test_training_with_every_instrument_scheduled_is_bit_identical(tmp_path, torch_bn):
    kw = dict(out=None, echo=lambda s: None, quiet=True, threads=1)
    plain = run_experiment(_experiment((), torch_bn), "smoke", **{**kw, "out": tmp_path / "plain"})
    probed = run_experiment(_experiment(PROBES, torch_bn), "smoke", **{**kw, "out": tmp_path / "probed"})
    for p0, p1 in zip(plain.planned, probed.planned):
        a = read_metrics(p0.spec.run_dir / "metrics.jsonl")
        b = read_metrics(p1.spec.run_dir / "metrics.jsonl")
        assert a == [r for r in b if "probe" not in r]  # losses, accuracies: the same bits
        wa = torch.load(p0.spec.run_dir / "model.pt", weights_only=True)
        wb = torch.load(p1.spec.run_dir / "model.pt", weights_only=True)
        assert wa.keys() == wb.keys()
        for k in wa:  # weights and running statistics
            if isinstance(wa[k], torch.Tensor):
                assert torch.equal(wa[k], wb[k]), k
    res = load_results(tmp_path / "probed", "instr").by_variant()["bn"][0]
    steps, l2 = res.probe_series("ics", "fc3.l2")
    assert list(steps) == [0, 4, 8, 12] and np.all(np.isfinite(l2)) and np.all(np.asarray(l2) > 0)
    assert res.arrays["probe/along_gradient/grad_change"].shape == (4, 3)
    _, beta = res.probe_series("along_gradient", "effective_beta")
    assert np.all(np.asarray(beta) > 0)
    _, eig = res.probe_series("hessian_eigenvalues", "eig0")
    _, cost = res.probe_series("hessian_trace", "cost_passes")
    assert len(eig) == 4 and len(cost) == 3


def test_probe_costs_enter_the_estimate():
    exp = _experiment(PROBES, False)
    cfg = exp.config("bn", "smoke")
    g = CostModel()  # the generic constants: the graph-keeping gradient + one double backward per product
    assert [p.cost for p in PROBES] == [3.0, 4.0, pytest.approx(g.forward + g.graph_backward + 4 * g.double_backward),
                                        pytest.approx(g.forward + g.graph_backward + 3 * g.double_backward)]
    assert exp.run_cost(cfg) > _experiment((), False).run_cost(cfg)


class _Crash(BaseException):
    pass


def test_noisy_bn_run_resumes_to_the_same_noise(tmp_path):
    """The noise generators travel in the checkpoint: a run killed after a checkpoint resumes to the
    bits of an uninterrupted run (the noise drawn after the resume is the noise it would have drawn)."""
    state = {"armed": False}

    def crash(ctx):
        if state["armed"] and ctx.step == 9:
            raise _Crash()
        return {}

    from bnlab.experiments.base import Probe

    exp = Experiment(name="noisy", description="resume", base=dataclasses.replace(TINY, checkpoint_every=5),
                     variants={"noisy": {"norm": "noisy_batch"}},
                     probes=(Probe("crash", crash, schedule="every", every=1),))
    kw = dict(echo=lambda s: None, quiet=True, threads=1)
    ref = run_experiment(exp, "smoke", out=tmp_path / "ref", **kw)
    state["armed"] = True
    with pytest.raises(_Crash):
        run_experiment(exp, "smoke", out=tmp_path / "crashed", **kw)
    state["armed"] = False
    again = run_experiment(exp, "smoke", out=tmp_path / "crashed", **kw)
    assert again.outcomes[0].resumed_from == 5
    a, b = ref.planned[0].spec.run_dir, again.planned[0].spec.run_dir
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa if isinstance(wa[k], torch.Tensor))


def test_a_noisy_layer_replacing_its_generator_draws_the_same_noise_and_is_restored():
    """On CUDA a noisy BN built on CPU continues its stream on a new generator at its first call
    (``model.to`` leaves generators where they are). Simulated here by a generator that reports
    another device: every evaluation of an instrument must still draw the same noise (η → 0 gives
    no gradient change), and the model must get its own generator back, in its old state."""
    from bnlab.norm.noisy import NoisyBatchNorm1d

    class OtherDevice(torch.Generator):
        @property
        def device(self):
            return torch.device("cuda", 0)

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), NoisyBatchNorm1d(8, seed=3), nn.ReLU(), nn.Linear(8, 3))
        g = OtherDevice()
        g.manual_seed(3)
        m[1].generator = g
        return m

    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = build()
    gen, state = model[1].generator, model[1].generator.get_state()
    r = along_gradient(model, nn.functional.cross_entropy, (x, y), [1e-12])
    assert r.grad_change[0] < 1e-9  # the same noise in both passes (it was 0.3 with fresh noise)
    assert model[1].generator is gen and torch.equal(gen.get_state(), state)
    fresh = build()
    model.train(), fresh.train()
    assert torch.equal(model(x), fresh(x))  # the training run continues as if nothing had measured it


def test_running_mode_is_refused_for_bn_without_running_statistics():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ConfigError, match="track_running_stats=False"):
        along_gradient(model, nn.functional.cross_entropy, batch, [0.1], bn_mode="running")
    along_gradient(model, nn.functional.cross_entropy, batch, [0.1], bn_mode="batch")  # fine


def test_noise_only_layer_follows_bn_mode_like_noisy_bn():
    """Santurkar Fig. 2's two noisy arms get the same treatment: noise on with bn_mode='batch', off
    with 'running', whatever the model's own flags."""
    from bnlab.norm.noisy import NoiseOnly

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), NoiseOnly(6, seed=1), nn.Linear(6, 3)).eval()
    plain = nn.Sequential(model[0], nn.Identity(), model[2])
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    lf = nn.functional.cross_entropy
    off = along_gradient(model, lf, batch, [0.1], bn_mode="running")
    assert off.loss0 == pytest.approx(float(lf(plain(batch[0]), batch[1])), rel=1e-6)
    model.train()
    on = along_gradient(model, lf, batch, [0.1], bn_mode="batch")
    assert on.loss0 != off.loss0
    model.train()  # the model's flag does not decide it
    assert along_gradient(model, lf, batch, [0.1], bn_mode="running").loss0 == off.loss0
