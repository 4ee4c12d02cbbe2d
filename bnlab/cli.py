"""The ``bnlab`` command: list | run | reproduce | report | doctor.

    bnlab list
    bnlab run ioffe_mnist --profile quick --seeds 0,1,2 --set lr=0.1 steps=2000 --workers 2
    bnlab reproduce ioffe --profile quick          # run what is missing, then write runs/report.html
    bnlab report runs -o report.html               # rebuild the report from stored runs only
    bnlab doctor

Every bnlab error (bad key, unknown experiment, missing data, locked run, ...) is printed as one
message naming the problem and the fix, with exit code 2 and no traceback. Divergence is a result,
not an error: the run is recorded as diverged and the exit code stays 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from bnlab.errors import BnlabError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --- bnlab list ------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    from bnlab.experiments import PROFILES, all_experiments
    from bnlab.train.cost import format_seconds

    exps = all_experiments()
    width = max([len(e.name) for e in exps] + [10])
    print(f"{'experiment':<{width}}  {'smoke':>6} {'quick':>6} {'paper':>6}  description")
    for e in exps:
        costs = " ".join(f"{format_seconds(e.estimate_cost(p)):>6}" for p in PROFILES)
        print(f"{e.name:<{width}}  {costs}  {e.description}")
    print("\ncosts: estimated serial CPU time per profile (all variants x default seeds); "
          "`bnlab run NAME --profile P` runs one")
    return 0


# --- bnlab run -------------------------------------------------------------------------------------

def _flatten(items: list[list[str]] | None) -> list[str]:
    return [x for group in (items or []) for x in group]


def cmd_run(args: argparse.Namespace) -> int:
    from bnlab.experiments import get_experiment
    from bnlab.train.config import parse_set_args
    from bnlab.train.runner import parse_seeds, parse_shard, run_experiment

    exp = get_experiment(args.name)
    overrides = parse_set_args(_flatten(args.set))
    exp.configs(args.profile, overrides)  # unknown keys / wrong types fail here, before any output
    seeds = parse_seeds(args.seeds) if args.seeds else None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    shard = parse_shard(args.shard) if args.shard else None
    run = run_experiment(
        exp, args.profile, out=args.out, seeds=seeds, overrides=overrides, variants=variants,
        workers=args.workers, threads=args.threads, max_minutes=args.max_minutes, quiet=args.quiet,
        tensorboard=args.tensorboard, data_dir=args.data_dir, wait=args.wait, shard=shard,
    )
    if shard is not None or variants:
        print("verdict: skipped for a partial run (--shard/--variants); run without them once every "
              "part is done to get it")
        return 0
    write_verdict_and_plots(exp, run.run_dirs, Path(args.out), args.profile, overrides)
    return 0


def write_verdict_and_plots(exp: Any, run_dirs: Sequence[Path], out: Path, profile: str,
                            overrides: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Compute the experiment's verdict and plots from the stored runs of this invocation; write
    ``<out>/<exp>/verdict.json`` and ``<out>/<exp>/figures/`` (where the report puts them too);
    print the verdict table."""
    from bnlab.train.results import ExperimentResults

    if exp.verdict is None and exp.plots is None:
        return None
    results = ExperimentResults.from_run_dirs(run_dirs, exp.name)
    unfinished = [r for r in results.runs if r.status == "incomplete"]
    if unfinished or len(results.runs) < len(run_dirs):
        print(f"verdict: pending, {len(run_dirs) - len(results.finished().runs)} run(s) unfinished")
        return None
    results = results.finished()
    rows = None
    if exp.verdict is not None:
        rows = [dict(r) for r in exp.verdict(results)]
        for r in rows:
            r.setdefault("profile", profile)
            if overrides:
                r.setdefault("overrides", dict(overrides))
        path = write_verdict_json(out, exp.name, rows)
        print_verdict(rows)
        print(f"verdict written to {path}")
    if getattr(exp, "tables", None) is not None:
        for title, table_rows in exp.tables(results).items():
            print_table(title, table_rows)
    if exp.plots is not None:
        for p in exp.plots(results, out / exp.name / "figures"):
            print(f"plot: {p}")
    return rows


