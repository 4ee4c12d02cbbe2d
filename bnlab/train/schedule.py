"""When things happen: the learning rate at step t, and the steps at which probes run.

Both are pure functions of the config and the step, so a resumed run needs no scheduler state: the
learning rate after a restart is the one an uninterrupted run would use at that step.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.errors import ConfigError
from bnlab.train.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for the update at ``step`` (0-based)."""
    if cfg.lr_schedule == "constant":
        lr = cfg.lr
    elif cfg.lr_schedule == "exp":  # smooth exponential decay, Ioffe Sec. 4.2.1 "exponential decay"
        lr = cfg.lr * cfg.lr_decay ** (step / cfg.lr_decay_steps)
    elif cfg.lr_schedule == "step":
        lr = cfg.lr * cfg.lr_decay ** (step // cfg.lr_decay_steps)
    elif cfg.lr_schedule == "cosine":
        lr = cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
    else:  # TrainConfig validates the name; this is a bug guard
        raise ConfigError(f"unknown lr_schedule {cfg.lr_schedule!r}")
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def probe_steps(schedule: str, steps: int, *, every: int = 100, points: int = 20) -> list[int]:
    """Sorted distinct steps in [0, steps] at which a probe runs (a step s = after s updates).

    - "log": about ``points`` log-spaced steps, always including 0 and ``steps``; dense early, where
      the papers' curves change fastest (Santurkar Fig. 4 early training, Ioffe Fig. 1 transients).
    - "every": 0, every, 2*every, ... and ``steps``.
    - "none": no steps.
    """
    if schedule == "none":
        return []
    if schedule == "every":
        if every < 1:
            raise ConfigError(f"probe_every must be >= 1, got {every}")
        return sorted(set(range(0, steps + 1, every)) | {steps})
    if schedule == "log":
        if points < 2:
            return sorted({0, steps})
        # geomspace over 1..steps, rounded; duplicates at the small end collapse, so a few points more
        # are asked for until ``points`` distinct steps exist (or every step is taken).
        for n in range(points, 4 * points + 1):
            raw = np.geomspace(1, max(steps, 1), num=n - 1)
            out = sorted({0, steps} | {int(round(v)) for v in raw})
            if len(out) >= min(points, steps + 1):
                return out
        return out
    raise ConfigError(f"unknown probe schedule {schedule!r}; choose one of: log, every, none")
