"""santurkar_dln: the mode-residual instrument (closed forms), the verdict rules on synthetic per-seed
numbers (each rule can pass and fail), figures as data, and that experiments with declared figures do
not import the report package."""
from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import bnlab.experiments.santurkar_dln as dln
from bnlab.errors import ConfigError
from bnlab.experiments import ExperimentResults
from bnlab.experiments.figures import Curve, FigureSpec, Panel
from bnlab.train.config import TrainConfig


# --- the instrument --------------------------------------------------------------------------------

def test_end_to_end_recovers_an_affine_map_exactly():
    g = np.random.default_rng(0)
    x = g.standard_normal((200, 10))
    m, c = g.standard_normal((10, 10)), g.standard_normal(10)
    m_hat, c_hat = dln.end_to_end(x @ m.T + c, x)
    np.testing.assert_allclose(m_hat, m, atol=1e-10)
    np.testing.assert_allclose(c_hat, c, atol=1e-10)


def test_mode_residuals_closed_forms():
    a = np.random.default_rng(1).standard_normal((10, 10))
    s_ref = np.linalg.svd(a, compute_uv=False)
    s, res = dln.mode_residuals(a, a)  # M = A: nothing left
    np.testing.assert_allclose(s, s_ref)
    assert np.all(res < 1e-24)
    _, res0 = dln.mode_residuals(np.zeros_like(a), a)  # M = 0: every mode's energy sigma_i^2 remains
    np.testing.assert_allclose(res0, s_ref ** 2, rtol=1e-12)
    np.testing.assert_allclose(res0.sum(), (a ** 2).sum(), rtol=1e-12)  # = ||A||_F^2


def test_modes_probe_sums_to_the_summed_loss_of_a_linear_net():
    """n * sum_i ||(M - A) v_i||^2 equals the summed loss when x^T x = n I (whitened x), for a real DLN."""
    from bnlab.data import make_gaussian_regression
    from bnlab.models import build_model
    from bnlab.train.probes import ProbeContext

    x, y, a = make_gaussian_regression(n=400, dim=10, seed=3)
    # whiten x so that x^T x = n I exactly; y = x A^T stays the data of the same A
    q, _ = torch.linalg.qr(x)
    x = q * math.sqrt(x.shape[0])
    y = x @ a.T
    torch.manual_seed(0)
    model = build_model("dln", norm="none", in_shape=(10,), num_classes=10, depth=5).double()

    class Task:
        x_train, y_train = x, y

    ctx = ProbeContext(step=0, model=model, cfg=TrainConfig(), seed=0, probe_batch=(x, y), batch=(x, y),
                       task=Task, lr=1e-6, loss_fn=None, generator=torch.Generator())
    out = dln.modes_probe(ctx)
    with torch.no_grad():
        loss = float(((model(x) - y) ** 2).sum())
    assert out["n_offset"] < 1e-18 * loss  # a bias-free linear net has no offset
    assert out["n_residual"] == pytest.approx(loss, rel=1e-10)
    np.testing.assert_allclose(out["sigma"], np.linalg.svd(a.numpy(), compute_uv=False), rtol=1e-10)


# --- the verdict rules on synthetic per-seed numbers ------------------------------------------------

@dataclass
class FakeRun:
    variant: str
    seed: int
    loss: float = 1e3
    probes: dict = field(default_factory=dict)  # (probe, key) -> values over steps
    status: str = "done"
    setting: str | None = None
    profile: str | None = None  # unknown profile: no declared seeds (the runs decide)
    config: TrainConfig = field(default_factory=lambda: dln.BASE)
    dataset: dict = field(default_factory=lambda: {"used": "gaussian_regression"})

    def series(self, split="eval", key="acc"):
        if split == "train" and key == "loss":
            return np.arange(3), np.array([1e5, 1e4, self.loss])
        return np.zeros(0, np.int64), np.zeros(0)

    def probe_series(self, probe, key):
        v = np.asarray(self.probes.get((probe, key), []), float)
        return np.arange(v.size), v


def _results(cos_std=0.99, cos_bn=0.1, loss=None, beta=(1e12, 1e6), seeds=(0, 1, 2)):
    loss = loss or {"standard": 1.7e3, "bn": 5e2, "l1": 1e2, "l2": 5e2, "linf": 1e3,
                    "standard_lr1e-7": 3e3, "bn_lr1e-7": 1e3}
    runs = []
    for s in seeds:
        for i, (v, lv) in enumerate(loss.items()):
            # per (seed, arm): paired differences vary over seeds (a zero spread decides nothing),
            # and over seeds 0-2 every arm cycles through the same three factors (means unchanged)
            jitter = 1 + 0.05 * ((s + i) % 3)
            p = {}
            if v in ("standard", "bn"):
                c = cos_std if v == "standard" else cos_bn
                b = beta[0] if v == "standard" else beta[1]
                p = {("ics", f"{layer}.cosine"): [c * jitter / 1.1] * 5 for layer in dln.ICS_LAYERS}
                for key in ("loss_range", "predictiveness_max", "effective_beta"):
                    p[("landscape", key)] = [b * jitter] * 5
            runs.append(FakeRun(v, s, lv * jitter, p))
    return ExperimentResults("santurkar_dln", runs)