def write_verdict_json(out: Path, experiment: str, rows: list[dict[str, Any]]) -> Path:
    """``<out>/<experiment>/verdict.json``: the verdict rows (claim, paper, ours, seeds, passed, why)."""
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


def print_verdict(rows: list[dict[str, Any]]) -> None:
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    print("\nverdict")
    for r in rows:
        print(f"  [{mark.get(r.get('passed'), '?'):>4}] {r.get('claim', '')}")
        print(f"         paper: {r.get('paper', '')}")
        print(f"         ours:  {r.get('ours', '')}  (seeds: {r.get('seeds', '?')})")
        if r.get("why"):
            print(f"         why:   {r['why']}")


# --- bnlab reproduce / report -------------------------------------------------------------------------

# Named groups of experiments; "all" is every registered experiment.
GROUPS: dict[str, tuple[str, ...]] = {"ioffe": ("ioffe_mnist", "ioffe_lr_study")}


def expand_targets(targets: Sequence[str]) -> list[str]:
    """Group names and experiment names -> experiment names, in order, without repeats."""
    from bnlab.experiments import experiment_names, get_experiment

    names: list[str] = []
    for t in targets or ["ioffe"]:
        if t == "all":
            found = experiment_names()
        elif t in GROUPS:
            found = list(GROUPS[t])
        else:
            try:
                found = [get_experiment(t).name]
            except BnlabError:
                raise BnlabError(f"unknown experiment or group {t!r}; groups: all, {', '.join(GROUPS)}; "
                                 f"experiments: {', '.join(experiment_names())}") from None
        names += [n for n in found if n not in names]
    return names


