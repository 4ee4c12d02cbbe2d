"""The per-step training records of metrics.jsonl, produced without per-step Python and torch churn.

A training record is ``{"step", "split": "train", "loss", "acc" (classification), "lr"}`` for every
``log_every``-th update. Written naively, each record costs more than a small model's whole update
on a CPU (the Ioffe MLP: an argmax/compare/cast/mean/item chain of tiny torch ops, ``json.dumps``,
a ``write`` and a ``flush`` per step, about 0.15 ms of a 1.6 ms step). ``TrainRecords`` keeps what a
record needs and does the rest in bulk:

* per step it stores the loss (a Python float the loop reads anyway for its divergence check), the
  learning rate, a detached reference to the logits and the batch's labels;
* at a flush it computes every pending accuracy with one stacked ``argmax``/compare/sum, and writes
  the lines with one ``write`` through ``RunDir.log_lines``.

The bytes written are those of the per-step version: the accuracy of ``k`` correct out of ``n`` is
the float32 mean that ``(pred == y).float().mean().item()`` gives (computed once per ``(k, n)`` by
exactly that torch expression and cached), and a line is ``json.dumps`` of the record (a faster
formatter is used only where it produces the same text, see ``format_train_line``).

The loop flushes before every other record (evaluation, probes, events), before a checkpoint's
fsync, when ``max_pending`` records wait, when ``max_seconds`` have passed since the last flush (so
``tail -f`` still follows a run), at the end, and when the loop is left by an exception. A SIGKILL
loses at most the unflushed records, which a resume rewrites anyway (it truncates metrics.jsonl to
the checkpoint's byte offset and replays the steps after it).
"""
from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from typing import Any, Callable

import torch

from bnlab.train.rundir import json_safe

__all__ = ["TrainRecords", "accuracy_fraction", "format_train_line"]


@lru_cache(maxsize=4096)
def accuracy_fraction(correct: int, total: int) -> float:
    """``correct / total`` exactly as the float32 ``(pred == y).float().mean().item()`` rounds it.

    Computed by that torch expression on a mask with ``correct`` ones (a float32 sum of 0/1 values
    is exact below 2**24, so only the count matters, not where the ones are), then cached."""
    mask = torch.zeros(total, dtype=torch.bool)
    mask[:correct] = True
    return mask.float().mean().item()


def format_train_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line for ``record``: the text of ``json.dumps(json_safe(record),
    allow_nan=False, separators=(",", ":"))``. Plain ints/strs/finite floats are formatted directly
    (``repr`` of a float is what ``json`` writes); anything else goes through ``json``."""
    parts = []
    for key, value in record.items():
        kind = type(value)
        if kind is float and math.isfinite(value):
            text = float.__repr__(value)
        elif kind is int:
            text = int.__repr__(value)
        elif kind is str and value.isalnum() and value.isascii():
            text = '"' + value + '"'
        else:
            return json.dumps(json_safe(dict(record)), allow_nan=False, separators=(",", ":"))
        if not (type(key) is str and key.isidentifier() and key.isascii()):
            return json.dumps(json_safe(dict(record)), allow_nan=False, separators=(",", ":"))
        parts.append('"' + key + '":' + text)
    return "{" + ",".join(parts) + "}"


class TrainRecords:
    """Pending training records of one run, written in order by ``flush``.

    ``write(records, lines)`` receives the complete records (for other sinks such as TensorBoard) and
    their metrics.jsonl lines (each ending in a newline)."""

    def __init__(self, write: Callable[[list[dict[str, Any]], list[str]], None], classification: bool, *,
                 max_pending: int = 1000, max_seconds: float = 1.0) -> None:
        self._write = write
        self._classification = classification
        self._max_pending = max_pending
        self._max_seconds = max_seconds
        self._steps: list[int] = []
        self._losses: list[float] = []
        self._lrs: list[float] = []
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._last_flush = time.monotonic()

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, loss: float, lr: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Queue the record of the update at ``step`` (``logits``: the model output of that update)."""
        self._steps.append(step)
        self._losses.append(loss)
        self._lrs.append(lr)
        if self._classification:
            self._logits.append(logits.detach())
            self._labels.append(labels)
        if len(self._steps) >= self._max_pending or time.monotonic() - self._last_flush >= self._max_seconds:
            self.flush()

    def _accuracies(self) -> list[float]:
        logits, labels = self._logits, self._labels
        shape, label_shape = logits[0].shape, labels[0].shape
        if (len(shape) >= 2 and shape[:1] + shape[2:] == label_shape and all(t.shape == shape for t in logits)
                and all(t.shape == label_shape for t in labels)):
            # (records, batch, ...): argmax over each record's dim 1, as per record; counts are exact
            pred = torch.stack(logits).argmax(dim=2)
            correct = (pred == torch.stack(labels)).flatten(1).sum(dim=1).tolist()
            total = label_shape.numel()
            return [accuracy_fraction(k, total) for k in correct]
        # anything else (shapes that vary or broadcast): the per-step expression itself
        return [(lg.argmax(dim=1) == lb).float().mean().item() for lg, lb in zip(logits, labels)]

    def flush(self) -> None:
        """Write every pending record (nothing to do when none waits)."""
        self._last_flush = time.monotonic()
        if not self._steps:
            return
        accuracies = self._accuracies() if self._classification else None
        records, lines = [], []
        for i, step in enumerate(self._steps):
            record: dict[str, Any] = {"step": step, "split": "train", "loss": self._losses[i]}
            if accuracies is not None:
                record["acc"] = accuracies[i]
            record["lr"] = self._lrs[i]
            records.append(record)
            lines.append(format_train_line(record) + "\n")
        self._steps, self._losses, self._lrs, self._logits, self._labels = [], [], [], [], []
        self._write(records, lines)
