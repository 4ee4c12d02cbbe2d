"""Fused CPU batch-norm kernels, registered as ``torch.library`` custom operators.

BN is memory-bound: on a CPU the statistics, the normalization and the backward each need only one
or two passes over the data, but a composite of torch ops (shift, torch's kernel, casts) streams the
tensor several times and allocates fresh input-sized buffers whose first touch (page faults) costs
more than the arithmetic. The kernels here do each step in the fewest passes:

* training forward (``bnlab::bn_train``): one read for the per-channel statistics (blocks of a few
  thousand values averaged, then their deviations summed in float64, blocks merged with Chan et
  al.'s pairwise formula: stable for |mean| >> std, never a naive sum of squares, exactly 0 for a
  constant channel), one read+write for normalize+affine (the mean subtracted first, as hi + lo
  floats for float32/half so the subtraction keeps float64 accuracy), and the running-statistics
  update with the composite core's guard (batch statistics finite in the compute dtype, updated
  values representable in the buffers' dtype, else nothing changes), computed in float64 and
  rounded once to the buffers' dtype;
* backward (``bnlab::bn_backward``): two per-channel reductions (sum dy, sum dy*(x - mean)) in one
  read, then one elementwise pass ``dx = a*dy + k*(x - mean) + e``; saved for it: the input ``x``
  (the one input-sized tensor) plus per-channel float64 mean and 1/std;
* eval forward (``bnlab::bn_eval``): one pass ``(x - running_mean) * scale + bias``;
* ``bnlab::bn_train_``: ``bn_train`` with the running statistics and the counter updated in place
  (as torch's native batch norm does) instead of returned. A BN module's eager forward uses it: on a
  small layer (the Ioffe MLP's BatchNorm1d(100) at batch 60) the three returned statistics tensors
  and the three ``copy_`` calls into the buffers cost a third of the layer; graph capture
  (``torch.compile``, ``torch.export``, tracing) keeps the functional ``bn_train``.

* ``bnlab::lp_train``/``lp_train_``/``lp_backward``: ℓp batch norm's one-node training path
  (``bnlab.norm.lp``), not a fused kernel but the very ATen operations that path runs in Python, in
  the same order on the same operands (so the numbers are bit-identical, tested), called from C++:
  on the deep linear network's (1000, 10) layers the Python frame and argument parsing around each of
  its ~15 small operations cost as much as the arithmetic (``bench/dln_engine.py --lp-python``
  measures what the operators save).

* ``bnlab::max_pool2x2``/``max_pool2x2_backward``: not BN, but VGG's 2x2, stride-2 max pools, which
  torch's general CPU pooling kernel runs far below memory speed (8 % of a quick-profile VGG
  step); exact (torch's selection rule, bit-identical outputs and gradients), used by
  ``bnlab.models.pool.MaxPool2d``.

The BN kernels cover CPU tensors of float32/float64 and float16/bfloat16 (float32 arithmetic, float64
statistics) in NCHW, channels_last (2-D and 3-D images), (N, C) and (N, C, L) layouts, parallel over
channels or row blocks with ``at::parallel_for`` (so ``torch.set_num_threads`` applies).

Why C++ (``torch.utils.cpp_extension``) and not numba: the kernels take torch tensors of every dtype
(numba has no bfloat16 and no torch tensors), parallelize on torch's own thread pool (numba keeps a
second one, which oversubscribes the cores next to torch's), and are called through the dispatcher
without a Python frame, which matters for small layers. The price is a compile at first use (about
20 s of CPU time), cached on disk under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), so later processes load the library in milliseconds; ``python -m
bnlab.norm.kernels`` builds it ahead of time. Without a C++ compiler bnlab uses the composite path.

Graph capture: each operator has a fake (meta) implementation (``torch.library.register_fake``)
and ``bnlab::bn_train``/``bn_train_``/``bn_eval`` an autograd formula registered at the Autograd
dispatch key in C++ (a Python formula through ``torch.library.register_autograd`` costs tens of
microseconds per call, more than a whole small BN layer): a ``torch::autograd::Function`` for
``bn_train`` and ``bn_eval``, and for ``bn_train_``, which every eager training step of a BN module
calls, a backward node written like torch's generated ones (``BnTrainBackward``: three edges, three
saved tensors), which took the Ioffe MLP's BatchNorm1d(100) at batch 60 from 0.90x to 1.01-1.06x
torch.nn's forward+backward on one thread. So ``torch.compile(fullgraph=True)`` and ``torch.export``
capture the kernels as single nodes and ``torch.library.opcheck`` validates the registrations.
Neither node supports compiled autograd (``torch._dynamo.compiled_autograd``), which needs
``compiled_args``/``apply_with_saved`` on each node: a training step whose backward is compiled that
way needs ``BNLAB_KERNELS=off``.

The composite torch path of ``bnlab.norm.functional`` (torch's ops) serves everything the kernels do
not: other devices, ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ``hessian``,
``jvp``, ``jacfwd``), forward-mode AD (inside ``torch.autograd.forward_ad.dual_level()``: a C++
autograd node has no jvp rule), TorchScript and empty batches. Double backward through a kernel's
output (``create_graph=True``) differentiates the textbook formula written in torch ops, from x
itself, so derivatives of every order are right. The composite path's training statistics come from
torch's fused batch norm, whose derivatives are right to second order (Hessians, Hessian-vector
products) but silently wrong from the third order on (pytorch/pytorch#186256): the same as
torch.nn.

Large training outputs (8 MiB and more: the output and the input gradient) ask the OS for
transparent huge pages (``madvise``), which makes their first touch cheaper; the eval output does not
(there stalls at the first touch of huge pages cost more than the hint saved; see ``empty_out`` in
the C++ source).
``BNLAB_HUGE_PAGES=0`` (read once, at the first kernel call) turns the hint off entirely.

Switch: ``BNLAB_KERNELS=auto`` (default: kernels where they apply), ``off`` (always the composite
path) or ``on`` (like auto, but a failed build raises instead of falling back), read at import; in
code ``bnlab.norm.kernels.set_mode("off")`` or ``with bnlab.norm.kernels.use_mode("off"): ...``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

__all__ = ["MODES", "available", "build", "mode", "set_mode", "use_mode", "applies"]

MODES = ("auto", "on", "off")
_SOURCE = Path(__file__).with_name("_kernels.cpp")
_CFLAGS = ["-O3", "-fopenmp", "-march=native"]
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _env_mode() -> str:
    value = os.environ.get("BNLAB_KERNELS", "auto").strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    value = aliases.get(value, value)
    if value not in MODES:
        warnings.warn(f"BNLAB_KERNELS={value!r} is not one of {', '.join(MODES)}; using 'auto'", RuntimeWarning)
        return "auto"
    return value


_mode = _env_mode()
_state: dict = {"loaded": False, "error": None}
_lock = threading.Lock()


def mode() -> str:
    """The current switch: 'auto', 'on' or 'off'."""
    return _mode


def set_mode(value: str) -> str:
    """Set the switch ('auto', 'on', 'off') for this process; returns the previous value.

    Raises ValueError for another value."""
    global _mode
    if value not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {value!r}")
    previous, _mode = _mode, value
    return previous


@contextlib.contextmanager
def use_mode(value: str) -> Iterator[None]:
    """``with use_mode("off"): ...`` runs the block with the given switch, then restores it."""
    previous = set_mode(value)
    try:
        yield
    finally:
        set_mode(previous)


def _build_name() -> str:
    """Extension name: a hash of the source, flags, torch version and CPU (``-march=native``)."""
    h = hashlib.sha1(_SOURCE.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(platform.machine().encode())
    try:
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    except OSError:
        flags = ""
    h.update(flags.encode())
    # One build per Python environment: torch rebuilds when a build folder's recorded include paths
    # (which name the environment) differ, so two virtualenvs sharing the cache would rebuild in turn.
    h.update(sys.prefix.encode())
    # One build per copy of the source: torch's build file names the source path, so two checkouts of
    # the same source (a worktree, an installed copy next to a clone) would otherwise rebuild in turn,
    # each process paying a full compile.
    h.update(str(_SOURCE.resolve()).encode())
    return f"bnlab_kernels_{h.hexdigest()[:12]}"


STALE_LOCK_SECONDS = 300.0  # a build takes about a minute (several on a loaded machine)
LIVE_BUILD_SECONDS = 1800.0  # never wait longer than this, even on a builder that seems alive


def _owner_file(name: str) -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False)) / "bnlab_builder"


def _builder_alive(owner: Path) -> bool | None:
    """Whether the process that announced the build in ``owner`` still runs (None: unknown, e.g. no
    announcement, or another host sharing the cache)."""
    try:
        host, pid = owner.read_text().split()
        if host != platform.node():
            return None
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False if owner.exists() else None
    return True


def _clear_stale_lock(name: str) -> None:
    """torch's build waits forever on the build folder's ``lock`` file; a build that was killed (Ctrl-C,
    SIGKILL) leaves it behind and every later process would hang at its first BN call. A build
    announces its process in ``bnlab_builder`` (withdrawn when it ends): while that process lives,
    wait (up to
    LIVE_BUILD_SECONDS); when it is gone, the lock is stale at once. Without an announcement (a build
    started by other code), a lock older than STALE_LOCK_SECONDS is stale. A stale lock is removed with
    a warning."""
    from torch.utils import cpp_extension

    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    owner = _owner_file(name)
    while lock.exists():
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return  # removed meanwhile: the build finished
        alive = _builder_alive(owner)
        if alive is False or (alive is None and age > STALE_LOCK_SECONDS) or age > LIVE_BUILD_SECONDS:
            why = "its builder process is gone" if alive is False else f"{age:.0f} s old"
            warnings.warn(f"removing a stale build lock {lock} ({why}: left by a build that was killed); "
                          "bnlab's kernels are built again", RuntimeWarning, stacklevel=3)
            lock.unlink(missing_ok=True)
            return
        time.sleep(1.0)


def _announce_build(name: str) -> None:
    """Say which process is about to build (read by ``_clear_stale_lock`` in other processes)."""
    owner = _owner_file(name)
    try:
        owner.parent.mkdir(parents=True, exist_ok=True)
        tmp = owner.with_suffix(f".{os.getpid()}")
        tmp.write_text(f"{platform.node()} {os.getpid()}")
        os.replace(tmp, owner)
    except OSError:
        pass  # a read-only cache: the age rule still applies


def _withdraw_build(name: str) -> None:
    owner = _owner_file(name)
    try:
        if owner.read_text().split()[1] == str(os.getpid()):
            owner.unlink()
    except (OSError, IndexError):
        pass


def build(verbose: bool = False) -> None:
    """Compile (or load from the on-disk cache) the C++ kernels and register their Python parts.

    Raises RuntimeError naming the cause when the build fails (e.g. no C++ compiler or ninja)."""
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError(_state["error"])
        try:
            from torch.utils import cpp_extension

            name = _build_name()
            _clear_stale_lock(name)
            _announce_build(name)
            try:
                cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                                   extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
            finally:
                _withdraw_build(name)
            _register_python_parts()
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the composite path
            _state["error"] = (f"bnlab's fused BN kernels could not be built ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); they need "
                               f"a C++ compiler (g++) and ninja. bnlab uses its composite torch path instead; "
                               f"set BNLAB_KERNELS=off to skip the attempt")
            raise RuntimeError(_state["error"]) from exc
        _state["loaded"] = True


@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the kernels are built and loaded (building them on first call, unless mode is 'off').

    In 'auto' mode a failed build warns once and returns False; in 'on' mode it raises."""
    if _mode == "off":
        return False
    if _state["loaded"]:
        return True
    if _state["error"] is not None and _mode == "auto":
        return False
    try:
        build()
    except RuntimeError as exc:
        if _mode == "on":
            raise
        warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
        return False
    return True