def cmd_reproduce(args: argparse.Namespace) -> int:
    import time

    from bnlab.experiments import get_experiment
    from bnlab.report.build import collect, summary_text, write_report
    from bnlab.train.cost import format_seconds
    from bnlab.train.runner import parse_seeds, plan_runs, run_experiment

    exps = [get_experiment(n) for n in expand_targets(args.targets)]
    seeds = parse_seeds(args.seeds) if args.seeds else None
    # The whole plan first: one estimate for everything, and an overall ETA between experiments.
    plans = {e.name: plan_runs(e, args.profile, out=args.out, seeds=seeds) for e in exps}
    todo = {n: sum(p.est_seconds for p in ps if p.state != "done") / max(1, args.workers) for n, ps in plans.items()}
    total_runs = sum(len(ps) for ps in plans.values())
    print(f"reproduce [{args.profile}]: {', '.join(plans)}: {total_runs} runs, "
          f"{sum(p.state == 'done' for ps in plans.values() for p in ps)} already done; "
          f"estimated {format_seconds(sum(todo.values()))}")
    start = time.monotonic()
    bar = None
    if not args.quiet:  # one bar over every run of every experiment, in estimated seconds of work
        from tqdm import tqdm

        bar = tqdm(total=sum(p.est_seconds for ps in plans.values() for p in ps if p.state != "done"),
                   desc="reproduce", dynamic_ncols=True, file=sys.stderr,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
    echo = bar.write if bar is not None else print
    try:
        for i, exp in enumerate(exps, 1):
            left = sum(list(todo.values())[i - 1:])
            echo(f"\n[{i}/{len(exps)}] {exp.name}  (elapsed {format_seconds(time.monotonic() - start)}, "
                 f"about {format_seconds(left)} left)")
            run_experiment(exp, args.profile, out=args.out, seeds=seeds, workers=args.workers,
                           max_minutes=args.max_minutes, quiet=args.quiet, data_dir=args.data_dir,
                           echo=echo, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    report = collect(args.out, [e.name for e in exps], args.output)
    path = write_report(report)
    for exp in exps:  # the same rows the report shows, one file per experiment
        rows = [r for r in report.rows if r.get("experiment") == exp.name and r.get("profile") == args.profile]
        if rows:
            write_verdict_json(Path(args.out), exp.name, rows)
    print()
    print(summary_text(path, report.rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bnlab.report.build import collect, summary_text, write_report

    report = collect(args.dir, args.experiments or None, args.output)
    path = write_report(report)
    print(summary_text(path, report.rows))
    return 0


# --- bnlab doctor ----------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

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
    try:
        import numba

        print(f"numba: {numba.__version__}")
    except ImportError:
        print("numba: not installed (fused BN kernels fall back to torch)")
    from bnlab.data import DATASET_NAMES, load_dataset, search_paths

    print("datasets (search order: --data-dir, $BNLAB_DATA, ~/.cache/bnlab, /usr/share/datasets):")
    for name in DATASET_NAMES:
        try:
            ds = load_dataset(name, args.data_dir, fallback=False)
            found = f"found: {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test in {ds.source}"
        except BnlabError as err:
            found = "MISSING: " + str(err).splitlines()[0]
            if name in ("mnist", "cifar10"):
                found += " (runs fall back to fashion_mnist unless data_fallback=false)"
        print(f"  {name:<14} {found}")
        if name != "digits":
            for p in search_paths(name, args.data_dir):
                print(f"      {'*' if p.exists() else ' '} {p}")
    return 0


# --- the parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch normalization laboratory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="experiments, their descriptions and estimated costs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run an experiment (skips finished runs, resumes killed ones)")
    p.add_argument("name", help="experiment name (see `bnlab list`)")
    p.add_argument("--profile", default="quick", choices=("smoke", "quick", "paper"),
                   help="smoke: seconds; quick: minutes on 2 cores (default); paper: the paper's scale")
    p.add_argument("--seeds", help="e.g. 0,1,2 or 0-4 (default: the profile's seeds)")
    p.add_argument("--set", nargs="+", action="append", metavar="KEY=VALUE",
                   help="override config fields, e.g. --set lr=0.05 steps=2000")
    p.add_argument("--variants", help="comma-separated subset of the experiment's variants")
    p.add_argument("--out", default="runs", help="output directory (default: runs/)")
    p.add_argument("--workers", type=int, default=1, help="parallel run processes (1 thread each)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: 2 for one worker, 1 with several)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="refuse to start if the estimated time exceeds this")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true", help="also log to <run>/tb (needs tensorboard)")
    p.add_argument("--data-dir", default=None, help="look for datasets here first")
    p.add_argument("--wait", action="store_true",
                   help="wait for runs that another process is writing instead of skipping them")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only every N-th run, from the I-th")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("doctor", help="versions, threads, dataset search paths and what was found")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("reproduce", help="run a paper's experiments (what is missing) and write the HTML report")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help=f"groups ({', '.join(['all', *GROUPS])}) or experiment names (default: ioffe)")
    p.add_argument("--profile", default="quick", choices=("smoke", "quick", "paper"))
    p.add_argument("--seeds", help="e.g. 0,1,2 (default: each profile's seeds)")
    p.add_argument("--out", default="runs", help="output directory (default: runs/)")
    p.add_argument("--workers", type=int, default=2, help="parallel run processes (default 2, 1 thread each)")
    p.add_argument("--max-minutes", type=float, default=None, help="refuse an experiment estimated longer")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--data-dir", default=None, help="look for datasets here first")
    p.add_argument("-o", "--output", type=Path, default=None, help="report path (default: OUT/report.html)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="rebuild the HTML report from stored runs only (never trains)")
    p.add_argument("dir", nargs="?", default="runs", help="the --out directory of the runs (default: runs/)")
    p.add_argument("-o", "--output", type=Path, default=None, help="report path (default: DIR/report.html)")
    p.add_argument("--experiments", nargs="+", default=None, help="only these experiments")
    p.set_defaults(func=cmd_report)
    from bnlab.bench_kernels import register_cli
    register_cli(sub)  # bnlab bench kernels
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "reproduce"):
        from bnlab.train.memory import apply_policy
        apply_policy()  # reuse freed memory across steps (opt out: BNLAB_MALLOC=default)
    try:
        return args.func(args)
    except BnlabError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nbnlab: interrupted; finished runs and the last checkpoints are kept: run the same "
              "command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
