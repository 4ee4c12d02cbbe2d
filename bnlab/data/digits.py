"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes): the dataset that is always there.

Split, fixed and documented so results are comparable across runs and machines: the first
``DIGITS_TRAIN`` = 1500 images (in scikit-learn's order) are the training set, the remaining 297
the test set. scikit-learn's order interleaves writers and classes, so both splits hold every
class (checked in the tests).
"""

from __future__ import annotations

import numpy as np

__all__ = ["read_digits", "DIGITS_TRAIN"]

DIGITS_TRAIN = 1500
DIGITS_MAX = 16.0  # pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap)


def read_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (x_train, y_train, x_test, y_test); x float32 in [0, 1] shaped (N, 1, 8, 8), y int64."""
    # imported here: scikit-learn takes ~1 s to import and only this dataset needs it
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (np.asarray(x, dtype=np.float32) / DIGITS_MAX).reshape(-1, 1, 8, 8)
    y = np.asarray(y, dtype=np.int64)
    return (
        np.ascontiguousarray(x[:DIGITS_TRAIN]),
        np.ascontiguousarray(y[:DIGITS_TRAIN]),
        np.ascontiguousarray(x[DIGITS_TRAIN:]),
        np.ascontiguousarray(y[DIGITS_TRAIN:]),
    )
