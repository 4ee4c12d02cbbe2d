"""The ``bnlab`` command: list | run | reproduce | report | doctor.

    bnlab list
    bnlab run ioffe_mnist --profile quick --seeds 0,1,2 --set lr=0.1 steps=2000 --workers 2
    bnlab run ioffe_mnist --show-config            # every config key, its type and value per variant
    bnlab reproduce ioffe --profile quick          # run what is missing, then write runs/quick/report.html
    bnlab report runs                              # rebuild every profile's report from stored runs only
    bnlab doctor
    bnlab doctor --model model.pt2 --data fashion_mnist --html doctor.html   # BN problems of a saved model

Runs of each profile live apart, under ``<out>/<profile>/<experiment>/...``: a smoke run never
overwrites or mixes into a quick verdict, and smoke rows decide no claim.

Every bnlab error (bad key, unknown experiment, missing data, locked run, ...) is printed as one
message naming the problem and the fix, with exit code 2 and no traceback. Divergence is a result,
not an error: the run is recorded as diverged and the exit code stays 0.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from bnlab.errors import BnlabError, ConfigError, DataNotFoundError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --- shared checks --------------------------------------------------------------------------------

def profiles() -> tuple[str, ...]:
    """The profiles experiments declare (bnlab.experiments.PROFILES): the CLI accepts exactly these."""
    from bnlab.experiments import PROFILES

    return tuple(PROFILES)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_profile(profile: str) -> str:
    known = profiles()
    if profile not in known:
        raise ConfigError(f"unknown profile {profile!r}{_did_you_mean(profile, known)}; choose one of: "
                          f"{', '.join(known)}")
    return profile


def profile_root(out: str | Path, profile: str) -> Path:
    """Where the runs of ``profile`` live: ``<out>/<profile>/`` (profiles never share a folder, so a
    smoke run can never overwrite or be mixed into a quick verdict). An ``--out`` that already is
    this profile's folder (``runs/quick``) is used as is; another profile's folder is refused."""
    out = Path(out)
    if out.name == profile:
        return out
    if out.name in profiles():
        raise ConfigError(f"--out {out} is the folder of the {out.name} profile, but --profile is {profile}; "
                          f"pass --out {out.parent} (runs go to {out.parent / profile})")
    return out / profile


_NO_REUSE_HELP = ("train every run here, even one that another profile's folder under OUT already holds "
                  "finished with the same config and seed (by default such a run is copied, e.g. quick's "
                  "runs into robust, whose primary setting they are)")


_NO_DOCTOR_HELP = ("leave out the report's BN doctor section (the doctor on the first seed of each variant: "
                   "a model load and a few forward passes each)")


def sibling_profile_roots(root: Path, no_reuse: bool = False) -> list[Path]:
    """The other profiles' folders next to ``root`` (``runs/quick`` for ``runs/robust``), whose finished
    runs of an identical config and seed a run may copy instead of training again; none with --no-reuse."""
    if no_reuse:
        return []
    return [root.parent / p for p in profiles() if p != root.name and (root.parent / p).is_dir()]


def parse_overrides(groups: list[list[str]] | None) -> dict[str, str]:
    """--set key=value ... -> {key: value}; refuses a key given twice and suggests the closest
    field for an unknown key (the full list of valid keys follows)."""
    from bnlab.train.config import field_names, parse_set_args

    items = [x for group in (groups or []) for x in group]
    parsed = parse_set_args(items)
    seen: dict[str, list[str]] = {}
    for item in items:
        key, _, value = item.partition("=")
        seen.setdefault(key.strip(), []).append(value.strip())
    twice = {k: v for k, v in seen.items() if len(v) > 1}
    if twice:
        k, values = next(iter(twice.items()))
        raise ConfigError(f"--set {k} is given {len(values)} times ({', '.join(f'{k}={v}' for v in values)}); "
                          "give each key once")
    fields = field_names()
    for key in parsed:
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, fields)}; valid keys: "
                              f"{', '.join(fields)} (`bnlab run NAME --show-config` lists them with values "
                              "and types)")
    return parsed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a number > 0, got {text}")
    return value


# --- bnlab list ------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    from bnlab.experiments import all_experiments
    from bnlab.train.cost import format_seconds

    exps = all_experiments()
    width = max([len(e.name) for e in exps] + [10])
    known = profiles()
    print(f"{'experiment':<{width}}  " + " ".join(f"{p:>6}" for p in known) + "  description")
    for e in exps:
        costs = " ".join(f"{format_seconds(e.estimate_cost(p)):>6}" for p in known)
        print(f"{e.name:<{width}}  {costs}  {e.description}")
    print("\ncosts: estimated serial CPU time per profile (all variants x default seeds); "
          "`bnlab run NAME --profile P` runs one")
    print("\ngroups and selections for `bnlab reproduce` (default: headline):")
    names = ["all", *GROUPS, *SELECTIONS]
    w = max(len(n) for n in names)
    print(f"  {'all':<{w}}  every experiment")
    for n, members in GROUPS.items():
        print(f"  {n:<{w}}  {', '.join(members)}")
    for n, (description, parts) in SELECTIONS.items():
        arms = "; ".join(f"{e} ({', '.join(v)})" if v else e for e, v in parts)
        print(f"  {n:<{w}}  {description}\n  {'':<{w}}    {arms}")
    return 0


# --- bnlab run -------------------------------------------------------------------------------------

def show_config(exp: Any, profile: str, overrides: dict[str, Any]) -> None:
    """Every config key with its type and value for each variant (values shared by every variant
    once; differing ones per variant)."""
    from bnlab.train.config import _field_types, _type_name, config_to_dict

    configs = {v: config_to_dict(c) for v, c in exp.configs(profile, overrides).items()}
    types_ = _field_types()
    print(f"{exp.name} [{profile}]: {len(configs)} variant(s): {', '.join(configs)}"
          + (f"; with --set {' '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else ""))
    rows = []
    for key in types_:
        values = {v: d[key] for v, d in configs.items()}
        shown = {v: json.dumps(x) for v, x in values.items()}
        if len(set(shown.values())) == 1:
            text = next(iter(shown.values()))
        else:
            text = ", ".join(f"{v}: {x}" for v, x in shown.items())
        rows.append((key, _type_name(types_[key]).replace(" (comma-separated)", ""), text))
    wk = max(len(r[0]) for r in rows)
    wt = max(len(r[1]) for r in rows)
    # a field no part of this experiment reads is marked, not hidden: --set still accepts it
    unused = set()
    if getattr(exp, "probes", ()) and not any(getattr(p, "uses_probe_batch", True) for p in exp.probes):
        unused.add("probe_batch_size")
    print(f"{'key':<{wk}}  {'type':<{wt}}  value")
    for key, tp, text in rows:
        mark = "  (unused by this experiment's probes)" if key in unused else ""
        print(f"{key:<{wk}}  {tp:<{wt}}  {text}{mark}")
    print("\nchange any of them with --set key=value (e.g. --set lr=0.05 steps=2000); values as JSON "
          "(null = the model's default)")
    settings = getattr(exp, "settings", None) or {}
    if len(settings) > 1:
        print("\nrobustness settings (all run at --profile robust; one alone with --setting NAME):")
        for i, (name, ov) in enumerate(settings.items()):
            what = "the protocol as declared" if i == 0 else (
                " ".join(f"{k}={v}" for k, v in ov.items()) if isinstance(ov, dict) else "depends on the variant")
            print(f"  {name!r}: {what}")


def cmd_run(args: argparse.Namespace) -> int:
    from bnlab.experiments import get_experiment
    from bnlab.train.runner import check_data_dir, parse_seeds, parse_shard, run_experiment

    exp = get_experiment(args.name)
    profile = check_profile(args.profile)
    overrides = parse_overrides(args.set)
    from bnlab.train.config import check_norm_options_used

    # wrong types / values fail here, before any output; so does a norm option no variant takes
    check_norm_options_used(exp.configs(profile, overrides), overrides)
    if args.show_config:
        show_config(exp, profile, overrides)
        return 0
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    settings = args.setting or None
    shard = parse_shard(args.shard) if args.shard else None
    check_data_dir(args.data_dir)
    root = profile_root(args.out, profile)
    if args.nproc is not None and (args.nproc > 1 or args.torchrun_args):
        from bnlab.train.ddp import RANK_PROCESS_ENV, launch

        if os.environ.get(_RANK_ENV):
            return _run_rank(args, exp, profile, overrides, seeds, variants, shard, root)
        from bnlab.train.device import resolve_device

        if args.device not in (None, "auto") and resolve_device(args.device).type != "cpu":
            raise ConfigError(f"--nproc trains on CPUs (gloo) for now, not --device {args.device}; drop --device, "
                              "or train on one GPU without --nproc")
        if args.workers > 1:
            raise ConfigError("--nproc trains one run at a time over its processes; drop --workers "
                              "(or drop --nproc to train several runs side by side)")
        # Only what equals the single-process run (to float32 rounding) may share its run directory:
        # plain or no BN and no random layers. Other norms keep per-rank statistics, and dropout and
        # noise would draw per rank (not the single-process draws, and not restored per rank on resume).
        chosen = {v: c for v, c in exp.configs(profile, overrides).items() if not variants or v in variants}
        odd = {v: (f"norm={c.norm}" if c.norm not in ("batch", "none") else f"dropout={c.dropout}")
               for v, c in chosen.items() if c.norm not in ("batch", "none") or (c.dropout or 0) > 0}
        if odd:
            keep = [v for v in chosen if v not in odd]
            raise ConfigError(
                "--nproc trains arms with plain BN (synchronized) or none, without random layers; "
                + ", ".join(f"{v} ({why})" for v, why in odd.items()) + " would not equal the single-process "
                "run" + (f": run the others with --variants {','.join(keep)}" if keep else ""))
        small = {v: c.batch_size for v, c in chosen.items() if c.batch_size < args.nproc}
        if small:
            v, b = next(iter(small.items()))
            raise ConfigError(f"variant {v!r} has batch_size={b}, fewer examples than --nproc {args.nproc} processes; "
                              f"use --nproc {b} or fewer, or --set batch_size=...")
        return launch(args.argv, args.nproc, args.torchrun_args, args.threads or 1)
    elif args.torchrun_args:
        raise ConfigError("--torchrun-args needs --nproc N (processes per node)")
    run = run_experiment(
        exp, profile, out=root, seeds=seeds, overrides=overrides, variants=variants, settings=settings,
        device=args.device,
        workers=args.workers, threads=args.threads, max_minutes=args.max_minutes, quiet=args.quiet,
        tensorboard=args.tensorboard, data_dir=args.data_dir, wait=args.wait, shard=shard,
        share_from=sibling_profile_roots(root, args.no_reuse),
    )
    if shard is not None or variants or settings:
        print("verdict: skipped for a partial run (--shard/--variants/--setting); run without them once "
              "every part is done to get it (`bnlab report` shows what is stored)")
        return 0
    write_verdict_and_plots(exp, run.run_dirs, root, profile, overrides)
    return 0


def _run_rank(args: argparse.Namespace, exp: Any, profile: str, overrides: dict[str, Any], seeds: Any,
              variants: Any, shard: Any, root: Path) -> int:
    """One rank process of ``bnlab run --nproc`` (started by torchrun through ``launch``): rank 0 plans,
    prints, writes and trains every run with the others; they follow it (bnlab.train.ddp)."""
    from bnlab.train import ddp
    from bnlab.train.loop import RunOptions
    from bnlab.train.runner import _die_with_parent, plan_runs, run_experiment

    _die_with_parent()  # torchrun starts ranks in their own sessions: go when the launcher goes
    # torchrun stops the ranks with SIGTERM when one fails: end at once, quietly (files are written
    # atomically and a resume truncates the metrics to the checkpoint, as after a kill)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(EXIT_INTERRUPTED))
    ranks = ddp.init_from_env()
    distributed = ranks.world > 1
    threads = args.threads or 1
    try:
        return _rank_body(args, exp, profile, overrides, seeds, variants, shard, root, ranks, distributed, threads)
    except RuntimeError as err:
        if isinstance(err, BnlabError) or not ddp.collective_failure(err):
            raise
        raise ddp.DistributedRunError(
            f"rank {ranks.rank}: a collective with the other ranks failed ({str(err).strip().splitlines()[0]}); "
            "another rank died or stalled") from None
    finally:
        ddp.shutdown()


def _rank_body(args: argparse.Namespace, exp: Any, profile: str, overrides: dict[str, Any], seeds: Any,
               variants: Any, shard: Any, root: Path, ranks: Any, distributed: bool, threads: int) -> int:
    from bnlab.train import ddp
    from bnlab.train.loop import RunOptions
    from bnlab.train.runner import plan_runs, run_experiment

    if not ranks.writer:  # train what rank 0 announces; print and write nothing
        specs = [p.spec for p in plan_runs(exp, profile, out=root, seeds=seeds, overrides=overrides,
                                           variants=variants, shard=shard, settings=args.setting)]
        ddp.follow(specs, RunOptions(data_dir=args.data_dir, threads=threads, distributed=True, device="cpu"))
        return 0
    run = run_experiment(
        exp, profile, out=root, seeds=seeds, overrides=overrides, variants=variants, workers=1,
        threads=threads, max_minutes=args.max_minutes, quiet=args.quiet, tensorboard=args.tensorboard,
        data_dir=args.data_dir, wait=args.wait, shard=shard, share_from=sibling_profile_roots(root, args.no_reuse),
        distributed=distributed, settings=args.setting, device="cpu")  # gloo: the ranks train on CPUs
    if distributed:
        ddp.end(ranks)  # only after every run: an error before this ends rank 0, and torchrun the others
    if shard is not None or variants or args.setting:
        print("verdict: skipped for a partial run (--shard/--variants/--setting); run without them once "
              "every part is done to get it (`bnlab report` shows what is stored)")
        return 0
    write_verdict_and_plots(exp, run.run_dirs, root, profile, overrides)
    return 0


def write_verdict_and_plots(exp: Any, run_dirs: Sequence[Path], out: Path, profile: str,
                            overrides: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Compute the experiment's verdict and plots from the stored runs of this invocation; write
    ``<out>/<exp>/verdict.json`` and ``<out>/<exp>/figures/`` (where the report puts them too);
    print the verdict table. Smoke-profile rows are UNDECIDED (see report.verdicts)."""
    from bnlab.report.verdicts import apply_profile_policy
    from bnlab.train.results import ExperimentResults

    if exp.verdict is None and exp.plots is None and not getattr(exp, "figures", ()):
        return None
    results = ExperimentResults.from_run_dirs(run_dirs, exp.name)
    unfinished = [r for r in results.runs if r.status == "incomplete"]
    if unfinished or len(results.runs) < len(run_dirs):
        print(f"verdict: pending, {len(run_dirs) - len(results.finished().runs)} run(s) unfinished")
        return None
    results = results.finished()
    rows = None
    if exp.verdict is not None:
        from bnlab.report.build import Section

        rows = [dict(r) for r in exp.verdict(results)]
        dataset = Section(exp.name, profile, exp, results).dataset_text
        for r in rows:
            r.setdefault("profile", profile)
            if not r.get("dataset"):
                r["dataset"] = dataset
            if overrides:
                r.setdefault("overrides", dict(overrides))
        rows = apply_profile_policy(rows, profile)
        path = write_verdict_json(out, exp.name, rows)
        print_verdict(rows)
        print(f"verdict written to {path}")
    if getattr(exp, "tables", None) is not None:
        for title, table_rows in exp.tables(results).items():
            print_table(title, table_rows)
    if getattr(exp, "figures", ()) or exp.plots is not None:  # figures declared as data, then any plots
        from bnlab.report.figures import experiment_figures

        from bnlab.report.build import Section

        # one robustness setting (the primary one): curves of different settings are never averaged
        for p in experiment_figures(exp, Section(exp.name, profile, exp, results).figure_runs,
                                    out / exp.name / "figures"):
            print(f"figure: {p}")
    return rows


