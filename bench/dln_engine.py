"""The deep linear network (Santurkar et al. 2018, App. A.1) through bnlab's engine, against a bare loop.

Per variant (standard, bn, l1 by default), in the same process, alternating, best of ``--repeats``:

* ``bare``: the textbook loop: the same model (``build_network`` of the variant's config, float64),
  the same full batch of the same data, ``torch.optim.SGD``, summed MSE; forward, backward, step;
* ``engine``: ``bnlab.train.train_run`` of the experiment's config (``--steps`` updates), per-step
  loss record, evaluation, checkpoints, without probes;
* ``engine+probes``: the same with the experiment's probes (ICS, landscape, modes) on the same
  schedule the quick profile would have at ``--steps`` (their share is larger in a short run: the
  log schedule has 30 points whatever the length).

Prints ms per training step, the ratios engine / bare (1.0 = the engine adds nothing), and the
per-step time the cost estimate assumes (``bnlab.train.cost.ms_per_step``, engine included, probes
not) against the engine's (``engine/est``: 1.0 = the estimate is right). A run's time includes its
set-up and final test pass, a few hundred ms, which a short run spreads over few steps.

    python bench/dln_engine.py [--steps 1000] [--repeats 3] [--variants standard,bn,l1] [--lp-composite | --lp-python]

``--lp-composite`` routes ℓp BN through its composite of torch ops instead of the one-node training
path (``bnlab.norm.lp._LpTrain``; same numbers), to measure what that path saves. ``--lp-python``
keeps the one-node path but runs its operations from Python instead of through the C++ operators
``bnlab::lp_train_``/``lp_backward`` (same numbers), to measure what those save.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from bnlab.experiments import get_experiment
from bnlab.train.cost import ms_per_step
from bnlab.train.loop import RunOptions, RunSpec, train_run
from bnlab.train.task import build_network, build_task, loss_function


def bare_ms(cfg, steps: int) -> float:
    task = build_task(cfg)
    torch.manual_seed(0)
    model = build_network(cfg, task.in_shape, task.num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = loss_function(cfg)
    x, y = task.x_train[: cfg.batch_size], task.y_train[: cfg.batch_size]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return 1000 * (time.perf_counter() - t0) / steps


def engine_ms(exp, variant: str, cfg, probes: bool) -> tuple[float, float]:
    """(ms per step of the whole run, seconds of the run) through train_run."""
    with tempfile.TemporaryDirectory() as out:
        spec = RunSpec(exp.name, variant, 0, "quick", cfg, Path(out) / "run",
                       tuple(exp.probes) if probes else (), exp.build_model, exp.build_task)
        o = train_run(spec, RunOptions(threads=1))
    return 1000 * o.seconds / cfg.steps, o.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="standard,bn,l1")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--lp-composite", action="store_true")
    mode.add_argument("--lp-python", action="store_true")
    args = ap.parse_args()
    from bnlab.norm import lp

    if args.lp_composite:
        lp._fused_applies = lambda *a: False
    if args.lp_python:  # ℓp's operators off, BN's kernels untouched
        lp._kernel_forward = lambda module, x: None
        lp.kernels = type("NoLpKernels", (), {"applies": staticmethod(lambda *a: False)})
    torch.set_num_threads(1)
    exp = get_experiment("santurkar_dln")
    quick = exp.configs("quick")
    print(f"santurkar_dln, {args.steps} steps, 1 thread, torch {torch.__version__}, best of {args.repeats}"
          + (", ℓp composite" if args.lp_composite else ", ℓp from Python" if args.lp_python else ""))
    print(f"{'variant':<10} {'bare ms':>8} {'engine ms':>10} {'+probes ms':>11} {'engine/bare':>12} "
          f"{'+probes/bare':>13} {'est. ms':>8} {'engine/est':>11}")
    for v in args.variants.split(","):
        cfg = dataclasses.replace(quick[v], steps=args.steps)
        b, e, p = [], [], []
        for _ in range(args.repeats):
            b.append(bare_ms(cfg, args.steps))
            e.append(engine_ms(exp, v, cfg, probes=False)[0])
            p.append(engine_ms(exp, v, cfg, probes=True)[0])
        b, e, p = min(b), min(e), min(p)
        est = ms_per_step(quick[v])
        print(f"{v:<10} {b:>8.2f} {e:>10.2f} {p:>11.2f} {e / b:>12.2f} {p / b:>13.2f} {est:>8.2f} {e / est:>11.2f}")


if __name__ == "__main__":
    main()
