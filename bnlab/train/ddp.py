"""Data-parallel training of one run over several processes (``bnlab run NAME --nproc N``).

Launched by torchrun (``bnlab.cli`` starts ``torch.distributed.run``; each rank process runs the same
``bnlab run`` command with ``BNLAB_DDP_RANK_ARGV`` set to its arguments). The contract, and why:

- **Same run as one process.** The global batch stays the config's ``batch_size``: every rank draws
  batch s of the same seeded order (``Batches`` is a function of (seed, step)) and keeps its slice,
  rows [r·B/W, (r+1)·B/W) — unequal slices for a batch size that the world size does not divide.
  Every plain BN layer becomes bnlab's ``SyncBatchNorm``, whose statistics are those of the whole
  global batch (exact for unequal slices), and rank r's loss is its mean weighted by its share,
  W·n_r/B (W·1 for ``loss_reduction=sum``): DistributedDataParallel averages gradients over the W
  ranks, so the averaged gradient is the gradient of the mean over the global batch. Parameters,
  running statistics and logged losses equal the single-process run's to float32 rounding (not bit
  for bit: sums are taken in another order). Layers that draw random numbers (dropout, noisy BN)
  would draw them per rank, and BN variants other than plain BN (ghost, renorm, noisy, ℓp) would
  keep per-rank statistics, so ``bnlab run --nproc`` refuses such arms.
- **Rank 0 alone writes** the run directory (lock, config, metrics, checkpoints, results) and prints;
  the other ranks write nothing. A checkpoint is read by rank 0 and sent to the others, so a resumed
  run continues from the same state on every rank (the run directory need not be shared between
  machines).
- **Evaluation and probes run on rank 0 alone**, on the unwrapped model, with synchronized BN in
  ``local_statistics()`` mode (no collective). Running them on every rank in lock-step would repeat
  the same work W times on the same fixed batches for the same numbers; on rank 0 alone they are what
  a single-process run measures. The other ranks meanwhile wait in the next step's first collective.
- **Failures.** A rank that raises or dies ends its process; torchrun's agent (polling every 0.1 s)
  then stops the other ranks (SIGTERM; SIGKILL after torchrun's 30-s grace period for a rank blocked in
  a collective, so within about 30 s) and the command fails with one line naming the rank and its exit
  code or signal (``bnlab.cli``). A rank that stalls without dying makes the others wait up to the process
  group's timeout (torch's default, 30 minutes for gloo), then fail.

Backend: gloo. The engine trains on the CPU (its data and models are CPU tensors), so the ranks are
CPU processes; ``SyncBatchNorm`` itself also runs under nccl on CUDA tensors.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Mapping

import torch.distributed as dist
from torch import Tensor

from bnlab.errors import ConfigError

# Set by the launcher in the environment of each rank process it starts through torchrun: the command's
# arguments as a JSON list. (Not on the rank's command line: torchrun's parser would read an option of
# ours that abbreviates one of its own, e.g. --nproc for --nproc-per-node.)
RANK_PROCESS_ENV = "BNLAB_DDP_RANK_ARGV"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel job."""

    rank: int
    world: int

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run directory and prints; the others only compute."""
        return self.rank == 0

    def slice(self, n: int) -> tuple[int, int]:
        """Rows [lo, hi) of a global batch of ``n`` rows that this rank trains on."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def send(self, message: Mapping[str, Any]) -> None:
        """Rank 0 -> every rank (pickled, as ``broadcast_object_list`` does; our own messages only)."""
        dist.broadcast_object_list([dict(message)], src=0)

    def receive(self) -> dict[str, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, value: Tensor) -> Tensor:
        """The sum over ranks of ``value`` (a detached tensor; returns a new one)."""
        out = value.detach().clone()
        dist.all_reduce(out)
        return out


