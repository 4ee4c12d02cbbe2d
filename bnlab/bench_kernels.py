"""``bnlab bench kernels``: bnlab's BN against torch.nn's, layer by layer, in one process.

Candidates: ``torch.nn.BatchNorm{1,2}d``, bnlab with its fused CPU kernels (``kernels``) and bnlab on
its composite torch path (``composite``, what bnlab did before the kernels). Cases: training forward
(no autograd), training forward+backward, eval forward (inference mode). Shapes: (128,64,32,32) and
(256,256,14,14) NCHW, (32,512,7,7) channels_last, and the Ioffe MLP's BatchNorm1d(100) at batch 60.

Method: candidates are called alternately, call by call (small shapes: loops of many calls), so load
from other processes hits them alike; a speedup is the median of the per-round ratios torch/bnlab
(> 1: bnlab faster); times are medians. Two regimes:

* fresh outputs: the process's default allocator, where every large output is new memory whose
  first touch costs page faults (the allocation cost is measured and printed);
* steady loop: after ``bnlab.train.memory.apply_policy()`` (glibc keeps freed memory for reuse), so
  outputs land in warm memory and the time is the kernels' own.

The bandwidth bound of a case is a streaming model of a two-pass implementation, timed on this
machine in the same rounds as the candidates (this machine's memory speed drifts by 2x over
minutes, so a bound timed apart from the candidates is meaningless): a read pass (``x.sum()``) and
a copy pass (``y.copy_(x)`` into a preallocated ``y``); training forward = 1 read (statistics) + 1
copy (normalize); forward + backward adds 2 reads (the two reductions over x and dy) + 1 copy-like
pass that reads 2 and writes 1 (counted as 1 read + 1 copy); eval = 1 copy. With fresh outputs the
bound adds the cost of each fresh output (forward and eval: 1; forward+backward: 2, the output and
the input gradient), timed as a copy into a new tensor allocated as bnlab's kernels allocate theirs
(training outputs ask for transparent huge pages, the eval output does not), minus a copy into an
old one. It is not a hard floor: a kernel that normalizes
a channel while it is still in cache reads it once, not twice, and torch's ``copy_`` is not the
fastest possible pass, so a row can exceed 100 % (the table says so).
Per round: ``of bound`` = bound / bnlab's time and ``max x`` = torch's time / bound, the speedup over
torch.nn of an implementation that ran at the model; medians over the rounds. ``train_fwd`` runs
under ``torch.no_grad()`` (no graph), ``eval_fwd`` under ``torch.inference_mode()``.
``bandwidth_fraction`` = bound / time of bnlab's training forward+backward in the steady loop
(geometric mean over the large shapes); ``*_ceiling`` keys: geometric means of ``max x``.
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import bnlab.norm as bn
from bnlab.norm import kernels

__all__ = ["SHAPES", "run", "main_args", "format_table"]

# (name, shape, memory format); the last one is the small layer.
SHAPES = [
    ("128x64x32x32", (128, 64, 32, 32), torch.contiguous_format),
    ("256x256x14x14", (256, 256, 14, 14), torch.contiguous_format),
    ("32x512x7x7 cl", (32, 512, 7, 7), torch.channels_last),
    ("60x100", (60, 100), torch.contiguous_format),
]
SMALL = "60x100"
CASES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
CANDIDATES = ("torch", "kernels", "composite")
_PASSES = {"train_fwd": (1, 1, 1), "train_fwd_bwd": (4, 2, 2), "eval_fwd": (0, 1, 1)}  # (reads, copies, outputs)


@dataclass
class Row:
    shape: str
    case: str
    regime: str
    ms: dict = field(default_factory=dict)  # candidate -> median ms per call
    speedup: dict = field(default_factory=dict)  # candidate -> median ratio torch / candidate
    bound_ms: float | None = None
    bound_fraction: float | None = None  # median over rounds of bound / bnlab's (kernels) time
    ceiling: float | None = None  # median over rounds of torch's time / bound


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int, warmup: int = 2):
    for _ in range(warmup):
        for fn in fns.values():
            for _ in range(inner):
                fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def _layer(kind: str, shape: tuple[int, ...]):
    c = shape[1]
    cls = (torch.nn if kind == "torch" else bn).__dict__["BatchNorm1d" if len(shape) < 4 else "BatchNorm2d"]
    layer = cls(c)
    with torch.no_grad():  # non-trivial statistics and affine parameters, the same for all
        g = torch.Generator().manual_seed(0)
        layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g))
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return layer


def _calls(case: str, shape, fmt) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    grad = torch.randn(shape).contiguous(memory_format=fmt)
    fns = {}
    for kind in CANDIDATES:
        layer = _layer(kind, shape).train(case != "eval_fwd")
        mode = {"torch": None, "kernels": "on", "composite": "off"}[kind]
        xg = x.clone().requires_grad_()

        def call(layer=layer, mode=mode, xg=xg):
            if mode is not None:
                kernels.set_mode(mode)
            if case == "train_fwd":
                with torch.no_grad():
                    return layer(x)
            if case == "eval_fwd":
                with torch.inference_mode():
                    return layer(x)
            xg.grad = None
            layer(xg).backward(grad)

        fns[kind] = call
    return fns


def measure_bandwidth(shape=(128, 64, 32, 32), repeats: int = 9) -> dict[str, float]:
    """Read and copy bandwidth (GB/s) on a float32 tensor of ``shape`` and the cost (ms) of a fresh
    output of that size: a copy into a new tensor minus a copy into a preallocated one, with the
    default pages and asking for transparent huge pages."""
    x = torch.randn(shape)
    y = torch.empty_like(x)
    t = _interleaved({"read": lambda: x.sum(), "copy": lambda: y.copy_(x),
                      "fresh_copy": lambda: torch.empty_like(x).copy_(x),
                      "fresh_hinted": lambda: _ask_huge_pages(torch.empty_like(x)).copy_(x)}, repeats, 1)
    read, copy, fresh, hinted = (statistics.median(t[k]) for k in ("read", "copy", "fresh_copy", "fresh_hinted"))
    nbytes = x.numel() * x.element_size()
    return {"read_gbps": nbytes / read / 1e9, "copy_gbps": 2 * nbytes / copy / 1e9, "read_ms": read * 1e3,
            "copy_ms": copy * 1e3, "fresh_alloc_ms": max(fresh - copy, 0.0) * 1e3,
            "fresh_alloc_huge_pages_ms": max(hinted - copy, 0.0) * 1e3, "bytes": nbytes}


_HUGE = 1 << 21
_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


def _ask_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """What bnlab's kernels do with a large fresh training output: madvise(MADV_HUGEPAGE) on its 2 MiB-
    aligned interior (a hint; no effect where the OS has no transparent huge pages), unless
    BNLAB_HUGE_PAGES=0 turns the hint off."""
    if sys.platform.startswith("linux") and t.nbytes >= 4 * _HUGE and os.environ.get("BNLAB_HUGE_PAGES") != "0":
        start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
        end = (t.data_ptr() + t.nbytes) & ~(_HUGE - 1)
        if end > start:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return t


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _probes(shape, fresh: bool, huge_pages: bool) -> dict[str, Callable[[], object]]:
    """The passes the bound is made of, timed in the same rounds as the candidates; a fresh output is
    allocated as the kernels allocate it in that case (training outputs ask for huge pages, the eval
    output does not)."""
    x = torch.randn(shape)
    y = torch.empty_like(x)
    probes = {"_read": lambda: x.sum(), "_copy": lambda: y.copy_(x)}
    if fresh and huge_pages:
        probes["_fresh_copy"] = lambda: _ask_huge_pages(torch.empty_like(x)).copy_(x)
    elif fresh:
        probes["_fresh_copy"] = lambda: torch.empty_like(x).copy_(x)
    return probes


def _bound_per_round(case: str, t: dict[str, list[float]]) -> list[float]:
    """The streaming model's seconds per round (see the module docstring: a model, not a hard floor)."""
    reads, copies, outputs = _PASSES[case]
    bounds = []
    for i in range(len(t["_read"])):
        b = reads * t["_read"][i] + copies * t["_copy"][i]
        if "_fresh_copy" in t:
            b += outputs * max(t["_fresh_copy"][i] - t["_copy"][i], 0.0)
        bounds.append(b)
    return bounds


