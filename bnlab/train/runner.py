"""From "run experiment X at profile P" to finished run directories.

1. plan: expand variants x seeds into RunSpecs (each with its run directory), note which are done
   (skipped), which have a checkpoint (resumed), which are new;
2. check early: load each dataset and build each model once, so an unknown norm, a bad model option
   or a missing dataset fails before any run starts;
3. cost: print the estimate for what is left and refuse if it exceeds --max-minutes;
4. run serially (``threads`` intra-op threads, 2 by default) or in a pool of spawned worker processes
   (one thread each: two single-threaded runs beat one two-threaded run for these small models);
5. print one line per finished run and a summary.

Runs are independent and idempotent, so any number of ``bnlab run`` processes (or machines with
``--shard i/n``) can share an out dir: the per-run lock keeps them from writing the same run.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import textwrap
import queue as queue_mod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from bnlab.errors import BnlabError, ConfigError, RunLockedError
from bnlab.train.config import config_hash
from bnlab.train.cost import EXPERIMENT_OVERHEAD_S, format_seconds, wall_seconds
from bnlab.train.device import resolve_device
from bnlab.train.loop import RunOptions, RunOutcome, RunSpec, train_run
from bnlab.train.progress import Progress
from bnlab.train.rundir import CHECKPOINT, CONFIG, ENV, RunDir, copy_finished_run, read_json, run_dir_path
from bnlab.train.task import build_network, build_task

DEFAULT_SINGLE_RUN_THREADS = 2


@dataclass
class PlannedRun:
    spec: RunSpec
    state: str  # "done" | "resume" | "new" | "copy" (finished in another profile's folder: copied)
    start_step: int = 0
    est_seconds: float = 0.0
    source: Path | None = None  # for "copy": the finished run with the same config hash and seed

    @property
    def computes(self) -> bool:
        """Whether this run trains (new or resumed), as opposed to being done or copied."""
        return self.state in ("new", "resume")


@dataclass
class ExperimentRun:
    """What ``run_experiment`` did; ``run_dirs`` are every planned run's directory (done or not)."""

    experiment: str
    profile: str
    planned: list[PlannedRun]
    outcomes: list[RunOutcome] = field(default_factory=list)

    @property
    def run_dirs(self) -> list[Path]:
        return [p.spec.run_dir for p in self.planned]

    @property
    def locked(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "locked"]


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0,1,2" or "0-4" (inclusive) -> seeds (repeats dropped, order kept). Raises ConfigError for
    anything else, including empty items ("0,,1") and reversed ranges ("4-0")."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ConfigError(f"--seeds has an empty item in {text!r}; write e.g. 0,1,2 or 0-4")
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep and lo else (int(part), int(part))
        except ValueError:
            raise ConfigError(f"--seeds expects integers like 0,1,2 or 0-4, got {text!r}") from None
        if first < 0:
            raise ConfigError(f"--seeds expects non-negative integers like 0,1,2 or 0-4, got {text!r}")
        if last < first:
            raise ConfigError(f"--seeds range {part!r} is reversed; write {last}-{first}")
        seeds.extend(range(first, last + 1))
    return tuple(dict.fromkeys(seeds))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard expects i/n like 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def check_distinct_arms(planned: Sequence[PlannedRun], overrides: Mapping[str, Any] | None, name: str) -> None:
    """--set applies to every variant: refuse one that erases the difference between two planned arms
    (the same config trained twice under two names and compared with itself)."""
    if not overrides:
        return
    seen: dict[tuple[str, str], str] = {}
    for p in planned:
        key = (p.spec.setting or "", config_hash(p.spec.cfg))
        if seen.setdefault(key, p.spec.variant) != p.spec.variant:
            keys = ", ".join(sorted(overrides))
            raise ConfigError(
                f"with --set {keys} the variants {seen[key]!r} and {p.spec.variant!r} of {name} have the same config: "
                f"--set changes every variant, so the comparison between them is gone. To change one arm, run it "
                f"alone (--variants {p.spec.variant} --set ...), or drop that --set key")


