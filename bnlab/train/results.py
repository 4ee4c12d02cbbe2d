"""Reading stored runs back: what verdicts, plots and the HTML report work from. Never trains.

    results = load_results("runs", "ioffe_mnist", profile="quick")
    for variant, runs in results.by_variant().items():
        accs = [r.final("acc") for r in runs if r.status == "done"]
        steps, acc = runs[0].series("eval", "acc")
        steps, p50 = runs[0].probe_series("activations", "p50")     # scalars logged by a probe
        hist = runs[0].arrays["probe/activations/hist"]            # (n_calls, ...) from arrays.npz
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bnlab.errors import CorruptDataError, DataNotFoundError
from bnlab.train.config import TrainConfig, config_from_dict
from bnlab.train.rundir import ARRAYS, CONFIG, DONE, ENV, METRICS, MODEL, read_json, read_metrics

# Every status a stored run can have, in the order the report counts and shows them.
RUN_STATUSES = ("done", "diverged", "collapsed", "incomplete")


@dataclass(eq=False)
class RunResult:
    """One stored run. ``metrics`` and ``arrays`` are read on first use."""

    experiment: str
    variant: str
    seed: int
    profile: str
    config_hash: str
    config: TrainConfig
    run_dir: Path
    status: str  # "done" | "diverged" | "collapsed" (finite loss, chance-level accuracy) | "incomplete"
    diverged_step: int | None = None
    done_info: dict[str, Any] = field(default_factory=dict)
    setting: str = ""  # robustness setting the run belongs to ("" = the experiment's primary setting)
    copied_from: dict[str, Any] | None = None  # {"profile", "path"} when copied from another profile's folder

    @functools.cached_property
    def env(self) -> dict[str, Any]:
        path = self.run_dir / ENV
        return read_json(path) if path.exists() else {}

    @functools.cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir / METRICS)

    @functools.cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        path = self.run_dir / ARRAYS
        if not path.exists():
            return {}
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception as err:
            raise CorruptDataError(f"{path} cannot be read ({err}); delete {self.run_dir} to redo the run") from None

    @property
    def dataset(self) -> dict[str, Any]:
        """Dataset actually used (``used``, ``requested``, ``note`` on fallback, sizes)."""
        return self.env.get("dataset", {})

    def records(self, split: str | None = None, probe: str | None = None) -> list[dict[str, Any]]:
        out = self.metrics
        if split is not None:
            out = [r for r in out if r.get("split") == split]
        if probe is not None:
            out = [r for r in out if r.get("probe") == probe]
        return out

    def series(self, split: str = "eval", key: str = "acc") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of ``key`` over the records of ``split`` ("train", "eval", "test");
        values that were not finite are NaN."""
        recs = [r for r in self.records(split=split) if key in r]
        return _xy(recs, key)

    def probe_series(self, probe: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar a probe returned."""
        recs = [r for r in self.records(probe=probe) if key in r]
        return _xy(recs, key)

    def final(self, key: str = "acc") -> float | None:
        """The full-test-set value of ``key`` at the end (None if the run diverged or is unfinished)."""
        test = self.records(split="test")
        return test[-1].get(key) if test else None

    def model_state(self) -> dict[str, Any]:
        import torch

        return torch.load(self.run_dir / MODEL, map_location="cpu", weights_only=True)


def _xy(recs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in recs], dtype=np.int64)
    vals = np.array([np.nan if r[key] is None else r[key] for r in recs], dtype=np.float64)
    return steps, vals


@dataclass
class ExperimentResults:
    """The stored runs of one experiment, optionally restricted to one profile."""

    experiment: str
    runs: list[RunResult]
    out_dir: Path | None = None

    def by_variant(self) -> dict[str, list[RunResult]]:
        """variant -> its runs sorted by seed, variants in the order first seen (sorted dirs)."""
        out: dict[str, list[RunResult]] = {}
        for r in self.runs:
            out.setdefault(r.variant, []).append(r)
        return {v: sorted(rs, key=lambda r: r.seed) for v, rs in out.items()}

    @property
    def variants(self) -> list[str]:
        return list(self.by_variant())

    def by_setting(self) -> dict[str, "ExperimentResults"]:
        """robustness setting -> its runs ("" = the primary setting), settings in the order first seen."""
        out: dict[str, list[RunResult]] = {}
        for r in self.runs:
            out.setdefault(r.setting, []).append(r)
        return {s: ExperimentResults(self.experiment, rs, self.out_dir) for s, rs in out.items()}

    def get(self, variant: str, seed: int | None = None) -> list[RunResult]:
        return [r for r in self.runs if r.variant == variant and (seed is None or r.seed == seed)]

    def finished(self) -> "ExperimentResults":
        """Only runs that ended (done, diverged or collapsed)."""
        return ExperimentResults(self.experiment, [r for r in self.runs if r.status != "incomplete"],
                                 self.out_dir)

    def profiles(self) -> list[str]:
        return sorted({r.profile for r in self.runs})

    def for_profile(self, profile: str) -> "ExperimentResults":
        return ExperimentResults(self.experiment, [r for r in self.runs if r.profile == profile], self.out_dir)

    @classmethod
    def from_run_dirs(cls, dirs: Iterable[Path], experiment: str | None = None) -> "ExperimentResults":
        dirs = [Path(d) for d in dirs]
        runs = [r for r in (load_run(d) for d in dirs) if r is not None]
        name = experiment or (runs[0].experiment if runs else "")
        out_dir = dirs[0].parent.parent.parent if dirs else None  # <out>/<exp>/<variant-hash>/seed<k>
        return cls(name, runs, out_dir)


def load_run(run_dir: Path) -> RunResult | None:
    """The stored run in ``run_dir``; None if it has no config.json (never started)."""
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        return None
    meta = read_json(cfg_path)
    done_path = run_dir / DONE
    done = read_json(done_path) if done_path.exists() else {}
    status = done.get("status", "incomplete") if done else "incomplete"
    return RunResult(
        experiment=meta["experiment"], variant=meta["variant"], seed=int(meta["seed"]),
        profile=meta.get("profile", ""), config_hash=meta.get("config_hash", ""),
        config=config_from_dict(meta["config"]), run_dir=run_dir, status=status,
        diverged_step=done.get("diverged_step"), done_info=done, setting=meta.get("setting", ""),
        copied_from=meta.get("copied_from"),
    )


def load_results(out_dir: Path | str, experiment: str, *, profile: str | None = None,
                 include_incomplete: bool = False) -> ExperimentResults:
    """Every stored run of ``experiment`` under ``out_dir`` (``<out>/<experiment>/*/seed*/``).

    profile: keep only runs of that profile (runs of several profiles and ``--set`` overrides can share
    an out dir; each RunResult carries ``profile`` and ``config_hash`` to tell them apart).
    """
    root = Path(out_dir) / experiment
    if not root.is_dir():
        raise DataNotFoundError(f"no runs of {experiment!r} under {Path(out_dir)}; run `bnlab run "
                                f"{experiment}` first (or pass the --out it used)")
    runs = []
    for d in sorted(root.glob("*/seed*")):
        r = load_run(d)
        if r is None or (profile is not None and r.profile != profile):
            continue
        if r.status == "incomplete" and not include_incomplete:
            continue
        runs.append(r)
    return ExperimentResults(experiment, runs, Path(out_dir))