def run(repeats: int = 7, small_repeats: int = 15, threads: int | None = None, shapes=None,
        regimes=("fresh", "steady")) -> dict:
    """All measurements of ``bnlab bench kernels``; returns the JSON-able summary (see the module
    docstring for the keys' meaning). Raises RuntimeError when the kernels cannot be built."""
    from bnlab.train import memory

    if threads is not None:
        torch.set_num_threads(threads)
    previous = kernels.mode()
    kernels.set_mode("on")
    kernels.available()  # build or load before timing
    shapes = SHAPES if shapes is None else shapes
    rows: list[Row] = []
    machine: dict[str, dict] = {}
    try:
        for regime in regimes:
            if regime == "steady":
                memory.apply_policy(force=True)
            machine[regime] = measure_bandwidth()
            for name, shape, fmt in shapes:
                small = name == SMALL
                for case in CASES:
                    fns = _calls(case, shape, fmt)
                    if not small:
                        fns.update(_probes(shape, fresh=regime == "fresh", huge_pages=case != "eval_fwd"))
                    t = _interleaved(fns, small_repeats if small else repeats, 200 if small else 1)
                    row = Row(name, case, regime)
                    for kind in CANDIDATES:
                        row.ms[kind] = statistics.median(t[kind]) * 1e3
                        row.speedup[kind] = statistics.median(a / b for a, b in zip(t["torch"], t[kind]))
                    if not small:
                        bound = _bound_per_round(case, t)
                        row.bound_ms = statistics.median(bound) * 1e3
                        row.bound_fraction = statistics.median(b / k for b, k in zip(bound, t["kernels"]))
                        row.ceiling = statistics.median(a / b for a, b in zip(t["torch"], bound))
                    rows.append(row)
    finally:
        kernels.set_mode(previous)
    return _summary(rows, machine, torch.get_num_threads())


