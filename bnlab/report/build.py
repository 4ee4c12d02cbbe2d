"""From an out dir of stored runs to one self-contained HTML report. Reads run directories only:
nothing here trains or probes (compute, store, plot and report are separate).

    path = build_report("runs")                 # every experiment with runs -> runs/report.html

    report = collect("runs", ["ioffe_mnist"], "r.html")  # the same as data: sections, verdict rows
    path = write_report(report)                 # -> r.html
    print(summary_text(path, report.rows))      # what a CLI prints at the end

``out`` is one profile's folder (``runs/quick``, as the CLI writes them; ``profile_roots`` finds them)
or any folder of ``<experiment>/`` run directories. For each experiment with runs there (one
section per profile found, or only ``profile=``): its verdict and plot functions are called on the
*finished* stored runs (figures go to ``<out>/<experiment>/figures/``, where ``bnlab run`` puts them
too); verdict rows get the dataset the runs really used when they do not name it, and rows of the
smoke profile decide nothing (``verdicts.apply_profile_policy``). A verdict or plot function that
raises is reported in its section
instead of stopping the report. Incomplete (killed or still running) and diverged runs are listed as
such. Runs of experiments that are no longer registered still get their settings, environment and
generic curves.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bnlab.errors import BnlabError, ConfigError, DataNotFoundError
from bnlab.atomic import atomic_write_bytes
from bnlab.report.verdicts import LABELS, apply_profile_policy, outcome_of
from bnlab.train.config import config_hash
from bnlab.train.results import ExperimentResults, RunResult, load_run

PROFILE_ORDER = ("paper", "robust", "quick", "smoke")  # the largest scale first: it is the one that counts
_FIGURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def run_dataset_text(run: RunResult) -> str:
    """What a run really trained on (from its env.json): one wording everywhere, shared with the
    experiments' verdict rows (``bnlab.experiments.base.dataset_text``)."""
    from bnlab.experiments.base import dataset_text

    try:
        return dataset_text([run])
    except BnlabError:  # an unreadable env.json: say so rather than guess
        return "unknown (env.json cannot be read)"

__all__ = ["FigureEntry", "Report", "Section", "build_report", "collect", "summary_text",
           "write_report"]


@dataclass
class FigureEntry:
    path: Path
    caption: str
    data: bytes | None  # None: a file type the report does not inline (listed by path)
    mime: str = "image/png"


@dataclass
class DoctorEntry:
    """The BN doctor on one trained run (``bnlab.doctor.diagnose``): its findings, or why it did not run."""

    variant: str
    seed: int
    run_dir: Path
    findings: list[Any] | None  # bnlab.doctor.Finding, most severe first; None when it did not run
    examples: int = 0  # training examples it looked at
    batch_per_process: int = 0
    note: str = ""


# The doctor looks at the first DOCTOR_BATCHES training batches of the run (at most DOCTOR_EXAMPLES
# examples), as the run drew them: enough for per-channel statistics. Measured with one thread (other
# work on the machine): 0.06 s for the Ioffe MLP, 2.4 s for the 1/8-width VGG-16 (5.3 s with 512 examples).
DOCTOR_BATCHES = 4
DOCTOR_EXAMPLES = 256


