"""Draw the figures experiments declare as data (bnlab.experiments.figures.FigureSpec).

``draw_figures(specs, results, out_dir)`` -> the SVG files written, one per spec with at least one
curve that has data (a spec whose runs are all missing writes nothing). Curves over time are the mean
over seeds with the min-max band (``mean_spread``); a probe curve with ``band_key`` shades the band
between the two scalars of the seed mean; ``per_step`` curves draw the probe arrays of the first seed,
one line per probe step, coloured from early (light) to late (dark).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bnlab.report.plots import mean_spread, new_figure, save_figure

__all__ = ["draw_figures", "experiment_figures", "figure_specs"]


def _mean_over_seeds(runs: Sequence[Any], probe: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    series = [r.probe_series(probe, key) for r in runs]
    series = [s for s in series if s[0].size]
    if not series:
        return np.zeros(0, np.int64), np.zeros(0)
    grid = np.unique(np.concatenate([s[0] for s in series]))
    table = np.full((len(series), grid.size), np.nan)
    for i, (steps, values) in enumerate(series):
        table[i, np.searchsorted(grid, steps)] = values
    with np.errstate(invalid="ignore"):
        return grid, np.nanmean(np.where(np.isfinite(table), table, np.nan), axis=0)


def _draw_time(ax: Any, curve: Any, runs: Sequence[Any], color: str) -> bool:
    if curve.seed is not None:
        runs = [r for r in runs if r.seed == curve.seed]
        if not runs:
            return False
    color = curve.color or color
    if curve.split is not None:
        if not any(r.series(curve.split, curve.key)[0].size for r in runs):
            return False
        mean_spread(ax, runs, label=curve.label, split=curve.split, key=curve.key, color=color,
                    linestyle=curve.linestyle)
        return True
    if not any(r.probe_series(curve.probe, curve.key)[0].size for r in runs):
        return False
    if curve.band_key is None:
        mean_spread(ax, runs, label=curve.label, probe=curve.probe, key=curve.key, color=color,
                    linestyle=curve.linestyle)
        return True
    steps, hi = _mean_over_seeds(runs, curve.probe, curve.key)
    steps_lo, lo = _mean_over_seeds(runs, curve.probe, curve.band_key)
    if steps.size != steps_lo.size:
        return False
    label = curve.label if curve.seed is not None else (
        f"{curve.label} ({len(runs)} seed{'s' if len(runs) != 1 else ''}; band: seed mean of "
        f"{curve.band_key} .. {curve.key})")
    ax.fill_between(steps, lo, hi, color=color, alpha=0.3, linewidth=0, label=label)
    ax.plot(steps, hi, color=color, linewidth=0.8, linestyle=curve.linestyle)
    ax.plot(steps, lo, color=color, linewidth=0.8, linestyle=curve.linestyle)
    return True


def _draw_per_step(ax: Any, curve: Any, runs: Sequence[Any]) -> bool:
    import matplotlib

    key_y, key_x = f"probe/{curve.probe}/{curve.key}", f"probe/{curve.probe}/{curve.x_key}"
    run = next((r for r in sorted(runs, key=lambda r: r.seed) if key_y in r.arrays and key_x in r.arrays), None)
    if run is None:
        return False
    ys, xs = np.asarray(run.arrays[key_y], float), np.asarray(run.arrays[key_x], float)
    steps = run.arrays.get(f"probe/{curve.probe}/steps", np.arange(len(ys)))
    cmap = matplotlib.colormaps["viridis_r"]
    for i, (x, y, s) in enumerate(zip(xs, ys, steps)):
        frac = i / max(len(ys) - 1, 1)
        ax.plot(x, y, marker=".", color=cmap(0.15 + 0.85 * frac), linewidth=0.9,
                label=f"step {int(s)}" if i in (0, len(ys) - 1) else None)
    ax.set_title(f"{ax.get_title()} (seed {run.seed})")
    return True


def figure_specs(exp: Any, results: Any) -> tuple[Any, ...]:
    """The FigureSpecs ``exp`` declares for ``results``: its ``figures`` tuple, or what its
    ``figures`` function computes from the runs (captions and ranges that depend on them)."""
    figures = getattr(exp, "figures", ()) or ()
    return tuple(figures(results) or ()) if callable(figures) else tuple(figures)


def experiment_figures(exp: Any, results: Any, out_dir: Path | str) -> list[Path]:
    """Every figure of ``exp`` from ``results`` into ``out_dir``: the declared FigureSpecs, then the
    files of an older ``plots`` function, if any. Returns the files written."""
    paths = draw_figures(figure_specs(exp, results), results, out_dir)
    if getattr(exp, "plots", None) is not None:
        from bnlab.report.plots import use_agg

        use_agg()
        paths += list(exp.plots(results, Path(out_dir)) or [])
    return paths


def _draw_marks(ax: Any, panel: Any) -> None:
    for mark in panel.marks:
        draw = ax.axhline if mark.axis == "y" else ax.axvline
        draw(mark.at, color="k", linewidth=0.8, linestyle=":", label=mark.label or None)


def draw_figures(specs: Sequence[Any], results: Any, out_dir: Path | str) -> list[Path]:
    """Draw each FigureSpec from ``results`` (an ExperimentResults); returns the files written."""
    out_dir = Path(out_dir)
    groups = {v: [r for r in rs if r.status != "incomplete"] for v, rs in results.by_variant().items()}
    paths = []
    for spec in specs:
        n = len(spec.panels)
        ncols = min(n, spec.ncols or n)
        nrows = -(-n // ncols)
        width = 4.6 if ncols <= 3 else 3.3  # small multiples: narrower panels, still readable text
        fig, axes = new_figure(nrows, ncols, figsize=(width * ncols, (3.5 if nrows == 1 else 2.8) * nrows),
                               squeeze=False, sharey=spec.sharey, sharex=spec.sharey)
        flat = list(np.asarray(axes).flat)
        drawn_any = False
        for k, (ax, panel) in enumerate(zip(flat, spec.panels)):
            ax.set_title(panel.title, fontsize=10 if ncols <= 3 else 9)
            drawn = False
            for i, curve in enumerate(panel.curves):
                runs = groups.get(curve.variant, [])
                if not runs:
                    continue
                if curve.kind == "per_step":
                    drawn |= _draw_per_step(ax, curve, runs)
                else:
                    drawn |= _draw_time(ax, curve, runs, color=f"C{i % 10}")
            if drawn:
                _draw_marks(ax, panel)
                ax.set(xscale=panel.xscale, yscale=panel.yscale)
                if panel.ylim is not None:
                    ax.set_ylim(*panel.ylim)
                if nrows == 1 or k >= n - ncols:  # x labels on the bottom row only
                    ax.set_xlabel(panel.xlabel)
                if not spec.sharey or k % ncols == 0:
                    ax.set_ylabel(panel.ylabel, fontsize=9 if ncols > 3 else 10)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            drawn_any |= drawn
        for ax in flat[n:]:
            ax.axis("off")
        if not drawn_any:
            continue
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / f"{spec.name}.svg", caption=spec.caption))
    return paths
