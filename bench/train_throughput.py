"""Training throughput: bnlab's engine against the compute floor and a DataLoader loop.

Same model (built by the same code), same data tensors, same optimizer, same batch size, same
thread count; measured in the same process, alternating, over ``--repeats`` rounds. Loops:

* ``engine``: ``bnlab.train.train_run`` as the CLI runs it (per-step loss record in metrics.jsonl,
  NaN check, lr schedule, the checkpoint and probe checks; no checkpoint falls due and no probe is
  scheduled), minus evaluation, with bnlab's BN;
* ``plain torch.nn BN``: the compute floor, forward/backward/step over batches sliced beforehand
  (by default one epoch of distinct batches, or the run's steps when fewer: the bytes the engine
  reads, 1000 MLP batches, 188 MB; ``--cycle N`` cycles over N instead, e.g. 200, 37.6 MB, which the
  caches hold better), with the model's BN layers converted to torch.nn's (``bnlab.convert``);
* ``plain bnlab BN``: the same loop with bnlab's BN (bnlab's BN against torch.nn's, all else equal);
* ``plain + gather``: the plain bnlab loop, but each batch gathered at its step by
  ``bnlab.data.Batches`` as the engine does (random rows of the training tensor): the floor of any
  loop that draws fresh shuffled batches, so ``engine / plain + gather`` is the engine's own
  bookkeeping (loss record, NaN check, lr schedule, checkpoint and probe checks);
* ``DataLoader``: the textbook ``for xb, yb in DataLoader(TensorDataset(x, y), batch_size,
  shuffle=True, drop_last=True)`` with the default ``num_workers=0``.

Models: the Ioffe MLP (784-100-100-100-10, sigmoid, BN, batch 60) on Fashion-MNIST (or MNIST), and
VGG-11 at width 1/4 (BN, batch 128) on CIFAR-10 when installed, else random 3x32x32 tensors of the
same size (the throughput does not depend on the pixel values); VGG runs ``max(3, --repeats - 2)``
rounds.

    python bench/train_throughput.py [--threads 1] [--repeats 5] [--quick] [--clock wall|cpu] [--cycle N]

The table gives each loop's median steps/s over the rounds and its ratio to the median of the
torch.nn floor. An overhead of A over B is A's time per step / B's - 1, computed per round (the loops
of one round run back to back, in reversed order every other round, so background load and drift
hit them alike) and reported as the mean over the rounds with a 95 % t-interval of that mean
(``scipy.stats``; it treats rounds as independent, which slow drift of the machine's memory speed
makes optimistic) and the median. The last lines are ``vgg_engine_overhead`` and ``mlp_engine_overhead`` (engine over plain bnlab BN:
same BN, so only the data path and the bookkeeping differ), ``mlp_engine_overhead_vs_torch_floor``
(engine over plain torch.nn BN: the compute floor as the speed target defines it),
``mlp_gather_overhead`` (plain + gather over plain), ``mlp_engine_overhead_over_gather`` (engine over
plain + gather), and without intervals ``mlp_bnlab_vs_torch_bn`` (median over the rounds of plain
bnlab BN steps/s / plain torch.nn BN steps/s) and ``engine_vs_dataloader_speedup`` (ratio of the
medians, Ioffe MLP).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from bnlab.errors import BnlabError
from bnlab.train.config import TrainConfig
from bnlab.train.loop import RunOptions, RunSpec, train_run
from bnlab.train.task import Task, build_network, build_task, loss_function


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = _CLOCKS["wall"]  # --clock cpu: the process's CPU time (one thread), immune to time slices lost to others
_CYCLE: int | None = None  # --cycle: distinct pre-sliced batches the plain loops cycle over (None: one epoch)


def _random_task(shape: tuple[int, ...], n: int) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Task(name="random", requested="random", x_train=x, y_train=y, x_test=x[:500], y_test=y[:500],
                x_eval=x[:500], y_eval=y[:500], x_probe=x[:128], y_probe=y[:128], num_classes=10,
                in_shape=shape, source="torch.rand", note="", is_classification=True)


def _load_or_random(dataset: str, shape: tuple[int, ...], n: int, fallback: bool) -> tuple[Task, str]:
    """The real dataset when installed; else random tensors of its shape and size (the throughput
    does not depend on the pixel values)."""
    try:
        task = build_task(TrainConfig(dataset=dataset, data_fallback=fallback, eval_subset=500,
                                      probe_batch_size=128))
        return task, f"{task.name} ({task.x_train.shape[0]} train images)"
    except BnlabError:
        return _random_task(shape, n), f"random {'x'.join(map(str, shape))} tensors ({dataset} not installed)"


def engine_steps_per_second(cfg: TrainConfig, task: Task, threads: int) -> float:
    """Steady-state steps/s of train_run, timed between progress callbacks (excludes setup and the
    final test-set evaluation)."""
    stamps: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec("bench", "engine", 0, "bench", cfg, Path(tmp) / "run",
                       build_task=lambda c, d: task)
        train_run(spec, RunOptions(threads=threads, progress_every=max(1, cfg.steps // 10)),
                  lambda step: stamps.append((step, _clock())))
    # skip the first tenth (warm-up) and the final callback (after the files are written)
    (s0, t0), (s1, t1) = stamps[1], stamps[-2]
    return (s1 - s0) / (t1 - t0)


def dataloader_steps_per_second(cfg: TrainConfig, task: Task, threads: int) -> float:
    """The same training with the textbook DataLoader loop."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_network(cfg, task.in_shape, task.num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = loss_function(cfg)
    loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=cfg.batch_size,
                        shuffle=True, drop_last=True)
    warmup = max(1, cfg.steps // 10)
    step, t0 = 0, None
    while step < cfg.steps:
        for xb, yb in loader:
            if step == warmup:
                t0 = _clock()
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == cfg.steps:
                break
    return (cfg.steps - warmup) / (_clock() - t0)


def plain_steps_per_second(cfg: TrainConfig, task: Task, threads: int, bn: str, gather: bool = False) -> float:
    """Forward/backward/step over pre-sliced batches (no data path at all): the compute floor.
    ``bn``: "torch" converts the model's BN layers to torch.nn's, "bnlab" keeps bnlab's. With
    ``gather`` each batch is gathered at its step by ``Batches`` instead (the data floor)."""
    from bnlab.data import Batches
    from bnlab.norm import convert

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_network(cfg, task.in_shape, task.num_classes).train()
    if bn == "torch":
        convert(model, to="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    loss_fn = loss_function(cfg)
    batches = Batches(task.x_train, task.y_train, cfg.batch_size, seed=0)
    cycle = len(batches) if _CYCLE is None else _CYCLE
    data = [] if gather else [batches.batch(step) for step in range(min(cfg.steps, cycle))]
    warmup = max(1, cfg.steps // 10)
    t0 = None
    for step in range(cfg.steps):
        if step == warmup:
            t0 = _clock()
        xb, yb = batches.batch(step) if gather else data[step % len(data)]
        loss = loss_fn(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (cfg.steps - warmup) / (_clock() - t0)


def batch_fetch_microseconds(task: Task, batch_size: int, n: int = 2000) -> tuple[float, float]:
    """Time to produce one batch and nothing else: bnlab.data.Batches vs DataLoader(TensorDataset)."""
    from bnlab.data import Batches

    batches = Batches(task.x_train, task.y_train, batch_size, seed=0)
    t0 = _clock()
    for step in range(n):
        batches.batch(step)
    ours = (_clock() - t0) / n * 1e6
    loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=batch_size, shuffle=True,
                        drop_last=True)
    count, t0 = 0, _clock()
    while count < n:
        for _ in loader:
            count += 1
            if count == n:
                break
    return ours, (_clock() - t0) / n * 1e6


def paired(numerator: list[float], denominator: list[float]) -> tuple[float, float | None, float | None, float]:
    """Per-round values ``numerator / denominator - 1``: (mean, low, high, median), low/high a 95 %
    t-interval of the mean (None with fewer than 3 rounds)."""
    values = np.array([a / b - 1.0 for a, b in zip(numerator, denominator)])
    mean, med = float(values.mean()), float(np.median(values))
    if len(values) < 3:
        return mean, None, None, med
    if float(values.std()) == 0.0:
        return mean, mean, mean, med
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high), med


def _fmt(name: str, value: tuple[float, float | None, float | None, float]) -> str:
    mean, low, high, med = value
    if low is None:
        return f"{name}: {mean:.3f} (mean; no interval with fewer than 3 rounds; median {med:.3f})"
    return f"{name}: {mean:.3f} (mean; 95% interval {low:+.3f} to {high:+.3f}; median {med:.3f})"


def compare(label: str, cfg: TrainConfig, task: Task, threads: int, repeats: int) -> dict[str, object]:
    """Median steps/s of each loop (alternating round by round) and the paired per-round overheads;
    prints one line per loop."""
    loops = {
        "engine": lambda: engine_steps_per_second(cfg, task, threads),
        "plain torch.nn BN": lambda: plain_steps_per_second(cfg, task, threads, "torch"),
        "plain bnlab BN": lambda: plain_steps_per_second(cfg, task, threads, "bnlab"),
        "plain + gather": lambda: plain_steps_per_second(cfg, task, threads, "bnlab", gather=True),
        "DataLoader": lambda: dataloader_steps_per_second(cfg, task, threads),
    }
    rates: dict[str, list[float]] = {k: [] for k in loops}
    order = list(loops)
    for r in range(repeats):  # alternate, so background load hits all alike; reversed every other round
        for name in (order if r % 2 == 0 else order[::-1]):
            rates[name].append(loops[name]())
    med: dict[str, object] = {k: statistics.median(v) for k, v in rates.items()}
    floor = med["plain torch.nn BN"]
    print(f"{label} ({repeats} rounds)")
    for name in loops:
        r = med[name]
        print(f"  {name:<20} {r:8.1f} steps/s  {1000 / r:7.2f} ms/step   vs compute floor {r / floor:5.2f}x")
    # Per-round values: each round's loops ran back to back under the same background load.
    # Overhead of A over B = (time per step of A) / (time per step of B) - 1 = rate B / rate A - 1.
    med["ratio bnlab/torch"] = statistics.median(b / t for b, t in zip(rates["plain bnlab BN"],
                                                                       rates["plain torch.nn BN"]))
    med["engine overhead"] = paired(rates["plain bnlab BN"], rates["engine"])
    med["engine overhead vs torch floor"] = paired(rates["plain torch.nn BN"], rates["engine"])
    med["gather overhead"] = paired(rates["plain bnlab BN"], rates["plain + gather"])
    med["engine over gather"] = paired(rates["plain + gather"], rates["engine"])
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as per worker)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default 5; the intervals need 3 or more)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke test of the script)")
    parser.add_argument("--clock", choices=tuple(_CLOCKS), default="wall",
                        help="wall (default) or cpu: the process's CPU time, meaningful with --threads 1 "
                             "on a machine where other processes take the core part of the time")
    parser.add_argument("--cycle", type=int, default=None,
                        help="distinct pre-sliced batches in the plain loops (default: one epoch, "
                             "1000 for the MLP)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu sums the CPU time of all threads; use it with --threads 1")
    if args.cycle is not None and args.cycle < 1:
        parser.error("--cycle must be at least 1")
    global _clock, _CYCLE
    _clock = _CLOCKS[args.clock]
    _CYCLE = args.cycle

    common = dict(eval_subset=500, probe_schedule="none", log_every=1, checkpoint_every=10**9)
    mlp_task, mlp_data = _load_or_random("mnist", (1, 28, 28), 60_000, fallback=True)  # or Fashion-MNIST
    mlp = TrainConfig(dataset=mlp_task.name, model="ioffe_mlp", norm="batch", batch_size=60, lr=0.1,
                      steps=300 if args.quick else 3000, **common)
    mlp = dataclasses.replace(mlp, eval_every=mlp.steps)
    vgg_task, vgg_data = _load_or_random("cifar10", (3, 32, 32), 10_000, fallback=False)
    vgg = TrainConfig(dataset="cifar10", model="vgg11", width=0.25, norm="batch", batch_size=128, lr=0.05,
                      steps=20 if args.quick else 80, **common)
    vgg = dataclasses.replace(vgg, eval_every=vgg.steps)

    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
          f"plain loops cycle over {'one epoch (or the run) of' if _CYCLE is None else _CYCLE} batches")
    print(f"Ioffe MLP data: {mlp_data}; VGG-11 data: {vgg_data}")
    torch.set_num_threads(args.threads)
    ours_us, loader_us = batch_fetch_microseconds(mlp_task, 60)
    print(f"{'batch fetch only (60 x 1x28x28)':<34} Batches {ours_us:6.1f} us/batch   DataLoader "
          f"{loader_us:6.1f} us/batch   ratio {loader_us / ours_us:5.2f}x")
    mlp_rates = compare("Ioffe MLP 784-100x3-10 BN, batch 60", mlp, mlp_task, args.threads, args.repeats)
    vgg_rates = compare("VGG-11 width 1/4 BN, batch 128", vgg, vgg_task, args.threads, max(3, args.repeats - 2))
    print(_fmt("vgg_engine_overhead", vgg_rates["engine overhead"]))
    print(f"mlp_bnlab_vs_torch_bn: {mlp_rates['ratio bnlab/torch']:.3f}")
    print(_fmt("mlp_engine_overhead", mlp_rates["engine overhead"]))
    print(_fmt("mlp_engine_overhead_vs_torch_floor", mlp_rates["engine overhead vs torch floor"]))
    print(_fmt("mlp_gather_overhead", mlp_rates["gather overhead"]))
    print(_fmt("mlp_engine_overhead_over_gather", mlp_rates["engine over gather"]))
    print(f"engine_vs_dataloader_speedup: {mlp_rates['engine'] / mlp_rates['DataLoader']:.2f}")


if __name__ == "__main__":
    main()