def _by_id(rows):
    return {r["claim_id"]: r for r in rows}


def test_rules_pass_on_the_papers_numbers():
    rows = _by_id(dln.verdict(_results()))
    assert set(rows) == set(dln.CLAIMS)
    for cid in dln.CLAIMS:
        assert rows[cid]["outcome"] == "PASS", (cid, rows[cid]["ours"])
    assert "paper ≈1.7e+03" in rows["D.14b"]["paper_vs_ours"]


def test_rules_fail_when_the_claims_are_false():
    loss = {"standard": 1e2, "bn": 5e2, "l1": 1e3, "l2": 5e2, "linf": 1e3, "standard_lr1e-7": 1e2,
            "bn_lr1e-7": 1e3}
    rows = _by_id(dln.verdict(_results(cos_std=0.2, cos_bn=0.9, loss=loss, beta=(1e5, 1e6))))
    for cid in dln.CLAIMS:
        assert rows[cid]["outcome"] == "FAIL", (cid, rows[cid]["ours"])


def test_a_small_difference_is_not_orders_of_magnitude():
    rows = _by_id(dln.verdict(_results(beta=(3e6, 1e6))))  # half a decade: D.15 needs one decade
    assert rows["D.15c"]["outcome"] == "FAIL"
    assert rows["D.15c"]["estimate"] == pytest.approx(math.log10(3), rel=1e-9)


def test_missing_variants_and_single_seed_are_undecided():
    res = _results(seeds=(0,))
    rows = _by_id(dln.verdict(res))
    assert all(r["outcome"] == "UNDECIDED" for r in rows.values())
    only = ExperimentResults("santurkar_dln", [r for r in _results().runs if r.variant == "bn"])
    rows = _by_id(dln.verdict(only))
    assert rows["D.14a"]["outcome"] == "UNDECIDED" and "standard" in rows["D.14a"]["ours"]


def test_diverged_seed_is_counted_not_dropped():
    res = _results()
    res.runs[0].status = "diverged"  # standard, seed 0
    row = _by_id(dln.verdict(res))["D.14b"]
    assert row["n_diverged"] == 1 and row["n_seeds"] == 3
    assert row["per_seed"][0]["status"]["standard"] == "diverged" and row["per_seed"][0]["diff"] is None


# --- figures as data ----------------------------------------------------------------------------------

def test_figure_specs_reject_bad_input():
    with pytest.raises(ConfigError, match="exactly one of split"):
        Curve("bn", "BN")
    with pytest.raises(ConfigError, match="per_step"):
        Curve("bn", "BN", split="train", kind="per_step")
    with pytest.raises(ConfigError, match="scale"):
        Panel("t", "x", "y", (Curve("bn", "BN", split="train"),), yscale="symlog")
    with pytest.raises(ConfigError, match="unknown variants"):
        dln.Experiment(name="x", description="", base=dln.BASE, variants={"a": {}},
                       figures=(FigureSpec("f", "c", (Panel("t", "x", "y", (Curve("b", "B", split="train"),)),)),))


def test_figures_are_drawn_from_stored_series(tmp_path):
    from bnlab.report.figures import draw_figures

    paths = draw_figures(dln.FIGURES[:2], _results(), tmp_path)
    assert [p.name for p in paths] == ["santurkar_dln_fig3b.svg", "santurkar_dln_fig10.svg"]
    svg = paths[1].read_text()
    assert "Standard + BN" in svg and "effective" in svg
    assert "Fig. 10" in (tmp_path / "santurkar_dln_fig10.caption.txt").read_text()
    # nothing stored -> no file, not an empty figure
    assert draw_figures(dln.FIGURES[:1], ExperimentResults("santurkar_dln", []), tmp_path / "none") == []


def test_experiments_with_declared_figures_do_not_import_the_report():
    import bnlab.experiments as registry

    for exp in registry.all_experiments():
        if not exp.figures:
            continue
        module = inspect.getmodule(exp.verdict)
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.startswith("bnlab.report") for m in imported), (exp.name, imported)


def test_santurkar_group_and_quick_scale():
    from bnlab.cli import expand_targets

    assert expand_targets(["santurkar"]) == ["santurkar_dln", "santurkar_vgg"]
    assert expand_targets(["ioffe", "santurkar"])[-2:] == ["santurkar_dln", "santurkar_vgg"]
    exp = dln.EXPERIMENT
    cfg = exp.config("bn", "quick")  # the quick profile is the paper's protocol
    assert (cfg.depth, cfg.regression_dim, cfg.regression_n, cfg.batch_size, cfg.steps) == (25, 10, 1000, 1000, 10_000)
    assert (cfg.lr, cfg.loss, cfg.loss_reduction, cfg.dtype, cfg.momentum) == (1e-6, "mse", "sum", "float64", 0.0)
    assert exp.config("bn_lr1e-7", "quick").lr == 1e-7
    assert exp.estimate_cost("smoke") < 60
