"""The report layer: reads stored runs only (never trains) -> figures, verdicts, one HTML file.

    from bnlab.report import build_report, summary_text
    path = build_report("runs")                  # runs/report.html, self-contained, opens offline

Figure helpers for experiments live in ``bnlab.report.plots`` (mean ± spread over seeds, divergence
marks, reproducible SVG files).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "collect", "default_plots", "mean_spread", "new_figure", "save_figure",
           "summary_text", "write_report"]

_WHERE = {"build_report": "build", "collect": "build", "summary_text": "build",
          "write_report": "build", "default_plots": "plots",
          "mean_spread": "plots", "new_figure": "plots", "save_figure": "plots"}


def __getattr__(name: str) -> Any:  # lazy: `import bnlab.report` does not pull in matplotlib
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"bnlab.report.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'bnlab.report' has no attribute {name!r}")
