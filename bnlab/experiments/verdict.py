"""Verdicts: from per-seed numbers to "the paper claims X; on these runs X holds / fails / cannot be told".

One mechanism for every experiment. An experiment declares each claim (``Claim``: its id, the
statement, the paper's number, the statistic and the decision rule with its threshold) before any
run exists, extracts per-seed numbers from its stored runs, and calls one of the deciders here:

* ``paired_difference``: per seed, the difference ``a - b`` of two arms trained with the same seed
  (same data order, same init draw). Estimate = mean difference; 95 % CI = Student t interval on the
  n paired differences (``scipy.stats.t``, df = n - 1, standard error = sd(ddof=1)/sqrt(n)).
  PASS if the whole CI lies beyond the threshold in the claimed direction, FAIL if it lies wholly on
  the other side, TIE if it straddles the threshold (not decided either way). UNDECIDED with fewer
  than 2 seeds, with zero spread (the interval [m, m] measures nothing), or when a declared seed has
  no value in an arm (never run, unfinished, or diverged/collapsed without a ``Claim.diverged_value``).
* ``seed_count``: per seed, a yes/no outcome (e.g. "this run failed to train"). Estimate = fraction
  of seeds with "yes"; CI = Clopper-Pearson exact 95 % interval of that fraction
  (``scipy.stats.binomtest``). PASS if at least ``fraction`` of the seeds say yes, FAIL if at least
  ``fraction`` say no, TIE in between. Fewer than ``Claim.min_seeds`` (5) declared seeds: UNDECIDED
  (with 3, 2/3 can never TIE). Seeds that give no answer (declared but missing, unfinished) are
  counted in n_seeds and make the row UNDECIDED if they could change the outcome. The interval is
  descriptive; the decision is the count.
* ``decided``: a rule that is not a statistic over seeds (e.g. a comparison of learning-rate limits
  over a grid); the experiment computes the outcome and states why there is no CI.

Every row lists every DECLARED seed (``with_declared``: the experiment's seeds for the runs' profile
and setting, ``RunResult.profile``) with its value(s) and its run status ("missing" when it has no
finished run); diverged and collapsed runs are counted (``n_diverged``/``n_collapsed``), never dropped. "±" in a row's text is one sample standard
deviation over seeds (ddof = 1). ``robust_headline`` merges one row per robustness setting into the
headline row over every DECLARED setting (one not run counts as UNDECIDED "not run"): PASS only if
the claim passes in every setting, FAIL only if it fails in every one, otherwise UNDECIDED
("fragile: k/n"). Rules revised after review on 2026-11-29: see docs/claims.md.

Pure numbers in, JSON-ready dicts out (the row schema shared with the report and the CLI); nothing
here reads files or trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bnlab.numfmt import fmt_pm

OUTCOMES = ("PASS", "FAIL", "TIE", "UNDECIDED")
STATUSES = ("done", "diverged", "collapsed", "incomplete")
CI_LEVEL = 0.95
T_METHOD = "Student t interval on the paired per-seed differences (scipy.stats.t, df = n-1, sd with ddof=1)"
CP_METHOD = "Clopper-Pearson exact interval of the fraction of seeds (scipy.stats.binomtest)"
PM_MEANING = "± is one sample standard deviation over seeds (ddof = 1)"
MIN_COUNT_SEEDS = 5  # seed_count claims need at least 5 declared seeds (revised after review, 2026-11-29)
MISSING = "missing"  # status of a declared seed that has no finished run


@dataclass(frozen=True)
class Claim:
    """A paper claim and the rule that decides it, fixed before any run is looked at.

    id: stable id (docs/claims.md has an anchor for it), e.g. "D.8a".
    claim: the statement in one line; paper: the paper's number and figure.
    statistic: what is computed per seed (units); threshold/direction: for ``paired_difference``,
    PASS needs the CI above (direction=+1) or below (direction=-1) ``threshold``.
    fraction: for ``seed_count``, the share of seeds that must say yes (PASS) or no (FAIL).
    rule: optional text; by default written from the kind, threshold and direction.
    """

    id: str
    claim: str
    paper: str
    statistic: str
    kind: str = "paired_difference"  # paired_difference | seed_count | decided
    threshold: float = 0.0
    direction: int = 1
    fraction: float = 2 / 3
    ci_level: float = CI_LEVEL
    rule: str = ""
    # paired_difference: the value a diverged/collapsed run stands for (e.g. chance accuracy); None =
    # such a run has no value and makes the row UNDECIDED (revised after review on 2026-11-29).
    diverged_value: float | None = None
    # seed_count: fewest declared seeds that can decide a per-seed-outcome claim (2/3 of 3 cannot TIE).
    min_seeds: int = MIN_COUNT_SEEDS

    def __post_init__(self) -> None:
        if self.kind not in ("paired_difference", "seed_count", "decided"):
            raise ValueError(f"claim {self.id}: kind must be paired_difference, seed_count or decided, "
                             f"got {self.kind!r}")
        if self.direction not in (1, -1):
            raise ValueError(f"claim {self.id}: direction must be +1 or -1, got {self.direction!r}")
        if not 0.5 < self.fraction <= 1.0:
            raise ValueError(f"claim {self.id}: fraction must be in (0.5, 1], got {self.fraction!r}")
        if not 0.0 < self.ci_level < 1.0:
            raise ValueError(f"claim {self.id}: ci_level must be in (0, 1), got {self.ci_level!r}")

    @property
    def rule_text(self) -> str:
        if self.rule:
            return self.rule
        lvl = f"{self.ci_level:.0%}"
        if self.kind == "paired_difference":
            side, other = ("above", "below") if self.direction > 0 else ("below", "above")
            thr = _num(self.threshold)
            dv = ("a declared seed without a value (missing, unfinished, diverged, collapsed)" if
                  self.diverged_value is None else
                  f"a declared seed not run or unfinished (a diverged/collapsed run counts as {self.diverged_value:g})")
            return (f"PASS if the {lvl} CI of the paired difference lies {side} {thr}; FAIL if it lies "
                    f"{other} {thr}; TIE if the CI straddles {thr} (not decided either way); UNDECIDED with "
                    f"fewer than 2 seeds, zero spread (degenerate interval) or {dv}")
        if self.kind == "seed_count":
            return (f"PASS if at least {_frac(self.fraction)} of the declared seeds say yes; FAIL if at least "
                    f"{_frac(self.fraction)} say no; TIE otherwise (neither side has {_frac(self.fraction)}: not "
                    f"decided either way); UNDECIDED with fewer than {self.min_seeds} declared seeds or when "
                    "missing/unfinished seeds could change the outcome. The Clopper-Pearson interval is "
                    "descriptive only; it does not enter the decision")
        return "decided by the rule stated with the claim"


@dataclass
class Seed:
    """One seed's numbers for a claim: ``values`` per arm (None = no value), ``status`` per arm."""

    seed: int
    values: Mapping[str, float | None] = field(default_factory=dict)
    status: Mapping[str, str] = field(default_factory=dict)
    outcome: bool | None = None  # seed_count: the per-seed yes/no (None = no answer)
    note: str = ""


