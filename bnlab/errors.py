"""Error types shared by every layer.

Each error message names the problem *and* the fix, so the CLI can print it as is (no traceback).
They subclass the built-in type a caller would naturally catch (ValueError, FileNotFoundError, ...),
and, where torch.nn raises a different type in the same situation, that type too, so code written
for torch.nn (``except RuntimeError``) keeps working with bnlab's layers.
"""


class BnlabError(Exception):
    """Base class: the CLI prints these as one clear message and exits non-zero."""


class ConfigError(BnlabError, ValueError):
    """A bad argument, config key or value (unknown name, wrong type, out of range)."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument of the wrong type, e.g. num_features=2.5 (torch raises TypeError here)."""


class ShapeError(BnlabError, ValueError):
    """An input tensor of the wrong rank, channel count or dtype."""


class ChannelError(ShapeError, RuntimeError):
    """An input whose channel count differs from the layer's (torch.nn raises RuntimeError here)."""


class DtypeError(ShapeError, NotImplementedError):
    """An input of a dtype the layer cannot normalize, e.g. an integer tensor (torch.nn raises
    NotImplementedError, a RuntimeError, here), or one that does not match the layer's parameter
    dtype (torch.nn raises RuntimeError "mixed dtype")."""


class InputTypeError(ShapeError, TypeError, AttributeError):
    """A layer input that is not a tensor, e.g. a list or a NumPy array (torch.nn's layers fail
    with AttributeError on ``input.dim()`` here)."""


class NoChannelsError(ShapeError, IndexError):
    """A forward through a layer built with num_features=0 (torch.nn constructs it, then raises
    IndexError in the forward)."""


class VmapRunningStatsError(BnlabError, RuntimeError):
    """``torch.func.vmap`` over a training BN layer whose running statistics are shared by all the
    vmapped examples (torch.nn raises RuntimeError here)."""


class DataNotFoundError(BnlabError, FileNotFoundError):
    """A dataset that is not in any of the searched places."""


class CorruptDataError(BnlabError, ValueError):
    """A data or checkpoint file that is truncated, has the wrong size/hash, or a bad header."""


class RunLockedError(BnlabError, RuntimeError):
    """Another process holds the lock of a run directory."""
