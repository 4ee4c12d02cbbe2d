"""Batch normalization: NumPy reference, pure functional core, drop-in modules, variants, factory."""
from bnlab.norm.factory import convert, make_norm, norm_names, register_norm
from bnlab.norm.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze, unfreeze
from bnlab.norm.functional import BatchNormOutput, NonFiniteBatchWarning, batch_norm
from bnlab.norm.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm
from bnlab.norm.layer_group import GroupNorm, LayerNorm
from bnlab.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, is_batchnorm
from bnlab.norm.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule, batch_renorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormOutput", "NonFiniteBatchWarning",
    "batch_norm", "convert", "is_batchnorm", "make_norm", "norm_names", "register_norm",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule", "batch_renorm",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze",
    "GroupNorm", "LayerNorm",
]
