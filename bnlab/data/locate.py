"""Where datasets live, which files they consist of, and how to tell a good file from a bad one.

Search order, first directory holding a complete set of files wins:

1. ``data_dir`` (the CLI's ``--data-dir``)
2. ``$BNLAB_DATA`` (one or more directories separated by ``os.pathsep``)
3. the user cache, ``$XDG_CACHE_HOME/bnlab`` or ``~/.cache/bnlab``
4. ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` installs
   ``/usr/share/datasets/fashion-mnist/``)

Inside each of the roots 1-3 a dataset lives in its own subdirectory (``mnist/``,
``fashion-mnist/``, ``cifar-10-batches-py/``; torchvision's ``MNIST/raw/`` and
``FashionMNIST/raw/`` are accepted too). Files are never looked for directly in a root: MNIST and
Fashion-MNIST use the same file names, so a flat layout could silently load one as the other.

Verification (``verify=True``) compares each file with the published ones: its size, then its
hash where one is known (SHA-256 computed from the Debian package, or the MD5 that torchvision
publishes for the upstream files). A file that matches no known variant is reported as corrupt -
this is what catches truncated downloads that still parse. Files that are not the published ones
on purpose (subsets, test fixtures) load with ``verify=False``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from bnlab.errors import ConfigError, CorruptDataError, DataNotFoundError

__all__ = [
    "dataset_title",
    "DATASET_NAMES",
    "KnownFile",
    "KNOWN_FILES",
    "Located",
    "SYSTEM_DATA_ROOT",
    "canonical_name",
    "cache_dir",
    "find_dataset",
    "search_paths",
    "verify_file",
    "matches_known_size",
]

# Module attribute (not a constant inlined into functions) so tests can point it elsewhere.
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch")


@dataclass(frozen=True)
class _Spec:
    title: str
    subdirs: tuple[str, ...]     # where the files sit inside a search root
    system_dirs: tuple[str, ...]  # relative to SYSTEM_DATA_ROOT
    files: tuple[str, ...]       # logical names; IDX files may carry a .gz suffix on disk
    gz_ok: bool


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec("MNIST", ("mnist", "MNIST/raw"), ("mnist",), IDX_FILES, True),
    "fashion_mnist": _Spec(
        "Fashion-MNIST", ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        ("fashion-mnist",), IDX_FILES, True,
    ),
    "cifar10": _Spec(
        "CIFAR-10", ("cifar-10-batches-py",),
        ("cifar-10/cifar-10-batches-py", "cifar-10"), CIFAR_FILES, False,
    ),
}
# digits is bundled with scikit-learn: nothing to search for
DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "digits")
_ALIASES = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "sklearn_digits": "digits"}


def dataset_title(name: str) -> str:
    """The published name of a dataset ("fashion_mnist" -> "Fashion-MNIST"); unknown names as given."""
    if name == "digits":
        return "the scikit-learn 8x8 digits"
    spec = _SPECS.get(name)
    return spec.title if spec is not None else name


def canonical_name(name: str) -> str:
    """'Fashion-MNIST' -> 'fashion_mnist'; unknown names raise ConfigError listing the valid ones."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ConfigError(
            f"unknown dataset {name!r}. Valid names: {', '.join(DATASET_NAMES)}."
        )
    return key


# --------------------------------------------------------------------------- known files


@dataclass(frozen=True)
class KnownFile:
    """One published variant of a file. ``size``/``digest`` None = not known."""

    size: int | None
    digest: str | None  # "sha256:<hex>" or "md5:<hex>"
    origin: str


_DEBIAN = "Debian dataset-fashion-mnist 0.0~git20200523.55506a9-1"
_ZALANDO = "Zalando release (md5 as published by torchvision)"
_LECUN = "LeCun/ossci mirror (md5 as published by torchvision)"
_UNZIPPED = "decompressed data (sha256 of the Debian files' content)"

