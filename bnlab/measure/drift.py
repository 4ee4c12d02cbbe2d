"""Drift of activation statistics over training, and the train-vs-eval shift of BN inputs.

Definitions
-----------
- ``moment_drift`` (Santurkar et al. 2018, Fig. 8; docs/claims.md D.12, D.13): for each layer and
  consecutive probes t, t+1, the change of the first two moments of each unit,
  ``|mu_{t+1} - mu_t|`` and ``|var_{t+1} - var_t|``, averaged over units ("dmean", "dvar",
  shape (T-1,)), together with the unit-averaged moments themselves ("mean", "var", shape (T,))
  and the per-unit changes ("dmean_units", "dvar_units", shape (T-1, U)). Moments are those of
  ``record_activations`` (biased variance over batch x spatial positions).
- ``percentile_drift`` (Ioffe & Szegedy 2015, Fig. 1(b, c); the D.9 statistic): for each percentile
  trace, ``max - min`` over the probes left after skipping the first ``skip_fraction`` of training,
  averaged over units (a single unit is too noisy to decide D.9).
- ``covariate_shift``: the train-vs-eval shift of each BN layer's input. With every BN layer in
  batch mode (as in training), the per-channel mean ``mu_B`` and biased variance ``var_B`` of the
  layer's input over the probe batch (pooled over chunks) are compared with the layer's running
  statistics: ``mean_shift = mean_c |mu_B - running_mean| / sqrt(running_var + eps)`` (the shift in
  units of the normalizer used at inference), ``max_mean_shift`` its max over channels,
  ``var_ratio = mean_c var_B / running_var`` and ``max_abs_log_var_ratio``. Zero shift and ratio 1
  mean eval-mode BN normalizes this input exactly as training-mode BN does. Note torch stores an
  *unbiased* running variance (m/(m-1), Ioffe Alg. 2), so with batches of m samples the ratio of a
  converged layer sits near (m-1)/m, not exactly 1.

Cost: ``moment_drift`` and ``percentile_drift`` only post-process stored statistics (no passes);
``covariate_shift`` is 1 forward pass over the probe batch, no backward, side-effect free like
``record_activations``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.measure._util import ModuleSpec, batchnorm_names, capture, is_batchnorm, resolve_modules
from bnlab.measure.activations import LayerActivations

__all__ = ["moment_drift", "percentile_drift", "percentile_trace", "covariate_shift"]

History = Union[Sequence[Mapping[str, LayerActivations]], Mapping[str, tuple[np.ndarray, np.ndarray]]]


def _moments_from_history(history: History) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if isinstance(history, Mapping):
        out = {}
        for name, pair in history.items():
            if isinstance(pair, Mapping):
                pair = (pair["mean"], pair["var"])
            means, vars_ = (np.asarray(a, dtype=np.float64) for a in pair)
            if means.ndim == 1:
                means, vars_ = means[:, None], vars_[:, None]  # (T,) -> (T, 1): one unit
            if means.ndim != 2 or means.shape != vars_.shape:
                raise ShapeError(
                    f"layer {name!r}: means and vars must both have shape (T, units), got "
                    f"{means.shape} and {vars_.shape}."
                )
            out[str(name)] = (means, vars_)
        return out
    if not isinstance(history, Sequence) or len(history) == 0:
        raise ConfigError("history must be a non-empty list of record_activations results, or {name: (means, vars)}.")
    names = list(history[0])
    for t, step in enumerate(history):
        missing = [n for n in names if n not in step]
        if missing:
            raise ConfigError(f"history[{t}] lacks layers {missing}; record the same layers at every probe.")
    out = {}
    for n in names:
        widths = {step[n].n_units for step in history}
        if len(widths) != 1:
            raise ShapeError(f"layer {n!r} changes its number of units over the history: {sorted(widths)}.")
        out[n] = (np.stack([step[n].mean for step in history]), np.stack([step[n].var for step in history]))
    return out


def moment_drift(history: History, *, units: Sequence[int] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer change of per-unit mean and variance between consecutive probes (Santurkar Fig. 8).

    ``history`` is either the list of ``record_activations`` results in probe order, or
    ``{name: (means, vars)}`` with arrays of shape (T, units) (e.g. loaded from .npz). ``units``
    restricts to a subset of units (e.g. the randomly sampled activations of Fig. 1c/2).
    """
    result: dict[str, dict[str, np.ndarray]] = {}
    for name, (means, vars_) in _moments_from_history(history).items():
        if means.shape[0] == 0:
            raise ConfigError(f"layer {name!r} has an empty history; record at least one probe.")
        if units is not None:
            idx = np.asarray(list(units), dtype=np.int64)
            if np.any((idx < 0) | (idx >= means.shape[1])):
                raise ConfigError(f"units={list(units)!r} out of range for layer {name!r} with {means.shape[1]} units.")
            means, vars_ = means[:, idx], vars_[:, idx]
        dmean_u = np.abs(np.diff(means, axis=0))  # (T-1, U)
        dvar_u = np.abs(np.diff(vars_, axis=0))  # (T-1, U)
        result[name] = {
            "dmean": dmean_u.mean(axis=1),
            "dvar": dvar_u.mean(axis=1),
            "mean": means.mean(axis=1),
            "var": vars_.mean(axis=1),
            "dmean_units": dmean_u,
            "dvar_units": dvar_u,
        }
    return result


