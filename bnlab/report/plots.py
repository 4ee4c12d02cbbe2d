"""Figure helpers shared by every experiment: mean ± spread over seeds, divergence marks, and SVG files
that are sharp at any zoom, small, and byte-for-byte reproducible.

    from bnlab.report.plots import new_figure, mean_spread, save_figure

    fig, ax = new_figure()
    for variant, runs in results.by_variant().items():
        mean_spread(ax, runs, label=variant, split="eval", key="acc")
    ax.set(xlabel="training step", ylabel="accuracy (eval subset)")
    ax.legend()
    paths = [save_figure(fig, out_dir / "acc.png", caption="Test accuracy over training.")]  # -> acc.svg

Why these rules:
- Figures are drawn on the Agg canvas explicitly (``new_figure`` never touches pyplot), so plotting
  works without a display, leaks no pyplot state, and never changes an interactive user's backend.
- ``save_figure`` writes SVG (vector: sharp on any screen and in print; text stays text) through a
  temporary file and ``os.replace`` (a killed report never leaves half a file), without a date or
  creator line and with a fixed id salt, so rebuilding a report from the same runs gives the same
  bytes. A ``.png`` path (the older call form) is written as ``<stem>.svg``; the path written is
  returned.
- The band a curve shows is always said: ``mean_spread`` puts it in the legend label and records it
  on the figure, and ``save_figure`` appends it to the caption (``<name>.caption.txt`` next to the
  figure, read by the HTML report).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bnlab.atomic import atomic_write_bytes

DEFAULT_DPI = 200  # fmt="png" only: over 2x a 96-dpi screen (SVG, the default, has no pixels)
BANDS = ("minmax", "std")
_BAND_TEXT = {"minmax": "min–max over seeds", "std": "±1 std over seeds"}
# Reproducible bytes: no version or date in the file, a fixed salt for the SVG's element ids; text as
# <text> elements (small, selectable, crisp) rather than outlined glyph paths.
_PNG_METADATA = {"Software": None}
_SVG_METADATA = {"Date": None, "Creator": None}
_RC = {"svg.hashsalt": "bnlab", "path.simplify": True, "svg.fonttype": "none"}
VECTOR_SUFFIX = ".svg"

__all__ = ["BANDS", "DEFAULT_DPI", "Spread", "caption_path", "default_plots", "figure_path", "mean_spread",
           "new_figure", "read_caption", "save_figure", "use_agg"]


def use_agg() -> None:
    """Make pyplot (for experiments that use it) draw on Agg: no display, same pixels everywhere.

    Only before pyplot is first imported: a session that already chose a backend (a notebook, a GUI)
    keeps it; figures are still saved through Agg by ``save_figure``.
    """
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    matplotlib.rcParams.update(_RC)


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
               **subplots_kw: Any) -> tuple[Figure, Any]:
    """A Figure on an explicit Agg canvas and its axes (like ``plt.subplots`` without pyplot)."""
    matplotlib.rcParams.update(_RC)
    if figsize is None:
        figsize = (5.2 * ncols, 3.6 * nrows)
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    subplots_kw.setdefault("squeeze", True)
    axes = fig.subplots(nrows, ncols, **subplots_kw)
    return fig, axes


# --- mean ± spread over seeds ----------------------------------------------------------------------

@dataclass
class Spread:
    """What ``mean_spread`` drew: the common step grid and the statistics over seeds on it."""

    steps: np.ndarray  # (T,) union of every seed's steps
    mean: np.ndarray  # (T,) mean over the seeds with a finite value at that step
    lo: np.ndarray  # (T,) lower edge of the band
    hi: np.ndarray  # (T,) upper edge of the band
    count: np.ndarray  # (T,) seeds with a finite value at that step
    n_seeds: int
    diverged: list[tuple[int, float]]  # (step, last finite value before it) per diverged seed
    band: str


def _as_series(item: Any, split: str, key: str, probe: str | None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(steps, values, diverged_step) from a RunResult, a (steps, values) pair or a triple."""
    if hasattr(item, "series") and hasattr(item, "status"):  # a RunResult (duck-typed: no train import)
        steps, values = item.probe_series(probe, key) if probe else item.series(split, key)
        div = item.diverged_step if item.status == "diverged" else None
        return np.asarray(steps), np.asarray(values, dtype=float), div
    if len(item) == 3:
        steps, values, div = item
    else:
        (steps, values), div = item, None
    return np.asarray(steps), np.asarray(values, dtype=float), (None if div is None else int(div))


