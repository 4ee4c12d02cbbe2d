"""Cost estimates printed before a run (and compared with --max-minutes).

One run costs: loading its data and building its model (``_LOAD_S``), then per training step the
engine's own work (``_ENGINE_MS``: batch gather, learning rate, NaN check, logging) plus the model's
forward+backward+update, plus the evaluations, probes and the final full-test pass. Several runs on
``workers`` processes finish when the busiest worker does (``wall_seconds``: the pool hands the next
run to the first free worker); each worker pays its start-up once (``WORKER_START_S``), and each
experiment its verdict, figures and report section (``EXPERIMENT_OVERHEAD_S``), and ``bnlab
reproduce`` its checks and report (``REPORT_OVERHEAD_S``).

The per-step times are measured on the project's reference machine (2 CPU cores, torch 2.13, one
intra-op thread, two workers busy: the setting of ``bnlab reproduce``) and scaled by the obvious
factors (batch size, widths, pixels). ``bench/cost_model.py`` prints measured / estimated for every
finished run of a runs folder; on the reference machine the Ioffe and DLN runs are within about
±25 % (VGG's numbers are from the throughput benchmark, not from finished runs). They are estimates
to decide "seconds, minutes or hours", not promises; ``--max-minutes`` refuses a run whose estimate
exceeds it before anything starts.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterable, Sequence

from bnlab.train.config import TrainConfig

# model -> (ms per forward+backward+update without normalization, at the reference batch; reference
# batch; reference pixels). Measured in plain loops (bench/train_throughput.py-style) with 1 thread.
_REFERENCE_MS = {
    "ioffe_mlp": (1.1, 60, 784),  # 784-100-100-100-10, sigmoid
    "convnet": (8.1, 32, 784),  # widths 16-32-32 on 28x28 (Ioffe Sec. 4.2 proxy), NCHW
    "vgg11": (100.0, 128, 1024),  # width 1/4 on 32x32
    "vgg16": (145.0, 128, 1024),  # width 1/4 on 32x32
    # 25 x 10x10, float64, full batch: whole 10,000-step runs through the engine (bench/dln_engine.py
    # for the split), probes counted separately below, with bnlab's fused BN kernels and ℓp's one-node
    # training path; the 9.0 ms used before came from runs made before the kernels existed
    "dln": (2.1, 1000, 10),
}
# How much a normalization layer after every hidden layer multiplies the step (same loops).
_NORM_FACTOR = {
    "ioffe_mlp": {"batch": 1.45},
    "convnet": {"batch": 1.35},
    "vgg11": {"batch": 1.3, "noisy_batch": 2.1, "noise_only": 1.8},
    # width 1/8, whole 2000-step quick runs on 2 workers, quiet machine (2026-11-30, bnlab's pool
    # kernel): over the standard net, BN 1.12, noisy BN 1.88 (Algorithm 1 draws two activation-sized
    # random tensors per layer and step), the noise without BN 1.52, ℓ1 1.50, ℓ2 1.53, ℓ∞ 1.90
    "vgg16": {"batch": 1.12, "noisy_batch": 1.88, "noise_only": 1.52, "l1": 1.5, "l2": 1.53, "linf": 1.9},
    # DLN: 24 norm layers on 10 features cost more than the 25 tiny matmuls; ℓp's chain of small ATen
    # calls (from C++) costs about twice BN's one fused kernel call (same quiet quick runs)
    "dln": {"batch": 2.2, "l1": 4.5, "l2": 4.6, "linf": 6.0},
}
_DEFAULT_NORM_FACTOR = 1.3
_CHANNELS_LAST = 0.74  # convnet 16-32-32: 6.0 vs 8.1 ms without BN, 8.0 vs 11.0 with
_ENGINE_MS = 0.3  # per step: batch gather from the training tensor, lr, loss.item(), logging
_LOAD_S = {"digits": 0.3, "fashion_mnist": 1.3, "mnist": 1.3, "cifar10": 3.0, "gaussian_regression": 0.1}
_TEST_SIZE = {"mnist": 10000, "fashion_mnist": 10000, "cifar10": 10000, "digits": 360}
_PIXELS = {"mnist": 784, "fashion_mnist": 784, "cifar10": 1024, "digits": 64}
WORKER_START_S = 4.5  # a spawned worker imports torch and bnlab (~3.8 s alone)
EXPERIMENT_OVERHEAD_S = 8.0  # the verdict, its figures (matplotlib) and the report section
REPORT_OVERHEAD_S = 6.0  # bnlab reproduce: checking every dataset and model first, then the HTML report


def ms_per_step(cfg: TrainConfig, batch: int | None = None) -> float:
    """Estimated milliseconds of one forward+backward+update on ``batch`` examples, engine included."""
    batch = cfg.batch_size if batch is None else batch
    ref_ms, ref_batch, ref_pixels = _REFERENCE_MS.get(cfg.model, (10.0, 128, 784))
    scale = batch / ref_batch
    if cfg.model in ("vgg11", "vgg16"):
        # linear, not quadratic, in the width: below 1/4 a step is mostly per-op overhead (width 1/8 on
        # 28x28, 2 workers: 57 ms without BN, where the quadratic rule said 28 ms)
        scale *= ((cfg.width or 1.0) / 0.25) * _PIXELS.get(cfg.dataset, ref_pixels) / ref_pixels
    elif cfg.model == "convnet":
        w = cfg.widths or (32, 64, 64)
        ref = 16 * 32 + 32 * 32
        scale *= max(sum(a * b for a, b in zip(w, w[1:])), w[0]) / ref
        scale *= _PIXELS.get(cfg.dataset, ref_pixels) / ref_pixels
    elif cfg.model == "dln":
        scale *= (cfg.depth or 25) / 25
    if cfg.norm != "none":
        scale *= _NORM_FACTOR.get(cfg.model, {}).get(cfg.norm, _DEFAULT_NORM_FACTOR)
    if cfg.dtype == "float64" and cfg.model != "dln":
        scale *= 2.0
    if cfg.channels_last and cfg.model in ("vgg11", "vgg16", "convnet"):
        scale *= _CHANNELS_LAST
    return _ENGINE_MS + ref_ms * scale


def run_seconds(cfg: TrainConfig, probe_costs: Iterable[tuple[int, float]] = (), start_step: int = 0) -> float:
    """Estimated seconds for the steps ``start_step..cfg.steps`` of one run, its data loading,
    evaluations, probes and final test pass included.

    probe_costs: (number of calls, forward+backward passes of a probe batch per call) for each probe.
    """
    step_ms = ms_per_step(cfg)
    per_example_fwd = (step_ms - _ENGINE_MS) / cfg.batch_size / 3.0  # forward ~ 1/3 of a step
    remaining = max(cfg.steps - start_step, 0)
    n_eval = cfg.eval_subset or _TEST_SIZE.get(cfg.dataset, 10000)
    evals = remaining / cfg.eval_every + 1
    test = _TEST_SIZE.get(cfg.dataset, cfg.regression_n if cfg.dataset == "gaussian_regression" else 10000)
    ms = remaining * step_ms + evals * n_eval * per_example_fwd + test * per_example_fwd
    frac = remaining / cfg.steps if cfg.steps else 0.0
    probe_step_ms = ms_per_step(cfg, cfg.probe_batch_size) - _ENGINE_MS
    for calls, passes in probe_costs:
        ms += calls * frac * passes * probe_step_ms
    return ms / 1000.0 + _LOAD_S.get(cfg.dataset, 1.0)


def wall_seconds(run_costs: Sequence[float], workers: int) -> float:
    """Seconds until ``run_costs`` are done on ``workers`` processes, longest first, each run going to
    the first free worker (as the runner's pool submits them), worker start-up included; 0 for none."""
    if not run_costs:
        return 0.0
    n = max(1, min(workers, len(run_costs)))
    free = [0.0] * n
    for c in sorted(run_costs, reverse=True) if n > 1 else run_costs:
        heapq.heapreplace(free, free[0] + c)
    return max(free) + (WORKER_START_S if n > 1 else 0.0)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s" if seconds >= 1 else "<1s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m" if seconds >= 600 else f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
