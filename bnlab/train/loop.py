"""The training loop: one run = one (config, seed) trained to its end, resumable, in one directory.

Step numbering: "step s" is the state after s updates. At each step s = 0..steps the loop does, in
order: checkpoint (every ``checkpoint_every``, s > 0) -> evaluation on the fixed subset (every
``eval_every`` and at the last step) -> probes due at s -> the update at s (if s < steps). After the
last step the full test split is evaluated, then model.pt, arrays.npz and the ``done`` marker are
written. Everything that decides the trajectory (batches, learning rate) is a function of (seed,
step), and the checkpoint carries the model, optimizer, RNG states and probe data, so a resumed run
repeats exactly what an uninterrupted run does (see rundir.py for the metrics file). Bit-identity
holds for a fixed number of torch threads (parallel reductions round differently with another
count), so a resumed run continues with the thread count its checkpoint recorded.

A non-finite training loss ends the run as a *result*: ``{"event": "diverged"}`` is logged at that
step and ``done`` says ``"status": "diverged"``; nothing raises. A classification run that finishes
with a finite loss but predicts at chance level is ``"collapsed"`` (see ``collapse_check``): it is a
finished run with its final numbers, and verdicts count it as a failure to train, next to diverged.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bnlab.data import Batches
from bnlab.errors import ConfigError
from bnlab.norm.sync import SyncBatchNorm, local_statistics
from bnlab.train.config import TrainConfig, config_hash, config_to_dict
from bnlab.train.device import describe_device, resolve_device
from bnlab.train.env import environment
from bnlab.train.probes import ArrayStore, Probe, ProbeContext, _Guard, call_probe, probe_generator
from bnlab.train.records import TrainRecords
from bnlab.train.rundir import (ARRAYS, CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, ENV, METRICS, MODEL, RunDir, RunLock,
                                atomic_torch_save, atomic_write_bytes, read_json, read_metrics)
from bnlab.train.schedule import lr_at
from bnlab.train.task import Task, build_network, build_task, loss_function, per_example_loss_sum


# "Collapsed": the run ended with a finite loss but its final full-test accuracy is within
# COLLAPSE_MARGIN of chance (1/classes). Judged only for runs of at least COLLAPSE_MIN_STEPS updates
# (a 12-step smoke run near chance has not collapsed, it has barely started). The mean training loss
# over the last COLLAPSE_WINDOW of the run is stored next to ln(classes) as a second, diagnostic view
# (a net stuck at chance sits at ln(classes); a confidently wrong one above it).
COLLAPSE_MARGIN = 0.05
COLLAPSE_MIN_STEPS = 100
COLLAPSE_WINDOW = 0.1


@dataclass(frozen=True)
class RunSpec:
    """One run to do: which experiment/variant/seed, the resolved config, and where it lives."""

    experiment: str
    variant: str
    seed: int
    profile: str
    cfg: TrainConfig
    run_dir: Path
    probes: tuple[Probe, ...] = ()
    # Optional replacements for the model/data builders (custom models in an experiment, tests).
    build_model: Callable[[TrainConfig, Task], nn.Module] | None = None
    build_task: Callable[[TrainConfig, str | None], Task] | None = None
    setting: str = ""  # the experiment's robustness setting this run belongs to (stored in config.json)

    @property
    def label(self) -> str:
        return f"{self.variant}/seed{self.seed}"


@dataclass(frozen=True)
class RunOptions:
    """How to run (never what): none of these change a result or a run directory's hash."""

    data_dir: str | None = None
    threads: int | None = None  # torch intra-op threads; None = leave as is
    tensorboard: bool = False
    lock_wait: float | None = None  # None: refuse at once if another process holds the run
    progress_every: int = 0  # call the progress callback every N steps (0 = ~200 times per run)
    device: str | None = None  # auto | cpu | cuda | cuda:N (bnlab.train.device); None = auto
    distributed: bool = False  # train over the ranks of the initialized process group (bnlab.train.ddp)


@dataclass
class RunOutcome:
    run_dir: Path
    variant: str
    seed: int
    status: str  # "done" | "diverged" | "collapsed" | "skipped" (was done) | "locked"
    steps: int = 0
    diverged_step: int | None = None
    test: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: int | None = None
    message: str = ""
    collapse: dict[str, Any] = field(default_factory=dict)


