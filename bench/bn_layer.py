"""bnlab BatchNorm2d against torch.nn.BatchNorm2d on (128, 64, 32, 32) float32, same run.

Prints times and ratios (torch time / bnlab time; > 1 means bnlab is faster) for bnlab with its
fused CPU kernels (``bnlab``) and on its composite torch path (``composite``, BNLAB_KERNELS=off: what
bnlab did before the kernels), so before and after come from the same run. The layers are timed
alternately, call by call, so that load from other processes hits all alike; a speedup is the
median of the per-round ratios. The last lines are ``bn_train_fwd_bwd_speedup: <ratio>`` (kernels)
and ``bn_train_fwd_bwd_speedup_composite: <ratio>``.
Usage: python bench/bn_layer.py [--threads N] [--shape N C H W] [--repeats R]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bnlab.norm as bn  # noqa: E402
from bnlab.norm import kernels  # noqa: E402


def interleaved(fns: dict, *, warmup: int = 3, repeats: int = 15) -> tuple[dict, list[float]]:
    """Median time of each candidate, and its per-round ratios torch / candidate."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = {name: [t / b for t, b in zip(times["torch"], ts)] for name, ts in times.items()}
    return {name: statistics.median(ts) for name, ts in times.items()}, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 64, 32, 32])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, c, h, w = args.shape
    x = torch.randn(n, c, h, w)
    grad = torch.randn_like(x)
    layers = {"torch": torch.nn.BatchNorm2d(c), "bnlab": bn.BatchNorm2d(c), "composite": bn.BatchNorm2d(c)}
    modes = {"torch": "auto", "bnlab": "on", "composite": "off"}
    kernels.set_mode("on")
    kernels.available()  # build or load the kernels before timing
    cases = {}

    def train_step(layer, xg):
        xg.grad = None
        layer(xg).backward(grad)

    def train_fwd(layer):
        with torch.no_grad():
            layer(x)

    def eval_fwd(layer):
        with torch.inference_mode():
            layer(x)

    for case, fn, mode in (("train_fwd", train_fwd, True), ("train_fwd_bwd", train_step, True), ("eval_fwd", eval_fwd, False)):
        for layer in layers.values():
            layer.train(mode)

        def call(k, l, xg=None, fn=fn):
            kernels.set_mode(modes[k])
            return fn(l, xg) if fn is train_step else fn(l)

        calls = {k: (lambda k=k, l=l, xg=x.clone().requires_grad_(): call(k, l, xg)) for k, l in layers.items()}
        cases[case] = interleaved(calls, repeats=args.repeats)
    print(f"shape {tuple(args.shape)} float32, threads {args.threads}, torch {torch.__version__}")
    print(f"{'case':<16}{'torch ms':>10}{'bnlab ms':>10}{'speedup':>10}{'composite ms':>14}{'speedup':>10}")
    for case, (med, ratios) in cases.items():
        print(f"{case:<16}{med['torch'] * 1e3:>10.2f}{med['bnlab'] * 1e3:>10.2f}{statistics.median(ratios['bnlab']):>10.2f}"
              f"{med['composite'] * 1e3:>14.2f}{statistics.median(ratios['composite']):>10.2f}")
    print(f"bn_train_fwd_bwd_speedup: {statistics.median(cases['train_fwd_bwd'][1]['bnlab']):.3f}")
    print(f"bn_train_fwd_bwd_speedup_composite: {statistics.median(cases['train_fwd_bwd'][1]['composite']):.3f}")


if __name__ == "__main__":
    main()
