"""The first touch of fresh memory, with and without asking for transparent huge pages.

bnlab's kernels ask for 2 MiB transparent huge pages (``madvise(MADV_HUGEPAGE)``) on their large
training outputs, not on the eval output. This script shows what that hint costs and saves on the
machine it runs on: each call allocates a fresh float32 tensor of ``--mib`` MiB (as a large kernel
output is allocated) and fills it with a copy (the first touch), in a fresh process, timed call by
call in the order they happen, so start-up effects are visible:

* ``plain``: default 4 KiB pages;
* ``hinted``: the 2 MiB-aligned interior asks for huge pages first (what the kernels do).

It also prints the kernel's THP settings and, over the run, the change in /proc/vmstat's compaction
and THP counters (system-wide: other processes count too; a ``compact_stall`` change of 0 means no
fault waited for memory compaction) and in the free page reporting counters where the kernel has them
(a VM that hands free 2 MiB blocks back to its host: ``reported_kib`` grows when it does; see
``empty_out`` in bnlab/norm/_kernels.cpp for why that matters).

    python bench/huge_pages.py [--threads 2] [--calls 30] [--mib 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_COUNTERS = ("compact_stall", "thp_fault_alloc", "thp_fault_fallback")
_REPORTING = Path("/sys/module/page_reporting/parameters")


def _reporting() -> dict[str, int]:
    """Free page reporting counters (empty where the kernel has none)."""
    out = {}
    for name in ("reported_kib", "passes"):
        try:
            out[name] = int((_REPORTING / name).read_text())
        except (OSError, ValueError):
            pass
    return out


def _vmstat() -> dict[str, int]:
    try:
        lines = Path("/proc/vmstat").read_text().split("\n")
    except OSError:
        return {}
    pairs = (line.split() for line in lines if line)
    return {k: int(v) for k, v in pairs if k in _COUNTERS}


def _setting(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "n/a"


def _child(kind: str, threads: int, calls: int, mib: int) -> None:
    """One fresh process: ``calls`` fresh outputs of one kind, one time (ms) per line."""
    import torch

    from bnlab.bench_kernels import _ask_huge_pages

    torch.set_num_threads(threads)
    x = torch.randn(mib * 2**20 // 4)
    for _ in range(calls):
        t0 = time.perf_counter()
        y = torch.empty_like(x)
        if kind == "hinted":
            _ask_huge_pages(y)
        y.copy_(x)
        print(f"{(time.perf_counter() - t0) * 1e3:.2f}", flush=True)
        del y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the fill (default 2)")
    parser.add_argument("--calls", type=int, default=30, help="fresh outputs per process (default 30)")
    parser.add_argument("--mib", type=int, default=32, help="output size in MiB, at least 32 (default: 32, the "
                                                            "33.6 MB of a (128, 64, 32, 32) float32 tensor)")
    parser.add_argument("--child", choices=("plain", "hinted"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.threads, args.calls, args.mib)
        return
    if args.mib < 32:
        # glibc serves freed blocks below 32 MiB again from its heap (its mmap threshold grows with what is
        # freed), so later calls would reuse warm memory instead of touching fresh pages
        parser.error("--mib must be at least 32: smaller outputs may reuse warm heap memory, not fresh pages")
    if not sys.platform.startswith("linux"):
        sys.exit("huge_pages.py: transparent huge pages are a Linux feature; nothing to measure here")
    if os.environ.get("BNLAB_HUGE_PAGES") == "0":
        sys.exit("huge_pages.py: BNLAB_HUGE_PAGES=0 turns the hint off, so both kinds would be the same; "
                 "unset it to compare")
    print(f"THP enabled: {_setting('/sys/kernel/mm/transparent_hugepage/enabled')}; "
          f"defrag: {_setting('/sys/kernel/mm/transparent_hugepage/defrag')}")
    print(f"{args.calls} fresh {args.mib} MiB outputs per process, filled by a copy with {args.threads} thread(s); "
          "ms per call, in order:")
    before, reported_before = _vmstat(), _reporting()
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for kind in ("plain", "hinted", "plain", "hinted"):  # alternating processes
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--threads", str(args.threads),
                              "--calls", str(args.calls), "--mib", str(args.mib)],
                             check=True, capture_output=True, text=True, env=env).stdout.split()
        times = [float(t) for t in out]
        half = times[len(times) // 2:]
        print(f"  {kind:<6} first {times[0]:6.1f}  median of the first 10 {statistics.median(times[:10]):6.1f}  "
              f"median of the second half {statistics.median(half):6.1f}  max {max(times):6.1f}")
        print("         " + " ".join(f"{t:.1f}" for t in times))
    after, reported_after = _vmstat(), _reporting()
    print("/proc/vmstat change (system-wide): "
          + ", ".join(f"{k} +{after[k] - before[k]}" for k in _COUNTERS if k in after))
    print("free page reporting: " + (", ".join(f"{k} +{reported_after[k] - reported_before[k]}"
                                               for k in reported_after) or "no counters (none on this kernel)"))


if __name__ == "__main__":
    main()
