"""Batch normalization: NumPy reference, pure functional core, drop-in modules, factory."""
from bnlab.norm.factory import convert, make_norm, norm_names, register_norm
from bnlab.norm.functional import BatchNormOutput, NonFiniteBatchWarning, batch_norm
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, is_batchnorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormOutput", "NonFiniteBatchWarning",
    "batch_norm", "convert", "is_batchnorm", "make_norm", "norm_names", "register_norm",
]