def mean_spread(ax: Axes, runs_or_series: Iterable[Any], *, label: str, color: Any = None,
                split: str = "eval", key: str = "acc", probe: str | None = None, band: str = "minmax",
                linestyle: str = "-", alpha: float = 0.2) -> Spread | None:
    """Draw the mean over seeds as a line and the spread as a shaded band; mark diverged seeds.

    runs_or_series: RunResults of one variant (their ``series(split, key)``, or
    ``probe_series(probe, key)`` when ``probe`` is given) or (steps, values[, diverged_step]) tuples.
    The series are aligned on the union of their steps; at each step the mean and band are over the
    seeds that have a finite value there, so a diverged seed drops out after its divergence step
    (marked with an x at that step, at its last finite value, and "(k diverged)" in the label).
    band: "minmax" (min-max over seeds, default) or "std" (mean ± 1 sample std); the label says which.
    Returns what was drawn, or None if there was nothing to draw.
    """
    if band not in BANDS:
        raise ValueError(f"band={band!r}; choose one of: {', '.join(BANDS)}")
    series = [_as_series(item, split, key, probe) for item in runs_or_series]
    if not series:
        return None
    nonempty = [s for s in series if s[0].size]
    diverged_steps = [s[2] for s in series if s[2] is not None]
    if not nonempty and not diverged_steps:
        return None
    grid = np.unique(np.concatenate([s[0] for s in nonempty])) if nonempty else np.zeros(0, np.int64)
    table = np.full((len(series), grid.size), np.nan)
    for i, (steps, values, _) in enumerate(series):
        if steps.size:
            table[i, np.searchsorted(grid, steps)] = values
    finite = np.isfinite(table)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        filled = np.where(finite, table, 0.0)
        mean = np.where(count > 0, filled.sum(axis=0) / np.maximum(count, 1), np.nan)
        if band == "minmax":
            lo = np.where(count > 0, np.where(finite, table, np.inf).min(axis=0), np.nan)
            hi = np.where(count > 0, np.where(finite, table, -np.inf).max(axis=0), np.nan)
        else:
            dev = np.where(finite, table - mean, 0.0)
            std = np.sqrt((dev**2).sum(axis=0) / np.maximum(count - 1, 1))
            std = np.where(count > 1, std, 0.0)
            lo, hi = mean - std, mean + std

    n = len(series)
    diverged: list[tuple[int, float]] = []
    for steps, values, div in series:
        if div is None:
            continue
        ok = np.isfinite(values) & (steps <= div) if steps.size else np.zeros(0, bool)
        last = float(values[ok][-1]) if ok.any() else float(np.nanmean(mean)) if np.isfinite(mean).any() else 0.0
        diverged.append((int(div), last))

    # The band's meaning goes into the caption (one note per figure), not into every legend entry.
    parts = [f"{n} seed{'s' if n != 1 else ''}"]
    if diverged:
        parts.append(f"{len(diverged)} diverged")
    full_label = f"{label} ({', '.join(parts)})"
    shown = count > 0
    line = None
    if shown.any():
        (line,) = ax.plot(grid[shown], mean[shown], linestyle=linestyle, color=color, label=full_label)
        color = line.get_color()
        if n > 1:
            ax.fill_between(grid[shown], lo[shown], hi[shown], color=color, alpha=alpha, linewidth=0)
    if diverged:
        xs, ys = zip(*diverged)
        ax.plot(xs, ys, linestyle="none", marker="x", markersize=8, markeredgewidth=2, color=color or "C3",
                label=None if line is not None else full_label)
    if n > 1:
        _note_band(ax.figure, band)
    if diverged:
        _note(ax.figure, "x marks the step at which a run diverged (loss became non-finite)")
    return Spread(grid, mean, lo, hi, count, n, diverged, band)


def _note(fig: Any, text: str) -> None:
    try:  # a SubFigure's notes belong to the Figure that gets saved
        fig = fig.get_figure(root=True)
    except (AttributeError, TypeError):
        fig = getattr(fig, "figure", None) or fig
    notes = fig.__dict__.setdefault("_bnlab_notes", [])
    if text not in notes:
        notes.append(text)