def with_declared(seeds: Sequence[Seed], declared: Sequence[int] | None, arms: Sequence[str]) -> list[Seed]:
    """``seeds`` plus one ``Seed`` per declared seed that has none (values None, status "missing").

    A declared seed that was never run or did not finish must stay visible: it is what makes a row
    UNDECIDED when it could change the outcome. Sorted by seed. ``declared`` None: ``seeds`` as given.
    """
    have = {sd.seed for sd in seeds}
    out = list(seeds) + [Seed(int(s), {a: None for a in arms}, {a: MISSING for a in arms},
                              note="declared, no finished run")
                         for s in (declared or ()) if int(s) not in have]
    return sorted(out, key=lambda sd: sd.seed)


# --- formatting ------------------------------------------------------------------------------------

def _num(x: float) -> str:
    return f"{x:+.3g}" if x != 0 else "0"


def _frac(f: float) -> str:
    return "2/3" if abs(f - 2 / 3) < 1e-9 else f"{f:.0%}"


def decimals_for(spread: float | None, value: float | None = None) -> int:
    """Decimal places so that the spread (sd or CI half-width) shows 2 significant digits.

    One rule for every number in a verdict: the precision a value deserves is set by its
    uncertainty. Without a usable spread, 3 significant digits of the value itself.
    """
    if value is not None and spread is not None and abs(spread) <= 1e-9 * abs(value):
        spread = None  # rounding noise (e.g. 1.7e-17 around 0.1), not a spread
    if spread is not None and math.isfinite(spread) and spread > 0:
        return max(0, 1 - int(math.floor(math.log10(spread))))
    if value is not None and math.isfinite(value) and value != 0:
        return max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return 3


