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

``kind="time"`` curves are the mean over seeds with a min-max band (bnlab.report.plots.mean_spread);
``seed=`` draws one seed's run only (Ioffe Fig. 1b,c shows one network). A ``Panel`` may fix its
y-range (``ylim``: where the comparison happens) and carry reference lines (``Mark``); a
``FigureSpec`` lays its panels out in ``ncols`` columns (small multiples) with a shared y-axis.

An experiment whose captions or ranges depend on its runs (the dataset used, the number of seeds, a
target computed from the Baseline) declares ``figures`` as a function ``(ExperimentResults) ->
tuple[FigureSpec, ...]`` instead of a tuple: still data, computed from stored runs, drawn by the report.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bnlab.errors import ConfigError

KINDS = ("time", "per_step")
SCALES = ("linear", "log")

__all__ = ["Curve", "FigureSpec", "Mark", "Panel", "grad_change_panels", "ics_panels", "landscape_panels"]


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
    color: str | None = None  # a matplotlib colour ("C0", "0.6"); None: the panel's next colour
    seed: int | None = None  # only this seed's run (None: every seed, mean and band)

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
class Mark:
    """A reference line: horizontal at y=``at`` (``axis="y"``) or vertical at x=``at`` (``axis="x"``),
    dotted, with its meaning in the legend."""

    at: float
    label: str
    axis: str = "y"

    def __post_init__(self) -> None:
        if self.axis not in ("x", "y"):
            raise ConfigError(f"mark {self.label!r}: axis={self.axis!r}; choose x (vertical) or y (horizontal)")


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    curves: tuple[Curve, ...]
    yscale: str = "linear"
    xscale: str = "linear"
    ylim: tuple[float, float] | None = None  # None: fit the data
    marks: tuple[Mark, ...] = ()

    def __post_init__(self) -> None:
        if self.ylim is not None and not (len(self.ylim) == 2 and self.ylim[0] < self.ylim[1]):
            raise ConfigError(f"panel {self.title!r}: ylim={self.ylim!r}; give (low, high) with low < high")
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
    ncols: int | None = None  # panels per row (None: all in one row)
    sharey: bool = False  # one y-axis for every panel (small multiples compare across panels)

    def __post_init__(self) -> None:
        if self.ncols is not None and self.ncols < 1:
            raise ConfigError(f"figure {self.name!r}: ncols={self.ncols!r}; give a positive number of columns")
        if not self.panels:
            raise ConfigError(f"figure {self.name!r} has no panels")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"figure name {self.name!r} must be letters, digits, '_' or '-' (a file name)")

    def variants(self) -> set[str]:
        return {c.variant for p in self.panels for c in p.curves}


# --- panels shared by the Santurkar experiments (same probes, same layout in both networks) -----------

Variants = Sequence[tuple[str, str]]  # (variant, label) per curve


def ics_panels(layers: Sequence[str], variants: Variants, number: Callable[[str], str]) -> tuple[Panel, ...]:
    """Santurkar Fig. 3: ||G - G'|| then cos(G, G') per probed layer (``ics`` probe keys
    ``<layer>.l2`` / ``<layer>.cosine``); ``number(layer)`` gives the paper's layer number."""
    l2 = [Panel(f"ICS ℓ2, layer #{number(ly)}", "training step", "||G - G'||", yscale="log",
                curves=tuple(Curve(v, lab, probe="ics", key=f"{ly}.l2") for v, lab in variants)) for ly in layers]
    cos = [Panel(f"ICS cosine, layer #{number(ly)}", "training step", "cos(G, G')",
                 curves=tuple(Curve(v, lab, probe="ics", key=f"{ly}.cosine") for v, lab in variants)) for ly in layers]
    return (*l2, *cos)


def landscape_panels(variants: Variants) -> tuple[Panel, ...]:
    """Santurkar Figs. 4 / 10 from the ``landscape`` probe: (a) loss band over eta, (b) band of
    ||g_eta - g||, (c) effective β-smoothness."""
    return (
        Panel("(a) loss landscape", "training step", "loss along the gradient", yscale="log",
              curves=tuple(Curve(v, lab, probe="landscape", key="loss_max", band_key="loss_min")
                           for v, lab in variants)),
        Panel("(b) gradient predictiveness", "training step", "||g_eta - g||", yscale="log",
              curves=tuple(Curve(v, lab, probe="landscape", key="predictiveness_max", band_key="predictiveness_min")
                           for v, lab in variants)),
        Panel("(c) effective β-smoothness", "training step", "β_eff", yscale="log",
              curves=tuple(Curve(v, lab, probe="landscape", key="effective_beta") for v, lab in variants)),
    )


def grad_change_panels(variants: Variants) -> tuple[Panel, ...]:
    """Santurkar Fig. 11: ||g_eta - g|| against eta, one curve per probe step, one panel per variant."""
    return tuple(Panel(lab, "eta", "||g_eta - g||", xscale="log", yscale="log",
                       curves=(Curve(v, lab, probe="landscape", key="grad_change", x_key="etas", kind="per_step"),))
                 for v, lab in variants)