def applies(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether the kernels serve this call: CPU tensors of a supported dtype, a non-empty input, no
    torch.func transform or forward-AD level active, and kernels switched on and built. A decision on metadata only."""
    if _mode == "off" or not x.is_cpu or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    for t in others:
        if t is not None and (not t.is_cpu or not t.is_floating_point()):
            return False
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return False  # vmap/grad/jacrev/hessian: the composite path (torch's ops), which torch.func can transform
    if _forward_ad._current_level >= 0:
        # Inside torch.autograd.forward_ad.dual_level(): the kernels' autograd formula is a C++
        # torch::autograd::Function, which has no forward-mode (jvp) rule; the composite path has.
        return False
    return available()


# --------------------------------------------------------------------------------------------------
# Fake implementations (shapes, dtypes and layouts only) and the autograd formula.


def _out_like(x: Tensor) -> Tensor:
    if x.is_contiguous() or x.dim() not in (4, 5):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x, memory_format=fmt)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps):
    out = (_out_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64))
    if running_mean is None or running_var is None:
        return out + (x.new_empty((0,), dtype=torch.float64), x.new_empty((0,), dtype=torch.float64),
                      x.new_empty((0,), dtype=torch.int64), x.new_empty((0,), dtype=torch.bool))
    count = (torch.empty_like(num_batches_tracked) if num_batches_tracked is not None
             else x.new_empty((0,), dtype=torch.int64))
    return out + (torch.empty_like(running_mean), torch.empty_like(running_var), count,
                  x.new_empty((), dtype=torch.bool))


def _fake_train_inplace(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, cumulative, eps):
    return _out_like(x), x.new_empty((3, x.shape[1]), dtype=torch.float64), x.new_empty((), dtype=torch.bool)


def _fake_backward(grad_out, x, weight, stats, input_grad):
    c = x.shape[1]
    dx = _out_like(x) if input_grad else x.new_empty((0,))
    dtype = weight.dtype if weight is not None else (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    return dx, x.new_empty((c,), dtype=dtype), x.new_empty((c,), dtype=dtype)


def _fake_eval(x, weight, bias, running_mean, running_var, eps):
    return _out_like(x)


def _lp_stat_like(x: Tensor) -> Tensor:
    return x.new_empty((1, x.shape[1], *([1] * (x.dim() - 2))))


def _fake_lp_train(x, weight, bias, p, eps, cn):
    inf = p == float("inf")
    return (torch.empty_like(x), _lp_stat_like(x), _lp_stat_like(x), torch.empty_like(x), _lp_stat_like(x),
            _lp_stat_like(x), _lp_stat_like(x), torch.empty_like(x) if inf else x.new_empty((0,)),
            _lp_stat_like(x) if inf else x.new_empty((0,)))


def _fake_lp_train_inplace(x, weight, bias, running_mean, running_var, num_batches_tracked, p, eps, cn, momentum,
                           cumulative):
    return _fake_lp_train(x, weight, bias, p, eps, cn) + (x.new_empty((), dtype=torch.bool),)


def _fake_lp_backward(grad_out, x, weight, d, stat, r, scale, a, top, p, cn, need_x, need_w, need_b):
    c = x.shape[1]
    return (torch.empty_like(x) if need_x else None, x.new_empty((c,)) if need_w else None,
            x.new_empty((c,)) if need_b else None)


def _fake_max_pool2x2(x):
    shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


def _fake_max_pool2x2_backward(grad_out, offsets, h, w):
    return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], h, w))


def _register_python_parts() -> None:
    # The autograd formulas are registered in C++ (Autograd key), so a call costs no Python frame.
    torch.library.register_fake("bnlab::bn_train", _fake_train)
    torch.library.register_fake("bnlab::bn_train_", _fake_train_inplace)
    torch.library.register_fake("bnlab::bn_backward", _fake_backward)
    torch.library.register_fake("bnlab::bn_eval", _fake_eval)
    torch.library.register_fake("bnlab::lp_train", _fake_lp_train)
    torch.library.register_fake("bnlab::lp_train_", _fake_lp_train_inplace)
    torch.library.register_fake("bnlab::lp_backward", _fake_lp_backward)
    torch.library.register_fake("bnlab::max_pool2x2", _fake_max_pool2x2)
    torch.library.register_fake("bnlab::max_pool2x2_backward", _fake_max_pool2x2_backward)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    build(verbose=True)
    print(f"bnlab kernels ready ({_build_name()}) in {time.perf_counter() - t0:.1f} s")