def fmt(value: float | None, spread: float | None = None, *, decimals: int | None = None,
        signed: bool = False) -> str:
    """``value`` rounded by ``decimals_for(spread)``; None/NaN as "n/a"."""
    if value is None or not math.isfinite(value):
        return "n/a"
    d = decimals_for(spread, value) if decimals is None else decimals
    return f"{value:+.{d}f}" if signed else f"{value:.{d}f}"


def fmt_mean_sd(values: Iterable[float | None]) -> str:
    """"mean ± sd (n=k)" over the finite values, sd with ddof=1; one value: the value alone."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{fmt(float(v[0]))} (1 seed)"
    sd = float(v.std(ddof=1))
    if sd <= 1e-9 * abs(float(v.mean())):  # identical seeds (e.g. all at chance): not "0.100 ± 0.000"
        return fmt_pm(float(v.mean()), 0.0)
    d = decimals_for(sd, float(v.mean()))
    return f"{v.mean():.{d}f} ± {sd:.{d}f}"


def fmt_ci(estimate: float | None, ci: Sequence[float] | None, *, signed: bool = True) -> str:
    if estimate is None or not math.isfinite(estimate):
        return "n/a"
    if ci is None:
        return fmt(estimate, signed=signed)
    half = (ci[1] - ci[0]) / 2
    d = decimals_for(half if half > 0 else None, estimate)
    f = (lambda x: f"{x:+.{d}f}") if signed else (lambda x: f"{x:.{d}f}")
    return f"{f(estimate)} [{f(ci[0])}, {f(ci[1])}]"


# --- intervals -------------------------------------------------------------------------------------

def t_interval(diffs: Sequence[float], level: float = CI_LEVEL) -> tuple[float, tuple[float, float] | None]:
    """(mean, (lo, hi)) of the Student t interval of the mean of ``diffs``; CI None for n < 2.

    A zero spread gives the degenerate interval (mean, mean).
    """
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(d.mean())
    if n < 2:
        return mean, None
    sem = float(d.std(ddof=1)) / math.sqrt(n)
    if sem <= 1e-12 * max(1.0, abs(mean)):  # zero up to float rounding (0.872 - 0.852 per seed)
        return mean, (mean, mean)
    lo, hi = stats.t.interval(level, df=n - 1, loc=mean, scale=sem)
    return mean, (float(lo), float(hi))


def proportion_interval(k: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Clopper-Pearson exact interval of k successes out of n (n >= 1)."""
    from scipy import stats

    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


# --- rows ------------------------------------------------------------------------------------------

def _counts(seeds: Sequence[Seed]) -> tuple[int, int]:
    div = sum(any(s == "diverged" for s in sd.status.values()) for sd in seeds)
    col = sum(any(s == "collapsed" for s in sd.status.values()) for sd in seeds)
    return div, col


def _per_seed(seeds: Sequence[Seed], diff: Mapping[int, float] | None = None) -> list[dict[str, Any]]:
    out = []
    for sd in seeds:
        row: dict[str, Any] = {"seed": int(sd.seed),
                               "values": {k: _clean(v) for k, v in sd.values.items()},
                               "status": dict(sd.status)}
        if diff is not None:
            row["diff"] = _clean(diff.get(sd.seed))
        if sd.outcome is not None or diff is None:
            row["outcome"] = sd.outcome
        if sd.note:
            row["note"] = sd.note
        out.append(row)
    return out


def _clean(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (bool, int, str)):
        return v
    f = float(v)
    return f if math.isfinite(f) else None


