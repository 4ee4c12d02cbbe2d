"""One run directory per (experiment, variant config hash, seed), and the rules that keep it consistent.

Layout: ``<out>/<experiment>/<variant>-<hash8>/seed<k>/``

    config.json     the full TrainConfig plus experiment, variant, seed, profile, hash
    env.json        versions, threads, git commit, machine, dataset actually used (+ fallback note)
    metrics.jsonl   one JSON object per line, append-only; flushed at every record but the per-step
                    training ones (those at least once a second, see records.py), fsynced at checkpoints
    arrays.npz      probe arrays, stacked over the steps at which the probe ran
    checkpoint.pt   model, optimizer, RNG states, step, probe arrays, metrics byte offset
    model.pt        final weights (state_dict)
    done            final status as JSON ({"status": "done" | "diverged", ...}); written last
    lock            fcntl.flock'ed by the process that writes the run

Why these rules:
- Every file except metrics.jsonl is written to a temporary name in the same directory and renamed
  (``os.replace`` is atomic on POSIX), so a SIGKILL leaves either the old or the new file, never half.
- metrics.jsonl is append-only. A checkpoint stores the byte length the file had when it was taken
  (after an fsync); resuming truncates the file to that length and replays the steps after it, so the
  finished file is byte-identical to the one of an uninterrupted run.
- The lock is an advisory ``flock`` held for the whole run; the kernel drops it when the process dies,
  so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from bnlab.atomic import atomic_write_bytes
from bnlab.errors import ConfigError, CorruptDataError, RunLockedError
from bnlab.train import safe_state

CONFIG, ENV, METRICS, ARRAYS = "config.json", "env.json", "metrics.jsonl", "arrays.npz"
CHECKPOINT, MODEL, DONE, LOCK = "checkpoint.pt", "model.pt", "done", "lock"
# 2: NumPy values encoded as tensors, loaded with weights_only=True (1: pickled, full unpickling)
CHECKPOINT_FORMAT = 2


def run_dir_path(out: Path | str, experiment: str, variant: str, cfg_hash: str, seed: int) -> Path:
    return Path(out) / experiment / f"{variant}-{cfg_hash[:8]}" / f"seed{seed}"


def copy_finished_run(src: Path | str, dst: Path | str, **meta: Any) -> None:
    """Copy the finished run ``src`` to the new run directory ``dst`` (which must not exist), all at
    once: the files go to a hidden sibling first, which is then renamed, so ``dst`` is either absent
    or complete (with its ``done`` marker). The lock file is not copied. Used when another profile's
    folder already holds a finished run of exactly the same config and seed (same config hash).

    ``meta``: config.json fields to set in the copy (its ``profile`` and ``setting`` where it now
    belongs); the copy's config.json also records ``copied_from`` (the source's profile and path)."""
    src, dst = Path(src), Path(dst)
    if not (src / DONE).exists():
        raise ConfigError(f"{src} is not a finished run (no {DONE} marker); it cannot be copied")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.copy-*"):  # left by a copy that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dst.parent / f".{dst.name}.copy-{os.getpid()}"
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(LOCK, CHECKPOINT))
    info = read_json(tmp / CONFIG)
    info = {**info, **meta, "copied_from": {"profile": info.get("profile"), "path": str(src)}}
    atomic_write_json(tmp / CONFIG, info)
    try:
        os.rename(tmp, dst)  # atomic; fails if dst appeared meanwhile (another process made it)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / DONE).exists():
            raise ConfigError(f"cannot copy {src} to {dst}: {dst} appeared meanwhile and is not finished "
                              "(another process is writing it?); run the command again, or pass --no-reuse") from None


# --- atomic writes -----------------------------------------------------------------------------------

def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become None; numpy/torch scalars become Python ones."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- the lock ------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/lock`` holding the owner's pid.

    ``wait=None`` refuses at once if another process holds it; ``wait=seconds`` polls that long
    (``math.inf`` = until it is free).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self, wait: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if deadline is None or time.monotonic() >= deadline:
                    owner = self.owner()
                    os.close(fd)
                    raise RunLockedError(
                        f"run directory {self.path.parent} is being written by another process"
                        f"{f' (pid {owner})' if owner else ''}; wait for it to finish (bnlab run ... "
                        "--wait) or stop it, then run again"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def owner(self) -> int | None:
        try:
            text = self.path.read_text().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            # The lock file itself stays: deleting it would let a third process lock a fresh inode
            # while a second one still waits on the old one.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- the run directory -----------------------------------------------------------------------------

class RunDir:
    """Paths and consistent reads/writes of one run directory (see module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._metrics: io.BufferedWriter | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    # status
    def is_done(self) -> bool:
        return self.file(DONE).exists()

    def read_done(self) -> dict[str, Any]:
        return read_json(self.file(DONE))

    def write_done(self, info: Mapping[str, Any]) -> None:
        atomic_write_json(self.file(DONE), json_safe(dict(info)))

    # config / env
    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.file(name), json_safe(obj))

    # metrics.jsonl
    def open_metrics(self, offset: int) -> None:
        """Open metrics.jsonl for appending after truncating it to ``offset`` bytes (0 = fresh)."""
        path = self.file(METRICS)
        if offset == 0:
            path.write_bytes(b"")
        else:
            size = path.stat().st_size if path.exists() else 0
            if size < offset:
                raise CorruptDataError(
                    f"{path} has {size} bytes but the checkpoint expects at least {offset}; the run "
                    f"directory was edited or damaged: delete {self.path} to restart this run"
                )
            with open(path, "r+b") as f:
                f.truncate(offset)
        self._metrics = open(path, "ab")

    def log(self, record: Mapping[str, Any]) -> None:
        assert self._metrics is not None, "open_metrics first"
        line = json.dumps(json_safe(dict(record)), allow_nan=False, separators=(",", ":")) + "\n"
        self._metrics.write(line.encode())
        self._metrics.flush()  # visible to readers (and to a crash of Python) at once

    def log_lines(self, lines: list[str]) -> None:
        """Append ready-made metrics.jsonl lines (each ending in a newline) with one write and flush."""
        assert self._metrics is not None, "open_metrics first"
        self._metrics.write("".join(lines).encode())
        self._metrics.flush()

    def sync_metrics(self) -> int:
        """fsync metrics.jsonl and return its length in bytes (the resume point)."""
        assert self._metrics is not None
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        return self._metrics.tell()

    def close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    # checkpoints
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        # NumPy arrays and scalars encoded as tensors: the file loads with weights_only=True
        atomic_torch_save(self.file(CHECKPOINT), safe_state.encode(dict(state)))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The run's checkpoint, loaded with torch's restricted unpickler (``weights_only=True``): a file
        that asks for anything but tensors and plain values (code to run on load) is refused."""
        path = self.file(CHECKPOINT)
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "unsupported global" not in str(err).lower():  # not a refusal: a damaged file
                raise CorruptDataError(f"checkpoint {path} cannot be read ({_last_line(str(err))}); delete it "
                                       "to restart this run from step 0") from None
            raise CorruptDataError(
                f"checkpoint {path} was refused: it holds Python objects that loading would have to "
                f"construct or call (written by a bnlab before checkpoint format {CHECKPOINT_FORMAT}, or "
                f"crafted), and run directories can come from anywhere; nothing was executed; delete it to "
                f"restart this run from step 0 ({_last_line(str(err))})"
            ) from None
        except Exception as err:  # truncated, not a zip, ...
            raise CorruptDataError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); delete it to "
                "restart this run from step 0"
            ) from None
        if not isinstance(state, dict) or "step" not in state:
            raise CorruptDataError(f"checkpoint {path} is not a bnlab checkpoint; delete it to restart this run "
                                   "from step 0")
        return safe_state.decode(state)

    def remove(self, name: str) -> None:
        try:
            self.file(name).unlink()
        except FileNotFoundError:
            pass


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise CorruptDataError(f"{path} is not valid JSON ({err}); delete its run directory to redo it") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise CorruptDataError(f"{path} has a line that is not JSON: {line[:80]!r}; delete the "
                                       "run directory to redo the run") from None
    return out
