"""Cost of each landscape instrument in forward+backward passes: measured against stated.

For each model, one "pass" is the measured median time of one plain forward+backward of the same
model on the same batch (``torch.autograd.grad`` of the loss, BN in training mode). Each instrument
call is timed between two blocks of plain passes and divided by (its stated cost in passes,
``cost.passes`` of its result) x (the mean of the blocks' medians); the median ratio over repeats is
printed with its range: 1 means the stated cost is exact; the target is 0.75-1.25. Two statements are
compared:

* calibrated (the target): the instrument is called with ``cost_model=calibrate_cost(model, ...)``,
  measured once per model before the instruments are timed (bnlab.measure.calibrate), so the
  statement is the instrument's own count of work (forward, backward, graph-keeping backward,
  double backward, Lanczos vector operations) weighted by what each kind costs on this model.
* generic: the default ``CostModel()`` constants, which no one set fits every model (bnlab.measure.cost):
  a double backward costs about 3 passes on the conv net but about 2 on the MLP, whose pass time is
  per-op overhead, and Lanczos' orthogonalization is a sizeable share of the MLP's Hessian cost.

``ics`` states an upper bound: the backward for G' stops at the probed layer, so layers near the
output cost less than a full pass (on the conv net about 0.7 of the bound).

Calibration is not circular in what it checks: it times single primitives (a pass, a forward, one
Hessian-vector product, one vector operation) and the instruments combine them in counts; it does
check only the counts and the weights of this model, not the generic constants (the generic column
does that). Measured (docs/instruments.md): within 10 % on the conv net (ics 0.7, its bound); 1.2-1.5
calibrated on the Ioffe MLP, whose ~1 ms pass leaves the instruments' per-call overheads dominant.

Usage: python bench/instruments.py [--threads N] [--repeats K] [--calibration-repeats K]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import time_fn  # noqa: E402

from bnlab.measure import (CostModel, along_gradient, calibrate_cost, hessian_eigenvalues, hessian_trace,  # noqa: E402
                           ics)
from bnlab.norm import make_norm  # noqa: E402


def convnet(norm: str = "batch", width: int = 32) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), make_norm(norm, cout, 2), nn.ReLU()]
    return nn.Sequential(*block(3, width), *block(width, width), nn.MaxPool2d(2), *block(width, 2 * width),
                         *block(2 * width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * width * 8 * 8, 10))


def mlp(norm: str = "batch") -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [784, 100, 100, 100]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b, bias=False), make_norm(norm, b, 1), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(100, 10))


def measure(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ics_layers: list[str],
            repeats: int, calibration_repeats: int) -> list[tuple[str, float, float, float, float, float, float]]:
    """Each instrument call is timed between two blocks of plain passes and compared with them, so
    the ratio is immune to the load of a shared machine drifting between measurements."""
    params = [p for p in model.parameters() if p.requires_grad]

    def one_pass() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def timed(fn) -> tuple[float, object]:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    def unit_pass() -> float:
        # the median of 5 passes after one warm-up: the first pass after an instrument runs with cold
        # caches and, on a model whose pass takes a millisecond, would skew the unit by 30 %
        one_pass()
        return statistics.median(timed(one_pass)[0] for _ in range(5))

    time_fn(one_pass, warmup=2, repeats=3)
    batch = (x, y)
    cm = calibrate_cost(model, F.cross_entropy, batch, repeats=calibration_repeats)
    again = calibrate_cost(model, F.cross_entropy, batch, repeats=calibration_repeats)
    drift = max(abs(getattr(again, k) / getattr(cm, k) - 1)
                for k in ("forward", "backward", "graph_backward", "double_backward", "vector_op") if getattr(cm, k) > 0)
    print(f"{name}: a second calibration moments later differs by up to {100 * drift:.0f} % per constant")
    print(f"{name}: {cm.source}\n  forward {cm.forward:.2f}, graph-keeping backward {cm.graph_backward:.2f}, "
          f"double backward {cm.double_backward:.2f}, vector op {cm.vector_op:.2e}, "
          f"basis dot {cm.basis_dot:.2e}, setup {cm.setup:.2f} passes "
          f"(generic: {CostModel().forward:.2f}, {CostModel().graph_backward:.2f}, {CostModel().double_backward:.2f}, "
          f"{CostModel().vector_op:.0f})")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    runs = {
        f"ics({len(ics_layers)} layers)": lambda: ics(model, F.cross_entropy, batch, ics_layers, update=opt,
                                                      cost_model=cm),
        "along_gradient(4 etas)": lambda: along_gradient(model, F.cross_entropy, batch, [0.05, 0.1, 0.2, 0.4],
                                                         cost_model=cm),
        "hessian_eigenvalues(20 it)": lambda: hessian_eigenvalues(model, F.cross_entropy, batch, k=1, max_iter=20,
                                                                  tol=1e-12, cost_model=cm),
        "hessian_trace(10 samples)": lambda: hessian_trace(model, F.cross_entropy, batch, samples=10, cost_model=cm),
    }
    rows = []
    for label, fn in runs.items():
        fn()  # warm-up
        ratios, generic, times = [], [], []
        for _ in range(repeats):
            before = unit_pass()
            t, res = timed(fn)
            after = unit_pass()
            unit = (before + after) / 2
            times.append(t)
            ratios.append(t / (res.cost.passes * unit))
            generic.append(t / (dataclasses.replace(res.cost, model=CostModel()).passes * unit))
        rows.append((f"{name}: {label}", statistics.median(times), res.cost.passes, statistics.median(ratios),
                     statistics.median(generic), min(ratios), max(ratios)))
    print(f"{name}: one forward+backward pass = {time_fn(one_pass, warmup=1, repeats=5) * 1e3:.2f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calibration-repeats", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    rows += measure("convnet w32 BN, (64,3,32,32)", convnet(), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)),
                    ["3", "10", "15"], args.repeats, args.calibration_repeats)
    rows += measure("Ioffe MLP BN, (60,784)", mlp(), torch.rand(60, 784), torch.randint(0, 10, (60,)),
                    ["4", "7", "10"], args.repeats, args.calibration_repeats)
    print(f"\n{'instrument':48s} {'ms':>9s} {'stated passes':>14s} {'measured/stated':>16s} {'(range)':>11s} "
          f"{'(generic)':>10s}")
    worst, worst_generic = 0.0, 0.0
    for label, t, passes, ratio, generic, lo, hi in rows:
        print(f"{label:48s} {t * 1e3:9.2f} {passes:14.2f} {ratio:16.2f} {f'{lo:.2f}-{hi:.2f}':>11s} {generic:10.2f}")
        worst = max(worst, abs(ratio - 1))
        worst_generic = max(worst_generic, abs(generic - 1))
    print(f"\ninstrument_cost_worst_deviation: {worst:.2f} (calibrated; target <= 0.25)")
    print(f"instrument_cost_worst_deviation_generic: {worst_generic:.2f} (generic constants; informational)")


if __name__ == "__main__":
    main()
