"""bnlab BatchNorm2d against torch.nn.BatchNorm2d on (128, 64, 32, 32) float32, same run.

Prints times and ratios (torch time / bnlab time; > 1 means bnlab is faster). The last line is
``bn_train_fwd_bwd_speedup: <ratio>``. Usage: python bench/bn_layer.py [--threads N] [--shape ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import time_fn  # noqa: E402

import bnlab.norm as bn  # noqa: E402


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
    layers = {"torch": torch.nn.BatchNorm2d(c), "bnlab": bn.BatchNorm2d(c)}
    results: dict[str, dict[str, float]] = {}
    for name, layer in layers.items():
        xg = x.clone().requires_grad_()

        def train_step(layer=layer, xg=xg):
            xg.grad = None
            layer(xg).backward(grad)

        def train_fwd(layer=layer):
            with torch.no_grad():
                layer(x)

        layer.train()
        r = {"train_fwd": time_fn(train_fwd, repeats=args.repeats), "train_fwd_bwd": time_fn(train_step, repeats=args.repeats)}
        layer.eval()
        with torch.inference_mode():
            r["eval_fwd"] = time_fn(lambda layer=layer: layer(x), repeats=args.repeats)
        results[name] = r
    print(f"shape {tuple(args.shape)} float32, threads {args.threads}, torch {torch.__version__}")
    print(f"{'case':<16}{'torch ms':>10}{'bnlab ms':>10}{'speedup':>10}")
    for case in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
        t, b = results["torch"][case], results["bnlab"][case]
        print(f"{case:<16}{t * 1e3:>10.2f}{b * 1e3:>10.2f}{t / b:>10.2f}")
    print(f"bn_train_fwd_bwd_speedup: {results['torch']['train_fwd_bwd'] / results['bnlab']['train_fwd_bwd']:.3f}")


if __name__ == "__main__":
    main()