def _write_verdicts(root: Path, rows: list[dict[str, Any]]) -> None:
    """The rows a report shows, one ``verdict.json`` per experiment (so the two never disagree)."""
    for name in dict.fromkeys(r.get("experiment") for r in rows if r.get("experiment")):
        write_verdict_json(root, name, [r for r in rows if r.get("experiment") == name])


def write_verdict_json(out: Path, experiment: str, rows: list[dict[str, Any]]) -> Path:
    """``<out>/<experiment>/verdict.json``: the verdict rows (see bnlab.report.verdicts)."""
    from bnlab.train.rundir import atomic_write_json, json_safe

    path = Path(out) / experiment / "verdict.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json_safe(rows))
    return path


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """A paper's table (e.g. Ioffe Fig. 3) as fixed-width text."""
    from bnlab.report.html import format_cell

    print(f"\n{title}")
    if not rows:
        print("  (empty)")
        return
    headers = list(rows[0])
    cells = [[format_cell(r.get(h)) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    for line in [headers, *cells]:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(line, widths)))


def print_verdict(rows: Sequence[dict[str, Any]], title: str = "verdict") -> None:
    """One block per claim: outcome, claim, ours, estimate with its CI, seeds, data."""
    from bnlab.report.markdown import claim_id_of
    from bnlab.numfmt import fmt_value
    from bnlab.report.verdicts import ci_text, outcome_of, ours_text, seeds_text

    from bnlab.report.verdicts import PROFILE_NOTES, UNDECIDING_PROFILES

    print(f"\n{title}")
    for profile in dict.fromkeys(r.get("profile") for r in rows if r.get("undecided_reason")):
        if profile in PROFILE_NOTES:
            print(f"  {PROFILE_NOTES[profile]}")
    for r in rows:
        cid = claim_id_of(r)
        claim = str(r.get("claim", ""))
        if cid and not claim.startswith(cid):
            claim = f"{cid} {claim}"
        where = f"{r['experiment']}: " if r.get("experiment") else ""
        print(f"  [{outcome_of(r):>9}] {where}{claim}")
        if r.get("paper"):
            print(f"              paper: {r['paper']}")
        print(f"              ours:  {ours_text(r.get('ours', ''))}")
        ci = ci_text(r)
        if ci.startswith("none") and isinstance(r.get("estimate"), (int, float)):
            print(f"              estimate: {fmt_value(r['estimate'])}")  # the CI line holds intervals only
        if ci:
            print(f"              CI:    {ci}")
        extra = [seeds_text(r)] + ([f"data: {r['dataset']}"] if r.get("dataset") else [])
        rob = r.get("robustness")
        if isinstance(rob, dict) and rob.get("label"):
            extra.append(f"robustness: {rob['label']}")
        print(f"              {'; '.join(extra)}")
        if r.get("undecided_reason"):
            reason = r["undecided_reason"]
            if reason not in UNDECIDING_PROFILES.values():  # a profile's reason says it all: no "rule alone"
                reason += f" (the rule alone: {r.get('computed_outcome', '?')})"
            print(f"              undecided: {reason}")
        elif r.get("why") and not r.get("rule"):
            print(f"              why:   {r['why']}")
        if r.get("rule"):
            print(f"              rule:  {r['rule']}")


