"""bnlab: batch normalization done right, measured, and reproduced.

The public API: drop-in BN modules, the pure functional core, the norm factory and ``convert``.
Instruments live in ``bnlab.measure``, data in ``bnlab.data``, models in ``bnlab.models``.
"""
from bnlab.norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    batch_norm,
    convert,
    is_batchnorm,
    make_norm,
    norm_names,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert", "is_batchnorm",
    "make_norm", "norm_names", "__version__",
]
