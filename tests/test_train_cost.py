"""The cost estimate printed before a run: the pool's makespan, worker start-up, the dataset really
used, and the terms of one run's estimate. (How close the estimates are to measured run times is a
benchmark, bench/cost_model.py, not a test: times depend on the machine.)"""
from __future__ import annotations

import dataclasses

import pytest

from bnlab.experiments.base import Experiment
from bnlab.train.config import TrainConfig
from bnlab.train.cost import WORKER_START_S, ms_per_step, run_seconds, wall_seconds
from bnlab.train.runner import check_configs, plan_runs


def _makespan(costs, workers):
    """A second implementation of the pool's rule (not an exhaustive search): each run, longest first,
    goes to the worker that frees up first, ties to the lowest index; a plain loop instead of a heap."""
    free = [0.0] * workers
    for c in (sorted(costs, reverse=True) if workers > 1 else costs):
        i = min(range(workers), key=lambda k: (free[k], k))
        free[i] += c
    return max(free)


@pytest.mark.parametrize("costs,workers", [([10, 1, 1, 1], 2), ([3, 3, 3], 2), ([5, 4, 3, 2, 1], 3), ([7], 4),
                                           ([2, 2, 2, 2], 1), ([1, 9, 1, 1, 1, 1, 1, 1], 2)])
def test_wall_time_is_the_busiest_workers_load_plus_start_up(costs, workers):
    n = min(workers, len(costs))
    start = WORKER_START_S if n > 1 else 0.0
    assert wall_seconds(costs, workers) == pytest.approx(_makespan(costs, n) + start)
    assert wall_seconds(costs, workers) >= max(costs) and wall_seconds([], workers) == 0.0
    # closed forms for two of them: one long run decides; three equal runs need two rounds on 2 workers
    assert wall_seconds([10, 1, 1, 1], 2) == pytest.approx(10 + WORKER_START_S)
    assert wall_seconds([3, 3, 3], 2) == pytest.approx(6 + WORKER_START_S)
    # longest first: a long run submitted last does not run alone at the end
    assert wall_seconds([1, 1, 1, 1, 4], 2) == pytest.approx(4 + WORKER_START_S)


def test_one_run_is_steps_times_step_cost_plus_evaluations_and_loading():
    cfg = TrainConfig(dataset="fashion_mnist", model="ioffe_mlp", norm="batch", batch_size=60, steps=1000,
                      eval_every=100, eval_subset=2000, probe_schedule="none")
    base = run_seconds(cfg)
    longer = run_seconds(dataclasses.replace(cfg, steps=2000, eval_every=200))  # same evaluations
    assert longer - base == pytest.approx(1000 * ms_per_step(cfg) / 1000)
    assert run_seconds(dataclasses.replace(cfg, norm="none")) < base  # BN layers cost time
    assert run_seconds(cfg, start_step=1000) < 5, "a finished run only pays its test pass and loading"
    assert run_seconds(cfg, [(10, 2.0)]) > base  # probes add their passes


def test_a_dataset_fallback_is_estimated_for_the_dataset_used(tmp_path):
    # CIFAR-10 is absent here (the test data dir is empty): the config falls back to Fashion-MNIST,
    # whose 28x28 images cost less than CIFAR-10's 32x32 would
    cfg = TrainConfig(dataset="cifar10", data_fallback=True, model="convnet", widths=(4, 4), steps=20,
                      batch_size=16, eval_every=10, eval_subset=50, probe_schedule="none")
    exp = Experiment(name="fb", description="", base=cfg, variants={"a": {}})
    planned = plan_runs(exp, "smoke", out=tmp_path)
    before = planned[0].est_seconds
    tasks = check_configs(planned, str(tmp_path), exp.run_cost)
    used = tasks[0].name
    assert used != "cifar10"
    assert planned[0].est_seconds == pytest.approx(exp.run_cost(dataclasses.replace(cfg, dataset=used)))
    assert planned[0].est_seconds != before


def test_every_norm_factor_names_a_norm_and_a_model_the_estimate_knows():
    """A factor under a name the factory does not know (e.g. "noisy" for "noisy_batch") would never
    apply: the step would silently get the default factor."""
    from bnlab.norm import norm_names
    from bnlab.train import cost

    for model, factors in cost._NORM_FACTOR.items():
        assert model in cost._REFERENCE_MS
        unknown = set(factors) - set(norm_names())
        assert not unknown, f"{model}: {sorted(unknown)} are not norm names"


def test_dln_step_cost_orders_the_norms_as_measured():
    """The DLN's per-step estimate: 25 layers scale linearly with depth and batch; BN costs more than
    none and ℓp more than BN (bench/dln_engine.py measures the numbers)."""
    from bnlab.experiments import get_experiment

    cfg = get_experiment("santurkar_dln").configs("quick")["standard"]
    ms = {n: ms_per_step(dataclasses.replace(cfg, norm=n)) for n in ("none", "batch", "l1", "l2", "linf")}
    assert ms["none"] < ms["batch"] < ms["l1"] < ms["l2"] < ms["linf"]
    deeper = ms_per_step(dataclasses.replace(cfg, depth=50)) - 0.3
    assert deeper == pytest.approx(2 * (ms["none"] - 0.3))