# --- bnlab reproduce / report -------------------------------------------------------------------------

# Named groups of experiments; "all" is every registered experiment.
GROUPS: dict[str, tuple[str, ...]] = {
    "ioffe": ("ioffe_mnist", "ioffe_lr_study"),
    # Santurkar et al. 2018: the deep linear network and the VGG experiments
    "santurkar": ("santurkar_dln", "santurkar_vgg"),
}

# Named selections: some arms (variants) of one or more experiments, runnable by name. Their runs are
# the experiments' own (same folders, same configs), so running a selection and later the whole
# experiment computes nothing twice, and the report shows each experiment's section with what has run.
Selection = tuple[tuple[str, "tuple[str, ...] | None"], ...]
# The README's first command, about 20 minutes on 2 CPU cores (quick profile): Ioffe's Fig. 1 (BN trains
# faster, steadier activations); Santurkar's deep linear network at paper scale (ICS and the landscape,
# standard vs BN) and VGG's noisy-BN arm against BN. The VGG standard net was in it at first; it was
# taken out after the first run (time budget), and at this scale it does not train at all (rule R-S1 in
# docs/claims.md), so its claims are in `bnlab reproduce santurkar`.
HEADLINE: Selection = (("ioffe_mnist", None), ("santurkar_dln", ("standard", "bn")),
                       ("santurkar_vgg", ("bn", "noisy_bn")))
