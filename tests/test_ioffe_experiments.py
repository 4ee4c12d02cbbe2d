"""The Ioffe reproductions: probes do not change training, verdict statistics are what they claim."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from bnlab.experiments.ioffe_lr_study import EXPERIMENT as LR_STUDY
from bnlab.experiments.ioffe_lr_study import fig3_table, table
from bnlab.experiments.ioffe_mnist import EXPERIMENT as MNIST
from bnlab.experiments.ioffe_mnist import drift_statistics, verdict
from bnlab.train.results import load_results
from bnlab.train.runner import run_experiment

SMOKE_DIGITS: dict = {}  # the smoke profile already uses the bundled digits


def test_percentile_probe_leaves_the_training_trajectory_bit_identical(tmp_path):
    without = dataclasses.replace(MNIST, probes=())
    for exp, out in ((MNIST, tmp_path / "with"), (without, tmp_path / "without")):
        run_experiment(exp, "smoke", out=out, seeds=[0], variants=["bn"], overrides=SMOKE_DIGITS, quiet=True,
                       echo=lambda *_: None)
    with_runs = load_results(tmp_path / "with", "ioffe_mnist").runs
    without_runs = load_results(tmp_path / "without", "ioffe_mnist").runs
    a, b = with_runs[0].model_state(), without_runs[0].model_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = lambda r: [(m["step"], m["loss"]) for m in r.records(split="train")]  # noqa: E731
    assert train(with_runs[0]) == train(without_runs[0])
    pct = with_runs[0].arrays["probe/sigmoid_input/percentiles"]
    assert pct.shape[1:] == (3, 10) and np.all(pct[:, 0] <= pct[:, 1]) and np.all(pct[:, 1] <= pct[:, 2])


def test_drift_statistic_is_max_minus_min_after_the_first_tenth():
    steps = np.arange(0, 1001, 100)
    traces = np.zeros((2, len(steps), 3, 4))  # (seeds, T, percentiles, units)
    traces[:, :, 1, :] = np.linspace(0, 5, len(steps))[None, :, None]  # median drifts by 5 overall
    traces[:, 0, 1, :] = 100.0  # an early transient inside the skipped first 10 % is ignored
    traces[:, :, 2, :] = 2.0  # spread 85-15 constant = 2
    d = drift_statistics(steps, traces)
    assert np.isclose(d["median"], 5.0 - 0.5) and np.isclose(d["spread"], 0.0)


def test_ioffe_smoke_runs_give_verdict_rows_and_fig3_table(tmp_path):
    run_experiment(MNIST, "smoke", out=tmp_path, overrides=SMOKE_DIGITS, quiet=True, echo=lambda *_: None)
    rows = verdict(load_results(tmp_path, "ioffe_mnist"))
    assert [r["claim"][:4] for r in rows] == ["D.8a", "D.8b", "D.8c", "D.9a", "D.9b"]
    assert all(set(r) >= {"claim", "paper", "ours", "seeds", "passed", "why"} for r in rows)
    run_experiment(LR_STUDY, "smoke", out=tmp_path, overrides={"dataset": "digits"}, quiet=True,
                   echo=lambda *_: None)
    fig3 = table(load_results(tmp_path, "ioffe_lr_study"))
    assert [r["variant"] for r in fig3] == list(LR_STUDY.variants)
    (title, rows), = fig3_table(load_results(tmp_path, "ioffe_lr_study")).items()
    assert "Fig. 3" in title and [r["variant"] for r in rows] == list(LR_STUDY.variants)
    assert rows[0]["paper: steps to 72.2%"] == "31.0e6" and rows[0]["steps to Baseline max"] is not None
    lrs = {r["variant"]: r["lr"] for r in fig3}
    assert np.isclose(lrs["BN-x30"], 30 * lrs["Baseline"]) and np.isclose(lrs["BN-x5"], 5 * lrs["Baseline"])
