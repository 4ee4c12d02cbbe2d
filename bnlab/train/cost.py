"""Cost estimates printed before a run (and compared with --max-minutes): steps x ms/step + extras.

The per-step times are measurements on the project's reference machine (2 CPU cores, torch 2.13,
one intra-op thread unless noted; our pilot runs and bench/train_throughput.py), scaled by the obvious
factors (batch size, width^2, pixels). They are estimates to decide "seconds, minutes or hours", not
promises; ``--max-minutes`` refuses a run whose estimate exceeds it before anything starts.
"""

from __future__ import annotations

import math
from typing import Iterable

from bnlab.train.config import TrainConfig

# model -> (ms per step at the reference batch, reference batch, reference pixels), norm="batch",
# measured with bench/train_throughput.py-style loops on 2 busy cores, 1 thread (±30 %).
_REFERENCE_MS = {
    "ioffe_mlp": (1.1, 60, 784),  # 784-100-100-100-10 with bnlab BN; no norm: x0.5
    "convnet": (80.0, 128, 784),  # widths 32-64-64 on 28x28 (pilot: 65-95 ms, 2 threads)
    "vgg11": (95.0, 128, 1024),  # width 1/4 on 32x32 (channels_last: ~0.8x)
    "vgg16": (140.0, 128, 1024),  # width 1/4 on 32x32
    "dln": (3.5, 1000, 10),  # 25 x 10x10, float64, no norm (BN: x4, pilot runs)
}
_FIXED_OVERHEAD_MS = 0.15  # Python + optimizer per step, independent of size
_TEST_SIZE = {"mnist": 10000, "fashion_mnist": 10000, "cifar10": 10000, "digits": 360}
_PIXELS = {"mnist": 784, "fashion_mnist": 784, "cifar10": 1024, "digits": 64}


def ms_per_step(cfg: TrainConfig, batch: int | None = None) -> float:
    """Estimated milliseconds of one forward+backward+update on ``batch`` examples."""
    batch = cfg.batch_size if batch is None else batch
    ref_ms, ref_batch, ref_pixels = _REFERENCE_MS.get(cfg.model, (10.0, 128, 784))
    scale = batch / ref_batch
    if cfg.model in ("vgg11", "vgg16"):
        scale *= ((cfg.width or 1.0) / 0.25) ** 2 * _PIXELS.get(cfg.dataset, ref_pixels) / ref_pixels
    elif cfg.model == "convnet":
        w = cfg.widths or (32, 64, 64)
        ref = 32 * 64 + 64 * 64
        scale *= max(sum(a * b for a, b in zip(w, w[1:])), w[0]) / ref
        scale *= _PIXELS.get(cfg.dataset, ref_pixels) / ref_pixels
    elif cfg.model == "dln":
        scale *= (cfg.depth or 25) / 25
        if cfg.norm != "none":
            scale *= 4.0
    elif cfg.model == "ioffe_mlp" and cfg.norm == "none":
        scale *= 0.5
    if cfg.dtype == "float64" and cfg.model != "dln":
        scale *= 2.0
    if cfg.channels_last and cfg.model in ("vgg11", "vgg16", "convnet"):
        scale *= 0.8
    return _FIXED_OVERHEAD_MS + ref_ms * scale


def run_seconds(cfg: TrainConfig, probe_costs: Iterable[tuple[int, float]] = (), start_step: int = 0) -> float:
    """Estimated seconds for the steps ``start_step..cfg.steps`` of a run.

    probe_costs: (number of calls, passes per call) for each probe.
    """
    step_ms = ms_per_step(cfg)
    per_example_fwd = (step_ms - _FIXED_OVERHEAD_MS) / cfg.batch_size / 3.0  # forward ~ 1/3 of a step
    remaining = max(cfg.steps - start_step, 0)
    n_eval = cfg.eval_subset or _TEST_SIZE.get(cfg.dataset, 10000)
    evals = remaining / cfg.eval_every + 1
    test = _TEST_SIZE.get(cfg.dataset, cfg.regression_n if cfg.dataset == "gaussian_regression" else 10000)
    ms = remaining * step_ms + evals * n_eval * per_example_fwd + test * per_example_fwd
    frac = remaining / cfg.steps if cfg.steps else 0.0
    probe_step_ms = ms_per_step(cfg, cfg.probe_batch_size)
    for calls, passes in probe_costs:
        ms += calls * frac * passes * probe_step_ms
    return ms / 1000.0 + 0.05  # + building the model and writing files


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s" if seconds >= 1 else "<1s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m" if seconds >= 600 else f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
