"""Figures as data: what an experiment plots, from which stored series; bnlab.report draws them.

An experiment declares ``figures=(FigureSpec(...), ...)``; it never imports the report package (the
report imports the experiments, so plotting code in an experiment would make a cycle). Pure data,
frozen dataclasses, no matplotlib here.

A ``Curve`` names one variant and one stored series of its runs:

* ``split`` + ``key``: a logged metric, e.g. ``split="train", key="loss"`` (RunResult.series);
* ``probe`` + ``key``: a scalar a probe returned, e.g. ``probe="landscape", key="effective_beta"``
  (RunResult.probe_series); ``band_key`` adds a second scalar of the same probe as the other edge of
  a shaded band (Santurkar Fig. 4's [min, max] over eta);
* ``kind="per_step"``: a probe *array* (``arrays.npz``: ``probe/<probe>/<key>``) drawn against the
  probe array ``x_key``, one line per probe step of the first seed (Santurkar Fig. 11).

``kind="time"`` curves are the mean over seeds with a min-max band (bnlab.report.plots.mean_spread).
"""
from __future__ import annotations

from dataclasses import dataclass

from bnlab.errors import ConfigError

KINDS = ("time", "per_step")
SCALES = ("linear", "log")

__all__ = ["Curve", "FigureSpec", "Panel"]


@dataclass(frozen=True)
class Curve:
    variant: str
    label: str
    split: str | None = None  # "train" | "eval" | "test" (logged metrics)
    key: str = "loss"
    probe: str | None = None  # a probe's name: its scalars (time) or arrays (per_step)
    band_key: str | None = None  # time curves of a probe: second edge of a shaded band
    x_key: str | None = None  # per_step: the probe array on the x-axis
    kind: str = "time"
    linestyle: str = "-"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"curve {self.label!r}: kind={self.kind!r}; choose one of {', '.join(KINDS)}")
        if (self.split is None) == (self.probe is None):
            raise ConfigError(f"curve {self.label!r}: give exactly one of split= (a logged metric) or probe= "
                              "(a probe's output)")
        if self.kind == "per_step" and (self.probe is None or self.x_key is None):
            raise ConfigError(f"curve {self.label!r}: kind='per_step' needs probe= and x_key= (probe arrays)")
        if self.band_key is not None and self.probe is None:
            raise ConfigError(f"curve {self.label!r}: band_key needs probe= (a second scalar of that probe)")


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    curves: tuple[Curve, ...]
    yscale: str = "linear"
    xscale: str = "linear"

    def __post_init__(self) -> None:
        for scale in (self.xscale, self.yscale):
            if scale not in SCALES:
                raise ConfigError(f"panel {self.title!r}: scale {scale!r}; choose one of {', '.join(SCALES)}")
        if not self.curves:
            raise ConfigError(f"panel {self.title!r} has no curves")


@dataclass(frozen=True)
class FigureSpec:
    """One figure file: ``name`` (file stem), ``caption`` (what it shows, the paper's figure), panels
    side by side."""

    name: str
    caption: str
    panels: tuple[Panel, ...]

    def __post_init__(self) -> None:
        if not self.panels:
            raise ConfigError(f"figure {self.name!r} has no panels")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"figure name {self.name!r} must be letters, digits, '_' or '-' (a file name)")

    def variants(self) -> set[str]:
        return {c.variant for p in self.panels for c in p.curves}