def train_run(spec: RunSpec, options: RunOptions = RunOptions(),
              progress: Callable[[int], None] | None = None) -> RunOutcome:
    """Train ``spec`` to its end in ``spec.run_dir`` (skip if done, resume if a checkpoint exists).

    ``progress(step)`` is called now and then with the current step. Raises RunLockedError if
    another process writes the run (after ``options.lock_wait`` seconds, if set).

    With ``options.distributed`` in rank 0 of a data-parallel job (bnlab.train.ddp): the run is
    trained by every rank; this rank announces it (with its checkpoint) to the others, which train it
    in ``follow_run``, or tells them to skip it when it is done, locked or refused here.
    """
    ranks = _ranks(options)
    announced: list[bool] = []
    try:
        rd = RunDir(spec.run_dir)
        _check_same_config(spec, rd)
        if rd.is_done():
            return _skipped(spec, rd)
        lock = RunLock(rd.path)
        lock.acquire(options.lock_wait)
        try:
            if rd.is_done():  # finished by the process we waited for
                return _skipped(spec, rd)
            if options.threads:
                torch.set_num_threads(options.threads)
            return _train_locked(spec, options, rd, progress, ranks, announced)
        finally:
            rd.close_metrics()
            lock.release()
    finally:
        if ranks is not None and not announced:
            from bnlab.train.ddp import run_key

            ranks.send({"run": run_key(spec), "skip": True})


