"""The per-step training records of metrics.jsonl, produced without per-step Python and torch churn.

A training record is ``{"step", "split": "train", "loss", "acc" (classification), "lr"}`` for every
``log_every``-th update. Written naively, each record costs more than a small model's whole update
on a CPU (the Ioffe MLP: an argmax/compare/cast/mean/item chain of tiny torch ops, ``json.dumps``,
a ``write`` and a ``flush`` per step, about 0.15 ms of a 1.6 ms step). ``TrainRecords`` keeps what a
record needs and does the rest in bulk:

* per step it stores the loss (a Python float the loop reads anyway for its divergence check), the
  learning rate, and copies the logits and the batch's labels into one preallocated buffer (a row per
  pending record; a new buffer, after a flush, when their shape, dtype or device changes). Copies,
  not references: up to ``max_pending`` kept outputs would pin as many allocations (and memory that
  grows with the output size), so a step's tensors could not reuse what the step before freed. The
  buffer holds at most ``max_buffer_bytes``; a record whose row alone is larger (say, segmentation
  logits) gets its accuracy computed at once by the per-step expression, and nothing is kept;
* at a flush it computes every pending accuracy with one ``argmax``/compare/sum over the buffer, and
  writes the lines with one ``write`` through ``RunDir.log_lines``.

The bytes written are those of the per-step version: the accuracy of ``k`` correct out of ``n`` is
the float32 mean that ``(pred == y).float().mean().item()`` gives (computed once per ``(k, n)`` by
exactly that torch expression and cached), and a line is ``json.dumps`` of the record (a faster
formatter is used only where it produces the same text, see ``format_train_line``).

The loop flushes before every other record (evaluation, probes, events), before a checkpoint's
fsync, when ``max_pending`` records wait (or the buffer, at most ``max_buffer_bytes``, is full), when
``max_seconds`` have passed since the last flush (so
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
def accuracy_fraction(correct: int, total: int, device: str = "cpu") -> float:
    """``correct / total`` exactly as the float32 ``(pred == y).float().mean().item()`` rounds it on
    ``device`` (a device's mean may divide or multiply by 1/total, which round differently).

    Computed by that torch expression on a mask with ``correct`` ones (a float32 sum of 0/1 values
    is exact below 2**24, so only the count matters, not where the ones are), then cached."""
    mask = torch.zeros(total, dtype=torch.bool, device=device)
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
                 max_pending: int = 1000, max_seconds: float = 1.0, max_buffer_bytes: int = 16 << 20) -> None:
        self._write = write
        self._classification = classification
        self._max_pending = max_pending
        self._max_seconds = max_seconds
        self._max_buffer_bytes = max_buffer_bytes
        self._steps: list[int] = []
        self._losses: list[float] = []
        self._lrs: list[float] = []
        self._direct: list[float] = []  # accuracies computed at add (rows larger than the buffer)
        # logits and labels of the pending records, row i for record i (allocated at the first add)
        self._logit_rows: torch.Tensor | None = None
        self._label_rows: torch.Tensor | None = None
        self._last_flush = time.monotonic()

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, loss: float, lr: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Queue the record of the update at ``step`` (``logits``: the model output of that update;
        both tensors are copied, so the caller may reuse or free them)."""
        if self._classification:
            logits, labels = logits.detach(), labels.detach()
            rows, label_rows = self._logit_rows, self._label_rows
            per_row = logits.numel() * logits.element_size() + labels.numel() * labels.element_size()
            direct = per_row > self._max_buffer_bytes
            if direct != bool(self._direct) and self._steps:
                self.flush()  # one kind of pending record at a time
            if direct:
                self._direct.append((logits.argmax(dim=1) == labels).float().mean().item())
            else:
                if (rows is None or rows.shape[1:] != logits.shape or rows.dtype != logits.dtype
                        or rows.device != logits.device or label_rows.shape[1:] != labels.shape
                        or label_rows.dtype != labels.dtype or label_rows.device != labels.device):
                    self.flush()  # the pending rows have the old shape: write them first
                    n = max(1, min(self._max_pending, self._max_buffer_bytes // max(per_row, 1)))
                    with torch.inference_mode(False):  # an add under inference mode must not make it read-only
                        rows = self._logit_rows = logits.new_empty((n, *logits.shape))
                        label_rows = self._label_rows = labels.new_empty((n, *labels.shape))
                i = len(self._steps)
                rows[i].copy_(logits)
                label_rows[i].copy_(labels)
        self._steps.append(step)
        self._losses.append(loss)
        self._lrs.append(lr)
        full = (not self._direct and self._logit_rows is not None
                and len(self._steps) >= self._logit_rows.shape[0])
        if len(self._steps) >= self._max_pending or time.monotonic() - self._last_flush >= self._max_seconds or full:
            self.flush()

    def _accuracies(self) -> list[float]:
        if self._direct:
            return self._direct
        n = len(self._steps)
        logits, labels = self._logit_rows[:n], self._label_rows[:n]
        shape, label_shape = logits.shape[1:], labels.shape[1:]
        if len(shape) >= 2 and shape[:1] + shape[2:] == label_shape:
            # (records, batch, ...): argmax over each record's dim 1, as per record; counts are exact
            correct = (logits.argmax(dim=2) == labels).flatten(1).sum(dim=1).tolist()
            return [accuracy_fraction(k, label_shape.numel(), logits.device.type) for k in correct]
        # anything else (labels that broadcast): the per-step expression itself
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
        self._steps, self._losses, self._lrs, self._direct = [], [], [], []
        self._write(records, lines)