def plan_runs(exp: Any, profile: str, *, out: Path | str = "runs", seeds: Sequence[int] | None = None,
              overrides: Mapping[str, Any] | None = None, variants: Sequence[str] | None = None,
              shard: tuple[int, int] | None = None, share_from: Sequence[Path | str] = (),
              settings: Sequence[str] | None = None) -> list[PlannedRun]:
    """Every (setting, variant, seed) run of ``exp`` at ``profile`` with its state and estimated cost.

    Only the ``robust`` profile has more than one setting (the experiment's robustness grid); each
    run's setting is stored in its config.json so verdicts can group by it. ``share_from``: other
    output folders (e.g. the quick profile's, whose runs are robust's primary setting) whose finished
    runs of exactly the same config and seed are copied ("copy") instead of computed again; only for
    a run directory that does not exist yet. ``settings``: a subset of the robustness settings
    ``profile`` runs (ConfigError for a name it does not run). Creates nothing.
    """
    names = exp.setting_names(profile) if hasattr(exp, "setting_names") else [""]
    if settings:
        # a setting's name is long ("He init (init=kaiming)"): accept it in any case, or by the part
        # before its parenthesis when that names one setting
        def match(given: str) -> str:
            low = given.strip().lower()
            hits = [n for n in names if n.lower() == low] or [n for n in names if n.lower().split(" (")[0] == low]
            return hits[0] if len(hits) == 1 else given
        settings = [match(s) for s in settings]
        unknown = [s for s in settings if s not in names]
        if unknown:
            at = (f"at --profile {profile}" if len(names) > 1 else
                  f"at --profile {profile}, which runs only the primary setting (use --profile robust)")
            raise ConfigError(f"experiment {exp.name!r} has no setting(s) {', '.join(map(repr, unknown))} {at}; "
                              f"settings: {'; '.join(getattr(exp, 'settings', None) or names)}")
        names = [s for s in names if s in settings]
    planned = []
    for setting in names:
        configs = exp.configs(profile, overrides, setting) if setting else exp.configs(profile, overrides)
        if variants:
            unknown = [v for v in variants if v not in configs]
            if unknown:
                raise ConfigError(f"experiment {exp.name!r} has no variant(s) {', '.join(unknown)}; "
                                  f"variants: {', '.join(configs)}")
            configs = {v: c for v, c in configs.items() if v in variants}
        if seeds is not None:
            run_seeds = tuple(seeds)
        elif setting:
            run_seeds = exp.default_seeds(profile, setting)
        else:
            run_seeds = exp.default_seeds(profile)
        for variant, cfg in configs.items():
            h = config_hash(cfg)
            for seed in run_seeds:
                run_dir = run_dir_path(out, exp.name, variant, h, seed)
                if any(p.spec.run_dir == run_dir for p in planned):
                    continue  # a setting that leaves this variant unchanged shares its runs
                spec = RunSpec(exp.name, variant, seed, profile, cfg, run_dir, tuple(exp.probes),
                               exp.build_model, exp.build_task, setting=setting)
                planned.append(PlannedRun(spec, "new"))
    if shard is not None:
        i, n = shard
        planned = planned[i::n]
    for p in planned:
        rd = RunDir(p.spec.run_dir)
        if rd.is_done():
            p.state = "done"
        elif rd.file(CHECKPOINT).exists():
            try:
                p.start_step = int(rd.load_checkpoint()["step"])
                p.state = "resume"
            except BnlabError:
                p.state = "resume"  # the run itself reports the corrupt checkpoint with its fix
        elif not p.spec.run_dir.exists():
            h = config_hash(p.spec.cfg)
            for root in share_from:
                src = run_dir_path(root, exp.name, p.spec.variant, h, p.spec.seed)
                if Path(root).resolve() != Path(out).resolve() and RunDir(src).is_done():
                    p.state, p.source = "copy", src
                    break
        p.est_seconds = exp.run_cost(p.spec.cfg, p.start_step) if p.computes else 0.0
    return planned


