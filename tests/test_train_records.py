"""The bulk training records (bnlab/train/records.py) write the bytes of the per-step version."""
from __future__ import annotations

import json
import math
import random

import torch

from bnlab.train.records import TrainRecords, accuracy_fraction, format_train_line
from bnlab.train.rundir import json_safe


def _per_step_line(record: dict) -> str:
    return json.dumps(json_safe(dict(record)), allow_nan=False, separators=(",", ":"))


def test_accuracy_fraction_is_the_float32_mean_of_the_mask_for_every_count():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 32, 60, 100, 128, 1000):
        for k in range(n + 1):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=g)[:k]] = True  # the ones anywhere, not only first
            assert accuracy_fraction(k, n) == mask.float().mean().item(), (k, n)


def test_format_train_line_matches_json_dumps():
    rng = random.Random(0)
    values = [0.1, 1.0, 1e-300, 5e-324, 1e300, 0.8500000238418579, 2.0 ** 0.5, -0.0, 123456789.123, 3, 0,
              10 ** 20, float("nan"), float("inf"), -float("inf"), True, None, "train", "a b", "é"]
    for _ in range(2000):
        record = {"step": rng.randrange(10 ** 7), "split": "train"}
        for key in ("loss", "acc", "lr"):
            v = rng.choice(values + [rng.random() * 10 ** rng.randint(-20, 20)])
            record[key] = v
        assert format_train_line(record) == _per_step_line(record)
    assert format_train_line({"weird key": 1.5}) == _per_step_line({"weird key": 1.5})
    assert format_train_line({"x": torch.tensor(0.25)}) == _per_step_line({"x": torch.tensor(0.25)})


def test_records_equal_the_per_step_expressions_and_keep_order():
    torch.manual_seed(0)
    written: list[str] = []
    sink = TrainRecords(lambda records, lines: written.extend(lines), classification=True, max_pending=7,
                        max_seconds=math.inf)
    expected = []
    for step in range(30):
        logits = torch.randn(60, 10, requires_grad=True)
        labels = torch.randint(0, 10, (60,))
        if step == 3:
            logits = logits.detach().clone()
            logits[5, :] = float("nan")  # argmax of a NaN row: the same in bulk as per step
        loss = float(torch.rand(()))
        lr = 0.1 * 0.9 ** step
        sink.add(step, loss, lr, logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean().item()
        expected.append(_per_step_line({"step": step, "split": "train", "loss": loss, "acc": acc, "lr": lr}) + "\n")
    assert len(written) == 28  # flushed by count (4 x 7), two pending
    sink.flush()
    assert written == expected


def test_records_with_varying_batch_shapes_and_regression():
    written: list[str] = []
    sink = TrainRecords(lambda records, lines: written.extend(lines), classification=True, max_seconds=math.inf)
    expected = []
    for step, n in enumerate((32, 32, 17)):  # a smaller last batch (drop_last=False)
        logits, labels = torch.randn(n, 3), torch.randint(0, 3, (n,))
        sink.add(step, 1.5, 0.1, logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean().item()
        expected.append(_per_step_line({"step": step, "split": "train", "loss": 1.5, "acc": acc, "lr": 0.1}) + "\n")
    sink.flush()
    assert written == expected
    written.clear()
    reg = TrainRecords(lambda records, lines: written.extend(lines), classification=False)
    reg.add(4, 2.25, 0.5, torch.randn(8, 2), torch.randn(8, 2))
    reg.flush()
    reg.flush()  # nothing pending: nothing written
    assert written == ['{"step":4,"split":"train","loss":2.25,"lr":0.5}\n']


def test_records_copy_their_tensors_and_respect_the_buffer_cap():
    """add() copies the logits and labels (the caller may reuse them); a buffer too small for
    max_pending rows flushes when full; a dtype change flushes first. The lines are the per-step ones."""
    torch.manual_seed(1)
    written: list[str] = []
    row_bytes = 20 * 4 * 4 + 20 * 8  # one record of (20, 4) float32 logits and (20,) int64 labels
    sink = TrainRecords(lambda records, lines: written.extend(lines), classification=True, max_pending=100,
                        max_seconds=math.inf, max_buffer_bytes=3 * row_bytes)
    logits = torch.empty(20, 4)
    labels = torch.empty(20, dtype=torch.int64)
    expected = []
    for step in range(8):
        dtype = torch.float64 if step >= 5 else torch.float32
        logits = logits.to(dtype)
        logits.copy_(torch.randn(20, 4))  # the same tensors, overwritten every step
        labels.copy_(torch.randint(0, 4, (20,)))
        sink.add(step, 0.5, 0.1, logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean().item()
        expected.append(_per_step_line({"step": step, "split": "train", "loss": 0.5, "acc": acc, "lr": 0.1}) + "\n")
        if step == 2:
            assert len(written) == 3  # three rows fit in the buffer: flushed when full
        if step == 5:
            # the float64 record flushed the two float32 ones first; one float64 row fills the cap
            assert len(written) == 6
    sink.flush()
    assert written == expected


def test_records_of_rows_larger_than_the_buffer_grad_labels_and_inference_mode():
    """A row larger than max_buffer_bytes is scored at once (nothing kept); labels that require grad
    build no graph on the buffer; a first add under inference mode leaves a buffer later adds can use."""
    torch.manual_seed(2)
    written: list[str] = []
    sink = TrainRecords(lambda records, lines: written.extend(lines), classification=True, max_pending=100,
                        max_seconds=math.inf, max_buffer_bytes=1000)
    expected = []

    def check(step, logits, labels):
        sink.add(step, 0.25, 0.1, logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean().item()
        expected.append(_per_step_line({"step": step, "split": "train", "loss": 0.25, "acc": acc, "lr": 0.1}) + "\n")

    with torch.inference_mode():
        check(0, torch.randn(5, 3), torch.randint(0, 3, (5,)))  # 5*3*4 + 5*8 = 100 bytes: buffered
    check(1, torch.randn(5, 3), torch.randint(0, 3, (5,)))
    soft = torch.randint(0, 3, (5,)).float().requires_grad_()  # float labels that require grad
    check(2, torch.randn(5, 3), soft * 1)
    assert sink._label_rows is not None and sink._label_rows.grad_fn is None
    check(3, torch.randn(40, 10), torch.randint(0, 10, (40,)))  # 40*10*4 + 320 = 1920 bytes > 1000: at once
    check(4, torch.randn(40, 10), torch.randint(0, 10, (40,)))
    assert sink._logit_rows.shape[1:] == (5, 3)  # nothing of the large rows kept
    check(5, torch.randn(5, 3), torch.randint(0, 3, (5,)))
    sink.flush()
    assert written == expected
