"""The verdict mechanism on synthetic per-seed numbers where the right outcome is known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bnlab.experiments.verdict import (Claim, Seed, decimals_for, fmt_mean_sd, merge_settings,
                                       paired_difference, proportion_interval, robust_headline, seed_count,
                                       t_interval, undecided, with_declared)

SCHEMA_KEYS = {"claim_id", "claim", "paper", "ours", "dataset", "outcome", "rule", "statistic", "estimate",
               "ci", "ci_level", "ci_method", "no_ci_reason", "per_seed", "n_seeds", "n_diverged",
               "n_collapsed", "robustness", "passed"}

GAP = Claim("T.1", "a beats b", "a > b in the paper", "a - b per seed")
FEWER = Claim("T.2", "a is below b", "a < b", "a - b per seed", threshold=0.0, direction=-1)
COUNT = Claim("T.3", "runs fail", "they fail", "per seed: did it fail", kind="seed_count")


def pairs(a, b, status=None):
    status = status or {}
    return [Seed(i, {"a": x, "b": y}, status.get(i, {"a": "done", "b": "done"})) for i, (x, y) in enumerate(zip(a, b))]


def t_quantile_df2(p):  # closed form of Student t's inverse CDF with 2 degrees of freedom
    q = 2 * p - 1
    return q * math.sqrt(2 / (1 - q * q))


def test_t_interval_is_the_student_interval_with_ddof_1():
    d = [0.10, 0.04, 0.07]
    mean, (lo, hi) = t_interval(d)
    half = t_quantile_df2(0.975) * np.std(d, ddof=1) / math.sqrt(3)
    assert math.isclose(mean, np.mean(d)) and math.isclose(lo, mean - half) and math.isclose(hi, mean + half)
    assert t_interval([0.3])[1] is None
    assert t_interval([0.2, 0.2, 0.2]) == (pytest.approx(0.2), (pytest.approx(0.2), pytest.approx(0.2)))


def test_clopper_pearson_interval_matches_its_closed_forms():
    # k = n: lower bound (alpha/2)^(1/n), upper 1; k = 0: lower 0, upper 1 - (alpha/2)^(1/n)
    lo, hi = proportion_interval(5, 5)
    assert math.isclose(lo, 0.025 ** (1 / 5)) and hi == 1.0
    lo, hi = proportion_interval(0, 4)
    assert lo == 0.0 and math.isclose(hi, 1 - 0.025 ** (1 / 4))


def test_clear_pass_clear_fail_and_tie():
    r = paired_difference(GAP, pairs([0.90, 0.91, 0.92], [0.80, 0.805, 0.81]), "a", "b", dataset="synthetic")
    assert r["outcome"] == "PASS" and r["passed"] is True and r["ci"][0] > 0
    r = paired_difference(GAP, pairs([0.70, 0.71, 0.72], [0.80, 0.805, 0.81]), "a", "b", dataset="synthetic")
    assert r["outcome"] == "FAIL" and r["passed"] is False and r["ci"][1] < 0
    r = paired_difference(GAP, pairs([0.85, 0.80, 0.81], [0.80, 0.84, 0.80]), "a", "b", dataset="synthetic")
    assert r["outcome"] == "TIE" and r["passed"] is None and r["ci"][0] < 0 < r["ci"][1]
    assert set(r) >= SCHEMA_KEYS and r["ci_method"] and r["no_ci_reason"] is None
    json.dumps(r)  # JSON-serializable as written to verdict.json


def test_direction_minus_one_passes_when_the_interval_is_below_the_threshold():
    r = paired_difference(FEWER, pairs([1.0, 1.1, 1.2], [2.0, 2.0, 2.1]), "a", "b", dataset="s")
    assert r["outcome"] == "PASS"
    r = paired_difference(Claim("T.4", "gap > 0.2", "", "", threshold=0.2),
                          pairs([0.9, 0.91, 0.92], [0.8, 0.805, 0.81]), "a", "b", dataset="s")
    assert r["outcome"] == "FAIL", "a gap of 0.1 is not above a declared threshold of 0.2"


def test_one_seed_is_undecided_with_a_stated_reason():
    r = paired_difference(GAP, pairs([0.9], [0.1]), "a", "b", dataset="s")
    assert r["outcome"] == "UNDECIDED" and r["ci"] is None and "1 seed" in r["no_ci_reason"]
    assert r["estimate"] == pytest.approx(0.8) and len(r["per_seed"]) == 1


def test_a_diverged_seed_is_counted_and_shown_never_dropped():
    seeds = pairs([0.90, 0.91, None, 0.92], [0.80, 0.805, 0.80, 0.81],
                  status={2: {"a": "diverged", "b": "done"}})
    r = paired_difference(GAP, seeds, "a", "b", dataset="s")
    assert r["n_seeds"] == 4 and r["n_diverged"] == 1 and r["n_collapsed"] == 0
    assert [p["seed"] for p in r["per_seed"]] == [0, 1, 2, 3]
    assert r["per_seed"][2]["status"]["a"] == "diverged" and r["per_seed"][2]["diff"] is None
    # revised after review (2026-11-29): a seed that dropped out is not a random omission; without a
    # value declared for it the row is UNDECIDED and names it (before: PASS on the 3 others)
    assert r["outcome"] == "UNDECIDED" and r["ci"] is None
    assert "seed 2 (a: diverged)" in r["ours"] and "seed 2 (a: diverged)" in r["no_ci_reason"]
    assert r["estimate"] == pytest.approx(np.mean([0.10, 0.105, 0.11]))


def test_a_diverged_seed_takes_the_value_the_claim_declares():
    seeds = pairs([0.90, 0.91, None, 0.92], [0.80, 0.805, 0.80, 0.81],
                  status={2: {"a": "diverged", "b": "done"}})
    chance = Claim("T.5", "a beats b", "", "accuracy", diverged_value=0.1)
    r = paired_difference(chance, seeds, "a", "b", dataset="s")
    assert r["per_seed"][2]["diff"] == pytest.approx(0.1 - 0.80) and r["n_diverged"] == 1
    assert r["outcome"] == "TIE" and "n=4" in r["ours"]  # the chance seed widens the interval across 0
    assert "counts as 0.1" in r["rule"]
    # a declared seed that was never run has no value even so: UNDECIDED
    seeds = with_declared(pairs([0.90, 0.91, 0.92], [0.80, 0.805, 0.81]), (0, 1, 2, 3, 4), ("a", "b"))
    r = paired_difference(chance, seeds, "a", "b", dataset="s")
    assert r["outcome"] == "UNDECIDED" and r["n_seeds"] == 5
    assert [p["status"]["a"] for p in r["per_seed"]] == ["done"] * 3 + ["missing"] * 2


def test_zero_spread_gives_no_interval_and_no_pass():
    # identical differences: the t interval degenerates to [m, m]; before the fix this PASSed
    r = paired_difference(GAP, pairs([0.9, 0.9, 0.9], [0.8, 0.8, 0.8]), "a", "b", dataset="s")
    assert r["outcome"] == "UNDECIDED" and r["ci"] is None and "sd = 0" in r["no_ci_reason"]
    assert r["estimate"] == pytest.approx(0.1)


def test_a_collapsed_seed_counts_as_its_outcome_in_a_count_claim():
    st = lambda s: {"run": s}  # noqa: E731
    seeds = [Seed(0, {"acc": 0.10}, st("collapsed"), outcome=True), Seed(1, {"acc": 0.1}, st("diverged"), outcome=True),
             Seed(2, {"acc": 0.78}, st("done"), outcome=False), Seed(3, {"acc": 0.1}, st("collapsed"), outcome=True),
             Seed(4, {"acc": 0.1}, st("collapsed"), outcome=True)]
    r = seed_count(COUNT, seeds, dataset="s")
    assert r["outcome"] == "PASS" and r["n_collapsed"] == 3 and r["n_diverged"] == 1
    assert r["estimate"] == pytest.approx(4 / 5) and r["ci"][0] < 4 / 5 < r["ci"][1]
    assert "descriptive" in r["rule"]


@pytest.mark.parametrize("outcomes, expected", [
    # fewer than 5 declared seeds cannot decide (with 3, 2/3 can never TIE): revised after review
    ([True, True, True], "UNDECIDED"), ([True, False, False], "UNDECIDED"), ([True] * 4, "UNDECIDED"),
    ([True] * 4 + [False], "PASS"), ([True] * 3 + [False] * 2, "TIE"), ([True] + [False] * 4, "FAIL"),
    ([True] * 4 + [None], "PASS"), ([True] * 3 + [None] * 2, "UNDECIDED"), ([False] * 3 + [None] * 2, "UNDECIDED"),
    ([False] * 4 + [None], "FAIL"), ([True], "UNDECIDED"),
])
def test_seed_count_rule(outcomes, expected):
    seeds = [Seed(i, {}, {"run": "done" if o is not None else "incomplete"}, outcome=o) for i, o in enumerate(outcomes)]
    r = seed_count(COUNT, seeds, dataset="s")
    assert r["outcome"] == expected
    if len(outcomes) < 5:
        assert "needs ≥ 5 seeds" in r["ours"]


def test_declared_seeds_that_never_ran_make_a_count_row_undecided():
    # 5 declared, 3 ran and all say yes: the 2 missing ones could still make it a TIE (3/5)
    seeds = with_declared([Seed(i, {"acc": 0.8}, {"run": "done"}, outcome=True) for i in range(3)],
                          (0, 1, 2, 3, 4), ["run"])
    r = seed_count(COUNT, seeds, dataset="s")
    assert r["outcome"] == "UNDECIDED" and r["n_seeds"] == 5
    assert [p["status"]["run"] for p in r["per_seed"]] == ["done"] * 3 + ["missing"] * 2


def test_robust_headline_passes_only_when_every_setting_passes():
    a = paired_difference(GAP, pairs([0.9, 0.91, 0.92], [0.8, 0.805, 0.81]), "a", "b", dataset="s")
    b = paired_difference(GAP, pairs([0.7, 0.71, 0.72], [0.8, 0.805, 0.81]), "a", "b", dataset="s")
    head = robust_headline({"p": a, "q": a, "r": a}, "p")
    assert head["outcome"] == "PASS" and head["robustness"]["label"] == "holds in 3/3"
    head = robust_headline({"p": a, "q": b, "r": a, "s": b}, "p")
    assert head["outcome"] == "UNDECIDED" and head["robustness"]["label"] == "fragile: 2/4"
    assert head["robustness"]["holds"] == 2 and head["robustness"]["of"] == 4
    assert [s["setting"] for s in head["robustness"]["settings"]] == ["p", "q", "r", "s"]
    assert head["estimate"] == a["estimate"] and head["robustness"]["primary_outcome"] == "PASS"
    head = robust_headline({"p": b, "q": b}, "p")
    assert head["outcome"] == "FAIL" and head["robustness"]["label"] == "fails in 2/2"
    assert robust_headline({"p": a}, "p")["robustness"] is None
    rows = merge_settings({"p": [a, undecided(COUNT, "no runs")], "q": [b]}, "p")
    assert [r["claim_id"] for r in rows] == ["T.1", "T.3"] and rows[0]["robustness"]["of"] == 2


def test_robust_headline_counts_declared_settings_that_were_not_run():
    a = paired_difference(GAP, pairs([0.9, 0.91, 0.92], [0.8, 0.805, 0.81]), "a", "b", dataset="s")
    head = robust_headline({"p": a, "q": a}, "p", declared=["p", "q", "r"])
    assert head["outcome"] == "UNDECIDED" and head["robustness"]["label"] == "fragile: 2/3"
    assert head["robustness"]["settings"][2] == {**head["robustness"]["settings"][2], "setting": "r",
                                                  "outcome": "UNDECIDED", "ours": "not run"}
    rows = merge_settings({"p": [a]}, "p", declared=["p", "q"])
    assert rows[0]["outcome"] == "UNDECIDED" and rows[0]["robustness"]["of"] == 2


def test_numbers_are_rounded_by_their_spread():
    assert decimals_for(0.0009539) == 5 and decimals_for(0.012) == 3 and decimals_for(0.3) == 2
    assert fmt_mean_sd([0.8728 - 0.0009539, 0.8728, 0.8728 + 0.0009539]).startswith("0.87280 ± 0.00095")
    # identical seeds (or round-off such as 1.7e-17): the shared rule of bnlab.numfmt, "± 0", not "± 0.000"
    assert fmt_mean_sd([0.1, 0.1 + 1.7e-17, 0.1]) == "0.1 ± 0"
    assert fmt_mean_sd([0.1] * 5) == "0.1 ± 0"
    assert fmt_mean_sd([0.5]) == "0.500 (1 seed)"


def test_bad_claims_and_rows_are_refused():
    with pytest.raises(ValueError, match="kind"):
        Claim("x", "", "", "", kind="vote")
    with pytest.raises(ValueError, match="direction"):
        Claim("x", "", "", "", direction=0)
    with pytest.raises(ValueError, match="seed_count"):
        seed_count(GAP, [], dataset="s")
