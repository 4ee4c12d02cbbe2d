"""Optional TensorBoard logging (``bnlab run ... --tensorboard``): scalars and activation histograms.

Event files go to ``<run_dir>/tb/``. The metrics.jsonl stays the record of truth; TensorBoard is a
live view. On resume, ``purge_step`` drops the events after the checkpoint so the curves do not
fold back on themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError


def tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except Exception:
        return False
    return True


def require_tensorboard() -> None:
    if not tensorboard_available():
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or run without --tensorboard)")


class TensorBoardLogger:
    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step or None)

    def scalars(self, step: int, prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and key not in ("step", "n"):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def activation_histograms(self, step: int, model: nn.Module, x: Tensor) -> None:
        """Histograms of every nonlinearity's input on the probe batch (the model is guarded by the
        caller, so the forward pass in train mode does not move BN running statistics)."""
        layers = getattr(model, "nonlinearity_inputs", None)
        if layers is None:
            return
        captured: dict[str, Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0].detach()))
                 for name, m in layers().items()]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        for name, value in captured.items():
            self.writer.add_histogram(f"activations/{name}", value.float().flatten(), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
