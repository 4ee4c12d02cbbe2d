"""An experiment is data: a base config, named variants, profiles, seeds, probes, a verdict, plots.

How a run's config is resolved (later wins):

    base -> profiles[profile] -> variants[variant] -> variant_profiles[profile][variant] -> --set

``profiles`` scale every variant (steps, eval cadence, data subset); ``variants`` are the arms of the
comparison (norm, lr, activation); ``variant_profiles`` is for the rare variant that needs its own
setting at one profile. Overrides are plain dicts of field -> value (values may be strings, parsed by
field type), checked when the experiment is defined, so a typo fails at import with the valid keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from bnlab.errors import ConfigError
from bnlab.train.config import TrainConfig, apply_overrides
from bnlab.train.cost import run_seconds
from bnlab.train.probes import Probe, ProbeContext  # re-exported: experiments import them from here
from bnlab.train.results import ExperimentResults, RunResult  # re-exported
from bnlab.train.task import Task

PROFILES = ("smoke", "quick", "paper")
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"smoke": (0,), "quick": (0, 1, 2), "paper": (0, 1, 2)}

Verdict = Callable[[ExperimentResults], list[dict[str, Any]]]
# title -> rows (dicts with the same keys, in column order): a paper's table, e.g. Ioffe Fig. 3
Tables = Callable[[ExperimentResults], dict[str, list[dict[str, Any]]]]
Plots = Callable[[ExperimentResults, Path], list[Path]]

__all__ = ["DEFAULT_SEEDS", "PROFILES", "Experiment", "ExperimentResults", "Probe", "ProbeContext",
           "RunResult", "Task"]


@dataclass(frozen=True, eq=False)
class Experiment:
    """A named, runnable figure or table.

    verdict(results) -> rows, each a dict with at least: claim, paper, ours, seeds, passed (bool or
    None when it cannot be decided), why. plots(results, out_dir) -> paths of the files written.
    Both read stored runs only (``ExperimentResults``), never train.
    """

    name: str
    description: str  # one line, shown by ``bnlab list``
    base: TrainConfig
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"default": {}})
    profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variant_profiles: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    seeds: Mapping[str, Sequence[int]] = field(default_factory=lambda: dict(DEFAULT_SEEDS))
    probes: tuple[Probe, ...] = ()
    verdict: Verdict | None = None
    plots: Plots | None = None
    tables: Tables | None = None
    # (quantity, exact definition with the paper's equation/figure, cost in passes) for what the
    # verdict derives from the runs; the report lists them with the probes' own definitions.
    definitions: tuple[tuple[str, str, str], ...] = ()
    notes: str = ""  # documented choices and deviations from the paper (shown in the report)
    paper: str = ""  # e.g. "Ioffe & Szegedy 2015, Fig. 1 (papers.md A.7)"
    # Optional replacements for bnlab.models.build_model / the dataset loader (custom nets, tests).
    build_model: Callable[[TrainConfig, Task], nn.Module] | None = None
    build_task: Callable[[TrainConfig, str | None], Task] | None = None

    def __post_init__(self) -> None:
        for what, name in [("experiment", self.name)] + [("variant", v) for v in self.variants]:
            if not _NAME.fullmatch(name):
                raise ConfigError(f"{what} name {name!r} must be letters, digits, '_', '.' or '-' "
                                  "(it becomes a directory name)")
        if not self.variants:
            raise ConfigError(f"experiment {self.name!r} has no variants")
        for profile in self.profiles:
            if profile not in PROFILES:
                raise ConfigError(f"experiment {self.name!r}: unknown profile {profile!r}; "
                                  f"profiles are {', '.join(PROFILES)}")
        for profile, per_variant in self.variant_profiles.items():
            for variant in per_variant:
                if variant not in self.variants:
                    raise ConfigError(f"experiment {self.name!r}: variant_profiles[{profile!r}] names "
                                      f"unknown variant {variant!r}; variants: {', '.join(self.variants)}")
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"experiment {self.name!r}: probe names must be unique, got {names}")
        # Resolve every (profile, variant) now: a typo in a key or value fails at import time.
        for profile in PROFILES:
            self.configs(profile)

    # --- configs ----------------------------------------------------------------------------------------
    def config(self, variant: str, profile: str = "quick", overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        if variant not in self.variants:
            raise ConfigError(f"experiment {self.name!r} has no variant {variant!r}; "
                              f"variants: {', '.join(self.variants)}")
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
        cfg = apply_overrides(self.base, self.profiles.get(profile, {}))
        cfg = apply_overrides(cfg, self.variants[variant])
        cfg = apply_overrides(cfg, self.variant_profiles.get(profile, {}).get(variant, {}))
        return apply_overrides(cfg, overrides or {})

    def configs(self, profile: str = "quick", overrides: Mapping[str, Any] | None = None) -> dict[str, TrainConfig]:
        """variant -> resolved config, in the declared variant order."""
        return {v: self.config(v, profile, overrides) for v in self.variants}

    def default_seeds(self, profile: str) -> tuple[int, ...]:
        return tuple(self.seeds.get(profile, DEFAULT_SEEDS.get(profile, (0,))))

    # --- cost ---------------------------------------------------------------------------------------------
    def run_cost(self, cfg: TrainConfig, start_step: int = 0) -> float:
        """Estimated seconds for one run of ``cfg`` (from ``start_step``), probes included."""
        probe_costs = [(len(p.steps(cfg)), p.cost) for p in self.probes]
        return run_seconds(cfg, probe_costs, start_step)

    def estimate_cost(self, profile: str = "quick", seeds: Sequence[int] | None = None,
                      overrides: Mapping[str, Any] | None = None) -> float:
        """Estimated serial seconds for every variant x seed of ``profile``."""
        n_seeds = len(self.default_seeds(profile) if seeds is None else seeds)
        return sum(self.run_cost(cfg) * n_seeds for cfg in self.configs(profile, overrides).values())
