"""The allocator's effect on whole training steps: VGG-11 (width 1/4) and the Sec. 4.2 convnet with BN.

Each (policy, model) runs in its own process (an allocator is chosen at process start), the policies
alternate round by round in a shuffled order, so that load from other processes hits them alike,
and the result is the median over rounds of each process's median step time. Policies:

* ``default``: glibc's defaults;
* ``tuned``: bnlab's policy (``bnlab.train.memory``: no mmap'd blocks, freed memory kept);
* ``thp``: glibc's transparent-huge-page tunable (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``);
* ``jemalloc`` / ``tcmalloc``: ``LD_PRELOAD`` of Debian's libjemalloc2 / libtcmalloc-minimal4 (when
  installed).

    python bench/memory_policy.py [--rounds 3] [--steps 12] [--threads 2]

The last line is ``vgg_tuned_speedup: <default step time / tuned step time>``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
PRELOADS = {"jemalloc": LIBDIR / "libjemalloc.so.2", "tcmalloc": LIBDIR / "libtcmalloc_minimal.so.4"}


def policies() -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bnlab.train.memory import POLICY_ENV

    out = {"default": {}, "tuned": dict(POLICY_ENV), "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}}
    for name, lib in PRELOADS.items():
        if lib.exists():
            out[name] = {"LD_PRELOAD": str(lib)}
    return out


def child(model_name: str, steps: int, threads: int) -> None:
    import torch

    from bnlab.train.config import TrainConfig
    from bnlab.train.task import build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_name == "vgg":
        cfg = TrainConfig(dataset="cifar10", model="vgg11", width=0.25, norm="batch", batch_size=128)
    else:
        cfg = TrainConfig(dataset="cifar10", model="convnet", norm="batch", widths=(16, 32, 32), batch_size=128)
    model = build_network(cfg, (3, 32, 32), 10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(cfg.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (cfg.batch_size,))
    times = []
    for step in range(steps + 3):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": statistics.median(times) * 1e3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.steps, args.threads)
        return
    pol = policies()
    root = str(Path(__file__).resolve().parents[1])
    results: dict[tuple[str, str], list[float]] = {}
    rng = random.Random(0)
    for _ in range(args.rounds):
        for model in ("vgg", "convnet"):
            order = list(pol.items())
            rng.shuffle(order)  # no policy always runs first in a round
            for name, env in order:
                full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
                full.update(env, PYTHONPATH=root, BNLAB_MALLOC="default")
                out = subprocess.run([sys.executable, __file__, "--child", model, "--steps", str(args.steps),
                                      "--threads", str(args.threads)], env=full, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{model} {name}: failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                results.setdefault((model, name), []).append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
    print(f"training step, batch 128, {args.threads} thread(s), median of {args.rounds} rounds x {args.steps} steps")
    for model in ("vgg", "convnet"):
        base = statistics.median(results[(model, "default")])
        for name in pol:
            if (model, name) in results:
                ms = statistics.median(results[(model, name)])
                print(f"{model:<8} {name:<9} {ms:8.1f} ms/step   speedup over default {base / ms:5.2f}x")
    vgg = statistics.median(results[("vgg", "default")]) / statistics.median(results[("vgg", "tuned")])
    print(f"vgg_tuned_speedup: {vgg:.3f}")


if __name__ == "__main__":
    main()