def _summary(rows: list[Row], machine: dict, threads: int) -> dict:
    def pick(case, regime, kind="kernels", small=False):
        return [r.speedup[kind] for r in rows if r.case == case and r.regime == regime and (r.shape == SMALL) == small]

    def ceiling(case, regime):
        return [r.ceiling for r in rows if r.case == case and r.regime == regime and r.ceiling]

    large_steady_fb = [r for r in rows if r.case == "train_fwd_bwd" and r.regime == "steady" and r.shape != SMALL]
    # (no steady regime measured: the fraction is NaN)
    out = {
        "threads": threads,
        "torch": torch.__version__,
        "train_fwd_speedup": _geomean(pick("train_fwd", "fresh")),
        "train_fwd_bwd_speedup": _geomean(pick("train_fwd_bwd", "fresh")),
        "eval_fwd_speedup": _geomean(pick("eval_fwd", "fresh")),
        "train_fwd_speedup_steady": _geomean(pick("train_fwd", "steady")),
        "train_fwd_bwd_speedup_steady": _geomean(pick("train_fwd_bwd", "steady")),
        "eval_fwd_speedup_steady": _geomean(pick("eval_fwd", "steady")),
        "composite_train_fwd_bwd_speedup": _geomean(pick("train_fwd_bwd", "fresh", "composite")),
        "composite_eval_fwd_speedup": _geomean(pick("eval_fwd", "fresh", "composite")),
        "small_layer_fwd_bwd_speedup": _geomean(pick("train_fwd_bwd", "fresh", small=True)),
        "small_layer_train_fwd_speedup": _geomean(pick("train_fwd", "fresh", small=True)),
        "small_layer_eval_fwd_speedup": _geomean(pick("eval_fwd", "fresh", small=True)),
        "bandwidth_fraction": _geomean([r.bound_fraction for r in large_steady_fb if r.bound_fraction]),
        "train_fwd_bwd_speedup_ceiling": _geomean(ceiling("train_fwd_bwd", "fresh")),
        "eval_fwd_speedup_ceiling": _geomean(ceiling("eval_fwd", "fresh")),
        "train_fwd_bwd_speedup_steady_ceiling": _geomean(ceiling("train_fwd_bwd", "steady")),
        "eval_fwd_speedup_steady_ceiling": _geomean(ceiling("eval_fwd", "steady")),
        "machine": machine,
        "rows": [r.__dict__ for r in rows],
    }
    return out