KNOWN_FILES: dict[str, dict[str, tuple[KnownFile, ...]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (KnownFile(9912422, "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873", _LECUN),),
        "train-labels-idx1-ubyte.gz": (KnownFile(28881, "md5:d53e105ee54ea40749a09fcbcd1e9432", _LECUN),),
        "t10k-images-idx3-ubyte.gz": (KnownFile(1648877, "md5:9fb629c4189551a2d022fa330f9573f3", _LECUN),),
        "t10k-labels-idx1-ubyte.gz": (KnownFile(4542, "md5:ec29112dd5afa0611ce80d1b7f02629c", _LECUN),),
        # decompressed sizes follow from the IDX headers; no published hash
        "train-images-idx3-ubyte": (KnownFile(47040016, None, "decompressed MNIST"),),
        "train-labels-idx1-ubyte": (KnownFile(60008, None, "decompressed MNIST"),),
        "t10k-images-idx3-ubyte": (KnownFile(7840016, None, "decompressed MNIST"),),
        "t10k-labels-idx1-ubyte": (KnownFile(10008, None, "decompressed MNIST"),),
    },
    "fashion_mnist": {
        # Debian recompressed the upstream files without the stored file name (gzip -n): same data,
        # 23-24 bytes shorter, different hashes. Both variants are genuine.
        "train-images-idx3-ubyte.gz": (
            KnownFile(26421856, "sha256:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", _DEBIAN),
            KnownFile(26421880, "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d", _ZALANDO),
        ),
        "train-labels-idx1-ubyte.gz": (
            KnownFile(29491, "sha256:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", _DEBIAN),
            KnownFile(29515, "md5:25c81989df183df01b3e8a0aad5dffbe", _ZALANDO),
        ),
        "t10k-images-idx3-ubyte.gz": (
            KnownFile(4422079, "sha256:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", _DEBIAN),
            KnownFile(4422102, "md5:bef4ecab320f06d8554ea6380940ec79", _ZALANDO),
        ),
        "t10k-labels-idx1-ubyte.gz": (
            KnownFile(5125, "sha256:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", _DEBIAN),
            KnownFile(5148, "md5:bb300cfdad3c16e7a12a480ee83cd310", _ZALANDO),
        ),
        "train-images-idx3-ubyte": (
            KnownFile(47040016, "sha256:c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", _UNZIPPED),
        ),
        "train-labels-idx1-ubyte": (
            KnownFile(60008, "sha256:bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", _UNZIPPED),
        ),
        "t10k-images-idx3-ubyte": (
            KnownFile(7840016, "sha256:5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", _UNZIPPED),
        ),
        "t10k-labels-idx1-ubyte": (
            KnownFile(10008, "sha256:0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", _UNZIPPED),
        ),
    },
    "cifar10": {
        # md5 as published by torchvision for the extracted cifar-10-python.tar.gz; sizes not recorded
        name: (KnownFile(None, f"md5:{md5}", "cifar-10-python.tar.gz (md5 as published by torchvision)"),)
        for name, md5 in (
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
        )
    },
}


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _verify_cached(dataset: str, path_str: str, size: int, mtime_ns: int) -> None:
    # keyed on (size, mtime) so a file replaced on disk is checked again
    path = Path(path_str)
    variants = KNOWN_FILES.get(dataset, {}).get(path.name)
    if not variants:
        return
    title = _SPECS[dataset].title if dataset in _SPECS else dataset
    fix = (
        f"Fix: replace it with the published file ({how_to_get(dataset)}); if it is deliberately "
        f"different (a subset, a test file), load with verify=False."
    )
    by_size = [v for v in variants if v.size is None or v.size == size]
    if not by_size:
        known = " or ".join(f"{v.size} ({v.origin})" for v in variants)
        other = _other_dataset_with_size(dataset, path.name, size)
        hint = f" Its size is that of the {other} file - wrong directory?" if other else ""
        raise CorruptDataError(
            f"{path}: size mismatch: {size} bytes, expected {known} for the {title} file. "
            f"Truncated or incomplete download?{hint} {fix}"
        )
    computed: dict[str, str] = {}
    for v in by_size:
        if v.digest is None:
            _reject_other_dataset(dataset, path, size, fix)
            return
        algo, want = v.digest.split(":", 1)
        if algo not in computed:
            computed[algo] = _file_digest(path, algo)
        if computed[algo] == want:
            return
    wanted = ", ".join(f"{v.digest} ({v.origin})" for v in by_size)
    got = ", ".join(f"{a}:{h}" for a, h in computed.items())
    raise CorruptDataError(f"{path}: hash mismatch: got {got}, expected {wanted}. {fix}")


def _reject_other_dataset(dataset: str, path: Path, size: int, fix: str) -> None:
    # Decompressed MNIST and Fashion-MNIST files have the same names and sizes and MNIST's have no
    # published hash, so only the other dataset's hash can tell them apart.
    for other, files in KNOWN_FILES.items():
        if other == dataset:
            continue
        for v in files.get(path.name, ()):
            if v.size == size and v.digest is not None:
                algo, want = v.digest.split(":", 1)
                if _file_digest(path, algo) == want:
                    raise CorruptDataError(
                        f"{path}: this is the {_SPECS[other].title} file, not "
                        f"{_SPECS[dataset].title} (its {algo} matches {v.origin}) - wrong "
                        f"directory? Move it to a {_SPECS[other].subdirs[0]}/ directory. {fix}"
                    )


def _other_dataset_with_size(dataset: str, filename: str, size: int) -> str | None:
    for other, files in KNOWN_FILES.items():
        if other != dataset and any(v.size == size for v in files.get(filename, ())):
            return _SPECS[other].title
    return None


def verify_file(dataset: str, path: str | os.PathLike) -> None:
    """Raise CorruptDataError if ``path`` is a known file of ``dataset`` but differs from it.

    Files with names that are not known are not checked (nothing to compare with). Results are
    cached per (path, size, mtime), so loading the same dataset again costs no hashing.
    """
    path = Path(path)
    st = path.stat()
    _verify_cached(canonical_name(dataset), str(path), st.st_size, st.st_mtime_ns)


