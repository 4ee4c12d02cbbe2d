"""Builders for small files in the real dataset formats, written independently of bnlab's readers.

IDX bytes are packed by hand with struct; CIFAR-10 batches are emitted as the opcodes a Python 2
``cPickle.dump(d, f, 2)`` produces (py2 ``str`` -> SHORT_BINSTRING/BINSTRING, arrays through
``numpy.core.multiarray._reconstruct``), which is what the real ``data_batch_*`` files contain.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B,
             np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a)
    head = struct.pack(">HBB", 0, IDX_CODES[a.dtype], a.ndim)
    head += struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray) -> Path:
    data = idx_bytes(a)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_idx_arrays(n_train: int, n_test: int, hw: tuple[int, int] = (6, 5), seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(n_train, *hw), dtype=np.uint8),
        rng.integers(0, 10, size=n_train, dtype=np.uint8),
        rng.integers(0, 256, size=(n_test, *hw), dtype=np.uint8),
        rng.integers(0, 10, size=n_test, dtype=np.uint8),
    )


def write_idx_dataset(directory: Path, arrays, *, gz: bool) -> dict[str, Path]:
    out = {}
    for name, a in zip(IDX_NAMES, arrays):
        out[name] = write_idx(directory / (name + (".gz" if gz else "")), a)
    return out


# ----------------------------------------------------------------------------- CIFAR (py2 pickle)


def _py2_str(b: bytes) -> bytes:
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING
    return b"T" + struct.pack("<I", len(b)) + b  # BINSTRING


def _py2_int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    return b"J" + struct.pack("<i", i)


def _py2_uint8_array(a: np.ndarray) -> bytes:
    assert a.dtype == np.uint8
    out = b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
    out += _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
    shape = b"".join(_py2_int(s) for s in a.shape)
    shape_tuple = b"(" + shape + b"t"
    dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
    dtype += b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + _py2_int(0) + b"tb"
    out += b"(" + _py2_int(1) + shape_tuple + dtype + b"\x89" + _py2_str(a.tobytes()) + b"tb"
    return out


def cifar_batch_bytes(data: np.ndarray, labels, label: bytes = b"training batch") -> bytes:
    """A protocol-2 pickle as Python 2 wrote the CIFAR-10 batches."""
    items = _py2_str(b"batch_label") + _py2_str(label)
    items += _py2_str(b"labels") + b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"
    items += _py2_str(b"data") + _py2_uint8_array(np.ascontiguousarray(data))
    items += _py2_str(b"filenames") + b"](" + b"".join(
        _py2_str(f"img_{i}.png".encode()) for i in range(len(labels))) + b"e"
    return b"\x80\x02}(" + items + b"u."


def make_cifar_dir(root: Path, n_per_batch: int = 7, n_test: int = 5, seed: int = 0):
    """Write root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; return arrays
    (x_train (N,3,32,32), y_train, x_test, y_test) as they should be read back."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch)
        (d / f"data_batch_{i}").write_bytes(cifar_batch_bytes(data, labels, f"training batch {i} of 5".encode()))
        xs.append(data)
        ys.append(labels)
    tdata = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    tlabels = rng.integers(0, 10, size=n_test)
    (d / "test_batch").write_bytes(cifar_batch_bytes(tdata, tlabels, b"testing batch 1 of 1"))
    meta = b"\x80\x02}(" + _py2_str(b"label_names") + b"](" + b"".join(
        _py2_str(n) for n in (b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                              b"frog", b"horse", b"ship", b"truck")) + b"eu."
    (d / "batches.meta").write_bytes(meta)
    x_train = np.concatenate(xs).reshape(-1, 3, 32, 32)
    return x_train, np.concatenate(ys), tdata.reshape(-1, 3, 32, 32), tlabels