def follow_run(spec: RunSpec, options: RunOptions, ranks: Any, checkpoint: dict[str, Any] | None) -> None:
    """A rank other than 0 trains its slice of ``spec`` in lock-step with rank 0, from rank 0's
    ``checkpoint`` (None: from the start); it writes nothing (bnlab.train.ddp)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    _train_locked(spec, options, None, None, ranks, [], checkpoint)


def _ranks(options: RunOptions) -> Any:
    if not options.distributed:
        return None
    from bnlab.train.ddp import current

    ranks = current()
    if ranks is None:
        raise ConfigError("RunOptions(distributed=True) needs an initialized process group with 2 or more "
                          "processes; start it with `bnlab run NAME --nproc N`")
    return ranks


def _check_same_config(spec: RunSpec, rd: RunDir) -> None:
    """The directory name carries 8 hex digits of the hash; config.json carries all of it."""
    path = rd.file(CONFIG)
    if path.exists():
        stored = read_json(path).get("config_hash")
        if stored != config_hash(spec.cfg):
            raise ConfigError(f"{path} belongs to another config (hash {str(stored)[:12]}..., this run "
                              f"is {config_hash(spec.cfg)[:12]}...); delete {rd.path} to redo it")


def _skipped(spec: RunSpec, rd: RunDir) -> RunOutcome:
    info = rd.read_done()
    return RunOutcome(rd.path, spec.variant, spec.seed, "skipped", steps=info.get("steps", 0),
                      diverged_step=info.get("diverged_step"), test=info.get("test") or {},
                      message=f"already {info.get('status', 'done')}", collapse=info.get("collapse") or {})


def collapse_check(test_acc: float | None, num_classes: int, steps: int,
                   train_losses: list[float]) -> dict[str, Any]:
    """Whether a finished classification run collapsed to chance, with the numbers behind it.

    collapsed <=> steps >= COLLAPSE_MIN_STEPS and test_acc <= 1/num_classes + COLLAPSE_MARGIN.
    ``train_losses``: the logged training losses of the last COLLAPSE_WINDOW of the run (diagnostic).
    Returns {"collapsed": bool, "rule": str, "test_acc", "chance", "train_loss_window", "ln_classes"}.
    """
    chance = 1.0 / num_classes
    window = float(np.mean(train_losses)) if train_losses else None
    judged = test_acc is not None and steps >= COLLAPSE_MIN_STEPS
    return {
        "collapsed": bool(judged and test_acc <= chance + COLLAPSE_MARGIN),
        "rule": (f"final full-test accuracy <= chance (1/{num_classes}) + {COLLAPSE_MARGIN:g}, judged for "
                 f"runs of >= {COLLAPSE_MIN_STEPS} steps"),
        "test_acc": test_acc, "chance": chance, "train_loss_window": window,
        "ln_classes": math.log(num_classes),
    }


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":  # what draws from the GPU's default generator (dropout) resumes exactly
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.inference_mode()
def evaluate(model: nn.Module, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
             is_classification: bool) -> dict[str, Any]:
    """Mean per-example loss (and accuracy) of ``model`` in eval mode (BN uses running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for i in range(0, x.shape[0], cfg.eval_batch_size):
            xb, yb = x[i:i + cfg.eval_batch_size], y[i:i + cfg.eval_batch_size]
            if cfg.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = model(xb)
            loss_sum += float(per_example_loss_sum(cfg, out, yb))
            if is_classification:
                correct += int((out.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = int(x.shape[0])
    result: dict[str, Any] = {"loss": loss_sum / n}
    if is_classification:
        result["acc"] = correct / n
    result["n"] = n
    return result


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _save_arrays(rd: RunDir, store: ArrayStore) -> None:
    buf = io.BytesIO()
    np.savez(buf, **store.stacked())
    atomic_write_bytes(rd.file(ARRAYS), buf.getvalue())


def _train_locked(spec: RunSpec, options: RunOptions, rd: RunDir | None,
                  progress: Callable[[int], None] | None, ranks: Any = None, announced: list[bool] | None = None,
                  received: dict[str, Any] | None = None) -> RunOutcome | None:
    """Train ``spec`` (rd: its run directory, locked; None on a data-parallel rank other than 0, which
    writes nothing, starts from rank 0's checkpoint ``received`` and returns None)."""
    cfg, seed = spec.cfg, spec.seed
    writer = rd is not None
    t_start = time.perf_counter()
    h = config_hash(cfg)

    # --- data, model, optimizer (deterministic given the seed) ------------------------------------
    device = resolve_device(options.device)
    _seed_everything(seed)
    task = (spec.build_task or build_task)(cfg, options.data_dir)
    if spec.build_model is not None:
        model = spec.build_model(cfg, task)
    else:
        model = build_network(cfg, task.in_shape, task.num_classes)
    # The weights are drawn on the CPU and then moved, so a seed gives the same start on every device.
    model = model.to(device)
    task = task.to(device)
    if ranks is not None:
        from bnlab.norm.sync import convert_sync
        from bnlab.train.ddp import check_batch

        check_batch(ranks, cfg.batch_size)
        model = convert_sync(model)  # same Parameters and buffers: the optimizer below is unchanged
    model.train()
    optimizer = _make_optimizer(cfg, model)
    loss_fn = loss_function(cfg)
    if cfg.batch_size > task.x_train.shape[0]:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {task.x_train.shape[0]} training "
                          f"examples of {task.name}; lower batch_size or raise train_subset")
    batches = Batches(task.x_train, task.y_train, cfg.batch_size, seed)
    probe_plan = {p.name: set(p.steps(cfg)) for p in spec.probes}
    probe_state: dict[str, dict[str, Any]] = {p.name: {} for p in spec.probes}
    store = ArrayStore()

    # --- resume or start ----------------------------------------------------------------------------
    ckpt = rd.load_checkpoint() if writer else received
    nproc = ranks.world if ranks is not None else 1
    start, offset, resumed_from = 0, 0, None
    if ckpt is not None and writer:
        if ckpt.get("config_hash") != h:
            raise ConfigError(
                f"checkpoint {rd.file(CHECKPOINT)} belongs to another config (hash "
                f"{str(ckpt.get('config_hash'))[:8]}, this run is {h[:8]}); delete it to restart this run"
            )
        if ckpt.get("dataset") not in (None, task.name):
            raise ConfigError(
                f"checkpoint {rd.file(CHECKPOINT)} was trained on {ckpt['dataset']} but {task.name} is "
                f"what loads now (dataset fallback); restore the data it used or delete {rd.path}"
            )
        if int(ckpt.get("nproc", 1)) != nproc:
            # Another number of processes sums the batch in another order: not the uninterrupted run.
            was = int(ckpt.get("nproc", 1))
            raise ConfigError(
                f"checkpoint {rd.file(CHECKPOINT)} was written by a run over {was} process(es), this one has "
                f"{nproc}; resume it with " + (f"--nproc {was}" if was > 1 else "no --nproc")
                + f", or delete {rd.path} to restart it")
    if ranks is not None and writer:
        from bnlab.train.ddp import run_key

        ranks.send({"run": run_key(spec), "checkpoint": ckpt})
        announced.append(True)
    if ckpt is not None:
        if ckpt.get("threads") and ckpt["threads"] != torch.get_num_threads():
            # Parallel reductions round differently with another thread count; the continuation
            # uses the count the run started with, so it stays bit-identical to an uninterrupted run.
            torch.set_num_threads(int(ckpt["threads"]))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], device)
        store = ArrayStore(ckpt["store"])
        probe_state.update(ckpt.get("probe_state", {}))
        start, offset, resumed_from = int(ckpt["step"]), int(ckpt["metrics_bytes"]), int(ckpt["step"])
    elif writer:
        for stale in (ARRAYS, MODEL):  # from an older attempt that never checkpointed
            rd.remove(stale)
        meta = {"experiment": spec.experiment, "variant": spec.variant, "seed": seed,
                "profile": spec.profile, "setting": spec.setting, "config_hash": h,
                "config": config_to_dict(cfg)}
        rd.write_json(CONFIG, meta)
    net: nn.Module = model  # what the update step calls: the DistributedDataParallel wrapper over ranks
    if ranks is not None:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are not broadcast each step: synchronized BN already gives every rank the same running
        # statistics, and the constructor makes the ranks start from rank 0's parameters and buffers.
        net = DistributedDataParallel(model, forward_sync_buffers=False)
    if writer:
        env = environment()
        env.update(describe_device(device))
        env["dataset"] = task.describe()
        env["resumed_from"] = resumed_from
        if ranks is not None:
            env["distributed"] = {"nproc": nproc, "backend": "gloo",
                                  "sync_bn_layers": sum(isinstance(m, SyncBatchNorm) for m in model.modules())}
        if resumed_from is not None and rd.file(ENV).exists():  # keep what the earlier attempt ran on
            previous = read_json(rd.file(ENV))
            env["earlier_attempts"] = previous.pop("earlier_attempts", []) + [previous]
        rd.write_json(ENV, env)
        rd.open_metrics(offset)

    tb = None
    if options.tensorboard and writer:
        from bnlab.train.tensorboard import TensorBoardLogger

        tb = TensorBoardLogger(rd.path, purge_step=start if start else None)

    def write_train_records(records: list[dict[str, Any]], lines: list[str]) -> None:
        rd.log_lines(lines)
        if tb is not None:
            for record in records:
                tb.scalars(record["step"], "train", record)

    # The per-step training records wait here and are written in bulk (see records.py); every other
    # write flushes them first, so the file's order is the order of the steps.
    train_records = TrainRecords(write_train_records, task.is_classification)

    def checkpoint(step: int) -> None:
        train_records.flush()
        nbytes = rd.sync_metrics()
        rd.save_checkpoint({
            "format": CHECKPOINT_FORMAT, "step": step, "config_hash": h, "dataset": task.name,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
            "store": store.data, "probe_state": probe_state, "metrics_bytes": nbytes,
            "threads": torch.get_num_threads(), "nproc": nproc,
        })

    def log(record: dict[str, Any]) -> None:
        if not writer:
            return
        train_records.flush()
        rd.log(record)
        if tb is not None:
            prefix = record.get("split") or f"probe/{record.get('probe', 'event')}"
            tb.scalars(record["step"], prefix, record)

    every = options.progress_every or max(1, cfg.steps // 200)
    probe_batch = (task.x_probe, task.y_probe)
    status, diverged_step, diverged_value = "done", None, None

    # --- the loop -------------------------------------------------------------------------------------
    try:
        for step in range(start, cfg.steps + 1):
            if writer and step > start and step % cfg.checkpoint_every == 0:
                checkpoint(step)
            last = step == cfg.steps
            if writer and (step % cfg.eval_every == 0 or last):
                # Evaluation, histograms and probes: this process alone (module docstring of bnlab.train.ddp)
                with local_statistics():
                    log({"step": step, "split": "eval", **evaluate(model, cfg, task.x_eval, task.y_eval,
                                                                   task.is_classification)})
                    if tb is not None:
                        guard = _Guard(model)
                        try:
                            tb.activation_histograms(step, model, task.x_probe)
                        finally:
                            guard.restore()
            xb, yb = batches.batch(step)
            if cfg.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, step)
            for probe in spec.probes if writer else ():
                if step in probe_plan[probe.name]:
                    ctx = ProbeContext(step=step, model=model, cfg=cfg, seed=seed, probe_batch=probe_batch,
                                       batch=(xb, yb), task=task, lr=lr, loss_fn=loss_fn,
                                       generator=probe_generator(seed, probe.name, step),
                                       state=probe_state[probe.name], optimizer=optimizer)
                    with local_statistics():
                        scalars, arrays = call_probe(probe, ctx)
                    if scalars:
                        log({"step": step, "probe": probe.name, **scalars})
                    store.add(probe.name, step, arrays)
            if last:
                break

            # The update at ``step``.
            for group in optimizer.param_groups:
                group["lr"] = lr
            if ranks is None:
                out = model(xb)
                loss = loss_fn(out, yb)
                loss_value = loss.item()
            else:
                out, yb, loss, loss_value = _ranked_forward(net, ranks, loss_fn, cfg, xb, yb)
            if not math.isfinite(loss_value):
                status, diverged_step, diverged_value = "diverged", step, str(loss_value)
                log({"step": step, "event": "diverged", "loss": diverged_value, "lr": lr})
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % cfg.log_every == 0:
                if ranks is None:
                    train_records.add(step, loss_value, lr, out, yb)
                else:  # the accuracy over the global batch: a collective, so every rank takes part
                    record: dict[str, Any] = {"step": step, "split": "train", "loss": loss_value}
                    if task.is_classification:
                        record["acc"] = ranks.all_sum((out.argmax(dim=1) == yb).sum()).item() / cfg.batch_size
                    record["lr"] = lr
                    log(record)
            if progress is not None and step % every == 0:
                progress(step)
    except BaseException:
        train_records.flush()  # what a crash of Python leaves is complete up to the failing step
        raise
    train_records.flush()

    # --- the end ------------------------------------------------------------------------------------
    if not writer:
        return None
    test: dict[str, Any] = {}
    collapse: dict[str, Any] = {}
    if status == "done":
        test = evaluate(model, cfg, task.x_test, task.y_test, task.is_classification)
        log({"step": cfg.steps, "split": "test", **test})
        if task.is_classification:
            first = cfg.steps - max(1, int(round(COLLAPSE_WINDOW * cfg.steps)))
            records = _train_records(rd)
            window = [r["loss"] for r in records if r["step"] >= first] or [r["loss"] for r in records[-1:]]
            collapse = collapse_check(test.get("acc"), task.num_classes, cfg.steps, window)
            if collapse["collapsed"]:
                status = "collapsed"
    rd.sync_metrics()
    if tb is not None:
        tb.close()
    _save_arrays(rd, store)
    atomic_torch_save(rd.file(MODEL), model.state_dict())
    seconds = time.perf_counter() - t_start
    done = {"status": status, "steps": diverged_step if status == "diverged" else cfg.steps,
            "diverged_step": diverged_step, "diverged_loss": diverged_value, "test": test,
            "collapse": collapse or None,
            "seconds_last_attempt": round(seconds, 3), "resumed_from": resumed_from,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rd.write_done(done)
    rd.remove(CHECKPOINT)  # model.pt holds the final weights; the optimizer state is no longer needed
    if progress is not None:
        progress(cfg.steps)
    return RunOutcome(rd.path, spec.variant, spec.seed, status, steps=done["steps"],
                      diverged_step=diverged_step, test=test, seconds=seconds, resumed_from=resumed_from,
                      collapse=collapse)


def _ranked_forward(net: nn.Module, ranks: Any, loss_fn: Callable, cfg: TrainConfig, xb: torch.Tensor,
                    yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """This rank's slice of the global batch through the DDP-wrapped model: (its outputs, its targets, its
    weighted loss to backpropagate, the global batch's loss). The weight makes DDP's gradient average
    the global batch's gradient; the global loss is the sum over ranks of the weighted losses / W."""
    from bnlab.train.ddp import local_loss_weight

    lo, hi = ranks.slice(xb.shape[0])
    x_local, y_local = xb[lo:hi], yb[lo:hi]
    out = net(x_local)
    loss = loss_fn(out, y_local) * local_loss_weight(ranks, hi - lo, xb.shape[0], cfg.loss_reduction)
    total = ranks.all_sum(loss.detach().double()) / ranks.world
    return out, y_local, loss, float(total)


def _train_records(rd: RunDir) -> list[dict[str, Any]]:
    """The training-loss records written so far (finite losses only)."""
    return [r for r in read_metrics(rd.file(METRICS))
            if r.get("split") == "train" and isinstance(r.get("loss"), (int, float))]