def confirm_copies(planned: Sequence[PlannedRun], data_dir: str | None,
                   estimate: Callable[[Any, int], float]) -> None:
    """Keep a planned "copy" only if its source really is this run: the source's config.json names the
    same full config hash and seed, and it was trained on the dataset this machine resolves now (a run
    made on a fallback, e.g. Fashion-MNIST for a missing CIFAR-10, is not copied once CIFAR-10 is
    installed, and vice versa). Otherwise the run is trained here ("new", cost ``estimate``)."""
    for p in planned:
        if p.state != "copy" or p.source is None:
            continue
        ok = False
        try:
            meta = read_json(p.source / CONFIG)
            used = (read_json(p.source / ENV).get("dataset") or {}).get("used")
            if meta.get("config_hash") == config_hash(p.spec.cfg) and meta.get("seed") == p.spec.seed:
                task = (p.spec.build_task or build_task)(p.spec.cfg, data_dir)
                ok = used == task.name
        except (OSError, ValueError, BnlabError):
            ok = False  # unreadable source: train it here; a missing dataset is reported by check_configs
        if not ok:
            p.state, p.source = "new", None
            p.est_seconds = estimate(p.spec.cfg, p.start_step)


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """A --data-dir that does not exist is a mistake (a typo would silently fall back otherwise)."""
    if data_dir is None:
        return
    path = Path(data_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"--data-dir {data_dir} {what}; pass the folder that holds the dataset folders "
                          "(e.g. DIR with DIR/mnist/), or leave --data-dir out (`bnlab doctor` shows where "
                          "datasets are looked for)")


def check_configs(planned: Sequence[PlannedRun], data_dir: str | None,
                  estimate: Callable[[Any, int], float] | None = None) -> list[Any]:
    """Load every dataset and build every model once, in this process, before any run starts or
    anything is printed or created; returns the distinct Tasks (for the dataset-fallback notice).

    Catches: unknown dataset/norm/model, missing data, a batch larger than the training set, and
    shape mismatches (one forward pass on two examples). ``estimate(cfg, start_step)`` (the
    experiment's ``run_cost``): re-estimates a run whose dataset falls back to another one (CIFAR-10
    -> Fashion-MNIST changes the pixels and the cost) for the dataset actually used."""
    seen: set[tuple] = set()
    tasks: dict[int, Any] = {}
    for p in planned:
        if not p.computes:
            continue
        cfg, spec = p.spec.cfg, p.spec
        task = (spec.build_task or build_task)(cfg, data_dir)
        tasks.setdefault(id(task), task)
        if estimate is not None and task.name != cfg.dataset and task.requested != task.name:
            p.est_seconds = estimate(replace(cfg, dataset=task.name), p.start_step)
        n_train = int(task.x_train.shape[0])
        if cfg.batch_size > n_train:
            raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {n_train} training examples of "
                              f"{task.name}; lower batch_size (at most {n_train}) or raise train_subset")
        key = (cfg.model, cfg.norm, cfg.activation, cfg.width, cfg.widths, cfg.init, cfg.init_std,
               cfg.head, cfg.depth, cfg.dropout, cfg.dtype, cfg.channels_last, task.in_shape,
               task.num_classes)
        if key in seen or spec.build_model is not None:
            continue
        seen.add(key)
        model = build_network(cfg, task.in_shape, task.num_classes)
        n = min(2, task.x_train.shape[0])
        with torch.no_grad():  # one forward on two examples: catches shape mismatches early
            model.eval()(task.x_train[:n])
    return list(tasks.values())


def fallback_notices(tasks: Sequence[Any]) -> list[str]:
    """One notice per distinct dataset fallback among ``tasks`` (asked for X, used Y, why, how to get
    X), in whole sentences; several tasks with the same fallback (binarized or not, other subsets)
    give one notice. Each run records the same in its env.json."""
    from bnlab.train.task import binarize_note

    by_pair: dict[tuple[str, str], list[str]] = {}
    for t in tasks:
        if t.requested == t.name:
            continue
        sentences = by_pair.setdefault((t.requested, t.name), [])
        note = (t.note or "").strip()
        extra = binarize_note(t.name)
        if extra in note:  # the binarize sentence: once, after the fallback's own
            note = note.replace(extra, "").strip()
            if extra not in sentences:
                sentences.append(extra)
        if note and note not in sentences:
            sentences.insert(0, note)
    lines = []
    for (requested, used), sentences in by_pair.items():
        text = " ".join(sentences) or f"{requested} is not installed; {used} is used instead."
        lines.append(textwrap.fill(f"data: {text} (Recorded in each run.)", width=100,
                                   subsequent_indent="      ", break_on_hyphens=False, break_long_words=False))
    return lines