HEADLINE_DESCRIPTION = ("a first look at both papers in about 20 min on 2 cores: Ioffe Fig. 1; Santurkar's "
                        "deep linear network (standard, BN) and VGG noisy BN vs BN")
SELECTIONS: dict[str, tuple[str, Selection]] = {
    "santurkar_noisy": ("Santurkar Figs. 2 and 8: standard, BN, noisy BN, standard + noise (VGG)",
                        (("santurkar_vgg", ("standard", "bn", "noisy_bn", "standard_noise")),)),
    "santurkar_ics": ("Santurkar Fig. 3: gradient-based ICS, VGG (3a) and the deep linear network (3b)",
                      (("santurkar_vgg", ("standard", "bn")),
                       ("santurkar_dln", ("standard", "bn", "standard_lr1e-7", "bn_lr1e-7")))),
    "santurkar_landscape": ("Santurkar Figs. 4, 10, 11: the landscape along the gradient, VGG and the DLN",
                            (("santurkar_vgg", ("standard", "bn")), ("santurkar_dln", ("standard", "bn")))),
    "santurkar_lp": ("Santurkar Figs. 5 and 6: ℓ1, ℓ2, ℓ∞ normalization against BN and standard, VGG and the DLN",
                     (("santurkar_vgg", ("standard", "bn", "l1", "l2", "linf")),
                      ("santurkar_dln", ("standard", "bn", "l1", "l2", "linf")))),
    "headline": (HEADLINE_DESCRIPTION, HEADLINE),
}


def select_targets(targets: Sequence[str]) -> list[tuple[str, tuple[str, ...] | None]]:
    """Group, selection and experiment names -> (experiment, variants or None for all), in order, one
    entry per experiment (the union of the variants asked for)."""
    from bnlab.experiments import experiment_names, get_experiment

    chosen: dict[str, tuple[str, ...] | None] = {}

    def add(name: str, variants: tuple[str, ...] | None) -> None:
        prev = chosen.get(name, ())
        if variants is None or prev is None:  # the whole experiment
            chosen[name] = None
        else:
            chosen[name] = prev + tuple(v for v in variants if v not in prev)

    for t in targets or ["headline"]:
        if t == "all":
            for n in experiment_names():
                add(n, None)
        elif t in GROUPS:
            for n in GROUPS[t]:
                add(n, None)
        elif t in SELECTIONS:
            for n, variants in SELECTIONS[t][1]:
                add(n, variants)
        else:
            try:
                add(get_experiment(t).name, None)
            except BnlabError:
                choices = ["all", *GROUPS, *SELECTIONS, *experiment_names()]
                raise BnlabError(f"unknown experiment or group {t!r}{_did_you_mean(t, choices)}; groups: all, "
                                 f"{', '.join([*GROUPS, *SELECTIONS])}; experiments: "
                                 f"{', '.join(experiment_names())}") from None
    return list(chosen.items())