def _note_band(fig: Any, band: str) -> None:
    _note(fig, f"lines: mean over seeds; shaded bands: {_BAND_TEXT[band]}")


# --- saving --------------------------------------------------------------------------------------------

def caption_path(figure: Path | str) -> Path:
    """Where the caption of a figure file lives: ``fig.svg`` -> ``fig.caption.txt``."""
    return Path(figure).with_suffix(".caption.txt")


def read_caption(figure: Path | str) -> str:
    path = caption_path(figure)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def figure_path(path: Path | str, fmt: str = "svg") -> Path:
    """The file ``save_figure(fig, path)`` writes: ``path`` with the suffix of ``fmt``."""
    return Path(path).with_suffix("." + fmt)


def save_figure(fig: Figure, path: Path | str, *, caption: str | None = None, dpi: int = DEFAULT_DPI,
                close: bool = True, fmt: str = "svg") -> Path:
    """Write ``fig`` to ``path`` with the suffix of ``fmt`` (SVG by default: ``acc.png`` is written
    as ``acc.svg``), atomically and reproducibly; returns the path written.

    caption: written next to it (``caption_path``) for the report; what ``mean_spread`` drew (band,
    divergence marks) is appended. ``dpi``: for ``fmt="png"`` only (vector files have no pixels).
    ``close``: release a pyplot-managed figure afterwards.
    Raises ValueError for a format other than "svg" or "png".
    """
    if fmt not in ("svg", "png"):
        raise ValueError(f"fmt={fmt!r}; choose svg (default) or png")
    path = figure_path(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        # tight: legends placed outside the axes are kept, nothing is cut off
        if fmt == "svg":
            fig.savefig(buf, format="svg", metadata=_SVG_METADATA, bbox_inches="tight")
        else:
            fig.savefig(buf, format="png", dpi=dpi, metadata=_PNG_METADATA, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    notes = list(getattr(fig, "_bnlab_notes", []))
    text = " ".join(t for t in [(caption or "").strip()] + [n[0].upper() + n[1:] + "." for n in notes] if t)
    cap = caption_path(path)
    if text:
        atomic_write_bytes(cap, (text + "\n").encode("utf-8"))
    elif cap.exists():
        cap.unlink()
    if close:
        import sys

        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close(fig)
    return path


# --- generic curves (experiments without a plots function) --------------------------------------------

def default_plots(results: Any, out_dir: Path | str) -> list[Path]:
    """Training loss and eval accuracy/loss per variant, mean ± min-max over seeds.

    For experiments that declare no ``plots`` (or are not registered any more): every stored run can
    be looked at. ``results`` is an ``ExperimentResults``.
    """
    out_dir = Path(out_dir)
    groups = results.by_variant()
    panels: list[tuple[str, str, str]] = []
    runs_all = [r for rs in groups.values() for r in rs]
    for split, key, title in (("train", "loss", "training loss (minibatch, before the update)"),
                              ("eval", "acc", "accuracy on the eval subset"),
                              ("eval", "loss", "loss on the eval subset")):
        if any(r.series(split, key)[0].size for r in runs_all):
            panels.append((split, key, title))
    if not panels:
        return []
    fig, axes = new_figure(1, len(panels), figsize=(4.6 * len(panels), 3.4))
    axes = np.atleast_1d(axes)
    for ax, (split, key, title) in zip(axes, panels):
        for i, (variant, runs) in enumerate(groups.items()):
            mean_spread(ax, runs, label=variant, split=split, key=key, color=f"C{i % 10}")
        ax.set(xlabel="training step", ylabel=f"{split} {key}", title=title)
        if key == "loss":
            vals = np.concatenate([r.series(split, key)[1] for r in runs_all])
            vals = vals[np.isfinite(vals)]
            if vals.size and vals.min() > 0 and vals.max() / vals.min() > 50:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = results.experiment or "runs"
    return [save_figure(fig, out_dir / f"{name}_curves.svg",
                        caption=f"{name}: training and evaluation curves of every variant (generic plot; "
                                "the experiment declares no figures of its own).")]
