"""How good is the cost estimate? The estimate printed before a run (bnlab.train.cost) against the
time the finished runs of a runs folder actually took (``seconds_last_attempt`` in each ``done``).

    python bench/cost_model.py runs/quick [runs/robust ...]

Prints, per experiment and variant: runs, measured median seconds per run, the estimate, and the
ratio measured / estimate (1.0 = right; the estimate aims at 0.7-1.4). The last line per folder is
the whole folder's sum of run times against the sum of estimates. Run times exclude what happens
outside a run (worker start-up, verdicts, figures, the report): ``bnlab.train.cost`` adds those
separately (``EXPERIMENT_OVERHEAD_S``, ``WORKER_START_S``).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections import defaultdict
from pathlib import Path

from bnlab.experiments import get_experiment
from bnlab.train.results import load_run


def measure(root: Path) -> list[tuple[str, str, float, float]]:
    """(experiment, variant, measured seconds, estimated seconds) for every finished run under root."""
    out = []
    for seed_dir in sorted(root.glob("*/*/seed*")):
        r = load_run(seed_dir)
        if r is None or r.status == "incomplete" or r.done_info.get("resumed_from") is not None:
            continue  # a resumed run's time covers only its last attempt
        try:
            exp = get_experiment(r.experiment)
        except Exception:
            continue
        used = (r.env.get("dataset") or {}).get("used", r.config.dataset)  # after a fallback
        cfg = dataclasses.replace(r.config, dataset=used)
        out.append((r.experiment, r.variant, float(r.done_info["seconds_last_attempt"]), exp.run_cost(cfg)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", type=Path)
    args = ap.parse_args()
    for root in args.roots:
        rows = measure(root)
        if not rows:
            print(f"{root}: no finished runs")
            continue
        groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for e, v, m, est in rows:
            groups[e, v].append((m, est))
        print(f"{root}")
        print(f"  {'experiment':<16} {'variant':<18} {'runs':>4} {'measured s':>10} {'estimate s':>10} {'ratio':>6}")
        for (e, v), xs in groups.items():
            m = statistics.median(x[0] for x in xs)
            est = statistics.median(x[1] for x in xs)
            print(f"  {e:<16} {v:<18} {len(xs):>4} {m:>10.1f} {est:>10.1f} {m / est:>6.2f}")
        total_m, total_e = sum(r[2] for r in rows), sum(r[3] for r in rows)
        print(f"  all runs: measured {total_m / 60:.1f} min of run time, estimated {total_e / 60:.1f} min, "
              f"ratio {total_m / total_e:.2f}")


if __name__ == "__main__":
    main()