@dataclass
class Section:
    """One experiment at one profile: its runs and what its verdict and plot functions made of them."""

    name: str
    profile: str
    experiment: Any  # bnlab.experiments.Experiment, or None when not registered
    results: ExperimentResults  # every run of this profile, incomplete ones included
    rows: list[dict[str, Any]] = field(default_factory=list)
    verdict_error: str | None = None  # traceback text
    figures: list[FigureEntry] = field(default_factory=list)
    plot_error: str | None = None
    figures_dir: Path | None = None
    notes: list[str] = field(default_factory=list)  # why no verdict/figures, and similar
    excluded: list[RunResult] = field(default_factory=list)  # finished, but another config of a variant
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # title -> rows
    doctor: list[DoctorEntry] | None = None  # None: not run (``collect(..., doctor=False)``)

    @property
    def anchor(self) -> str:
        raw = f"exp-{self.name}-{self.profile or 'none'}"
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)

    @property
    def title(self) -> str:
        return f"{self.name} ({self.profile} profile)" if self.profile else self.name

    @property
    def datasets(self) -> dict[str, list[RunResult]]:
        """The data the runs really used (text, see ``dataset_text``) -> those runs."""
        out: dict[str, list[RunResult]] = {}
        for r in self.results.runs:
            out.setdefault(run_dataset_text(r), []).append(r)
        return out

    @property
    def dataset_text(self) -> str:
        return " / ".join(self.datasets) or "no runs"

    @property
    def finished(self) -> ExperimentResults:
        """The finished runs the verdict and figures use (see ``_choose_configs``)."""
        done = self.results.finished()
        drop = {id(r) for r in self.excluded}
        return ExperimentResults(done.experiment, [r for r in done.runs if id(r) not in drop], done.out_dir)

    @property
    def incomplete(self) -> list[RunResult]:
        return [r for r in self.results.runs if r.status == "incomplete"]

    @property
    def diverged(self) -> list[RunResult]:
        return [r for r in self.results.runs if r.status == "diverged"]

    @property
    def collapsed(self) -> list[RunResult]:
        return [r for r in self.results.runs if r.status == "collapsed"]

    @property
    def figure_setting(self) -> str | None:
        """The robustness setting the figures show when the runs hold several (the primary one:
        curves of different settings are never averaged together); None when there is one."""
        names = list(dict.fromkeys(r.setting for r in self.results.runs))
        if len(names) < 2:
            return None
        exp = self.experiment
        if exp is not None and getattr(exp, "primary_setting", None) is not None:
            return exp.primary_setting
        return "" if "" in names else names[0]

    @property
    def figure_runs(self) -> ExperimentResults:
        """The finished runs the figures (and their seed counts and reference lines) are drawn from:
        those of ``figure_setting`` only; runs that name no setting belong to the primary one."""
        done = self.finished
        setting = self.figure_setting
        if setting is None:
            return done
        primary = getattr(self.experiment, "primary_setting", None)
        keep = [r for r in done.runs if r.setting == setting or (not r.setting and setting == primary)]
        return ExperimentResults(done.experiment, keep, done.out_dir)


@dataclass
class Report:
    out_dir: Path
    output: Path
    generated: str
    sections: list[Section]
    missing: list[str] = field(default_factory=list)  # requested experiments without runs
    profile: str | None = None  # the one profile this report was restricted to (None: every profile found)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Every verdict row, tagged with experiment and profile; a verdict function that raised
        gives one row with ``outcome="ERROR"`` (``passed=None``) and ``error`` set."""
        out: list[dict[str, Any]] = []
        for s in self.sections:
            for r in s.rows:
                out.append({"experiment": s.name, "profile": s.profile, **r})
            if s.verdict_error is not None:
                out.append({"experiment": s.name, "profile": s.profile, "claim": "(verdict function failed)",
                            "paper": "", "ours": "", "seeds": len(s.finished.runs), "passed": None,
                            "outcome": "ERROR", "dataset": s.dataset_text,
                            "why": _last_line(s.verdict_error), "error": s.verdict_error})
        return out

    @property
    def profiles(self) -> list[str]:
        return list(dict.fromkeys(s.profile for s in self.sections if s.profile))

    @property
    def datasets(self) -> dict[str, list[str]]:
        """The data really used (text) -> the experiments that used it, over every section."""
        out: dict[str, list[str]] = {}
        for s in self.sections:
            for text in s.datasets:
                names = out.setdefault(text, [])
                if s.name not in names:
                    names.append(s.name)
        return out


def profile_roots(out_dir: Path | str) -> dict[str, Path]:
    """``<out>/<profile>/`` folders that hold runs (the layout ``bnlab run``/``reproduce`` write),
    in PROFILE_ORDER; empty when ``out_dir`` itself holds experiment folders."""
    out_dir = Path(out_dir)
    found = {}
    if out_dir.is_dir():
        for d in sorted(out_dir.iterdir()):
            if d.is_dir() and any(d.glob("*/*/seed*/config.json")) and not any(d.glob("*/seed*/config.json")):
                found[d.name] = d
    return dict(sorted(found.items(), key=lambda kv: (PROFILE_ORDER.index(kv[0]) if kv[0] in PROFILE_ORDER
                                                      else len(PROFILE_ORDER), kv[0])))


# --- finding runs -------------------------------------------------------------------------------------

def _no_runs_message(out_dir: Path, what: str, example: str = "ioffe_mnist") -> str:
    """``what`` and the commands that fix it here: ``bnlab run``/``reproduce`` write
    ``<out>/<profile>/<experiment>/``, so for a profile folder ``--out`` is its parent, and an
    experiment's own folder is reported through its profile folder."""
    if out_dir.is_dir() and any(out_dir.glob("*/seed*/config.json")):  # <profile>/<experiment>/ itself
        return (f"{what}: {out_dir} is the folder of one experiment's runs; build the report of its "
                f"profile folder instead: `bnlab report {out_dir.parent}`")
    profile, out = "quick", out_dir
    try:
        from bnlab.experiments.base import PROFILES
    except Exception:  # a broken experiment module must not hide the message
        PROFILES = PROFILE_ORDER
    if out_dir.name in PROFILES:  # a profile folder: the runs go to <parent>/<profile>/
        profile, out = out_dir.name, out_dir.parent
    return (f"{what}; produce runs first, e.g. `bnlab run {example} --profile {profile} --out {out}` "
            f"(`bnlab list` names every experiment), then build the report with `bnlab report {out_dir}`")


