"""The training engine's memory policy: keep freed memory in the process for reuse (glibc malloc).

A training step allocates and frees the same large activation and gradient tensors over and over.
With glibc's defaults a block above the mmap threshold (128 KiB, raised dynamically up to 32 MiB) is
a fresh ``mmap`` each time and goes back to the OS on free, so every step pays first-touch page
faults on every large tensor (on the measuring machine: 13 ms for a fresh 33.6 MB tensor, against
2.6 ms to copy it), and memory above the trim threshold is returned to the OS and faulted in again.
The policy makes glibc serve large blocks from its heap and keep what is freed:

* ``M_MMAP_MAX = 0``: no block is a private mmap (so also tensors above 32 MiB are reused; the
  threshold alone cannot be set above 32 MiB on 64-bit glibc);
* ``M_TRIM_THRESHOLD`` = 1 GiB and ``M_TOP_PAD`` = 64 MiB: freed memory stays in the heap.

The price is a resident size that stays at the step's peak (what the step needs anyway) instead of
shrinking between steps. It is applied with ``mallopt`` through ctypes in the running process and
exported as glibc's ``MALLOC_*_`` environment variables, so worker processes started afterwards
(``bnlab run --workers``) start with it too. Measured on whole VGG and convnet training steps by
``bench/memory_policy.py`` (see the README for the numbers; jemalloc and tcmalloc via
``LD_PRELOAD`` were measured too).

Opt out with ``BNLAB_MALLOC=default`` (nothing is changed). In your own scripts: call
``bnlab.train.memory.apply_policy()`` at start-up, or start Python with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864 python train.py``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["POLICY_ENV", "apply_policy", "policy_env"]

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_SETTINGS = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}
# The same settings as glibc environment variables (read when a process starts).
POLICY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(64 << 20)}

_applied: dict | None = None


def policy_env() -> dict[str, str]:
    """The environment variables that give a new process the policy."""
    return dict(POLICY_ENV)


def _glibc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl does not implement mallopt's knobs)
        return libc
    except (OSError, AttributeError):
        return None


def apply_policy(force: bool = False) -> dict:
    """Apply the policy to this process (and, through the environment, to processes it starts).

    Returns what happened: ``{"applied": bool, "reason": str}``. Does nothing (and says why) with
    ``BNLAB_MALLOC=default`` unless ``force``, without glibc, or when a different allocator is
    preloaded (``LD_PRELOAD`` with jemalloc/tcmalloc: their own policy applies). Idempotent."""
    global _applied
    if _applied is not None and not force:
        return _applied
    choice = os.environ.get("BNLAB_MALLOC", "tuned").strip().lower()
    if choice in ("default", "off", "0", "none") and not force:
        _applied = {"applied": False, "reason": "BNLAB_MALLOC=default: the allocator's defaults are kept"}
        return _applied
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        _applied = {"applied": False, "reason": "another allocator is preloaded (LD_PRELOAD)"}
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = {"applied": False, "reason": "not glibc: nothing to tune"}
        return _applied
    ok = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in _SETTINGS.items())
    for key, value in POLICY_ENV.items():
        os.environ.setdefault(key, value)
    _applied = {"applied": ok, "reason": "glibc mallopt: no mmap'd blocks, freed memory kept for reuse" if ok
                else "glibc refused a mallopt setting"}
    return _applied