def percentile_trace(
    history: Sequence[Mapping[str, LayerActivations]], name: str, *, units: Sequence[int] | None = None
) -> np.ndarray:
    """Stack one layer's percentiles over the probes: (T, P, U) (or the chosen ``units``)."""
    if not history:
        raise ConfigError("history is empty; record at least one probe.")
    try:
        trace = np.stack([step[name].percentiles for step in history])  # (T, P, U)
    except KeyError:
        raise ConfigError(f"layer {name!r} is not in every probe of the history; have {sorted(history[0])}.") from None
    return trace if units is None else trace[:, :, np.asarray(list(units), dtype=np.int64)]


def percentile_drift(
    trace: np.ndarray | Tensor,
    skip_fraction: float = 0.1,
    *,
    steps: Sequence[float] | np.ndarray | None = None,
    reduce_units: bool = True,
) -> np.ndarray:
    """``max - min`` of each percentile trace after the first ``skip_fraction`` of training (D.9).

    ``trace``: (T, P) or (T, P, U). Without ``steps`` the skip counts probes (right for evenly
    spaced probes); with ``steps`` (the training step of each probe) it skips probes with
    ``step < steps[0] + skip_fraction * (steps[-1] - steps[0])``, which is right for log-spaced
    schedules too. Returns (P,) averaged over units, or (P, U) with ``reduce_units=False``.
    """
    tr = np.asarray(trace.cpu() if isinstance(trace, Tensor) else trace, dtype=np.float64)
    if tr.ndim == 2:
        tr = tr[:, :, None]
    if tr.ndim != 3 or tr.shape[0] == 0:
        raise ShapeError(f"trace must have shape (T, P) or (T, P, U) with T >= 1, got {np.shape(trace)}.")
    if not (0.0 <= float(skip_fraction) < 1.0):
        raise ConfigError(f"skip_fraction={skip_fraction!r} must be in [0, 1).")
    if steps is None:
        keep = np.arange(tr.shape[0]) >= int(np.floor(skip_fraction * tr.shape[0]))
    else:
        s = np.asarray(steps, dtype=np.float64)
        if s.shape != (tr.shape[0],):
            raise ShapeError(f"steps must have shape ({tr.shape[0]},) to match the trace, got {s.shape}.")
        keep = s >= s[0] + skip_fraction * (s[-1] - s[0])
    kept = tr[keep]  # (T', P, U); never empty: the last probe always passes
    spread = kept.max(axis=0) - kept.min(axis=0)  # (P, U); NaN (diverged) propagates
    return spread.mean(axis=1) if reduce_units else spread


def covariate_shift(
    model: nn.Module,
    x: Tensor,
    *,
    modules: ModuleSpec | None = None,
    chunk_size: int | None = None,
    seed: int | None = 0,
) -> dict[str, dict[str, float]]:
    """Train-mode input statistics of each BN layer vs its running statistics, on probe batch ``x``.

    ``modules``: BN layers to report (default: every BN layer with running statistics). The
    running statistics are read from the model as it is; the forward that measures the inputs
    runs on clones, so it does not move them.

    Cost: 1 forward pass over ``x``, no backward.
    """
    if modules is None:
        names = [n for n in batchnorm_names(model) if _running(model.get_submodule(n)) is not None]
        if not names:
            raise ConfigError(
                "the model has no BN layer with running statistics, so there is no train/eval shift "
                "to measure; check the norm= setting of the model."
            )
        modules = names
    targets = resolve_modules(model, modules)
    for label, (name, m) in targets.items():
        if not is_batchnorm(m) or _running(m) is None:
            raise ConfigError(
                f"module {name!r} ({type(m).__name__}) is not a BN layer with running statistics; "
                f"choose among {batchnorm_names(model)}."
            )
    acts = capture(
        model, x, {label: m for label, (_, m) in targets.items()},
        where="input", bn_mode="batch", chunk_size=chunk_size, seed=seed,
    )
    out: dict[str, dict[str, float]] = {}
    for label, values in acts.items():
        m = targets[label][1]
        rm, rv = (t.detach().to(device=values.device, dtype=torch.float64) for t in _running(m))
        if rm.numel() != values.shape[1]:
            raise ShapeError(f"layer {label!r}: input has {values.shape[1]} channels but running stats have {rm.numel()}.")
        eps = float(getattr(m, "eps", 1e-5))
        mu_b = values.mean(dim=0)  # (C,)
        var_b = values.var(dim=0, unbiased=False)  # (C,)
        shift = (mu_b - rm).abs() / torch.sqrt(rv + eps)  # (C,)
        ratio = var_b / rv  # (C,)
        out[label] = {
            "mean_shift": float(shift.mean()),
            "max_mean_shift": float(shift.max()),
            "var_ratio": float(ratio.mean()),
            "max_abs_log_var_ratio": float(ratio.log().abs().max()),
        }
    return out


def _running(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    return (rm, rv) if isinstance(rm, Tensor) and isinstance(rv, Tensor) else None