def _default_threads(workers: int) -> int:
    return 1 if workers > 1 else min(DEFAULT_SINGLE_RUN_THREADS, os.cpu_count() or 1)


# --- worker processes ----------------------------------------------------------------------------------

_progress_queue: Any = None


def _die_with_parent() -> None:
    """Linux: have the kernel send this worker SIGTERM when its parent dies (even by SIGKILL), so a
    killed command leaves no worker training on, holding its run's lock. Best effort elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() == 1:  # the parent died before prctl took effect
                os._exit(1)
        except (OSError, AttributeError):
            pass


def _init_worker(threads: int, progress_queue: Any) -> None:
    global _progress_queue
    _die_with_parent()
    torch.set_num_threads(threads)
    _progress_queue = progress_queue


def _worker_run(index: int, spec: RunSpec, options: RunOptions) -> RunOutcome:
    def report(step: int) -> None:
        _progress_queue.put((index, step))

    try:
        return train_run(spec, options, report)
    except RunLockedError as err:
        return RunOutcome(spec.run_dir, spec.variant, spec.seed, "locked", message=str(err))


# --- printing ----------------------------------------------------------------------------------------

_ROW = "{variant:<18} {seed:>4} {steps:>7} {state:<10} {result}"


def _outcome_row(o: RunOutcome, steps: int) -> str:
    if o.status == "diverged":
        result = f"diverged at step {o.diverged_step}"
    elif o.status == "collapsed":
        result = f"collapsed: test acc {o.test.get('acc', float('nan')):.4f}"
    elif o.status == "locked":
        result = "locked by another process"
    elif o.test.get("acc") is not None:
        result = f"test acc {o.test['acc']:.4f}"
    elif o.test.get("loss") is not None:
        result = f"test loss {o.test['loss']:.4g}"
    else:
        result = ""
    if o.status in ("done", "diverged", "collapsed"):
        result += f" in {format_seconds(o.seconds)}"
    if o.resumed_from:
        result += f" (resumed from the checkpoint at step {o.resumed_from})"
    return _ROW.format(variant=o.variant[:18], seed=o.seed, steps=int(steps), state=o.status, result=result)


def run_experiment(exp: Any, profile: str = "quick", *, out: Path | str = "runs",
                   seeds: Sequence[int] | None = None, overrides: Mapping[str, Any] | None = None,
                   variants: Sequence[str] | None = None, workers: int = 1, threads: int | None = None,
                   max_minutes: float | None = None, quiet: bool = False, tensorboard: bool = False,
                   data_dir: str | None = None, wait: bool = False, shard: tuple[int, int] | None = None,
                   echo: Callable[[str], None] = print, progress: Progress | None = None,
                   announce_data: bool = True, share_from: Sequence[Path | str] = (),
                   settings: Sequence[str] | None = None, device: str | None = None,
                   distributed: bool = False) -> ExperimentRun:
    """Plan, check, estimate, run (see module docstring); runs go to ``out/<experiment>/...``.

    Everything that can be checked is checked before the first line is printed or the first file is
    created (config values, --data-dir, datasets, models, batch size vs data). Raises ConfigError
    past ``max_minutes`` and RunLockedError at the end if some runs were held by another process
    (the others still ran). ``progress``: an outer Progress counting estimated seconds of work
    (``bnlab reproduce``: one over several experiments); without it, and unless ``quiet``, one
    over this experiment's steps. ``announce_data``: print the dataset-fallback notices (False when
    the caller printed them once for several experiments). ``settings``: run only these robustness
    settings (see ``plan_runs``). ``device``: auto (None), cpu, cuda or cuda:N (bnlab.train.device).
    ``distributed``: this is rank 0 of a data-parallel job (``bnlab run --nproc``); each run is
    trained by every rank (bnlab.train.ddp), one run at a time.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if distributed and workers > 1:
        raise ConfigError("--nproc trains one run at a time over its processes; drop --workers")
    if distributed and resolve_device(device).type != "cpu":
        raise ConfigError(f"--nproc trains on CPUs (gloo) for now, not on {resolve_device(device)}; add --device cpu, "
                          "or train on one GPU without --nproc")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    check_data_dir(data_dir)
    resolved = resolve_device(device)  # an unknown or missing device fails before anything is printed
    if tensorboard:
        from bnlab.train.tensorboard import require_tensorboard

        require_tensorboard()
    planned = plan_runs(exp, profile, out=out, seeds=seeds, overrides=overrides, variants=variants, settings=settings,
                        shard=shard, share_from=share_from)
    confirm_copies(planned, data_dir, exp.run_cost)
    todo = [p for p in planned if p.computes]
    copies = [p for p in planned if p.state == "copy"]
    n_resume = sum(p.state == "resume" for p in todo)
    # Data and models first (before any output: a bad value prints nothing, creates nothing); the
    # estimates then know which dataset each run really uses.
    tasks = check_configs(todo, data_dir, exp.run_cost)
    check_distinct_arms(planned, overrides, exp.name)
    serial = sum(p.est_seconds for p in todo)
    parallel = min(workers, max(len(todo), 1))
    wall = wall_seconds([p.est_seconds for p in todo], workers) + (EXPERIMENT_OVERHEAD_S if todo else 0.0)
    if max_minutes is not None and wall > max_minutes * 60:
        raise ConfigError(
            f"estimated {format_seconds(wall)} exceeds --max-minutes {max_minutes:g}; use a smaller "
            f"--profile (smoke, quick), fewer --seeds or --variants, more --workers, or raise --max-minutes"
            + (f" (the estimate is calibrated on CPUs; on {resolved} it is far too high: leave "
               "--max-minutes out there)" if resolved.type != "cpu" else "")
        )
    write = progress.write if progress is not None else echo
    n_done = sum(p.state == "done" for p in planned)
    write(f"{exp.name} [{profile}]: {len(planned)} runs ({n_done} done, "
          + (f"{len(copies)} copied, " if copies else "")
          + f"{n_resume} to resume, {len(todo) - n_resume} new) -> {Path(out) / exp.name}")
    if copies:
        for p in copies:
            copy_finished_run(p.source, p.spec.run_dir, profile=profile, setting=p.spec.setting)
        roots = sorted({str(p.source.parents[2]) for p in copies})
        write(f"copied {len(copies)} finished run(s) with the same config and seed from {', '.join(roots)} "
              "instead of training them again (--no-reuse trains them here)")
    result = ExperimentRun(exp.name, profile, planned)
    if not todo:
        write(f"nothing to do: all {len(planned)} runs are done (delete a run directory to redo it)")
        return result
    write(f"estimated cost: {format_seconds(wall)}"
          + (f" ({format_seconds(serial)} of CPU over {parallel} workers)" if parallel > 1 else "")
          + (f"; computing on {resolved} (the estimate is calibrated on CPUs)" if resolved.type != "cpu" else ""))
    for line in fallback_notices(tasks) if announce_data else ():
        write(line)

    threads = threads or _default_threads(workers)
    options = RunOptions(data_dir=data_dir, threads=threads, tensorboard=tensorboard,
                         lock_wait=math.inf if wait else None, device=str(resolved), distributed=distributed)
    total_steps = sum(p.spec.cfg.steps - p.start_step for p in todo)
    # An outer progress (``bnlab reproduce``) counts estimated seconds of work, since a step of one
    # model can cost 100x a step of another; our own counts steps.
    own = progress is None and not quiet
    weight = [1.0] * len(todo)
    if own:
        progress = Progress(total_steps, desc=exp.name, unit="steps")
        write = progress.write
    elif progress is not None:
        weight = [p.est_seconds / max(1, p.spec.cfg.steps - p.start_step) for p in todo]
    write(_ROW.format(variant="variant", seed="seed", steps="steps", state="status", result="result"))
    done_steps = {i: p.start_step for i, p in enumerate(todo)}

    def advance(i: int, step: int) -> None:
        if progress is not None and step > done_steps[i]:
            progress.update((step - done_steps[i]) * weight[i])
        done_steps[i] = max(done_steps[i], step)

    for p in planned:
        if p.state == "done":
            write(_ROW.format(variant=p.spec.variant[:18], seed=p.spec.seed, steps=p.spec.cfg.steps,
                              state="skipped", result="already done"))
        elif p.state == "copy":
            write(_ROW.format(variant=p.spec.variant[:18], seed=p.spec.seed, steps=p.spec.cfg.steps,
                              state="copied", result=f"from {p.source.parents[2].name}/"))
    try:
        if workers == 1 or len(todo) == 1:
            for i, p in enumerate(todo):
                try:
                    o = train_run(p.spec, options, lambda step, i=i: advance(i, step))
                except RunLockedError as err:
                    o = RunOutcome(p.spec.run_dir, p.spec.variant, p.spec.seed, "locked", message=str(err))
                result.outcomes.append(o)
                write(_outcome_row(o, p.spec.cfg.steps))
        else:
            _run_pool(todo, options, workers, threads, advance, write, result)
    finally:
        if own and progress is not None:
            progress.close()
    _summary(result, echo)
    if result.locked:
        raise RunLockedError(
            f"{len(result.locked)} run(s) are being written by another process, e.g. "
            f"{result.locked[0].message.split(';')[0].replace('run directory ', '')}; the others ran. "
            "Run the same command again when it has finished, or add --wait"
        )
    return result


