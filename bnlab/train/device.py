"""Where a run computes: ``--device auto`` (default: the first CUDA GPU when torch sees one, else the
CPU), ``cpu``, ``cuda`` or ``cuda:N``.

The device is how a run is computed, not what it computes: it is not part of the config or of the run
directory's hash, and it is recorded in the run's env.json. Runs on a GPU are not bit-reproducible
(cuDNN picks its algorithms, some of them non-deterministic); on the CPU they are. A run resumed on
another device continues from its checkpoint's weights, but not bit for bit, and a noisy-BN layer
then draws a new noise stream (a generator's state does not carry between devices; see
``bnlab.norm.noisy``): finish a run where it started. The data of a run (at most CIFAR-10, 180 MB in float32) is moved to the device
once, so batches are slices of device tensors.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from bnlab.errors import ConfigError

__all__ = ["DEVICE_CHOICES", "describe_device", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str | None = "auto") -> torch.device:
    """The device ``name`` means on this machine; ``None`` and "auto" choose CUDA when available.

    Raises ConfigError for a name that is not one of auto, cpu, cuda, cuda:N, or a CUDA device that
    this torch build or machine does not have (naming what it has and the fix)."""
    text = "auto" if name is None else str(name).strip().lower()
    if not _PATTERN.match(text):
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_CHOICES}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible to torch"
        raise ConfigError(f"--device {text}: CUDA is not available here ({build}); use --device cpu, or "
                          "--device auto to use a GPU only where there is one")
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def describe_device(device: torch.device) -> dict[str, Any]:
    """What env.json records about ``device``: its name and, for CUDA, the GPU's name and memory."""
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info
