"""bnlab.data: format readers, search order, verification, fallback, batching, synthetic data.

Dataset files are small ones generated in the real formats (tests/_data_formats.py builds them
without bnlab's readers). One test reads the real Debian Fashion-MNIST when it is installed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bnlab.data.locate as locate_mod
from bnlab.data import (
    Batches,
    Dataset,
    clear_cache,
    load_dataset,
    make_gaussian_regression,
    read_cifar10,
    read_idx,
    search_paths,
    subset,
)
from bnlab.data.cifar import read_cifar_batch
from bnlab.data.locate import KnownFile, cache_dir, find_dataset
from bnlab.errors import ConfigError, CorruptDataError, DataNotFoundError

sys.path.insert(0, str(Path(__file__).parent))  # the helper module next to this file
from _data_formats import (  # noqa: E402
    IDX_NAMES,
    cifar_batch_bytes,
    idx_bytes,
    make_cifar_dir,
    make_idx_arrays,
    write_idx,
    write_idx_dataset,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test may see the user's cache, $BNLAB_DATA or /usr/share/datasets unless it asks."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(locate_mod, "SYSTEM_DATA_ROOT", tmp_path / "system")
    yield
    clear_cache()


def _expect_tensors(ds: Dataset, arrays) -> None:
    x_train, y_train, x_test, y_test = arrays
    for t, a in ((ds.x_train, x_train), (ds.x_test, x_test)):
        assert t.dtype == torch.float32 and t.is_contiguous()
        a = a.reshape(t.shape)
        assert torch.equal(t, torch.from_numpy(a.astype(np.float32)) / 255.0)
    for t, a in ((ds.y_train, y_train), (ds.y_test, y_test)):
        assert t.dtype == torch.int64 and t.is_contiguous()
        assert torch.equal(t, torch.from_numpy(a.astype(np.int64)))


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_read_idx_roundtrip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == "uint8":
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / f"a{suffix}", a))
    assert got.dtype == a.dtype and got.dtype.isnative
    assert got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, a)


def test_read_idx_labels_1d_and_gzip_detected_by_content(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    p = tmp_path / "labels-without-gz-suffix"
    p.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(p), labels)


def test_truncated_idx_is_named(tmp_path):
    p = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 5, 5), np.uint8))
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(CorruptDataError, match="size mismatch with header") as e:
        read_idx(p)
    assert str(p) in str(e.value) and "truncated" in str(e.value)


def test_truncated_gzip_idx_is_named(tmp_path):
    p = write_idx(tmp_path / "x.gz", np.arange(4000, dtype=np.uint8).reshape(40, 10, 10) % 7)
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(CorruptDataError, match="truncated") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_trailing_bytes_are_a_size_mismatch(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\x00\x00")
    with pytest.raises(CorruptDataError, match="size mismatch with header"):
        read_idx(p)


@pytest.mark.parametrize("head", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00",
                                  b"PK\x03\x04"])
def test_bad_idx_magic_is_named(tmp_path, head):
    p = tmp_path / "t10k-labels-idx1-ubyte"
    p.write_bytes(head + struct.pack(">I", 3) + b"\x01\x02\x03")
    with pytest.raises(CorruptDataError, match="bad IDX magic") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_corrupt_gzip_is_named(tmp_path):
    p = write_idx(tmp_path / "x.gz", np.arange(3000, dtype=np.uint8).reshape(30, 10, 10))
    raw = bytearray(p.read_bytes())
    for i in range(12, len(raw) - 8):  # scribble over the deflate stream
        raw[i] ^= 0x5A
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_header_claiming_huge_data_fails_fast(tmp_path):
    # a damaged header must not make the reader try to allocate 2**64 bytes
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 2**31, 2**16, 2**16)))
    with pytest.raises(CorruptDataError, match="cannot hold"):
        read_idx(p)
    q = tmp_path / "y"
    q.write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2**31, 2**16, 2**16))
    with pytest.raises(CorruptDataError, match="size mismatch"):
        read_idx(q)


# ----------------------------------------------------------------------------- IDX datasets


@pytest.mark.parametrize("gz", [False, True])
def test_load_fashion_mnist_from_data_dir(tmp_path, gz):
    arrays = make_idx_arrays(12, 5, hw=(28, 28))
    write_idx_dataset(tmp_path / "data" / "fashion-mnist", arrays, gz=gz)
    ds = load_dataset("fashion_mnist", tmp_path / "data", verify=False)
    assert (ds.name, ds.requested) == ("fashion_mnist", "fashion_mnist")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.source == str(tmp_path / "data" / "fashion-mnist")
    assert "differ in size from the published Fashion-MNIST" in ds.note  # not the real thing
    _expect_tensors(ds, arrays)
    assert "train=12" in repr(ds) and "tensor" not in repr(ds)


def test_names_are_normalised_and_unknown_names_list_valid_ones(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist", make_idx_arrays(3, 2), gz=True)
    assert load_dataset("Fashion-MNIST", tmp_path, verify=False).name == "fashion_mnist"
    with pytest.raises(ConfigError) as e:
        load_dataset("imagenet")
    for valid in ("mnist", "fashion_mnist", "cifar10", "digits"):
        assert valid in str(e.value)
    with pytest.raises(ConfigError):
        search_paths("imagenet")


def test_torchvision_layout_is_accepted(tmp_path):
    arrays = make_idx_arrays(4, 3)
    write_idx_dataset(tmp_path / "MNIST" / "raw", arrays, gz=False)
    ds = load_dataset("mnist", tmp_path, verify=False, fallback=False)
    assert ds.name == "mnist" and ds.in_shape == (1, 6, 5)
    _expect_tensors(ds, arrays)


def test_loads_are_cached_in_process(tmp_path):
    write_idx_dataset(tmp_path / "mnist", make_idx_arrays(4, 3), gz=True)
    a = load_dataset("mnist", tmp_path, verify=False)
    b = load_dataset("mnist", tmp_path, verify=False)
    assert a.x_train is b.x_train


def test_rewritten_file_is_read_again(tmp_path):
    files = write_idx_dataset(tmp_path / "mnist", make_idx_arrays(4, 3), gz=False)
    a = load_dataset("mnist", tmp_path, verify=False)
    new = make_idx_arrays(6, 3)
    write_idx_dataset(tmp_path / "mnist", new, gz=False)
    for p in files.values():  # mtime resolution can be coarse: make the change visible
        os.utime(p, ns=(1, 1))
    b = load_dataset("mnist", tmp_path, verify=False)
    assert a.x_train.shape[0] == 4 and b.x_train.shape[0] == 6


def test_inconsistent_image_and_label_counts(tmp_path):
    x_tr, y_tr, x_te, y_te = make_idx_arrays(5, 3)
    write_idx_dataset(tmp_path / "mnist", (x_tr, y_tr[:4], x_te, y_te), gz=False)
    with pytest.raises(CorruptDataError, match="5 images .* 4 labels"):
        load_dataset("mnist", tmp_path, verify=False)


def test_label_out_of_range(tmp_path):
    x_tr, y_tr, x_te, y_te = make_idx_arrays(5, 3)
    y_tr[2] = 10
    write_idx_dataset(tmp_path / "mnist", (x_tr, y_tr, x_te, y_te), gz=False)
    with pytest.raises(CorruptDataError, match="label 10"):
        load_dataset("mnist", tmp_path, verify=False)


# ----------------------------------------------------------------------------- verification


def test_verify_rejects_small_file_under_a_standard_name(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist", make_idx_arrays(4, 3), gz=True)
    with pytest.raises(CorruptDataError, match="size mismatch") as e:
        load_dataset("fashion_mnist", tmp_path)  # verify=True by default
    msg = str(e.value)
    assert str(tmp_path / "fashion-mnist") in msg and "idx" in msg
    assert "26421856" in msg  # the Debian size is named as the expected one
    assert "verify=False" in msg


def _small_known(tmp_path, monkeypatch, dataset="mnist"):
    """Files that verification accepts: register their real size and SHA-256 as 'known'."""
    files = write_idx_dataset(tmp_path / locate_mod._SPECS[dataset].subdirs[0],
                              make_idx_arrays(4, 3), gz=True)
    known = {p.name: (KnownFile(p.stat().st_size,
                                "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest(), "test"),)
             for p in files.values()}
    monkeypatch.setitem(locate_mod.KNOWN_FILES, dataset, known)
    return files


def test_verify_accepts_matching_files_and_names_a_hash_mismatch(tmp_path, monkeypatch):
    files = _small_known(tmp_path, monkeypatch)
    ds = load_dataset("mnist", tmp_path, fallback=False)
    assert ds.x_train.shape[0] == 4
    p = files["t10k-labels-idx1-ubyte"]
    raw = bytearray(p.read_bytes())
    raw[-9] ^= 1  # same size, different content (in the gzip CRC: still parses as gzip header)
    p.write_bytes(bytes(raw))
    clear_cache()
    with pytest.raises(CorruptDataError, match="hash mismatch") as e:
        load_dataset("mnist", tmp_path, fallback=False)
    assert str(p) in str(e.value)


def test_verify_off_notes_non_standard_files(tmp_path):
    write_idx_dataset(tmp_path / "mnist", make_idx_arrays(4, 3), gz=True)
    ds = load_dataset("mnist", tmp_path, verify=False)
    assert "differ in size" in ds.note and "MNIST" in ds.note


def test_fashion_file_in_mnist_dir_is_recognised(tmp_path, monkeypatch):
    # decompressed MNIST/Fashion files share names and sizes; only Fashion's hash tells them apart
    files = write_idx_dataset(tmp_path / "mnist", make_idx_arrays(4, 3), gz=False)
    p = files["train-labels-idx1-ubyte"]
    size, sha = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
    monkeypatch.setitem(locate_mod.KNOWN_FILES, "mnist",
                        {p.name: (KnownFile(size, None, "test mnist"),)})
    monkeypatch.setitem(locate_mod.KNOWN_FILES, "fashion_mnist",
                        {p.name: (KnownFile(size, f"sha256:{sha}", "test fashion"),)})
    with pytest.raises(CorruptDataError, match="is the Fashion-MNIST file, not MNIST"):
        load_dataset("mnist", tmp_path, fallback=False)


def test_corrupt_mnist_does_not_fall_back(tmp_path):
    files = write_idx_dataset(tmp_path / "mnist", make_idx_arrays(4, 3), gz=True)
    write_idx_dataset(tmp_path / "fashion-mnist", make_idx_arrays(4, 3), gz=True)
    p = files["train-images-idx3-ubyte"]
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(CorruptDataError) as e:
        load_dataset("mnist", tmp_path, verify=False)
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------- search order


def _mk(root: Path, n: int) -> Path:
    write_idx_dataset(root / "fashion-mnist", make_idx_arrays(n, 2, seed=n), gz=True)
    return root / "fashion-mnist"


def test_search_order_data_dir_env_cache_system(tmp_path, monkeypatch):
    d_arg, d_env1, d_env2 = tmp_path / "arg", tmp_path / "env1", tmp_path / "env2"
    monkeypatch.setenv("BNLAB_DATA", f"{d_env1}{os.pathsep}{d_env2}")
    cache = cache_dir()
    assert cache == tmp_path / "xdg" / "bnlab"
    system = locate_mod.SYSTEM_DATA_ROOT / "fashion-mnist"
    paths = search_paths("fashion_mnist", d_arg)
    firsts = [paths.index(p) for p in (d_arg / "fashion-mnist", d_env1 / "fashion-mnist",
                                       d_env2 / "fashion-mnist", cache / "fashion-mnist", system)]
    assert firsts == sorted(firsts) and paths[-1] == system

    # fill the places from the back; each time the earlier place must win
    write_idx_dataset(system, make_idx_arrays(3, 2), gz=False)
    fillers = [lambda: system, lambda: _mk(cache, 4), lambda: _mk(d_env2, 5),
               lambda: _mk(d_env1, 6), lambda: _mk(d_arg, 7)]
    for n, fill in enumerate(fillers, start=3):
        where = fill()
        ds = load_dataset("fashion_mnist", d_arg, verify=False)
        assert (ds.source, ds.x_train.shape[0]) == (str(where), n)


def test_bnlab_data_is_honoured_without_data_dir(tmp_path, monkeypatch):
    _mk(tmp_path / "env", 5)
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert load_dataset("fashion_mnist", verify=False).x_train.shape[0] == 5


def test_cache_dir_honours_xdg_and_ignores_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "bnlab"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "bnlab"


def test_missing_dataset_lists_every_place_and_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    (tmp_path / "arg" / "fashion-mnist").mkdir(parents=True)
    write_idx(tmp_path / "arg" / "fashion-mnist" / "train-images-idx3-ubyte.gz",
              np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion_mnist", tmp_path / "arg")
    msg = str(e.value)
    for p in search_paths("fashion_mnist", tmp_path / "arg"):
        assert str(p) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "missing train-labels-idx1-ubyte" in msg  # the incomplete directory says what lacks
    assert isinstance(e.value, FileNotFoundError)


def test_missing_mnist_and_cifar_say_which_files_go_where(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", tmp_path, fallback=False)
    msg = str(e.value)
    assert all(n + ".gz" in msg for n in IDX_NAMES)
    assert str(cache_dir() / "mnist") in msg and "$BNLAB_DATA is not set" in msg
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar10", tmp_path, fallback=False)
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg
    assert "data_batch_1" in msg and "test_batch" in msg


# ----------------------------------------------------------------------------- fallback


def test_mnist_falls_back_to_fashion_mnist(tmp_path):
    arrays = make_idx_arrays(6, 4)
    write_idx_dataset(tmp_path / "fashion-mnist", arrays, gz=True)
    ds = load_dataset("mnist", tmp_path, verify=False)
    assert ds.name == "fashion_mnist" and ds.requested == "mnist" and ds.is_fallback
    assert "MNIST was requested but not found" in ds.note and "Fashion-MNIST" in ds.note
    assert str(tmp_path / "mnist") in ds.note  # says where it looked
    _expect_tensors(ds, arrays)
    with pytest.raises(DataNotFoundError):
        load_dataset("mnist", tmp_path, verify=False, fallback=False)


def test_cifar10_falls_back_and_says_the_shape_changed(tmp_path):
    write_idx_dataset(tmp_path / "fashion-mnist", make_idx_arrays(6, 4, hw=(28, 28)), gz=True)
    ds = load_dataset("cifar10", tmp_path, verify=False)
    assert (ds.name, ds.requested, ds.in_shape) == ("fashion_mnist", "cifar10", (1, 28, 28))
    assert "(3, 32, 32)" in ds.note


def test_fallback_missing_too_reports_both(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", tmp_path)
    msg = str(e.value)
    assert "MNIST not found" in msg and "Fashion-MNIST not found" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


# ----------------------------------------------------------------------------- CIFAR-10


def test_read_cifar10_python2_pickles(tmp_path):
    expected = make_cifar_dir(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        got = read_cifar10(root)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
    assert got[0].shape == (35, 3, 32, 32) and got[0].dtype == np.uint8


def test_load_cifar10(tmp_path):
    expected = make_cifar_dir(tmp_path / "data")
    ds = load_dataset("cifar10", tmp_path / "data", verify=False, fallback=False)
    assert ds.name == "cifar10" and ds.in_shape == (3, 32, 32)
    _expect_tensors(ds, expected)
    # the R, G, B planes of a row land in channels 0, 1, 2
    row = expected[0].reshape(35, 3072)[0]
    assert torch.equal(ds.x_train[0, 1, 0, :], torch.from_numpy(row[1024:1056]).float() / 255)


def test_cifar10_verify_names_the_hash_mismatch(tmp_path):
    make_cifar_dir(tmp_path)
    with pytest.raises(CorruptDataError, match="hash mismatch") as e:
        load_dataset("cifar10", tmp_path, fallback=False)
    assert "data_batch_1" in str(e.value) and "c99cafc152244af753f735de768cd75f" in str(e.value)


def test_bad_cifar_pickle_is_named(tmp_path):
    make_cifar_dir(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(CorruptDataError, match="bad pickle") as e:
        load_dataset("cifar10", tmp_path, verify=False, fallback=False)
    assert str(p) in str(e.value)


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.remove, (str(tmp_path / "victim"),))

    import pickle

    (tmp_path / "victim").write_text("x")
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Boom(), b"labels": []}, protocol=2))
    with pytest.raises(CorruptDataError, match="refusing to load global"):
        read_cifar_batch(p)
    assert (tmp_path / "victim").exists()


def test_cifar_batch_with_wrong_shape(tmp_path):
    p = tmp_path / "test_batch"
    p.write_bytes(cifar_batch_bytes(np.zeros((2, 100), np.uint8), [1, 2]))
    with pytest.raises(CorruptDataError, match=r"expected uint8 \(n, 3072\)"):
        read_cifar_batch(p)


# ----------------------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1500, 1, 8, 8) and ds.x_test.shape == (297, 1, 8, 8)
    assert ds.in_shape == (1, 8, 8) and ds.num_classes == 10 and ds.note == ""
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # every class in both splits
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert "first 1500" in ds.source
    from sklearn.datasets import load_digits

    y = load_digits().target
    assert ds.y_test.tolist() == y[1500:].tolist()


# ----------------------------------------------------------------------------- synthetic


def test_gaussian_regression():
    x, y, a = make_gaussian_regression()
    assert x.shape == (1000, 10) and y.shape == (1000, 10) and a.shape == (10, 10)
    assert x.dtype == torch.float64
    torch.testing.assert_close(y, x @ a.T)
    x2, y2, a2 = make_gaussian_regression()
    assert torch.equal(x, x2) and torch.equal(a, a2)
    assert not torch.equal(a, make_gaussian_regression(seed=1)[2])
    x32, _, a32 = make_gaussian_regression(dtype=torch.float32)
    assert x32.dtype == torch.float32 and torch.equal(a32, a.float())
    # N(0, 1) entries, N(0, I) samples: loose moment checks
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    for bad in ({"n": 0}, {"dim": -1}, {"dtype": torch.int64}):
        with pytest.raises(ConfigError):
            make_gaussian_regression(**bad)


# ----------------------------------------------------------------------------- batches


def _xy(n=23):
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    return x, torch.arange(n)


def test_batches_same_seed_and_step_give_same_batch():
    x, y = _xy()
    a, b = Batches(x, y, 5, seed=1), Batches(x, y, 5, seed=1)
    for step in (0, 3, 4, 5, 17, 100):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, x[ya]) and xa.is_contiguous()


def test_batches_resume_equals_uninterrupted():
    x, y = _xy()
    full = Batches(x, y, 4, seed=7)
    seq = [full.batch(s)[1] for s in range(30)]
    for start in (0, 5, 11, 12, 29):
        resumed = Batches(x, y, 4, seed=7)  # fresh object, as after a restart
        for s in range(start, 30):
            assert torch.equal(resumed.batch(s)[1], seq[s])


def test_batches_different_seeds_and_epochs_differ():
    x, y = _xy(100)
    a, b = Batches(x, y, 10, seed=0), Batches(x, y, 10, seed=1)
    assert not torch.equal(a.permutation(0), b.permutation(0))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    # seed s epoch e+1 is not seed s+1 epoch e (no additive mixing)
    assert not torch.equal(a.permutation(1), b.permutation(0))


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_example_once_per_epoch(drop_last):
    n, bs = 23, 5
    x, y = _xy(n)
    b = Batches(x, y, bs, seed=3, drop_last=drop_last)
    assert len(b) == b.steps_per_epoch == (4 if drop_last else 5)
    for epoch in range(3):
        seen = torch.cat([b.batch(epoch * len(b) + i)[1] for i in range(len(b))])
        if drop_last:
            assert seen.numel() == 20 and seen.unique().numel() == 20
        else:
            assert sorted(seen.tolist()) == list(range(n))
            assert b.batch(epoch * len(b) + 4)[1].numel() == 3


@pytest.mark.parametrize("bs", [0, -1, 24])
def test_bad_batch_size_is_a_config_error(bs):
    x, y = _xy(23)
    with pytest.raises(ConfigError, match="batch size between 1 and 23"):
        Batches(x, y, bs, seed=0)


def test_batches_bad_step_and_mismatched_inputs():
    x, y = _xy(10)
    with pytest.raises(ConfigError):
        Batches(x, y, 2, seed=0).batch(-1)
    with pytest.raises(ValueError, match="same first dimension"):
        Batches(x, y[:9], 2, seed=0)


def test_subset_is_fixed_and_clipped():
    x, y = _xy(50)
    xs, ys = subset(x, y, 10, seed=4)
    xs2, ys2 = subset(x, y, 10, seed=4)
    assert torch.equal(ys, ys2) and ys.unique().numel() == 10 and torch.equal(xs, x[ys])
    assert torch.equal(ys, ys.sort().values)
    assert not torch.equal(ys, subset(x, y, 10, seed=5)[1])
    assert subset(x, y, 500, seed=0)[1].numel() == 50
    with pytest.raises(ConfigError):
        subset(x, y, 0, seed=0)


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setattr(locate_mod, "SYSTEM_DATA_ROOT", DEBIAN_FASHION.parent)
    assert find_dataset("fashion_mnist").directory == DEBIAN_FASHION
    ds = load_dataset("fashion_mnist")  # verify=True: checks the recorded sizes and SHA-256s
    assert ds.source == str(DEBIAN_FASHION) and ds.note == ""
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and 0.0 <= float(ds.x_train.min())
    assert float(ds.x_train.max()) == 1.0
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.y_train[:4].tolist() == [9, 0, 0, 3] and ds.y_test[:4].tolist() == [9, 2, 1, 1]
    # and via the fallback, from an empty --data-dir
    fb = load_dataset("mnist", tmp_path)
    assert fb.name == "fashion_mnist" and fb.requested == "mnist" and fb.x_train is ds.x_train
