"""Reader for CIFAR-10 "python version" batches (cifar-10-python.tar.gz, extracted).

Layout: ``cifar-10-batches-py/data_batch_1..5`` (10000 images each) and ``test_batch``; each is a
pickled dict with ``b"data"`` (uint8, (10000, 3072): the 1024 red, then green, then blue values of a
32x32 image, row-major) and ``b"labels"`` (list of ints 0..9). The files were written by Python 2,
so they are read with ``encoding="bytes"``.

A pickle can run arbitrary code when loaded, so batches are read with an unpickler that only
accepts the few numpy globals needed to rebuild an array; anything else is reported as a file that
is not a CIFAR-10 batch.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from bnlab.errors import CorruptDataError, DataNotFoundError

__all__ = ["read_cifar10", "read_cifar_batch", "CIFAR_DIRNAME", "TRAIN_BATCHES", "TEST_BATCH"]

CIFAR_DIRNAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_IMAGE_BYTES = 3 * 32 * 32


def _reconstruct():
    # numpy >= 2 keeps the real function in numpy._core; resolving the old numpy.core name goes
    # through a shim that warns, so map both names to the real object here.
    try:
        from numpy._core.multiarray import _reconstruct as f  # type: ignore[attr-defined]
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as f  # type: ignore[no-redef]
    return f


def _scalar():
    try:
        from numpy._core.multiarray import scalar as f  # type: ignore[attr-defined]
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar as f  # type: ignore[no-redef]
    return f


def _frombuffer():
    try:
        from numpy._core.numeric import _frombuffer as f  # type: ignore[attr-defined]
    except ImportError:  # numpy 1.x
        from numpy.core.numeric import _frombuffer as f  # type: ignore[no-redef]
    return f


def _encode(*args):
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"); harmless.
    import _codecs

    return _codecs.encode(*args)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        get = _ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (a CIFAR-10 batch only holds numpy "
                f"arrays, lists, bytes and ints)"
            )
        return get()


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file -> (x uint8 (n, 3, 32, 32), y uint8 (n,)).

    Raises CorruptDataError naming the file for a truncated or non-CIFAR pickle.
    """
    path = Path(path)
    fix = f"Replace {path} (re-extract cifar-10-python.tar.gz)."
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # garbage bytes can fail in many ways inside the unpickler
        raise CorruptDataError(f"{path}: bad pickle, not a readable CIFAR-10 batch ({e}). {fix}") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise CorruptDataError(
            f"{path}: bad pickle contents: expected a dict with b'data' and b'labels', got {keys}. {fix}"
        )
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        raise CorruptDataError(
            f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (n, {_IMAGE_BYTES}). {fix}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise CorruptDataError(
            f"{path}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels for "
            f"{data.shape[0]} images. {fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CorruptDataError(
            f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()}). {fix}"
        )
    # channel-major rows map straight onto NCHW
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))
    return x, labels.astype(np.uint8)


def _batch_dir(root: Path) -> Path:
    """Accept either the directory holding cifar-10-batches-py/ or that directory itself."""
    sub = root / CIFAR_DIRNAME
    return sub if sub.is_dir() else root


def read_cifar10(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read all of CIFAR-10 -> (x_train, y_train, x_test, y_test); x uint8 NCHW, y uint8.

    ``root`` is the directory containing ``cifar-10-batches-py/`` (as torchvision expects) or the
    ``cifar-10-batches-py`` directory itself. No integrity check against known hashes here - that
    is `bnlab.data.locate`'s job; this only parses.
    """
    d = _batch_dir(Path(root))
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (d / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 batches missing in {d}: {', '.join(missing)}. Extract "
            f"cifar-10-python.tar.gz so that {d} holds data_batch_1..5 and test_batch."
        )
    parts = [read_cifar_batch(d / n) for n in TRAIN_BATCHES]
    x_test, y_test = read_cifar_batch(d / TEST_BATCH)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test