def matches_known_size(dataset: str, path: str | os.PathLike) -> bool | None:
    """Cheap check (no hashing) used to *note* non-standard files when verification is off.

    None when the file name is not a known one.
    """
    path = Path(path)
    variants = KNOWN_FILES.get(canonical_name(dataset), {}).get(path.name)
    if not variants:
        return None
    size = path.stat().st_size
    return any(v.size is None or v.size == size for v in variants)


# --------------------------------------------------------------------------- search order


def cache_dir() -> Path:
    """The user cache root: ``$XDG_CACHE_HOME/bnlab``, else ``~/.cache/bnlab``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # XDG spec: relative values are invalid and must be ignored
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "bnlab"
    return Path(os.path.expanduser("~")) / ".cache" / "bnlab"


def _roots(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    roots: list[tuple[Path, str]] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append((Path(os.path.expanduser(os.fspath(data_dir))), "--data-dir"))
    for part in os.environ.get("BNLAB_DATA", "").split(os.pathsep):
        if part.strip():
            roots.append((Path(os.path.expanduser(part.strip())), "$BNLAB_DATA"))
    roots.append((cache_dir(), "user cache"))
    return roots


def _candidates(name: str, data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    name = canonical_name(name)
    spec = _SPECS.get(name)
    if spec is None:
        return []
    out: list[tuple[Path, str]] = []
    for root, why in _roots(data_dir):
        out.extend((root / sub, why) for sub in spec.subdirs)
    out.extend((SYSTEM_DATA_ROOT / sub, "system") for sub in spec.system_dirs)
    seen: set[Path] = set()
    unique = []
    for p, why in out:
        if p not in seen:
            seen.add(p)
            unique.append((p, why))
    return unique


def search_paths(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in order (empty for ``digits``, which is
    bundled with scikit-learn). Used in error messages and by ``bnlab doctor``."""
    return [p for p, _ in _candidates(name, data_dir)]


@dataclass(frozen=True)
class Located:
    """A complete set of files for one dataset: logical name -> actual path."""

    name: str
    directory: Path
    files: dict[str, Path]


def _find_in(directory: Path, spec: _Spec) -> tuple[dict[str, Path], list[str]]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for logical in spec.files:
        plain = directory / logical
        gz = directory / (logical + ".gz")
        # prefer the decompressed file: same data, no gunzip on every load
        if plain.is_file():
            found[logical] = plain
        elif spec.gz_ok and gz.is_file():
            found[logical] = gz
        else:
            missing.append(logical + ("[.gz]" if spec.gz_ok else ""))
    return found, missing


def how_to_get(name: str) -> str:
    """One paragraph telling a user how to obtain dataset ``name`` (no network at run time)."""
    name = canonical_name(name)
    cache = cache_dir()
    if name == "fashion_mnist":
        return (
            "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts "
            f"the files in {SYSTEM_DATA_ROOT / 'fashion-mnist'}), or place "
            f"{', '.join(f + '.gz' for f in IDX_FILES)} (gzipped or not; from "
            "https://github.com/zalandoresearch/fashion-mnist, data/fashion/) in "
            f"{cache / 'fashion-mnist'}/ or in DIR/fashion-mnist/ with --data-dir DIR or "
            "BNLAB_DATA=DIR."
        )
    if name == "mnist":
        return (
            f"Place {', '.join(f + '.gz' for f in IDX_FILES)} (gzipped or not; e.g. from "
            f"https://ossci-datasets.s3.amazonaws.com/mnist/) in {cache / 'mnist'}/ or in "
            "DIR/mnist/ with --data-dir DIR or BNLAB_DATA=DIR (a torchvision download, "
            "DIR/MNIST/raw/, works too)."
        )
    if name == "cifar10":
        return (
            "Download cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) and "
            f"extract it with `mkdir -p {cache} && tar xzf cifar-10-python.tar.gz -C {cache}`, "
            f"which gives {cache / 'cifar-10-batches-py'}/data_batch_1..5 and test_batch (or "
            "extract it into DIR and use --data-dir DIR or BNLAB_DATA=DIR)."
        )
    return "It is bundled with scikit-learn: `pip install scikit-learn`."


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Located:
    """Find the first searched directory holding all files of dataset ``name``.

    Raises DataNotFoundError listing every searched place (and what was missing in directories
    that exist) plus how to get the dataset.
    """
    name = canonical_name(name)
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError(f"dataset {name!r} has no files to locate (it is bundled with scikit-learn)")
    cands = _candidates(name, data_dir)
    lines = []
    for i, (d, why) in enumerate(cands, 1):
        if not d.is_dir():
            lines.append(f"  {i}. {d}  ({why}; does not exist)")
            continue
        found, missing = _find_in(d, spec)
        if not missing:
            return Located(name, d, found)
        lines.append(f"  {i}. {d}  ({why}; missing {', '.join(missing)})")
    env_note = "" if os.environ.get("BNLAB_DATA", "").strip() else "\n  ($BNLAB_DATA is not set)"
    raise DataNotFoundError(
        f"{spec.title} not found. Searched, in order:\n" + "\n".join(lines) + env_note
        + f"\nHow to get it: {how_to_get(name)}"
    )