def current() -> Ranks | None:
    """The data-parallel job this process belongs to, or None (not initialized, or one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Ranks(dist.get_rank(), world) if world > 1 else None


def init_from_env() -> Ranks:
    """Join the job torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` in the
    environment) with the gloo backend. Raises ConfigError if the environment is not torchrun's or the
    rendezvous fails."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"this process was not started by torchrun ({', '.join(missing)} not set); start "
                          "data-parallel runs with `bnlab run NAME --nproc N`")
    try:
        dist.init_process_group("gloo")
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"torch.distributed could not start the process group ({str(err).strip().splitlines()[0]}); "
                          "check --torchrun-args (--rdzv-endpoint host:port reachable from every node)") from None
    return Ranks(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is torch.distributed reporting that the other ranks are gone or unreachable."""
    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        w in text for w in ("gloo", "Connection reset", "Connection closed", "Broken pipe", "timed out", "Timed out"))


def run_key(spec: Any) -> str:
    """A run's name that every rank computes alike: experiment/variant-hash/seedK."""
    return f"{spec.experiment}/{spec.run_dir.parent.name}/{spec.run_dir.name}"


def local_loss_weight(ranks: Ranks, n_local: int, n_global: int, reduction: str) -> float:
    """The factor on this rank's loss (computed with ``reduction`` over its slice) that makes the
    gradient DistributedDataParallel averages over ranks equal the global batch's (module docstring)."""
    return ranks.world * (n_local / n_global if reduction == "mean" else 1.0)


def check_batch(ranks: Ranks, batch_size: int) -> None:
    if batch_size < ranks.world:
        raise ConfigError(f"batch_size={batch_size} is smaller than the {ranks.world} processes: a rank would get no "
                          f"example; use --nproc {batch_size} or fewer, or raise batch_size")


def end(ranks: Ranks | None) -> None:
    """Rank 0: tell the other ranks that no run follows (they return from ``follow``)."""
    if ranks is not None and ranks.writer:
        ranks.send({"end": True})


def follow(specs: Any, options: Any) -> int:
    """Ranks other than 0: train each run rank 0 announces, in its order, until it says "end";
    returns how many runs this rank trained. ``specs``: every RunSpec rank 0 may announce."""
    from bnlab.train.loop import follow_run

    ranks = current()
    if ranks is None or ranks.writer:
        raise ConfigError("follow() is for ranks other than 0 of an initialized data-parallel job")
    by_key = {run_key(s): s for s in specs}
    trained = 0
    while True:
        message = ranks.receive()
        if message.get("end"):
            return trained
        if message.get("skip"):
            continue
        spec = by_key.get(message["run"])
        if spec is None:  # the ranks planned different runs: a bug or different code on the nodes
            raise ConfigError(f"rank {ranks.rank} has no run {message['run']!r} that rank 0 announced; run the "
                              "same bnlab version and command on every node")
        follow_run(spec, options, ranks, message.get("checkpoint"))
        trained += 1


# --- the launcher (the `bnlab run --nproc` process itself) ---------------------------------------------

# torchrun options bnlab sets itself: passing them in --torchrun-args would contradict --nproc or the
# command that each rank runs.
_OWN_OPTIONS = ("--nproc-per-node", "--nproc_per_node", "--standalone", "-m", "--module", "--no-python",
                "--no_python", "--run-path", "--run_path")
_RENDEZVOUS_OPTIONS = ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
                       "--master-addr", "--master_addr", "--master-port", "--master_port")


class DistributedRunError(ConfigError):
    """A rank of a ``--nproc`` run failed (died, was killed, or torch.distributed failed)."""


def torchrun_argv(nproc: int, torchrun_args: str | None) -> list[str]:
    """torchrun's own arguments for ``--nproc`` and ``--torchrun-args`` (shell words), then
    ``-m bnlab.cli`` (which reads its arguments from RANK_PROCESS_ENV): single-node (``--standalone``) unless
    torchrun-args name a rendezvous (``--nnodes``, ``--rdzv-endpoint``, ...). Raises ConfigError for an
    option bnlab sets itself."""
    import shlex

    try:
        extra = shlex.split(torchrun_args or "")
    except ValueError as err:
        raise ConfigError(f"--torchrun-args {torchrun_args!r}: {err}; quote it as one shell word, e.g. "
                          "--torchrun-args \"--nnodes 2 --rdzv-endpoint host:29500\"") from None
    names = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
    own = [n for n in names if n in _OWN_OPTIONS]
    if own:
        raise ConfigError(f"--torchrun-args must not contain {own[0]}: bnlab sets it (processes per node with "
                          "--nproc; the command each process runs is this one)")
    multi_node = any(n in _RENDEZVOUS_OPTIONS for n in names)
    return (([] if multi_node else ["--standalone"]) + ["--nproc-per-node", str(nproc), *extra,
                                                          "-m", "bnlab.cli"])


def failure_cause(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """(rank, failure) of the rank that made a --nproc run fail, from torchrun's ``ChildFailedError.failures``:
    a rank killed by a signal first, then one that exited with an error, earliest first. Exit code 2
    (a bnlab error the rank printed, e.g. a collective that failed because another rank died), 130 and
    -SIGTERM (torchrun stopping the surviving ranks) are consequences, never the cause."""
    def order(item: tuple[int, Any]) -> tuple[int, float, int]:
        rank, f = item
        stopped = f.exitcode in (2, 130, -signal.SIGTERM)
        return (0 if f.exitcode < 0 and not stopped else 1 if not stopped else 2, f.timestamp, rank)

    return min(failures.items(), key=order)


def launch(argv: list[str], nproc: int, torchrun_args: str | None, threads: int) -> int:
    """Run ``bnlab <argv>`` in ``nproc`` processes per node through torchrun (``torch.distributed.run``,
    in this process, as ``python -m torch.distributed.run`` does) and wait for them. Returns 0 when
    every rank finished, 2 when a rank stopped with a bnlab error (which it printed); raises
    DistributedRunError naming the first rank that failed (its exit code or signal), ConfigError when
    torchrun is missing or rejects ``torchrun_args``; KeyboardInterrupt when interrupted."""
    import contextlib
    import io
    import logging
    from pathlib import Path

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed, which --nproc needs; install a torch "
                          "build with it (the standard Linux wheels), or run without --nproc")
    try:
        from torch.distributed import run as torchrun
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError as err:
        raise ConfigError(f"torchrun (torch.distributed.run) cannot be imported ({err}); --nproc needs it: "
                          "reinstall torch, or run without --nproc") from None
    import json

    words = torchrun_argv(nproc, torchrun_args)
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            parsed = torchrun.parse_args(words)
    except SystemExit:
        last = (usage.getvalue().strip().splitlines() or [""])[-1]
        raise ConfigError(f"--torchrun-args {torchrun_args!r}: torchrun refuses it ({last}); see "
                          "`python -m torch.distributed.run --help`") from None
    # The agent's own log lines (rendezvous details, a failure's summary) would bury the one line below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    saved = {k: os.environ.get(k) for k in (RANK_PROCESS_ENV, "OMP_NUM_THREADS", "PYTHONPATH")}
    here = str(Path(__file__).resolve().parents[2])  # the ranks import this same copy of bnlab
    os.environ[RANK_PROCESS_ENV] = json.dumps(list(argv))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torchrun would otherwise set 1 and print a warning
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved["PYTHONPATH"]) if p)
    try:
        torchrun.run(parsed)
    except ChildFailedError as err:
        # A rank that exited with code 2 printed its own bnlab error (a bad value, a refused run, or a
        # collective that failed because another rank died): name a rank that died otherwise, if any.
        # Exit code 130 is a rank that torchrun stopped (SIGTERM) because another failed: the cause is
        # the others, a rank killed by a signal first.
        rank, failure = failure_cause(err.failures)
        if failure.exitcode in (2, 130) and any(f.exitcode == 2 for f in err.failures.values()):
            return 2
        how = (f"was killed by signal {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        raise DistributedRunError(
            f"rank {rank} of the --nproc {nproc} run {how} (pid {failure.pid}); torchrun stopped the other "
            "ranks. Finished runs and the last checkpoint are kept: run the same command again to resume "
            "(its own output above says why it stopped, if it could)") from None
    except SignalException:
        raise KeyboardInterrupt from None
    except Exception as err:  # a rendezvous that fails or times out, a port in use, ...
        raise DistributedRunError(f"torchrun could not run the {nproc} processes: "
                                  f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}; "
                                  "check --torchrun-args (the rendezvous endpoint must be reachable from every "
                                  "node)") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0
