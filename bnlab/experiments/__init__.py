"""The experiment registry: every runnable figure/table by name.

Experiment modules are listed explicitly (no import-time discovery magic): each module defines
``EXPERIMENT = Experiment(...)`` or ``EXPERIMENTS = (Experiment(...), ...)``. Add a new one by
appending its module name to ``_MODULES``.
"""

from __future__ import annotations

import difflib
import importlib

from bnlab.errors import ConfigError
from bnlab.experiments.base import (
    DEFAULT_SEEDS,
    PROFILES,
    Experiment,
    ExperimentResults,
    Probe,
    ProbeContext,
    RunResult,
)

# Modules under bnlab/experiments/ that define EXPERIMENTS, in the order ``bnlab list`` shows them.
_MODULES: tuple[str, ...] = ("ioffe_mnist", "ioffe_lr_study", "santurkar_dln", "santurkar_vgg")

_REGISTRY: dict[str, Experiment] = {}
_loaded = False


def register(exp: Experiment) -> Experiment:
    """Add ``exp`` to the registry (experiment modules, notebooks and tests); names are unique."""
    if exp.name in _REGISTRY and _REGISTRY[exp.name] is not exp:
        raise ConfigError(f"an experiment named {exp.name!r} is already registered")
    _REGISTRY[exp.name] = exp
    return exp


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _MODULES:
        mod = importlib.import_module(f"bnlab.experiments.{module}")
        exps = getattr(mod, "EXPERIMENTS", None)
        if exps is None:
            exps = (mod.EXPERIMENT,) if hasattr(mod, "EXPERIMENT") else ()
        for exp in exps:
            register(exp)


def all_experiments() -> list[Experiment]:
    _load()
    return list(_REGISTRY.values())


def experiment_names() -> list[str]:
    _load()
    return list(_REGISTRY)


def get_experiment(name: str) -> Experiment:
    _load()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown experiment {name!r}{hint}; known experiments: {', '.join(_REGISTRY)} "
                          "(see `bnlab list`)")
    return _REGISTRY[name]


__all__ = ["DEFAULT_SEEDS", "PROFILES", "Experiment", "ExperimentResults", "Probe", "ProbeContext",
           "RunResult", "all_experiments", "experiment_names", "get_experiment", "register"]