def experiments_with_runs(out_dir: Path | str) -> list[str]:
    """Names of the experiments that have at least one run directory under ``out_dir``: registered
    experiments in registry order, then any others (e.g. renamed or removed ones) sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = sorted(d.name for d in out_dir.iterdir()
                   if d.is_dir() and any(d.glob("*/seed*/config.json")))
    try:
        from bnlab.experiments import experiment_names

        order = {n: i for i, n in enumerate(experiment_names())}
    except Exception:  # a broken experiment module must not hide the runs of the others
        order = {}
    return sorted(found, key=lambda n: (order.get(n, len(order)), n))


def _lookup(name: str) -> tuple[Any, str | None]:
    """(the registered experiment or None, why not when an experiment module failed to import)."""
    try:
        from bnlab.experiments import get_experiment

        return get_experiment(name), None
    except ConfigError:
        return None, None
    except Exception as err:  # a broken experiment module: still report the stored runs
        return None, f"the experiment registry failed to load ({type(err).__name__}: {err})"


def _load_runs(out_dir: Path, name: str) -> tuple[list[RunResult], list[str]]:
    """Every run directory of ``name`` (incomplete ones included); one unreadable run directory is
    named in a note instead of hiding all the others."""
    runs, problems = [], []
    for d in sorted((out_dir / name).glob("*/seed*")):
        try:
            r = load_run(d)
        except Exception as err:
            problems.append(f"run directory {d} cannot be read ({_last_line(str(err)) or type(err).__name__}); "
                            "it is left out of this report (delete it to redo the run)")
            continue
        if r is not None:
            runs.append(r)
    return runs, problems


# --- calling experiment code safely -------------------------------------------------------------------

def _format_error(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else text


def _normalize_rows(rows: Any) -> list[dict[str, Any]]:
    if rows is None:
        return []
    if isinstance(rows, dict):
        rows = [rows]
    out = []
    for r in rows:
        if not isinstance(r, dict):
            raise TypeError(f"verdict rows must be dicts (claim, paper, ours, seeds, passed, why), got "
                            f"{type(r).__name__}: {r!r}")
        out.append(dict(r))
    return out


def _run_verdict(section: Section) -> None:
    exp = section.experiment
    if exp is None or getattr(exp, "verdict", None) is None:
        return
    try:
        rows = _normalize_rows(exp.verdict(section.finished))
    except Exception as err:  # the report shows it; other experiments still get their sections
        section.verdict_error = _format_error(err)
        return
    for r in rows:  # rows name the data they were computed on; older verdicts did not
        if not r.get("dataset"):
            r["dataset"] = section.dataset_text
    section.rows = apply_profile_policy(rows, section.profile)


def _run_tables(section: Section) -> None:
    exp = section.experiment
    fn = getattr(exp, "tables", None) if exp is not None else None
    if fn is None:
        return
    try:
        section.tables = {str(k): [dict(r) for r in v] for k, v in (fn(section.finished) or {}).items()}
    except Exception as err:
        section.notes.append(f"the tables function raised: {_last_line(_format_error(err))}")


def _run_plots(section: Section, out_dir: Path, several_profiles: bool) -> None:
    from bnlab.report.plots import default_plots, read_caption, use_agg

    exp = section.experiment
    if exp is not None and (getattr(exp, "figures", None) or getattr(exp, "plots", None)):
        from bnlab.report.figures import experiment_figures

        def fn(results, out):  # figures declared as data (bnlab/experiments/figures.py), then any plots
            return experiment_figures(exp, results, out)
    else:
        fn = default_plots
    figdir = out_dir / section.name / "figures"
    if several_profiles:
        figdir = figdir / (section.profile or "none")
    section.figures_dir = figdir
    use_agg()
    plt = sys.modules.get("matplotlib.pyplot")
    before = set(plt.get_fignums()) if plt is not None else set()
    try:
        figdir.mkdir(parents=True, exist_ok=True)
        paths = list(fn(section.figure_runs, figdir) or [])
    except Exception as err:
        section.plot_error = _format_error(err)
        paths = []
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:  # figures an experiment left open in pyplot would pile up over a report
            for num in set(plt.get_fignums()) - before:
                plt.close(num)
    setting = section.figure_setting
    if setting is not None and paths:
        n = len(section.figure_runs.runs)
        section.notes.append(
            f"The figures show the primary robustness setting ({setting or 'unnamed'}) only: {n} finished "
            f"run{'s' if n != 1 else ''}; the outcomes of every setting are in the Robustness table.")
    for p in paths:
        p = Path(p)
        if not p.is_file():
            section.notes.append(f"the plot function returned {p}, which does not exist")
            continue
        mime = _FIGURE_TYPES.get(p.suffix.lower())
        section.figures.append(FigureEntry(p, read_caption(p), p.read_bytes() if mime else None,
                                           mime or ""))


# --- the report ---------------------------------------------------------------------------------------

def diagnose_run(run: RunResult) -> DoctorEntry:
    """``bnlab.doctor.diagnose`` on the final model of ``run`` (its model.pt, loaded weights-only) over
    its first training batches, with the batch each process trained on (batch_size / nproc). The run
    directory is only read; a model without BN, a missing dataset or weights that are refused give
    an entry with a note instead of findings."""
    import torch

    from bnlab.data import Batches
    from bnlab.doctor import diagnose
    from bnlab.experiments.restore import restore_model

    entry = DoctorEntry(run.variant, run.seed, run.run_dir, None)
    try:
        r = restore_model(run.run_dir)
        bs = r.cfg.batch_size
        batches = Batches(r.task.x_train, r.task.y_train, bs, run.seed)
        k = max(1, min(DOCTOR_BATCHES, DOCTOR_EXAMPLES // bs, len(batches)))
        parts = [batches.batch(i) for i in range(k)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        dist = (run.env or {}).get("distributed") or {}
        # with synchronized BN (what --nproc uses) BN's statistics are over the global batch
        nproc = 1 if dist.get("sync_bn_layers") else int(dist.get("nproc", 1))
        entry.examples, entry.batch_per_process = int(x.shape[0]), max(1, bs // nproc)
        entry.findings = diagnose(r.model, x, y, batch_per_process=entry.batch_per_process)
    except ConfigError as err:
        text = str(err)
        entry.note = ("no BatchNorm layer: nothing for the doctor to check" if "no BatchNorm layer" in text
                      else f"not run: {text}")
    except BnlabError as err:
        entry.note = f"not run: {err}"
    except Exception as err:  # a model the doctor cannot run must not cost the report
        entry.note = f"not run: {_format_error(err)}"
    return entry


def _run_doctor(s: Section) -> None:
    """The doctor on the first seed of each variant (the figures' setting): one model per arm, since
    seeds of one arm share their BN problems and every model costs a load and a few passes (up to
    seconds for VGG: see DOCTOR_EXAMPLES)."""
    first: dict[str, RunResult] = {}
    for run in sorted(s.figure_runs.runs, key=lambda r: r.seed):
        first.setdefault(run.variant, run)
    s.doctor = [diagnose_run(run) for run in first.values()]


def _choose_configs(s: Section) -> None:
    """One config per variant for the verdict and figures, so seeds of different settings are never
    averaged together: the config the experiment declares for this profile when it has finished runs,
    else the config with the most finished runs. Runs of other configs (``--set`` overrides) stay in
    the settings and runs tables and are named in a note."""
    by_variant: dict[tuple[str, str], dict[str, list[RunResult]]] = {}
    for r in s.results.finished().runs:  # robustness settings are kept apart, never merged
        by_variant.setdefault((r.setting, r.variant), {}).setdefault(r.config_hash, []).append(r)
    for (setting, variant), by_hash in by_variant.items():
        if len(by_hash) < 2:
            continue
        declared = None
        if s.experiment is not None:
            try:
                declared = config_hash(s.experiment.config(variant, s.profile, setting=setting or None))
            except Exception:  # variant or profile no longer declared
                declared = None
        keep = declared if declared in by_hash else max(by_hash, key=lambda h: (len(by_hash[h]), h))
        others = [r for h, rs in by_hash.items() if h != keep for r in rs]
        s.excluded.extend(others)
        s.notes.append(
            f"variant {variant!r} has finished runs of {len(by_hash)} different configs; the verdict and "
            f"figures use config {keep[:8]}" + (" (the declared one)" if keep == declared else
                                                 " (the one with the most runs)")
            + " and leave out " + ", ".join(f"seed {r.seed} of {r.config_hash[:8]}" for r in others)
            + " (see Settings and Deviations)")


def _sections_for(out_dir: Path, name: str, exp: Any, lookup_error: str | None) -> list[Section]:
    runs, problems = _load_runs(out_dir, name)
    results = ExperimentResults(name, runs, out_dir)
    profiles = results.profiles()
    profiles.sort(key=lambda p: (PROFILE_ORDER.index(p) if p in PROFILE_ORDER else len(PROFILE_ORDER), p))
    if not profiles:  # every run directory was unreadable
        return [Section(name, "", exp, results, notes=problems)]
    sections = []
    for profile in profiles:
        sub = results.for_profile(profile)
        s = Section(name, profile, exp, sub, notes=list(problems))
        if lookup_error is not None:
            s.notes.append(f"{lookup_error}: the runs are listed with generic curves, without a verdict")
        elif exp is None:
            s.notes.append(f"{name!r} is not a registered experiment in this version of bnlab (renamed or "
                           "removed?): its runs are listed with generic curves, without a verdict")
        elif getattr(exp, "verdict", None) is None:
            s.notes.append("this experiment declares no verdict function")
        _choose_configs(s)
        copied = [r for r in sub.runs if r.copied_from]
        if copied:
            sources = sorted({str(r.copied_from.get("profile")) for r in copied})
            s.notes.append(f"{len(copied)} of these {len(sub.runs)} runs were copied from the "
                           f"{'/'.join(sources)} profile's folder, where they had finished with the same config, "
                           "seed and dataset (their config.json says copied_from); they were not trained again")
        sections.append(s)
    return sections


def collect(out_dir: Path | str, experiments: Sequence[Any] | None = None,
            output: Path | str | None = None, profile: str | None = None, doctor: bool = True) -> Report:
    """Read the stored runs, run every verdict and plot function; the report as data (no HTML).

    experiments: names (or Experiment objects, e.g. unregistered ones in tests); None = every
    experiment with runs under ``out_dir``. profile: only runs of that profile (a quick report never
    shows smoke runs); None = one section per profile found. ``doctor``: run the BN doctor on the
    first seed of each variant (``diagnose_run``; up to a few seconds per model). Raises
    DataNotFoundError when there is nothing to report.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise DataNotFoundError(_no_runs_message(out_dir, f"the run directory {out_dir} does not exist"))
    if not out_dir.is_dir():
        raise DataNotFoundError(_no_runs_message(out_dir, f"{out_dir} is not a directory of runs"))
    with_runs = experiments_with_runs(out_dir)
    wanted: list[tuple[str, Any, str | None]] = []
    missing: list[str] = []
    if experiments is None:
        wanted = [(n, *_lookup(n)) for n in with_runs]
    else:
        for item in experiments:
            if isinstance(item, str):
                name, (exp, why) = item, _lookup(item)
                if exp is None and why is None and item not in with_runs:
                    from bnlab.experiments import get_experiment

                    get_experiment(item)  # raises ConfigError: unknown experiment, naming the known ones
            else:
                name, exp, why = item.name, item, None
            if name in with_runs:
                wanted.append((name, exp, why))
            else:
                missing.append(name)
    if not wanted:
        what = (f"no runs of {', '.join(missing)} under {out_dir}" if missing
                else f"no runs under {out_dir} (no <experiment>/<variant>-<hash>/seed<k>/config.json)")
        raise DataNotFoundError(_no_runs_message(out_dir, what, missing[0] if missing else "ioffe_mnist"))

    sections: list[Section] = []
    for name, exp, why in wanted:
        sections.extend(_sections_for(out_dir, name, exp, why))
    if profile is not None:
        sections = [s for s in sections if s.profile == profile]
        if not sections:
            raise DataNotFoundError(_no_runs_message(out_dir, f"no runs of the {profile} profile under {out_dir}"))
    for name in dict.fromkeys(s.name for s in sections):
        mine = [s for s in sections if s.name == name]
        for s in mine:
            if not s.finished.runs:
                s.notes.append("no finished run yet (every run is incomplete): verdict and figures wait "
                               "for at least one run to end")
                continue
            _run_verdict(s)
            _run_tables(s)
            _run_plots(s, out_dir, several_profiles=len(mine) > 1)
            if doctor:
                _run_doctor(s)
    output = Path(output) if output is not None else out_dir / "report.html"
    return Report(out_dir, output, time.strftime("%Y-%m-%d %H:%M:%S %z"), sections, missing, profile)


def write_report(report: Report) -> Path:
    """Render ``report`` (from ``collect``) to ``report.output``, atomically; returns the path."""
    from bnlab.report.html import render

    report.output.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(report.output, render(report).encode("utf-8"))


def build_report(out_dir: Path | str, experiments: Sequence[Any] | None = None,
                 output: Path | str | None = None) -> Path:
    """Write the HTML report of the stored runs under ``out_dir`` (default ``<out>/report.html``,
    atomically) and return its path. Never trains. See ``collect`` for ``experiments``; to print
    ``summary_text`` as well, use ``report = collect(...); write_report(report); report.rows``."""
    return write_report(collect(out_dir, experiments, output))


def summary_text(report_path: Path | str, verdict_rows: Sequence[dict[str, Any]] | None) -> str:
    """A few plain-text lines for the end of a CLI command: where the report is, and the verdict
    counts (PASS / FAIL / TIE / UNDECIDED, and verdict functions that failed)."""
    rows = list(verdict_rows or [])
    lines = [f"report: {Path(report_path).resolve()} (one self-contained file; opens offline in any browser)"]
    if not rows:
        lines.append("verdicts: none (no verdict rows)")
        return "\n".join(lines)
    n = {k: sum(1 for r in rows if outcome_of(r) == k) for k in LABELS}
    text = ", ".join(f"{v} {k}" for k, v in n.items() if k != "ERROR")
    if n["ERROR"]:
        text += f", {n['ERROR']} verdict error{'s' if n['ERROR'] != 1 else ''}"
    lines.append(f"verdicts: {text} ({len(rows)} claim{'s' if len(rows) != 1 else ''})")
    for r in rows:
        if outcome_of(r) == "ERROR":
            where = "/".join(str(r[k]) for k in ("experiment", "profile") if r.get(k))
            lines.append(f"  ERROR     {where + ': ' if where else ''}{r.get('why', '')}")
    return "\n".join(lines)
