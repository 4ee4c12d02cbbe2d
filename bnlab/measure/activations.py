"""Per-layer activation statistics on a fixed probe batch, without side effects.

Definitions
-----------
For a chosen module, take its input (default; e.g. the input of a sigmoid = Ioffe's "sigmoid
input") or its output on the probe batch ``x``. Following BN's convention a *unit* is a feature
(``(N, C)`` activations) or a channel (``(N, C, *spatial)``: the samples of a channel are its
``N * H * W ...`` values; Santurkar App. A.2.1, Ioffe Sec. 3.2). Per unit:

- ``mean``, ``var``: mean and *biased* variance over the samples (what BN normalizes with);
- ``percentiles``: by default the 15th/50th/85th, exactly ``numpy.percentile`` (linear
  interpolation, Hyndman & Fan type 7), as in Ioffe et al. 2015 Fig. 1(b, c);
- optional histograms (over all units, and per selected unit, on shared bin edges) and the raw
  values of selected units: Santurkar et al. 2018 Fig. 1(c), 2 and 9, the
  distribution of a randomly sampled activation over the batch (x height x width).

``bn_mode`` is explicit: ``"batch"`` normalizes every BN layer with the statistics of the (chunk
of the) probe batch, as in training (Ioffe's N_tr_BN, Alg. 2); ``"running"`` uses the population
statistics, as at inference. ``chunk_size=60`` reproduces Ioffe's "batches of 60 with batch
statistics" over a larger held-out probe set (A.7 [I]). Dropout is always off.

Side effects: none (see ``_util``: cloned buffers through ``torch.func.functional_call``, forked and
seeded RNG, training flags restored), so a run with probes follows the same trajectory as one
without.

Cost: 1 forward pass over the probe batch (``ceil(N / chunk_size)`` chunk forwards), no backward.
Memory: one float64 copy of each recorded layer's activations, plus one sorted copy per layer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.measure._util import BnMode, ModuleSpec, Where, capture, check_choice, resolve_modules

__all__ = ["LayerActivations", "record_activations", "percentiles_linear", "stats_from_values"]

Units = Union[Sequence[int], Mapping[str, Sequence[int]], None]


@dataclasses.dataclass(frozen=True)
class LayerActivations:
    """Statistics of one layer's activations on the probe batch (all arrays float64 NumPy).

    ``percentiles`` has shape ``(len(percentile_levels), n_units)``; ``hist_counts`` is over all
    units' values, ``unit_hist_counts`` ``(len(units), bins)`` per selected unit on the same
    ``hist_edges`` (shared edges make ridge plots comparable); ``sample`` ``(n_samples, len(units))``
    holds the raw values of the selected units.
    """

    name: str
    where: str
    bn_mode: str
    n_samples: int
    mean: np.ndarray
    var: np.ndarray
    percentile_levels: np.ndarray
    percentiles: np.ndarray
    hist_counts: np.ndarray | None = None
    hist_edges: np.ndarray | None = None
    units: np.ndarray | None = None
    unit_hist_counts: np.ndarray | None = None
    sample: np.ndarray | None = None

    @property
    def n_units(self) -> int:
        return int(self.mean.shape[0])

    def to_arrays(self, prefix: str | None = None) -> dict[str, np.ndarray]:
        """Arrays keyed ``"{prefix}.{field}"`` (prefix defaults to the layer label) for ``np.savez``;
        absent optional fields are left out rather than stored as placeholders."""
        prefix = self.name if prefix is None else prefix
        out: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                out[f"{prefix}.{f.name}" if prefix else f.name] = v
        out[f"{prefix}.n_samples" if prefix else "n_samples"] = np.asarray(self.n_samples)
        return out

    def summary(self) -> dict[str, float]:
        """A few floats for metrics.jsonl: unit-averaged mean, variance, std and percentiles."""
        s: dict[str, float] = {
            "mean": float(self.mean.mean()),
            "var": float(self.var.mean()),
            "std": float(np.sqrt(self.var).mean()),
            "n_units": float(self.n_units),
            "n_samples": float(self.n_samples),
        }
        for q, row in zip(self.percentile_levels, self.percentiles):
            s[f"p{q:g}"] = float(row.mean())
        return s


def percentiles_linear(values: Tensor, levels: Sequence[float]) -> Tensor:
    """Per-column percentiles of ``values`` (S, U), same arithmetic as ``numpy.percentile``.

    Reimplemented in torch (sort + numpy's index and lerp formulas, float64) instead of
    ``torch.quantile``, which refuses inputs above 2**24 elements (conv layers reach that) and
    uses a different lerp; columns containing NaN give NaN as in NumPy. Returns (P, U) float64.
    """
    values = values.to(torch.float64)
    n, u = values.shape
    out = torch.empty(len(levels), u, dtype=torch.float64, device=values.device)
    if n == 0 or len(levels) == 0:
        return out.fill_(float("nan"))
    srt, _ = torch.sort(values, dim=0)  # NaN sorts last, as in NumPy
    for i, level in enumerate(levels):
        q = float(np.true_divide(level, 100))
        virtual = (n - 1) * q  # numpy's 'linear' virtual index
        if virtual >= n - 1:
            lo = hi = n - 1
        elif virtual < 0:
            lo = hi = 0
        else:
            lo = int(np.floor(virtual))
            hi = lo + 1
        gamma = virtual - np.floor(virtual)
        a, b = srt[lo], srt[hi]
        diff = b - a
        # numpy._lerp: the b-side formula for gamma >= 0.5 keeps the result monotone in gamma
        out[i] = b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma
    nan_cols = torch.isnan(srt[-1])
    out[:, nan_cols] = float("nan")
    return out


def _check_levels(percentiles: Sequence[float]) -> np.ndarray:
    levels = np.asarray(list(percentiles), dtype=np.float64)
    if levels.ndim != 1 or np.any(~np.isfinite(levels)) or np.any((levels < 0) | (levels > 100)):
        raise ConfigError(f"percentiles={list(percentiles)!r} must be numbers in [0, 100], e.g. (15, 50, 85).")
    return levels


def _units_for(units: Units, label: str, n_units: int) -> np.ndarray | None:
    chosen = units.get(label) if isinstance(units, Mapping) else units
    if chosen is None:
        return None
    idx = np.asarray(list(chosen), dtype=np.int64)
    if idx.ndim != 1 or np.any((idx < 0) | (idx >= n_units)):
        raise ConfigError(
            f"units={list(chosen)!r} for layer {label!r} must be indices in [0, {n_units}); "
            f"that layer has {n_units} units."
        )
    return idx


def _hist_range(values: np.ndarray, hist_range: tuple[float, float] | None) -> tuple[float, float]:
    if hist_range is not None:
        lo, hi = (float(v) for v in hist_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ConfigError(f"hist_range={hist_range!r} must be two finite numbers lo < hi.")
        return lo, hi
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0  # all NaN/inf (a diverged run): empty counts, still a well-formed record
    return float(finite.min()), float(finite.max())


def stats_from_values(
    values: Tensor,
    *,
    name: str = "",
    where: str = "input",
    bn_mode: str = "batch",
    percentiles: Sequence[float] = (15, 50, 85),
    units: Sequence[int] | None = None,
    bins: int | None = 50,
    hist_range: tuple[float, float] | None = None,
) -> LayerActivations:
    """Statistics of already captured activations ``values`` (samples, units).

    Separate from the capture so that stored or externally captured activations are summarized
    with exactly the same definitions.
    """
    levels = _check_levels(percentiles)
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 1):
        raise ConfigError(f"bins={bins!r} must be a positive int, or None for no histogram.")
    values = values.to(torch.float64)
    n, u = values.shape
    mean = values.mean(dim=0)  # (U,)
    var = values.var(dim=0, unbiased=False)  # (U,) biased: what BN divides by
    pct = percentiles_linear(values, levels.tolist())  # (P, U)
    idx = _units_for(units, name, u)

    hist_counts = hist_edges = unit_hist = sample = None
    if bins is not None or idx is not None:
        flat = values.cpu().numpy()
        if idx is not None:
            sample = flat[:, idx].copy()  # (S, K)
        if bins is not None:
            rng = _hist_range(flat, hist_range)
            finite = flat[np.isfinite(flat)]
            hist_counts, hist_edges = np.histogram(finite, bins=bins, range=rng)
            if idx is not None:
                unit_hist = np.stack(
                    [np.histogram(col[np.isfinite(col)], bins=hist_edges)[0] for col in flat[:, idx].T]
                ) if idx.size else np.zeros((0, bins), dtype=np.int64)

    return LayerActivations(
        name=name,
        where=where,
        bn_mode=bn_mode,
        n_samples=int(n),
        mean=mean.cpu().numpy(),
        var=var.cpu().numpy(),
        percentile_levels=levels,
        percentiles=pct.cpu().numpy(),
        hist_counts=hist_counts,
        hist_edges=hist_edges,
        units=idx,
        unit_hist_counts=unit_hist,
        sample=sample,
    )


def record_activations(
    model: nn.Module,
    x: Tensor,
    modules: ModuleSpec,
    *,
    where: Where = "input",
    bn_mode: BnMode = "batch",
    percentiles: Sequence[float] = (15, 50, 85),
    units: Units = None,
    bins: int | None = 50,
    hist_range: tuple[float, float] | None = None,
    chunk_size: int | None = None,
    seed: int | None = 0,
) -> dict[str, LayerActivations]:
    """Record per-unit statistics of the given modules' inputs (or outputs) on probe batch ``x``.

    Args:
        modules: a name, list of names (``dict(model.named_modules())``), or ``{label: name}``;
            results are keyed by label. A module called several times per forward (a ResNet
            block's shared ``relu``) has one result per call site, ``"label#0"``, ``"label#1"``,
            ... in call order: each equals what hooking that call alone gives; nothing is pooled.
        where: ``"input"`` (e.g. the sigmoid input) or ``"output"`` of each module.
        bn_mode: ``"batch"`` (batch statistics, as in training) or ``"running"`` (population
            statistics, as at inference); never taken from the model's current mode, so a probe
            means the same thing whatever state the training loop left the model in.
        units: unit indices (or ``{label: indices}``) whose raw values and per-unit histograms to
            keep; ``None`` keeps neither.
        bins: histogram bins (``None``: no histogram); ``hist_range`` fixes the edges, which keeps
            histograms comparable across steps (default: the data's min..max).
        chunk_size: forward in chunks of this many samples, each normalized with its own batch
            statistics in ``"batch"`` mode; statistics are pooled over all chunks.
        seed: seeds the probe's own (forked) RNG, for stochastic layers such as noisy BN; ``None``
            continues from the forked global state.

    Cost: 1 forward pass over ``x``, no backward.
    """
    check_choice("where", where, ("input", "output"))
    check_choice("bn_mode", bn_mode, ("batch", "running"))
    _check_levels(percentiles)
    targets = resolve_modules(model, modules)
    if isinstance(units, Mapping):
        extra = {u for u in units if u not in targets and u.rsplit("#", 1)[0] not in targets}
        if extra:
            raise ConfigError(f"units names layers {sorted(extra)} that are not measured; use labels from {sorted(targets)}.")
    acts = capture(
        model, x, {label: m for label, (_, m) in targets.items()},
        where=where, bn_mode=bn_mode, chunk_size=chunk_size, seed=seed, per_call=True,
    )
    return {
        key: stats_from_values(
            values, name=key, where=where, bn_mode=bn_mode, percentiles=percentiles,
            units=_units_of(units, key), bins=bins, hist_range=hist_range,
        )
        for key, values in acts.items()
    }


def _units_of(units: Units, key: str) -> Sequence[int] | None:
    """Units for result ``key``; a call site ``"label#i"`` takes ``units["label#i"]`` or else
    ``units["label"]``."""
    if not isinstance(units, Mapping):
        return units
    if key in units:
        return units[key]
    return units.get(key.rsplit("#", 1)[0]) if "#" in key else None
