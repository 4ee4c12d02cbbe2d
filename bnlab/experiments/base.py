"""An experiment is data: a base config, named variants, profiles, seeds, probes, a verdict, plots.

How a run's config is resolved (later wins):

    base -> profiles[profile] -> variants[variant] -> variant_profiles[profile][variant]
         -> settings[setting] -> --set

``profiles`` scale every variant (steps, eval cadence, data subset); ``variants`` are the arms of the
comparison (norm, lr, activation); ``variant_profiles`` is for the rare variant that needs its own
setting at one profile. Overrides are plain dicts of field -> value (values may be strings, parsed by
field type), checked when the experiment is defined, so a typo fails at import with the valid keys.

Robustness over the paper's unknowns: ``settings`` is a small grid of the choices a paper leaves open
(init, learning rate, ...), setting name -> overrides (a dict for every variant, or a function
``(variant, config) -> dict`` when the change depends on the variant, e.g. "every learning rate x2").
The first setting is the primary one (no overrides: the protocol as declared). Every profile runs the
primary setting only, except ``robust``: the quick scale (``profiles["robust"]`` if given, else
``profiles["quick"]``) over every setting, with ``robust_seeds`` for the non-primary ones. Each run
stores its setting in config.json, so a verdict decides each claim per setting and reports in how
many settings it holds (bnlab/experiments/verdict.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from bnlab.errors import ConfigError
from bnlab.experiments.figures import FigureSpec
from bnlab.experiments.verdict import Claim, merge_settings, undecided
from bnlab.train.config import TrainConfig, apply_overrides
from bnlab.train.cost import run_seconds
from bnlab.train.probes import Probe, ProbeContext  # re-exported: experiments import them from here
from bnlab.train.results import ExperimentResults, RunResult  # re-exported
from bnlab.train.task import Task

PROFILES = ("smoke", "quick", "robust", "paper")
ROBUST = "robust"
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
DEFAULT_SEEDS: dict[str, tuple[int, ...]] = {"smoke": (0,), "quick": (0, 1, 2), "robust": (0, 1, 2),
                                             "paper": (0, 1, 2)}
PRIMARY = "primary"  # the name of the setting with no overrides when an experiment declares no grid

SettingOverrides = Mapping[str, Any] | Callable[[str, TrainConfig], Mapping[str, Any]]

Verdict = Callable[[ExperimentResults], list[dict[str, Any]]]
# title -> rows (dicts with the same keys, in column order): a paper's table, e.g. Ioffe Fig. 3
Tables = Callable[[ExperimentResults], dict[str, list[dict[str, Any]]]]
Plots = Callable[[ExperimentResults, Path], list[Path]]

__all__ = ["DEFAULT_SEEDS", "PROFILES", "Experiment", "ExperimentResults", "Probe", "ProbeContext",
           "RunResult", "Task"]


@dataclass(frozen=True, eq=False)
class Experiment:
    """A named, runnable figure or table.

    verdict(results) -> rows in the verdict row schema (bnlab/experiments/verdict.py: claim_id, claim,
    paper, ours, dataset, outcome, rule, statistic, estimate, ci, per_seed, robustness, ...); the
    results may hold runs of several robustness settings (``RunResult.setting``).
    plots(results, out_dir) -> paths of the files written. Both read stored runs only
    (``ExperimentResults``), never train.
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
    plots: Plots | None = None  # older form: a function that draws; prefer ``figures``
    # figures as data (bnlab/experiments/figures.py), drawn by the report: FigureSpecs, or a function
    # of the stored runs that returns them (captions and ranges that depend on the runs)
    figures: tuple[FigureSpec, ...] | Callable[[ExperimentResults], Sequence[FigureSpec]] = ()
    tables: Tables | None = None
    # (quantity, exact definition with the paper's equation/figure, cost in passes) for what the
    # verdict derives from the runs; the report lists them with the probes' own definitions.
    definitions: tuple[tuple[str, str, str], ...] = ()
    notes: str = ""  # documented choices and deviations from the paper (shown in the report)
    paper: str = ""  # e.g. "Ioffe & Szegedy 2015, Sec. 4.1, Fig. 1"
    # The robustness grid over the paper's unknowns: setting name -> overrides; the first is primary.
    settings: Mapping[str, SettingOverrides] = field(default_factory=dict)
    robust_seeds: Sequence[int] | None = None  # seeds of the non-primary settings (None: the profile's)
    dataset_note: str = ""  # how the data is prepared (e.g. binarization), shown next to the dataset
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
        for setting in self.settings:  # shown in tables and stored in config.json: one printable line
            if not setting.strip() or not setting.isprintable():
                raise ConfigError(f"experiment {self.name!r}: setting name {setting!r} must be one "
                                  "non-empty printable line, e.g. 'init=N(0,1)'")
        if self.settings and dict(_resolve_setting(next(iter(self.settings.values())), "", self.base)):
            raise ConfigError(f"experiment {self.name!r}: the first setting is the primary one and must "
                              "have no overrides (the protocol as declared)")
        for spec in () if callable(self.figures) else self.figures:  # a function is checked when it runs
            unknown = spec.variants() - set(self.variants)
            if unknown:
                raise ConfigError(f"experiment {self.name!r}: figure {spec.name!r} names unknown variants "
                                  f"{sorted(unknown)}; variants: {', '.join(self.variants)}")
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"experiment {self.name!r}: probe names must be unique, got {names}")
        # Resolve every (profile, variant, setting) now: a typo in a key or value fails at import time.
        for profile in PROFILES:
            for setting in self.setting_names(profile):
                self.configs(profile, setting=setting)
        if len(self.settings) > 1:  # two settings with the same configs would share run directories
            seen: dict[tuple, str] = {}
            for setting in self.settings:
                key = tuple(sorted(self.configs(ROBUST, setting=setting).items()))
                key = tuple((v, repr(c)) for v, c in key)
                if key in seen:
                    raise ConfigError(f"experiment {self.name!r}: settings {seen[key]!r} and {setting!r} "
                                      "give the same configs; drop one")
                seen[key] = setting

    # --- configs ----------------------------------------------------------------------------------------
    @property
    def primary_setting(self) -> str:
        return next(iter(self.settings)) if self.settings else PRIMARY

    def setting_names(self, profile: str) -> list[str]:
        """The robustness settings a profile runs: all of them at ``robust``, else the primary one."""
        if profile == ROBUST and self.settings:
            return list(self.settings)
        return [self.primary_setting]

    def _scale(self, profile: str) -> str:
        """The profile whose scale (steps, cadence) ``profile`` uses: robust runs at quick's scale."""
        if profile == ROBUST and ROBUST not in self.profiles:
            return "quick"
        return profile

    def config(self, variant: str, profile: str = "quick", overrides: Mapping[str, Any] | None = None,
               setting: str | None = None) -> TrainConfig:
        if variant not in self.variants:
            raise ConfigError(f"experiment {self.name!r} has no variant {variant!r}; "
                              f"variants: {', '.join(self.variants)}")
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
        scale = self._scale(profile)
        cfg = apply_overrides(self.base, self.profiles.get(scale, {}))
        cfg = apply_overrides(cfg, self.variants[variant])
        vp = self.variant_profiles.get(profile, self.variant_profiles.get(scale, {}))
        cfg = apply_overrides(cfg, vp.get(variant, {}))
        if setting is not None and setting != self.primary_setting:
            if setting not in self.settings:
                raise ConfigError(f"experiment {self.name!r} has no setting {setting!r}; settings: "
                                  f"{', '.join(self.settings) or '(none)'}")
            cfg = apply_overrides(cfg, _resolve_setting(self.settings[setting], variant, cfg))
        return apply_overrides(cfg, overrides or {})

    def configs(self, profile: str = "quick", overrides: Mapping[str, Any] | None = None,
                setting: str | None = None) -> dict[str, TrainConfig]:
        """variant -> resolved config, in the declared variant order."""
        return {v: self.config(v, profile, overrides, setting) for v in self.variants}

    def default_seeds(self, profile: str, setting: str | None = None) -> tuple[int, ...]:
        """The seeds of ``profile``; at ``robust``, the non-primary settings use ``robust_seeds``."""
        if (profile == ROBUST and setting not in (None, self.primary_setting)
                and self.robust_seeds is not None):
            return tuple(self.robust_seeds)
        key = profile if profile in self.seeds or profile != ROBUST else "quick"
        return tuple(self.seeds.get(key, DEFAULT_SEEDS.get(key, (0,))))

    # --- cost ---------------------------------------------------------------------------------------------
    def run_cost(self, cfg: TrainConfig, start_step: int = 0) -> float:
        """Estimated seconds for one run of ``cfg`` (from ``start_step``), probes included."""
        probe_costs = [(len(p.steps(cfg)), p.cost) for p in self.probes]
        return run_seconds(cfg, probe_costs, start_step)

    def estimate_cost(self, profile: str = "quick", seeds: Sequence[int] | None = None,
                      overrides: Mapping[str, Any] | None = None) -> float:
        """Estimated serial seconds for every setting x variant x seed of ``profile``."""
        total = 0.0
        for setting in self.setting_names(profile):
            n_seeds = len(self.default_seeds(profile, setting) if seeds is None else seeds)
            total += sum(self.run_cost(cfg) * n_seeds
                         for cfg in self.configs(profile, overrides, setting).values())
        return total


    def profile_of(self, results: ExperimentResults) -> str | None:
        """The profile the stored runs were made under (``RunResult.profile``): "robust" if any run
        is, else the one profile they share; None when they name none or several."""
        names = {r.profile for r in results.runs if r.profile}
        if ROBUST in names:
            return ROBUST
        return next(iter(names)) if len(names) == 1 else None

    def declared_seeds(self, results: ExperimentResults, setting: str | None = None) -> tuple[int, ...] | None:
        """The seeds the runs' profile declares for ``setting`` (what a verdict must account for:
        a declared seed without a finished run is "missing"); None when the profile is unknown."""
        profile = self.profile_of(results)
        return None if profile is None else self.default_seeds(profile, setting)

    def declared_settings(self, results: ExperimentResults) -> list[str] | None:
        """The robustness settings the runs' profile declares (all at "robust"); None if unknown."""
        profile = self.profile_of(results)
        return None if profile is None else self.setting_names(profile)

    def split_by_setting(self, results: ExperimentResults) -> dict[str, ExperimentResults]:
        """setting -> its runs, in the declared setting order (runs that name no setting, e.g. runs
        made before settings existed, belong to the primary one)."""
        groups: dict[str, list[RunResult]] = {}
        for r in results.runs:
            groups.setdefault(r.setting or self.primary_setting, []).append(r)
        order = list(self.settings) or [self.primary_setting]
        names = [s for s in order if s in groups] + [s for s in groups if s not in order]
        return {s: ExperimentResults(results.experiment, groups[s], results.out_dir) for s in names}

    def verdict_by_setting(self, results: ExperimentResults,
                           verdict_setting: Callable[[ExperimentResults, tuple[int, ...] | None], list[dict[str, Any]]],
                           claims: Sequence[Claim]) -> list[dict[str, Any]]:
        """The headline verdict rows: ``verdict_setting(runs of one setting, its declared seeds)`` per
        robustness setting, merged by ``verdict.merge_settings`` (a declared setting without runs counts
        as UNDECIDED); without runs of the primary setting every claim is UNDECIDED."""
        by = self.split_by_setting(results)
        if self.primary_setting not in by:
            return [undecided(c, f"no runs of the primary setting ({self.primary_setting})") for c in claims]
        rows = {s: verdict_setting(r, self.declared_seeds(r, s)) for s, r in by.items()}
        return merge_settings(rows, self.primary_setting, self.declared_settings(results))


DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
                 "digits": "scikit-learn 8x8 digits", "gaussian_regression": "Gaussian regression (synthetic)"}


class SettingRuns:
    """The finished runs of one robustness setting, by variant and seed, as a verdict reads them.

    ``declared``: the seeds the profile declares; each is in ``seeds`` whether or not it ran (a
    declared seed without a finished run is "missing" and leaves its rows UNDECIDED).
    ``rows`` collects the rows; ``need`` adds an UNDECIDED row when a variant has no finished run."""

    def __init__(self, results: ExperimentResults, declared: Sequence[int] | None = None) -> None:
        self.groups = {v: {r.seed: r for r in rs if r.status != "incomplete"}
                       for v, rs in results.by_variant().items()}
        self.dataset = dataset_text([r for rs in self.groups.values() for r in rs.values()])
        self.seeds = sorted({s for rs in self.groups.values() for s in rs} | set(declared or ()))
        self.rows: list[dict[str, Any]] = []

    def run(self, variant: str, seed: int) -> RunResult | None:
        return self.groups.get(variant, {}).get(seed)

    def status(self, seed: int, *variants: str) -> dict[str, str]:
        return {v: (r.status if (r := self.run(v, seed)) else "missing") for v in variants}

    def need(self, claim: Claim, *variants: str) -> bool:
        missing = [v for v in variants if not self.groups.get(v)]
        if missing:
            self.rows.append(undecided(claim, f"needs finished runs of {', '.join(missing)}", dataset=self.dataset))
            return False
        return True


def dataset_text(runs: Sequence[RunResult]) -> str:
    """The data the runs really used, for titles and verdict rows, e.g.
    "Fashion-MNIST, grey levels (MNIST not installed)" or "MNIST, binarized at 0.5"; runs made on a GPU
    add where (", on cuda (NVIDIA H200)"), so a verdict over runs of several devices says so."""
    out = set()
    for r in runs:
        d = r.dataset
        used = d.get("used", "?")
        text = DATASET_NAMES.get(used, used)
        if r.config.binarize:
            text += ", binarized at 0.5" if d.get("binarized") else ", grey levels"
        req = d.get("requested")
        if req and req != used:
            text += f" ({DATASET_NAMES.get(req, req)} not installed)"
        env = getattr(r, "env", None) or {}
        device = str(env.get("device") or "cpu")  # runs made before devices existed ran on the CPU
        if device != "cpu":  # a verdict over CPU and GPU seeds lists both
            gpu = env.get("gpu")
            text += f", on {device}" + (f" ({gpu})" if gpu else "")
        out.add(text)
    return " / ".join(sorted(out)) or "unknown"


def _resolve_setting(spec: SettingOverrides, variant: str, cfg: TrainConfig) -> Mapping[str, Any]:
    return spec(variant, cfg) if callable(spec) else spec
