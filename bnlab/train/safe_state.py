"""Checkpoint contents that load with ``torch.load(..., weights_only=True)``.

A run directory travels (a shared cluster folder, a colleague's results), and resuming a run loads
its checkpoint. Full unpickling (``weights_only=False``) would execute whatever a crafted file asks
for, so checkpoints hold only what torch's restricted unpickler accepts: tensors, ``str``, ``int``,
``float``, ``bool``, ``None``, lists, tuples and dicts. The two other things a run keeps are encoded
here as such: NumPy arrays (probe arrays, NumPy's RNG state) as their bytes in a uint8 tensor with
dtype and shape, and NumPy scalars likewise, each in a dict tagged with a key no other dict uses.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["decode", "encode"]

_ARRAY = "__bnlab_ndarray__"
_SCALAR = "__bnlab_npscalar__"


def _pack(a: np.ndarray) -> dict[str, Any]:
    if a.dtype.hasobject:
        raise TypeError("a NumPy array of Python objects cannot be stored safely in a checkpoint")
    raw = np.ascontiguousarray(a).tobytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": data}


def _unpack(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(d["data"].numpy().tobytes(), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def encode(obj: Any) -> Any:
    """``obj`` with every NumPy array and scalar replaced by tensor-holding dicts (recursively through
    dicts, lists and tuples). Raises TypeError for anything else the restricted unpickler refuses."""
    if isinstance(obj, np.ndarray):
        return {_ARRAY: _pack(obj)}
    if isinstance(obj, np.generic):
        return {_SCALAR: _pack(np.asarray(obj))}
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [encode(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor, torch.Size, torch.dtype)):
        return obj
    raise TypeError(f"a {type(obj).__name__} cannot be stored safely in a checkpoint; use tensors, NumPy "
                    "arrays or plain Python values")


def decode(obj: Any) -> Any:
    """The inverse of ``encode``."""
    if isinstance(obj, dict):
        if len(obj) == 1 and _ARRAY in obj:
            return _unpack(obj[_ARRAY])
        if len(obj) == 1 and _SCALAR in obj:
            return _unpack(obj[_SCALAR])[()]
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [decode(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj
