"""Datasets and batching: IDX (MNIST, Fashion-MNIST), CIFAR-10 pickles, scikit-learn digits,
synthetic Gaussian regression (DLN), and seeded in-memory mini-batches.

Where each concept lives:

- ``locate.py``: search order (--data-dir, $BNLAB_DATA, user cache, /usr/share/datasets), known
  files with sizes and hashes, verification
- ``idx.py``, ``cifar.py``, ``digits.py``: format readers returning numpy arrays
- ``datasets.py``: ``Dataset`` and ``load_dataset`` (tensors, fallback to Fashion-MNIST, cache)
- ``synthetic.py``: ``make_gaussian_regression`` for the deep linear network
- ``batches.py``: ``Batches`` (batch = function of (seed, step)) and ``subset``
"""

from bnlab.data.batches import Batches, subset
from bnlab.data.cifar import read_cifar10
from bnlab.data.datasets import Dataset, clear_cache, load_dataset
from bnlab.data.idx import read_idx
from bnlab.data.locate import DATASET_NAMES, cache_dir, find_dataset, how_to_get, search_paths
from bnlab.data.synthetic import make_gaussian_regression

__all__ = [
    "Batches",
    "DATASET_NAMES",
    "Dataset",
    "cache_dir",
    "clear_cache",
    "find_dataset",
    "how_to_get",
    "load_dataset",
    "make_gaussian_regression",
    "read_cifar10",
    "read_idx",
    "search_paths",
    "subset",
]