def _run_pool(todo: list[PlannedRun], options: RunOptions, workers: int, threads: int,
              advance: Callable[[int, int], None], write: Callable[[str], None], result: ExperimentRun) -> None:
    try:
        pickle.dumps([p.spec for p in todo])
    except Exception as err:
        raise ConfigError(f"this experiment cannot be sent to worker processes ({err}); its probes and "
                          "hooks must be module-level functions. Use --workers 1") from None
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    progress_queue = ctx.Queue()
    pool = ctx.Pool(processes=min(workers, len(todo)), initializer=_init_worker,
                    initargs=(threads, progress_queue))
    try:
        # Longest estimated run first (LPT): the last runs to start are the short ones, so workers do
        # not sit idle while one long run finishes alone (3 noisy-BN VGG runs submitted last took
        # 2.3 min of one worker's idle time in a 23-min headline reproduction).
        order = sorted(range(len(todo)), key=lambda i: -todo[i].est_seconds)
        pending = {i: pool.apply_async(_worker_run, (i, todo[i].spec, replace(options, threads=threads)))
                   for i in order}
        while pending:
            try:
                while True:
                    i, step = progress_queue.get(timeout=0.2)
                    advance(i, step)
            except queue_mod.Empty:
                pass
            for i in [i for i, r in pending.items() if r.ready()]:
                o = pending.pop(i).get()  # re-raises a worker's exception here
                advance(i, todo[i].spec.cfg.steps)
                result.outcomes.append(o)
                write(_outcome_row(o, todo[i].spec.cfg.steps))
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _summary(result: ExperimentRun, echo: Callable[[str], None]) -> None:
    counts: dict[str, int] = {}
    for o in result.outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    skipped = sum(p.state == "done" for p in result.planned) + counts.get("skipped", 0)
    parts = [f"{counts.get('done', 0)} done", f"{counts.get('diverged', 0)} diverged",
             f"{counts.get('collapsed', 0)} collapsed",
             f"{skipped} skipped (already done)"]
    copied = sum(p.state == "copy" for p in result.planned)
    if copied:
        parts.append(f"{copied} copied from another profile's folder")
    if counts.get("locked"):
        parts.append(f"{counts['locked']} locked by another process")
    echo(f"{result.experiment}: " + ", ".join(parts))
    for o in result.outcomes:
        if o.status == "diverged":
            echo(f"  {o.variant}/seed{o.seed} diverged at step {o.diverged_step} (loss became non-finite); "
                 "recorded as a result in " + str(o.run_dir))
        elif o.status == "collapsed":
            echo(f"  {o.variant}/seed{o.seed} collapsed: finite loss but test accuracy "
                 f"{o.test.get('acc', float('nan')):.4f} at chance level; recorded as a result in {o.run_dir}")