def expand_targets(targets: Sequence[str]) -> list[str]:
    """Group, selection and experiment names -> experiment names, in order, without repeats."""
    return [n for n, _ in select_targets(targets)]


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bnlab.experiments import get_experiment
    from bnlab.report.build import collect, summary_text, write_report
    from bnlab.train.cost import EXPERIMENT_OVERHEAD_S, REPORT_OVERHEAD_S, format_seconds, wall_seconds
    from bnlab.train.progress import Progress
    from bnlab.train.device import resolve_device
    from bnlab.train.runner import (check_configs, check_data_dir, confirm_copies, fallback_notices, parse_seeds,
                                    plan_runs, run_experiment)

    if args.nproc is not None:
        raise ConfigError("--nproc is for `bnlab run NAME --nproc N` (one experiment, each run over N processes); "
                          "reproduce trains many small runs, which --workers spreads over processes better: run "
                          "`bnlab run NAME --nproc N` for the experiments you want data-parallel, then "
                          "`bnlab reproduce` (it reuses the finished runs)")
    profile = check_profile(args.profile)
    selected = select_targets(args.targets)
    exps = [get_experiment(n) for n, _ in selected]
    variants = dict(selected)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    check_data_dir(args.data_dir)
    root = profile_root(args.out, profile)
    on_gpu = resolve_device(args.device).type != "cpu"
    # The whole plan first: one estimate for everything, and an overall ETA between experiments.
    share_from = sibling_profile_roots(root, args.no_reuse)
    plans = {e.name: plan_runs(e, profile, out=root, seeds=seeds, variants=variants[e.name], share_from=share_from)
             for e in exps}
    tasks = []
    for e in exps:  # every dataset and model of every experiment, before any output
        confirm_copies(plans[e.name], args.data_dir, e.run_cost)
        tasks += check_configs([p for p in plans[e.name] if p.computes], args.data_dir, e.run_cost)
    # Per experiment: its runs on the workers (the busiest worker decides), then its verdict and figures.
    todo = {n: wall_seconds([p.est_seconds for p in ps if p.computes], args.workers)
            + (EXPERIMENT_OVERHEAD_S if any(p.computes for p in ps) else 0.0) for n, ps in plans.items()}
    total_runs = sum(len(ps) for ps in plans.values())
    n_done = sum(p.state == "done" for ps in plans.values() for p in ps)
    n_copy = sum(p.state == "copy" for ps in plans.values() for p in ps)
    total = sum(todo.values()) + REPORT_OVERHEAD_S
    if args.max_minutes is not None and total > args.max_minutes * 60:  # the whole command, before any output
        raise ConfigError(
            f"estimated {format_seconds(total)} for {total_runs - n_done - n_copy} runs to train exceeds "
            f"--max-minutes {args.max_minutes:g}; use a smaller --profile (smoke, quick), fewer --seeds or "
            "experiments, more --workers, or raise --max-minutes"
            + (" (the estimate is calibrated on CPUs, far too high on a GPU: leave --max-minutes out there)"
               if on_gpu else ""))
    shown = [n if variants[n] is None else f"{n} ({', '.join(variants[n])})" for n in plans]
    print(f"reproduce [{profile}]: {', '.join(shown)}: {total_runs} runs, {n_done} already done"
          + (f", {n_copy} to copy from another profile's folder" if n_copy else "")
          + f"; estimated {format_seconds(total)} -> {root}")
    for line in fallback_notices(tasks):  # once for the whole command, not once per experiment
        print(line)
    work = sum(p.est_seconds for ps in plans.values() for p in ps if p.computes)  # CPU seconds, as runs report
    progress = None
    if not args.quiet and work > 0:  # one progress over every run of every experiment, in estimated seconds
        progress = Progress(work, desc="reproduce", unit=None)
    echo = progress.write if progress is not None else print
    try:
        for i, exp in enumerate(exps, 1):
            if progress is not None:  # measured throughput only; "estimating…" until it is measured
                state = f"elapsed {format_seconds(progress.elapsed())}, {progress.left_text() or 'done'}"
            else:
                state = f"estimated {format_seconds(sum(list(todo.values())[i - 1:]))} left"
            echo(f"\n[{i}/{len(exps)}] {exp.name}  ({state})")
            run_experiment(exp, profile, out=root, seeds=seeds, variants=variants[exp.name], workers=args.workers,
                           quiet=args.quiet, data_dir=args.data_dir, device=args.device,
                           echo=echo, progress=progress, announce_data=False, share_from=share_from)
    finally:
        if progress is not None:
            progress.close()
    # The profile folder's report covers every experiment with runs there, whichever command made
    # them (a later `reproduce ioffe` must not drop the Santurkar sections); -o with a list of
    # experiments writes a report of those only.
    named = [e.name for e in exps]
    report = collect(root, named if args.output is not None else None, args.output, profile=profile,
                     doctor=not args.no_doctor)
    path = write_report(report)
    _write_verdicts(root, report.rows)
    shown = [r for r in report.rows if r.get("experiment") in named]
    # a selection runs some arms of an experiment: its other claims need arms it did not train; the
    # report lists them, the terminal only counts them
    outside = [r for r in shown if variants.get(r.get("experiment")) is not None
               and str(r.get("ours", "")).startswith("needs finished runs of")]
    print_verdict([r for r in shown if r not in outside], title=f"verdicts ({profile} profile)")
    if outside:
        print(f"\n{len(outside)} more claim(s) need arms outside this selection (UNDECIDED; listed in the report): "
              + ", ".join(f"{r.get('claim_id')}" for r in outside))
    print()
    print(summary_text(path, report.rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bnlab.report.build import collect, profile_roots, summary_text, write_report

    if args.profile is not None:
        check_profile(args.profile)
    roots = profile_roots(args.dir)
    if not roots:  # DIR holds experiment folders itself (one profile's folder, or an older layout)
        targets = [(Path(args.dir), args.profile)]
    elif args.profile is not None:
        if args.profile not in roots:
            raise DataNotFoundError(f"no runs of the {args.profile} profile under {args.dir} (found: "
                                    f"{', '.join(roots)}); run `bnlab reproduce --profile {args.profile} "
                                    f"--out {args.dir}` first")
        targets = [(roots[args.profile], args.profile)]
    else:
        targets = list((d, p) for p, d in roots.items())
        if args.output is not None and len(targets) > 1:
            raise ConfigError(f"{args.dir} holds runs of several profiles ({', '.join(roots)}): one report "
                              "each; add --profile P to choose the one -o names")
    for root, profile in targets:
        report = collect(root, args.experiments or None, args.output, profile=profile, doctor=not args.no_doctor)
        path = write_report(report)
        _write_verdicts(root, report.rows)  # verdict.json always says what the report says
        if len(targets) > 1:
            print(f"\n[{profile or 'all profiles'}]")
        print(summary_text(path, report.rows))
    return 0


# --- bnlab doctor ----------------------------------------------------------------------------------

def _safe_load(path: str | Path, flag: str, fix: str):
    """``torch.load`` with weights_only=True: a file that would construct or call Python objects on
    load is refused (nothing runs) with one error naming ``flag`` and ``fix``."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{flag} {path}: refused, the file holds Python objects that loading would have to "
                          f"construct or call (nothing was executed); {fix} ({str(err).strip().splitlines()[0]})"
                          ) from None
    except OSError as err:
        raise ConfigError(f"{flag} {path}: {err}") from None


def _is_model_file(spec: str) -> bool:
    """--model names a file (TorchScript or torch.export) rather than module:factory: it exists, or it
    has no ``:`` (a module:factory always has one)."""
    return Path(spec).exists() or ":" not in spec


def _load_user_model(spec: str, weights: str | None):
    """``module:factory`` (imported, called with no argument), then its state_dict from ``weights``
    loaded with weights_only=True (a checkpoint that would run code on load is refused); or a model
    file: TorchScript (torch.jit.save) or a torch.export program (torch.export.save), its kind read
    from the archive (a torch.save pickle is refused before anything is loaded)."""
    import importlib

    import torch

    if _is_model_file(spec):
        from bnlab.doctor import load_model_file

        if weights is not None:
            raise ConfigError(f"--weights goes with --model module:factory; the file {spec} holds its own weights "
                              "(leave out --weights)")
        return load_model_file(spec)
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"--model {spec!r}: give module:factory, e.g. mypkg.models:resnet18 (a function that "
                          "builds the model, importable from here: add its folder to PYTHONPATH), or a "
                          "TorchScript / torch.export file")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--model {spec!r}: {err}; give module:factory importable from here (PYTHONPATH)") from None
    try:
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    except TypeError as err:
        raise ConfigError(f"--model {spec!r}: calling {attr}() failed ({err}); give a factory that takes no "
                          f"argument (e.g. a small function in your module that calls {attr} with your settings)"
                          ) from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = _safe_load(weights, "--weights", "save model.state_dict() with torch.save")
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    return model


def _load_user_data(spec: str, n: int, data_dir: str | None):
    """A dataset name (its first ``n`` training images) or a tensor file: a tensor, or {"x", "y"}, loaded
    with weights_only=True (a file that would run code on load is refused)."""
    import torch

    from bnlab.data import DATASET_NAMES, load_dataset

    if spec in DATASET_NAMES:
        ds = load_dataset(spec, data_dir)
        x, y = ds.x_train[:n], ds.y_train[:n]
        print(f"data: {ds.name} from {ds.source}, the first {len(x)} training examples, shape {tuple(x.shape[1:])}")
        if ds.is_fallback:
            print(f"data: {ds.note}")
        return torch.as_tensor(x).float(), torch.as_tensor(y).long()
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--data {spec!r} is neither a dataset ({', '.join(DATASET_NAMES)}) nor an existing file")
    obj = _safe_load(path, "--data", "save tensors only, e.g. torch.save({'x': x, 'y': y}, path)")
    if isinstance(obj, torch.Tensor):
        return obj[:n], None
    if isinstance(obj, dict) and isinstance(obj.get("x"), torch.Tensor):
        y = obj.get("y")
        return obj["x"][:n], (y[:n] if isinstance(y, torch.Tensor) else None)
    raise ConfigError(f"--data {spec}: expected a tensor or a dict with tensors 'x' (and 'y'), got {type(obj).__name__}")


def cmd_doctor_model(args: argparse.Namespace) -> int:
    from bnlab.doctor import diagnose, format_findings

    if args.data is None:
        raise ConfigError("--model needs --data (a dataset name or a tensor file of inputs)")
    is_file = _is_model_file(args.model)
    if is_file and args.train_mode:
        raise ConfigError("--train-mode applies to --model module:factory; a model file is inspected in the mode "
                          "it was saved in (leave out --train-mode)")
    model = _load_user_model(args.model, args.weights)
    x, y = _load_user_data(args.data, args.batch_size, args.data_dir)
    if not args.train_mode and not is_file:
        model.eval()
    try:
        findings = diagnose(model, x, y, batch_per_process=args.batch_per_process)
    except RuntimeError as err:  # the model cannot run on these inputs (shapes, dtypes)
        msg = next((ln for ln in str(err).strip().splitlines() if ln.strip()), type(err).__name__)
        raise ConfigError(f"the model could not run on --data's inputs of shape {tuple(x.shape)} "
                          f"({msg.strip()}); give data shaped as the model expects") from None
    print(format_findings(findings))
    rc = 1 if any(f.severity == "error" for f in findings) else 0  # a CI gate: errors fail the command
    if args.html is not None:
        import torch

        from bnlab.atomic import atomic_write_bytes
        from bnlab.doctor import CHECKS
        from bnlab.report.html import render_doctor

        data = f"{args.data}, {x.shape[0]} examples" + ("" if y is not None else " (no targets: no train/eval gap)")
        kind = (" (TorchScript)" if isinstance(model, torch.jit.ScriptModule) else " (torch.export program)") \
            if is_file else ""
        page = render_doctor(findings, model=args.model + kind + (f" with {args.weights}" if args.weights else ""),
                             data=data, checks=CHECKS)
        atomic_write_bytes(args.html, page.encode())
        print(f"report: {args.html}")
    return rc


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    if getattr(args, "model", None) is not None:
        return cmd_doctor_model(args)

    import numpy as np
    import torch

    import bnlab
    from bnlab.train.env import git_commit
    from bnlab.train.tensorboard import tensorboard_available

    print(f"bnlab {bnlab.__version__} ({Path(bnlab.__file__).parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
          f"interop threads: {torch.get_num_interop_threads()}")
    git = git_commit()
    print("git: " + (f"{git['commit'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}" if git
                     else "not a git checkout"))
    print(f"tensorboard: {'available' if tensorboard_available() else 'not installed (pip install tensorboard)'}")
    from bnlab.data import DATASET_NAMES, how_to_get, load_dataset, search_paths
    from bnlab.train.runner import check_data_dir

    check_data_dir(args.data_dir)
    print("datasets (search order: --data-dir, $BNLAB_DATA, ~/.cache/bnlab, /usr/share/datasets; "
          "* = folder exists):")
    for name in DATASET_NAMES:
        try:
            ds = load_dataset(name, args.data_dir, fallback=False)
            found = f"found: {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test images in {ds.source}"
        except BnlabError as err:
            # "<Title> not found. Searched, in order:" -> "<Title> is in none of the folders below."
            title = str(err).splitlines()[0].split(" not found", 1)[0].rstrip(":. ")
            found = f"missing: {title} is in none of the folders below."
            if name in ("mnist", "cifar10"):
                found += (" Runs that ask for it use fashion_mnist instead and say so (set data_fallback=false "
                          "to make that an error).")
            found += f" How to get it: {how_to_get(name)}"
        print(f"  {name:<14} {found}")
        if name != "digits":
            for p in search_paths(name, args.data_dir):
                print(f"      {'*' if p.exists() else ' '} {p}")
    return 0


# --- bnlab fold / recalibrate ----------------------------------------------------------------------

def _bn_count(model: Any) -> int:
    from bnlab.norm.deploy import FROZEN
    from bnlab.norm.modules import is_batchnorm

    return sum(1 for m in model.modules() if is_batchnorm(m) or isinstance(m, FROZEN))


def cmd_fold(args: argparse.Namespace) -> int:
    """Fold the BN layers of a trained run's model into their neighbouring Linear/Conv layers and save
    the result as a torch.export program (no Python class needed to load it)."""
    import io

    import torch

    from bnlab.atomic import atomic_write_bytes
    from bnlab.experiments.restore import restore_model, sequential_chain
    from bnlab.norm.deploy import fold

    r = restore_model(args.path, args.data_dir)
    chain = sequential_chain(r.model)
    before = _bn_count(chain)
    folded = fold(chain)
    left = _bn_count(folded)
    x = r.task.x_eval[:256]
    with torch.no_grad():
        diff = float((folded(x) - r.model(x)).abs().max())
    try:
        program = torch.export.export(folded, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as err:  # a model torch.export cannot capture
        raise ConfigError(f"the folded model could not be exported ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0]}); use bnlab.norm.deploy.fold in Python instead") from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"folded {before - left} of {before} BN layers of {r.weights} into their neighbouring Linear/Conv layers"
          + (f" ({left} left: not next to one)" if left else ""))
    print(f"eval outputs on {x.shape[0]} examples of {r.task.name}: folded vs original differ by at most {diff:.2g}")
    print(f"saved to {args.out} (torch.export program: torch.export.load(path).module()(x))")
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    """Recompute a trained run's BN running statistics as the exact population statistics over
    ``--batches`` training batches (precise BN) and save the state_dict."""
    import io

    import torch

    from bnlab.atomic import atomic_write_bytes
    from bnlab.data import Batches
    from bnlab.experiments.restore import restore_model
    from bnlab.norm.deploy import recalibrate
    from bnlab.train.loop import evaluate

    r = restore_model(args.run_dir, args.data_dir)
    if r.weights.parent != r.run_dir or not Path(args.run_dir).is_dir():
        raise ConfigError(f"bnlab recalibrate takes a run directory, got the file {args.run_dir}; pass its folder")
    batch_size = args.batch_size or r.cfg.batch_size
    n_train = int(r.task.x_train.shape[0])
    if batch_size > n_train:
        raise ConfigError(f"--batch-size {batch_size} exceeds the {n_train} training examples of {r.task.name}")
    batches = Batches(r.task.x_train, r.task.y_train, batch_size, int(r.meta.get("seed", 0)))
    out = Path(args.out) if args.out else r.run_dir / "model_recalibrated.pt"
    cls = r.task.is_classification
    before = evaluate(r.model, r.cfg, r.task.x_eval, r.task.y_eval, cls)
    seen = recalibrate(r.model, (batches.batch(i)[0] for i in range(args.batches)), num_batches=args.batches,
                       progress=sys.stderr.isatty() and not args.quiet)
    after = evaluate(r.model, r.cfg, r.task.x_eval, r.task.y_eval, cls)
    buf = io.BytesIO()
    torch.save(r.model.state_dict(), buf)
    atomic_write_bytes(out, buf.getvalue())
    key = "acc" if cls else "loss"
    print(f"recalibrated {len(seen)} BN layers over {args.batches} batches of {batch_size} training examples "
          f"({r.task.name}): population mean and unbiased variance per channel")
    print(f"eval {key} on {before['n']} test examples: {before[key]:.4f} before, {after[key]:.4f} after")
    print(f"saved the state_dict to {out}")
    return 0


# --- the parser ----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with bnlab's one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice" in message:  # e.g. a misspelt command: suggest the closest
            import re

            m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
            if m:
                choices = [c.strip(" '") for c in m.group(2).split(",")]
                message = (f"unknown {'command' if self.prog == 'bnlab' else 'choice'} {m.group(1)!r}"
                           f"{_did_you_mean(m.group(1), choices)}; choose one of: {', '.join(choices)}")
        print(f"bnlab: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    from bnlab import __version__

    parser = _Parser(prog="bnlab", description="Batch normalization laboratory.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    known = ", ".join(profiles())

    p = sub.add_parser("list", help="experiments, their descriptions and estimated costs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run an experiment (skips finished runs, resumes killed ones)")
    p.add_argument("name", help="experiment name (see `bnlab list`)")
    p.add_argument("--profile", default="quick", metavar="PROFILE",
                   help=f"one of {known} (default quick). smoke: seconds, checks the pipeline, decides no "
                        "claim; quick: minutes on 2 cores; paper: the paper's scale")
    p.add_argument("--seeds", help="e.g. 0,1,2 or 0-4 (default: the profile's seeds)")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE",
                   help="override config fields, e.g. --set lr=0.05 steps=2000 (each key once)")
    p.add_argument("--show-config", action="store_true",
                   help="print every config key with its type and value (per variant) and exit")
    p.add_argument("--variants", help="comma-separated subset of the experiment's variants")
    p.add_argument("--setting", action="append", metavar="NAME",
                   help="with --profile robust: run only this robustness setting (repeatable; "
                        "`bnlab run NAME --profile robust --show-config` lists them)")
    p.add_argument("--out", default="runs", help="output root (default: runs/); runs go to OUT/PROFILE/")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel run processes (1 thread each)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads per run (default: 2 for one worker, 1 with several)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="refuse to start if the estimated time exceeds this")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--tensorboard", action="store_true", help="also log to <run>/tb (needs tensorboard)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (default: a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--data-dir", default=None, help="look for datasets here first (must exist)")
    p.add_argument("--wait", action="store_true",
                   help="wait for runs that another process is writing instead of skipping them")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only every N-th run, from the I-th")
    p.add_argument("--no-reuse", action="store_true",
                   help=_NO_REUSE_HELP)
    p.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                   help="train each run data-parallel over N processes (per node) through torchrun, with "
                        "synchronized BN; the global batch stays batch_size (gloo, CPU)")
    p.add_argument("--torchrun-args", default=None, metavar="ARGS",
                   help="torchrun's own options for several nodes, as one string, e.g. "
                        "\"--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint host:29500\"")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("doctor", help="versions, threads, dataset search paths and what was found; with "
                                      "--model: BN problems of your model on your data")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None,
                   help="your model: module:factory that builds it (importable from here), or a model file: "
                        "TorchScript (torch.jit.save of a scripted or traced model) or a torch.export program "
                        "(torch.export.save, .pt2), inspected in the mode it was saved in; the kind is read from "
                        "the file, and a torch.save pickle or state_dict is refused unloaded (use module:factory "
                        "--weights). Trust: a model file carries code that runs when the model runs; a .pt2 member "
                        "that torch.export.load would unpickle is tried weights-only first and the file refused "
                        "if it holds Python objects. Give only files you would run")
    p.add_argument("--weights", default=None,
                   help="with module:factory: its state_dict file (loaded with weights_only=True)")
    p.add_argument("--data", default=None, help="a dataset name, or a tensor file (a tensor or {'x', 'y'})")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="examples to inspect (default 256)")
    p.add_argument("--batch-per-process", type=_positive_int, default=None,
                   help="the batch size each process trains with (default: --batch-size)")
    p.add_argument("--html", type=Path, default=None, help="also write the findings as a self-contained HTML page")
    p.add_argument("--train-mode", action="store_true",
                   help="with module:factory: inspect the model in the mode it was built in (default: eval, as "
                        "for inference)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("fold", help="fold a trained run's BN into its Linear/Conv layers; save a torch.export program")
    p.add_argument("path", help="a run directory (runs/<profile>/<experiment>/<variant>/seed<k>) or its "
                                "model.pt / checkpoint.pt")
    p.add_argument("--out", type=Path, required=True, help="the file to write (e.g. folded.pt2)")
    p.add_argument("--data-dir", default=None, help="look for datasets here first (the check uses the run's data)")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("recalibrate", help="recompute a trained run's BN running statistics over N training "
                                           "batches (exact population statistics)")
    p.add_argument("run_dir", help="a run directory (runs/<profile>/<experiment>/<variant>/seed<k>)")
    p.add_argument("--batches", type=_positive_int, required=True, help="how many training batches to use")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the run's batch_size")
    p.add_argument("--out", type=Path, default=None,
                   help="where to save the state_dict (default: RUN_DIR/model_recalibrated.pt)")
    p.add_argument("--data-dir", default=None, help="look for datasets here first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("reproduce", help="run a paper's experiments (what is missing) and write the HTML report")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help=f"groups ({', '.join(['all', *GROUPS])}), selections ({', '.join(SELECTIONS)}) or "
                        "experiment names (default: headline; `bnlab list` shows what each contains)")
    p.add_argument("--profile", default="quick", metavar="PROFILE", help=f"one of {known} (default quick)")
    p.add_argument("--seeds", help="e.g. 0,1,2 (default: each profile's seeds)")
    p.add_argument("--out", default="runs", help="output root (default: runs/); runs and the report go to OUT/PROFILE/")
    p.add_argument("--workers", type=_positive_int, default=2,
                   help="parallel run processes (default 2, 1 thread each)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="refuse to start if the whole command's estimated time exceeds this")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--data-dir", default=None, help="look for datasets here first (must exist)")
    p.add_argument("-o", "--output", type=Path, default=None, help="report path (default: OUT/PROFILE/report.html)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (default: a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--no-reuse", action="store_true",
                   help=_NO_REUSE_HELP)
    p.add_argument("--nproc", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-doctor", action="store_true", help=_NO_DOCTOR_HELP)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="rebuild the HTML report from stored runs only (never trains)")
    p.add_argument("dir", nargs="?", default="runs",
                   help="the --out root of the runs (default: runs/): one report per profile found in it, "
                        "at DIR/PROFILE/report.html; or one profile's folder")
    p.add_argument("--profile", default=None, metavar="PROFILE", help=f"only this profile ({known})")
    p.add_argument("-o", "--output", type=Path, default=None, help="report path (default: next to the runs)")
    p.add_argument("--experiments", nargs="+", default=None, help="only these experiments")
    p.add_argument("--no-doctor", action="store_true", help=_NO_DOCTOR_HELP)
    p.set_defaults(func=cmd_report)
    from bnlab.bench_kernels import register_cli
    register_cli(sub)  # bnlab bench kernels
    return parser


# bnlab.train.ddp.RANK_PROCESS_ENV, spelled here because importing bnlab.train costs every command,
# even `bnlab --help`, most of a second (tests/test_train_ddp.py checks the two agree)
_RANK_ENV = "BNLAB_DDP_RANK_ARGV"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    rank_argv = os.environ.get(_RANK_ENV)
    if argv is None and rank_argv and not sys.argv[1:]:  # a rank process of `bnlab run --nproc` (bnlab.train.ddp)
        argv = json.loads(rank_argv)
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a --nproc run's ranks run again
    if args.command in ("run", "reproduce"):
        from bnlab.train.memory import apply_policy
        apply_policy()  # reuse freed memory across steps (opt out: BNLAB_MALLOC=default)
        # `kill PID` (SIGTERM) ends the command like Ctrl-C: the worker pool is terminated and the
        # runs keep their last checkpoints (Python's default SIGTERM would leave the workers running,
        # still holding their runs' locks).
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args)
    except BnlabError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if os.environ.get(_RANK_ENV):
            return EXIT_INTERRUPTED  # a rank stopped by torchrun: the launcher says what happened
        print("\nbnlab: interrupted; finished runs and the last checkpoints are kept: run the same "
              "command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