def format_table(summary: dict) -> str:
    lines = [f"bnlab bench kernels: float32, {summary['threads']} thread(s), torch {summary['torch']}; "
             "times are medians (ms), speedup = torch time / candidate time (> 1: faster than torch.nn)"]
    for regime, m in summary["machine"].items():
        lines.append(f"  machine ({regime}): read {m['read_gbps']:.1f} GB/s, copy {m['copy_gbps']:.1f} GB/s, "
                     f"fresh {m['bytes'] / 1e6:.1f} MB output costs {m['fresh_alloc_ms']:.2f} ms "
                     f"({m['fresh_alloc_huge_pages_ms']:.2f} ms asking for huge pages)")
    head = (f"{'regime':<7}{'shape':<15}{'case':<15}{'torch':>9}{'kernels':>9}{'x':>6}{'composite':>10}{'x':>6}"
            f"{'bound':>8}{'of bound':>9}{'max x':>7}")
    lines += ["", head, "-" * len(head)]
    for r in summary["rows"]:
        bound = (f"{r['bound_ms']:8.2f}{r['bound_fraction']:8.0%} {r['ceiling']:7.2f}" if r["bound_ms"]
                 else f"{'':>8}{'':>9}{'':>7}")
        lines.append(f"{r['regime']:<7}{r['shape']:<15}{r['case']:<15}{r['ms']['torch']:9.3f}{r['ms']['kernels']:9.3f}"
                     f"{r['speedup']['kernels']:6.2f}{r['ms']['composite']:10.3f}{r['speedup']['composite']:6.2f}{bound}")
    if any(r["bound_fraction"] and r["bound_fraction"] > 1 for r in summary["rows"]):
        lines.append("(of bound > 100 %: faster than the two-pass streaming model, e.g. a channel normalized while "
                     "still in cache; the bound is a model, not a floor)")
    lines.append("")
    for key in ("train_fwd_speedup", "train_fwd_bwd_speedup", "eval_fwd_speedup", "train_fwd_speedup_steady",
                "train_fwd_bwd_speedup_steady", "eval_fwd_speedup_steady", "composite_train_fwd_bwd_speedup",
                "composite_eval_fwd_speedup", "small_layer_train_fwd_speedup", "small_layer_fwd_bwd_speedup",
                "small_layer_eval_fwd_speedup", "bandwidth_fraction", "train_fwd_bwd_speedup_ceiling",
                "eval_fwd_speedup_ceiling", "train_fwd_bwd_speedup_steady_ceiling", "eval_fwd_speedup_steady_ceiling"):
        lines.append(f"{key}: {summary[key]:.3f}")
    return "\n".join(lines)


def main_args(json_out: bool, repeats: int, threads: int | None, quick: bool) -> int:
    summary = run(repeats=3 if quick else repeats, small_repeats=5 if quick else 15, threads=threads)
    print(json.dumps(summary, indent=1) if json_out else format_table(summary))
    return 0


def register_cli(subparsers) -> None:
    """Add ``bench kernels`` to bnlab's command line (called by bnlab.cli)."""
    p = subparsers.add_parser("bench", help="benchmarks against torch.nn in the same run: bench kernels [--json]")
    p.add_argument("what", choices=("kernels",), help="kernels: BN layers, bnlab vs torch.nn")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--repeats", type=int, default=7, help="rounds per case on the large shapes (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test)")
    p.set_defaults(func=lambda args: main_args(args.json, args.repeats, args.threads, args.quick))
