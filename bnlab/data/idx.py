"""Reader for the IDX format (MNIST, Fashion-MNIST), gzipped or not.

Format (LeCun's MNIST page): two zero bytes, one type-code byte, one byte giving the number of
dimensions d, then d big-endian uint32 sizes, then the values in C order, big-endian.

Every way a file can be broken gets its own message naming the file, because a truncated download is
the common failure and "cannot reshape array of size 1234" does not tell anyone to re-download.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from bnlab.errors import CorruptDataError

__all__ = ["read_idx", "IDX_TYPES"]

# type code -> big-endian numpy dtype
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot expand data by more than ~1032x; a header that claims more than this times the
# compressed size is corrupt, and checking it first avoids trying to allocate terabytes.
_MAX_DEFLATE_RATIO = 1100
_CHUNK = 1 << 22


def _fix_hint(path: Path) -> str:
    return f"Delete or replace {path} (re-download it, or reinstall the package that provided it)."


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip, detected by content, not by name) into a numpy array.

    Returns a writable, C-contiguous array in native byte order with the shape given by the header
    (images: (N, rows, cols); labels: (N,)).

    Raises CorruptDataError for: bad magic, unknown type code, a header whose sizes do not match
    the amount of data (truncated or with trailing bytes), a broken gzip stream.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            file_size = os.fstat(raw.fileno()).st_size
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                    return _read_stream(f, path, file_size, compressed=True)
            return _read_stream(raw, path, file_size, compressed=False)
    except (gzip.BadGzipFile, zlib.error) as e:
        raise CorruptDataError(f"{path}: corrupt gzip data ({e}). {_fix_hint(path)}") from e
    except EOFError as e:
        raise CorruptDataError(
            f"{path}: the gzip stream ends early - the file is truncated. {_fix_hint(path)}"
        ) from e


def _read_exact(f, buf: memoryview) -> int:
    """Fill buf from f; return how many bytes were read (short only at end of data)."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got : got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _read_stream(f, path: Path, file_size: int, *, compressed: bool) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise CorruptDataError(
            f"{path}: too short to be an IDX file ({len(head)} header bytes, need at least 4). "
            f"{_fix_hint(path)}"
        )
    zero, code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or code not in IDX_TYPES or ndim == 0:
        raise CorruptDataError(
            f"{path}: bad IDX magic 0x{head.hex()} (expected 0x0000, a type code in "
            f"{{{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}}}, and a dimension count >= 1). "
            f"This is not an IDX file, or it is damaged. {_fix_hint(path)}"
        )
    dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise CorruptDataError(
            f"{path}: truncated IDX header (declares {ndim} dimensions, file ends inside the "
            f"header). {_fix_hint(path)}"
        )
    dims = struct.unpack(f">{ndim}I", dims_raw)
    dtype = IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    header_len = 4 + 4 * ndim
    shape_txt = "x".join(map(str, dims))

    limit = (file_size * _MAX_DEFLATE_RATIO + (1 << 20)) if compressed else file_size - header_len
    if expected > limit:
        if compressed:
            what = f"but a {file_size}-byte gzip file cannot hold that much"
        else:
            what = f"but the file holds only {file_size - header_len}"
        raise CorruptDataError(
            f"{path}: size mismatch with header: it declares {shape_txt} {dtype.name} values "
            f"({expected} bytes of data) {what} - truncated file? {_fix_hint(path)}"
        )

    flat = np.empty(expected, dtype=np.uint8)
    got = _read_exact(f, memoryview(flat))
    if got < expected:
        raise CorruptDataError(
            f"{path}: size mismatch with header: it declares {shape_txt} {dtype.name} values "
            f"({expected} bytes of data) but only {got} bytes follow the header - truncated "
            f"file. {_fix_hint(path)}"
        )
    extra = f.read(1)
    if extra:
        raise CorruptDataError(
            f"{path}: size mismatch with header: there are bytes after the {expected} bytes of "
            f"data the header declares ({shape_txt} {dtype.name}) - not a valid IDX file. "
            f"{_fix_hint(path)}"
        )
    arr = flat.view(dtype).reshape(dims)
    if dtype.itemsize > 1:
        # callers (torch.from_numpy) need native byte order
        arr = arr.astype(dtype.newbyteorder("="))
    return arr
