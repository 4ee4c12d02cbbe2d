"""``load_dataset(name)`` -> ``Dataset``: tensors ready for training, plus where they came from.

MNIST and CIFAR-10 fall back to Fashion-MNIST when they are not installed (the data
policy): experiments still run on a machine with only Debian's ``dataset-fashion-mnist``, and the
returned ``Dataset`` says which data was really used (``name`` vs ``requested``, ``note``) so the
report can state it. Only a *missing* dataset falls back; a corrupt one is an error, because
silently training on other data than the files the user installed would hide the problem.

Decoded datasets are cached in-process, keyed on the files' paths, sizes and mtimes: experiments
load the same data many times, and a replaced file is read again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bnlab.data.cifar import read_cifar10
from bnlab.data.digits import DIGITS_TRAIN, read_digits
from bnlab.data.idx import read_idx
from bnlab.data.locate import (
    _SPECS,
    Located,
    _verify_cached,
    canonical_name,
    how_to_get,
    find_dataset,
    matches_known_size,
    search_paths,
    verify_file,
)
from bnlab.errors import CorruptDataError, DataNotFoundError

__all__ = ["Dataset", "load_dataset", "clear_cache", "FALLBACK"]

# what a missing dataset is replaced by
FALLBACK: dict[str, str] = {"mnist": "fashion_mnist", "cifar10": "fashion_mnist"}
_NUM_CLASSES = 10  # all four datasets


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """One dataset in memory: x float32 in [0, 1], (N, C, H, W), contiguous; y int64, (N,).

    The tensors may be shared with other callers through the in-process cache: treat them as
    read-only (normalize into new tensors, never in place).
    """

    name: str  # the dataset actually loaded ("fashion_mnist" after a fallback)
    requested: str  # what the caller asked for (canonical name)
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_shape: tuple[int, int, int]  # (C, H, W)
    source: str  # directory the files came from (or the library that bundles them)
    note: str = ""  # human-readable; '' unless a fallback happened or something is noteworthy

    @property
    def is_fallback(self) -> bool:
        return self.name != self.requested

    def __repr__(self) -> str:
        fb = f", requested={self.requested!r}" if self.is_fallback else ""
        return (
            f"Dataset(name={self.name!r}{fb}, train={self.x_train.shape[0]}, "
            f"test={self.x_test.shape[0]}, in_shape={self.in_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


def _to_tensors(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, scale: float
) -> tuple[torch.Tensor, ...]:
    def x_(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)
        return t.div_(scale).contiguous() if scale != 1.0 else t.contiguous()

    def y_(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.int64).contiguous()

    return x_(x_train), y_(y_train), x_(x_test), y_(y_test)


def _check_idx_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDataError(
            f"{img_path}: expected unsigned-byte images of shape (N, rows, cols), got "
            f"{images.dtype} {images.shape}. Is this an image file of the dataset?"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise CorruptDataError(
            f"{lbl_path}: expected unsigned-byte labels of shape (N,), got "
            f"{labels.dtype} {labels.shape}. Is this a label file of the dataset?"
        )
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} "
            f"labels; the two files come from different releases or one is damaged. Replace both."
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise CorruptDataError(
            f"{lbl_path}: label {int(labels.max())} is outside 0..{_NUM_CLASSES - 1}. Replace the file."
        )


def _decode_idx(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    out = []
    for split in ("train", "t10k"):
        ip, lp = files[f"{split}-images-idx3-ubyte"], files[f"{split}-labels-idx1-ubyte"]
        images, labels = read_idx(ip), read_idx(lp)
        _check_idx_pair(images, labels, ip, lp)
        out += [images[:, None], labels]  # (N, 1, H, W), (N,)
    if out[0].shape[1:] != out[2].shape[1:]:
        raise CorruptDataError(
            f"train images are {out[0].shape[2:]} but test images are {out[2].shape[2:]} "
            f"({files['train-images-idx3-ubyte']} vs {files['t10k-images-idx3-ubyte']}); they "
            f"come from different datasets. Replace them with one consistent set."
        )
    return tuple(out)


@functools.lru_cache(maxsize=4)  # CIFAR-10 alone is ~0.7 GB as float32: keep only a few
def _decode(name: str, directory: str, key: tuple[tuple[str, str, int, int], ...]) -> Dataset:
    files = {logical: Path(p) for logical, p, _, _ in key}
    if name == "cifar10":
        arrays = read_cifar10(directory)
    else:
        arrays = _decode_idx(files)
    x_train, y_train, x_test, y_test = _to_tensors(*arrays, scale=255.0)
    return Dataset(
        name=name,
        requested=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=_NUM_CLASSES,
        in_shape=tuple(int(s) for s in x_train.shape[1:]),  # type: ignore[arg-type]
        source=directory,
    )


@functools.lru_cache(maxsize=1)
def _digits() -> Dataset:
    import sklearn

    x_train, y_train, x_test, y_test = _to_tensors(*read_digits(), scale=1.0)
    return Dataset(
        name="digits",
        requested="digits",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=_NUM_CLASSES,
        in_shape=(1, 8, 8),
        source=(
            f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}); train = first "
            f"{DIGITS_TRAIN} images, test = the remaining {x_test.shape[0]}"
        ),
    )


def _load_located(loc: Located, verify: bool) -> Dataset:
    if verify:
        for p in loc.files.values():
            verify_file(loc.name, p)
    key = []
    for logical in sorted(loc.files):
        p = loc.files[logical]
        st = p.stat()
        key.append((logical, str(p), st.st_size, st.st_mtime_ns))
    ds = _decode(loc.name, str(loc.directory), tuple(key))
    if not verify:
        odd = [p.name for p in loc.files.values() if matches_known_size(loc.name, p) is False]
        if odd:
            title = _SPECS[loc.name].title
            ds = dataclasses.replace(ds, note=(
                f"Verification was off and {', '.join(odd)} in {loc.directory} differ in size "
                f"from the published {title} files (a subset or modified copy?): results are not "
                f"comparable with the standard {title}."
            ))
    return ds


def _fallback_note(requested: str, used: Dataset, data_dir: str | os.PathLike | None) -> str:
    want, got = _SPECS[requested].title, _SPECS[used.name].title
    shape = ""
    if requested == "cifar10":
        shape = f" Input shape is {used.in_shape} instead of CIFAR-10's (3, 32, 32)."
    where = ", ".join(str(p) for p in search_paths(requested, data_dir))
    return (
        f"{want} was requested but not found (searched {where}); used {got} from {used.source} "
        f"instead: same 10-class setup but different images, so numbers are not comparable with "
        f"results on {want}.{shape} To use {want}: {how_to_get(requested)}"
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    fallback: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load "mnist", "fashion_mnist", "cifar10" or "digits" as float32/int64 tensors.

    ``data_dir`` is searched first, then ``$BNLAB_DATA``, the user cache and
    ``/usr/share/datasets`` (see `bnlab.data.locate`). ``fallback=True`` replaces a missing MNIST
    or CIFAR-10 by Fashion-MNIST and records it in ``name``/``requested``/``note``.
    ``verify=True`` checks files with standard names against the published sizes and hashes;
    pass False for deliberately different files (subsets, test fixtures).

    Errors: ConfigError (unknown name), DataNotFoundError (lists every searched place and how to
    get the data), CorruptDataError (names the file and what is wrong with it).
    """
    requested = canonical_name(name)
    if requested == "digits":
        return _digits()
    try:
        loc = find_dataset(requested, data_dir)
    except DataNotFoundError as missing:
        alt = FALLBACK.get(requested)
        if not fallback or alt is None:
            raise
        try:
            loc = find_dataset(alt, data_dir)
        except DataNotFoundError as also:
            raise DataNotFoundError(
                f"{missing}\n\nThe fallback, {_SPECS[alt].title}, is missing too: {also}"
            ) from None
        used = _load_located(loc, verify)
        note = _fallback_note(requested, used, data_dir)
        return dataclasses.replace(
            used, requested=requested, note=f"{note} {used.note}".strip()
        )
    return _load_located(loc, verify)


def clear_cache() -> None:
    """Drop decoded datasets and verification results (frees memory; tests use it)."""
    _decode.cache_clear()
    _digits.cache_clear()
    _verify_cached.cache_clear()