def row(claim: Claim, *, ours: str, dataset: str, outcome: str, statistic: str | None = None,
        estimate: float | None = None, ci: Sequence[float] | None = None, ci_method: str | None = None,
        no_ci_reason: str | None = None, seeds: Sequence[Seed] = (), diffs: Mapping[int, float] | None = None,
        extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One verdict row in the shared schema (see docs/claims.md for the meaning of each key)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    if ci is None and not no_ci_reason:
        raise ValueError(f"claim {claim.id}: a row without a CI must say why (no_ci_reason)")
    n_div, n_col = _counts(seeds)
    out: dict[str, Any] = {
        "claim_id": claim.id,
        "claim": claim.claim,
        "paper": claim.paper,
        "ours": ours,
        "dataset": dataset,
        "outcome": outcome,
        "rule": claim.rule_text,
        "statistic": statistic or claim.statistic,
        "estimate": _clean(estimate),
        "ci": None if ci is None else [float(ci[0]), float(ci[1])],
        "ci_level": claim.ci_level,
        "ci_method": ci_method if ci is not None else None,
        "no_ci_reason": None if ci is not None else no_ci_reason,
        "per_seed": _per_seed(seeds, diffs),
        "n_seeds": len(seeds),
        "n_diverged": n_div,
        "n_collapsed": n_col,
        "robustness": None,
        "kind": claim.kind,  # paired_difference | seed_count | decided: how per_seed reads
        "passed": {"PASS": True, "FAIL": False}.get(outcome),
        # kept for readers of the earlier row format
        "seeds": len(seeds),
        "why": claim.rule_text,
    }
    if extra:
        out.update(extra)
    return out


def decide_interval(ci: Sequence[float], threshold: float, direction: int) -> str:
    lo, hi = ci
    if direction < 0:
        lo, hi, threshold = -hi, -lo, -threshold
    if lo > threshold:
        return "PASS"
    if hi < threshold:
        return "FAIL"
    return "TIE"


def paired_difference(claim: Claim, seeds: Sequence[Seed], a: str, b: str, *, dataset: str,
                      describe: str = "", digits_from_ci: bool = True,
                      extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Decide ``claim`` on the per-seed differences ``values[a] - values[b]``.

    A seed with no value in either arm (a diverged run whose statistic does not exist) has no
    difference: it stays in ``per_seed`` and the counts, the interval uses the others, and the
    row says how many seeds it rests on. ``describe`` prefixes the one-line summary.
    """
    if claim.kind != "paired_difference":
        raise ValueError(f"claim {claim.id} is a {claim.kind} claim, not paired_difference")
    diffs: dict[int, float] = {}
    lacking: list[str] = []  # "seed 3 (BN-x5: diverged)" for every declared seed without a value
    for sd in seeds:
        vals = {}
        for arm in (a, b):
            v = sd.values.get(arm)
            st = sd.status.get(arm, "")
            if (v is None or not math.isfinite(v)) and st in ("diverged", "collapsed") \
                    and claim.diverged_value is not None:
                v = claim.diverged_value  # the claim declares what such a run stands for
            vals[arm] = v
        if all(v is not None and math.isfinite(v) for v in vals.values()):
            diffs[sd.seed] = float(vals[a]) - float(vals[b])
        else:
            why = ", ".join(f"{arm}: {sd.status.get(arm) or 'no value'}" for arm in (a, b)
                            if vals[arm] is None or not math.isfinite(vals[arm]))
            lacking.append(f"seed {sd.seed} ({why})")
    n = len(diffs)
    means = {arm: [sd.values.get(arm) for sd in seeds] for arm in (a, b)}
    arms_text = f"{a} {fmt_mean_sd(means[a])} vs {b} {fmt_mean_sd(means[b])}"
    lack = f"; without a value: {', '.join(lacking)}" if lacking else ""
    prefix = f"{describe}: " if describe else ""
    if n == 0:
        return row(claim, ours=f"{prefix}no seed has both values{lack}", dataset=dataset,
                   outcome="UNDECIDED", no_ci_reason="no seed has a value in both arms", seeds=seeds,
                   diffs=diffs, extra=extra)
    est, ci = t_interval(list(diffs.values()), claim.ci_level)
    if lacking:
        # A seed that dropped out (never run, unfinished, diverged without a declared value) is not a
        # random omission: deciding on the others would bias the verdict. Report, do not decide.
        reason = (f"{len(lacking)} declared seed(s) without a value ({', '.join(lacking)}); the claim declares "
                  "no value for them")
        return row(claim, ours=f"{prefix}{fmt(est, signed=True)} from {n} of {len(seeds)} seeds ({arms_text})"
                   f"{lack}", dataset=dataset, outcome="UNDECIDED", estimate=est, no_ci_reason=reason,
                   seeds=seeds, diffs=diffs, extra=extra)
    if ci is None:
        return row(claim, ours=f"{prefix}{fmt(est, signed=True)} from 1 seed ({arms_text}){lack}",
                   dataset=dataset, outcome="UNDECIDED", estimate=est,
                   no_ci_reason="1 seed: no interval can be formed (needs >= 2)", seeds=seeds,
                   diffs=diffs, extra=extra)
    if ci[0] == ci[1]:
        # sd = 0: the t interval is the point [m, m], which would PASS on any nonzero mean. Zero spread
        # over seeds means the seeds are not independent draws (or the statistic is saturated).
        return row(claim, ours=f"{prefix}{fmt(est, signed=True)} with zero spread over {n} seeds ({arms_text})",
                   dataset=dataset, outcome="UNDECIDED", estimate=est,
                   no_ci_reason=f"the {n} paired differences are identical (sd = 0): the interval is "
                                "degenerate and measures no uncertainty", seeds=seeds, diffs=diffs, extra=extra)
    outcome = decide_interval(ci, claim.threshold, claim.direction)
    ours = f"{prefix}{fmt_ci(est, ci)} ({arms_text}; n={n}){lack}"
    return row(claim, ours=ours, dataset=dataset, outcome=outcome, estimate=est, ci=ci,
               ci_method=T_METHOD, seeds=seeds, diffs=diffs, extra=extra)


def seed_count(claim: Claim, seeds: Sequence[Seed], *, dataset: str, describe: str = "",
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Decide ``claim`` on the per-seed yes/no ``Seed.outcome`` (see module docstring)."""
    if claim.kind != "seed_count":
        raise ValueError(f"claim {claim.id} is a {claim.kind} claim, not seed_count")
    n = len(seeds)
    yes = sum(sd.outcome is True for sd in seeds)
    no = sum(sd.outcome is False for sd in seeds)
    unknown = n - yes - no
    need = math.ceil(claim.fraction * n - 1e-9) if n else 0
    prefix = f"{describe}: " if describe else ""
    ours = f"{prefix}{yes}/{n} seeds yes" + (f", {unknown} without an answer" if unknown else "")
    if n < max(2, claim.min_seeds):
        answered = yes + no
        ci = proportion_interval(yes, answered, claim.ci_level) if answered else None
        return row(claim, ours=ours + f"; needs ≥ {claim.min_seeds} seeds (declared {n})", dataset=dataset,
                   outcome="UNDECIDED", estimate=yes / answered if answered else None, ci=ci,
                   ci_method=CP_METHOD if ci else None,
                   no_ci_reason=f"{n} declared seed(s): needs ≥ {claim.min_seeds}", seeds=seeds, extra=extra)
    if yes >= need:
        outcome = "PASS"
    elif no >= need:
        outcome = "FAIL"
    elif yes + unknown >= need or no + unknown >= need:
        outcome = "UNDECIDED"  # the unfinished seeds could still decide it
    else:
        outcome = "TIE"
    answered = yes + no
    est = yes / answered if answered else None
    if answered == 0:
        return row(claim, ours=ours, dataset=dataset, outcome="UNDECIDED",
                   no_ci_reason="no seed has an answer", seeds=seeds, extra=extra)
    ci = proportion_interval(yes, answered, claim.ci_level)
    ours += f" (fraction {est:.2f}, {claim.ci_level:.0%} CI [{ci[0]:.2f}, {ci[1]:.2f}])"
    return row(claim, ours=ours, dataset=dataset, outcome=outcome, estimate=est, ci=ci,
               ci_method=CP_METHOD, seeds=seeds, extra=extra)


def undecided(claim: Claim, reason: str, *, dataset: str = "", seeds: Sequence[Seed] = ()) -> dict[str, Any]:
    """A row for a claim that cannot be decided from the runs at hand (missing runs, ...)."""
    return row(claim, ours=reason, dataset=dataset, outcome="UNDECIDED", no_ci_reason=reason, seeds=seeds)


# --- robustness -------------------------------------------------------------------------------------

def robust_label(outcomes: Sequence[str]) -> str:
    n = len(outcomes)
    holds = sum(o == "PASS" for o in outcomes)
    fails = sum(o == "FAIL" for o in outcomes)
    if holds == n:
        return f"holds in {holds}/{n}"
    if fails == n:
        return f"fails in {fails}/{n}"
    if holds == 0:
        return f"holds in 0/{n}"
    return f"fragile: {holds}/{n}"


def robust_outcome(outcomes: Sequence[str]) -> str:
    """PASS only if every setting passes, FAIL only if every setting fails, else UNDECIDED."""
    if outcomes and all(o == "PASS" for o in outcomes):
        return "PASS"
    if outcomes and all(o == "FAIL" for o in outcomes):
        return "FAIL"
    return "UNDECIDED"


def robust_headline(by_setting: Mapping[str, dict[str, Any]], primary: str,
                    declared: Sequence[str] | None = None) -> dict[str, Any]:
    """Merge one row per robustness setting (same claim) into the headline row.

    The headline keeps the primary setting's numbers, per-seed values and CI, replaces ``outcome``
    by the robust outcome and fills ``robustness``. ``declared``: every setting the profile declares;
    one without a row counts as UNDECIDED ("not run"), so "holds in k/k" is never over a subset.
    With only the primary setting declared (or present, when ``declared`` is None) the row is
    returned unchanged (``robustness`` None).
    """
    if primary not in by_setting:
        raise ValueError(f"primary setting {primary!r} is not among {list(by_setting)}")
    head = dict(by_setting[primary])
    names = list(declared) if declared else list(by_setting)
    names += [s for s in by_setting if s not in names]
    if len(names) == 1:
        return head
    not_run = {"outcome": "UNDECIDED", "estimate": None, "ci": None, "n_seeds": 0, "ours": "not run",
               "n_diverged": 0, "n_collapsed": 0}
    settings = []
    for name in names:
        r = by_setting.get(name, not_run)
        settings.append({"setting": name, "outcome": r["outcome"], "estimate": r.get("estimate"),
                         "ci": r.get("ci"), "n_seeds": r.get("n_seeds"), "ours": r.get("ours"),
                         "n_diverged": r.get("n_diverged", 0), "n_collapsed": r.get("n_collapsed", 0)})
    outcomes = [s["outcome"] for s in settings]
    label = robust_label(outcomes)
    outcome = robust_outcome(outcomes)
    head["robustness"] = {"settings": settings, "holds": sum(o == "PASS" for o in outcomes),
                          "of": len(outcomes), "label": label, "primary": primary,
                          "primary_outcome": by_setting[primary]["outcome"],
                          "rule": "PASS only if PASS in every setting, FAIL only if FAIL in every "
                                  "setting, otherwise UNDECIDED (the paper's unknowns decide it)"}
    head["outcome"] = outcome
    head["passed"] = {"PASS": True, "FAIL": False}.get(outcome)
    head["ours"] = f"{head['ours']} | {label} settings"
    return head


def merge_settings(rows_by_setting: Mapping[str, list[dict[str, Any]]], primary: str,
                   declared: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per setting a list of rows (same claim ids, any order) -> headline rows in the primary's order.

    ``declared``: the settings the profile declares (see ``robust_headline``)."""
    if primary not in rows_by_setting:
        raise ValueError(f"primary setting {primary!r} has no rows; settings: {list(rows_by_setting)}")
    out = []
    for r in rows_by_setting[primary]:
        cid = r["claim_id"]
        per = {s: next((x for x in rows if x["claim_id"] == cid), None) for s, rows in rows_by_setting.items()}
        out.append(robust_headline({s: x for s, x in per.items() if x is not None}, primary, declared))
    return out
