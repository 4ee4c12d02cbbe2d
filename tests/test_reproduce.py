"""`bnlab reproduce` and `bnlab report` from the command line: the main job, end to end (smoke)."""
from __future__ import annotations

import json
import re

from bnlab.cli import main, print_verdict


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _without_time(html: str) -> str:
    return re.sub(r"<time[^>]*>.*?</time>", "", html)


def test_reproduce_twice_trains_once_and_rewrites_the_same_report(tmp_path, capsys):
    out = tmp_path / "runs"
    code, first, _ = _cli(capsys, "reproduce", "ioffe", "--profile", "smoke", "--out", str(out), "--quiet")
    assert code == 0
    assert "[1/2] ioffe_mnist" in first and "[2/2] ioffe_lr_study" in first
    root = out / "smoke"  # each profile in its own folder, the report next to its runs
    report = root / "report.html"
    assert f"report: {report}" in first and "verdicts:" in first
    for name in ("ioffe_mnist", "ioffe_lr_study"):
        rows = json.loads((root / name / "verdict.json").read_text())
        assert rows and all({"claim", "paper", "ours", "passed", "dataset"} <= set(r) for r in rows)
        assert all(r["outcome"] == "UNDECIDED" for r in rows)  # smoke runs decide nothing
        # the verdict table: one block per claim with its outcome, the claim, ours
        for r in rows:
            assert f"[UNDECIDED] {name}: {r['claim_id']} {r['claim']}" in first
            assert f"ours:  {r['ours']}" in first
    # figures: one place per experiment and profile, whichever command drew them
    figures = sorted(str(p.relative_to(root)) for p in root.rglob("*.svg"))
    assert figures and all(re.fullmatch(r"ioffe_(mnist|lr_study)/figures/[^/]+\.svg", f) for f in figures), figures
    assert not list(out.rglob("*.png"))
    html = report.read_text(encoding="utf-8")
    assert "Ioffe Fig. 3: steps to reach the Baseline max" in html  # the paper's table
    metrics = {p: p.read_bytes() for p in root.glob("*/*/seed*/metrics.jsonl")}

    code, second, _ = _cli(capsys, "reproduce", "ioffe", "--profile", "smoke", "--out", str(out), "--quiet")
    assert code == 0
    assert second.count("nothing to do") == 2 and " 0 new" in second
    assert {p: p.read_bytes() for p in root.glob("*/*/seed*/metrics.jsonl")} == metrics  # no training
    assert _without_time(report.read_text(encoding="utf-8")) == _without_time(html)

    # `bnlab report` rebuilds the same page from the stored runs only, and refreshes verdict.json
    # to the rows it shows (a stale file from older code must not disagree with the report)
    stale = root / "ioffe_mnist" / "verdict.json"
    fresh = stale.read_text()
    stale.write_text("[]")
    code, text, _ = _cli(capsys, "report", str(out), "--profile", "smoke", "-o", str(tmp_path / "again.html"))
    assert code == 0 and "again.html" in text
    assert stale.read_text() == fresh
    assert _without_time((tmp_path / "again.html").read_text(encoding="utf-8")) == _without_time(html)
    code, text, _ = _cli(capsys, "report", str(root), "-o", str(tmp_path / "again2.html"))  # the profile folder
    assert code == 0
    assert _without_time((tmp_path / "again2.html").read_text(encoding="utf-8")) == _without_time(html)


def test_verdict_table_prints_outcome_claim_ours_and_ci(capsys):
    rows = [
        {"experiment": "ioffe_mnist", "claim_id": "D.8a", "claim": "BN is ahead early", "paper": "BN ≈0.96 at once",
         "ours": "gap at step 1000: +0.081 [0.052, 0.110]", "dataset": "Fashion-MNIST (MNIST not installed: fallback)",
         "outcome": "PASS", "rule": "PASS if the 95% CI of the paired gap is above 0", "estimate": 0.08123,
         "ci": [0.05234, 0.11012], "ci_level": 0.95, "n_seeds": 5, "n_diverged": 1, "n_collapsed": 0,
         "robustness": {"settings": [], "holds": 3, "of": 4, "label": "holds in 3/4"}, "passed": True},
        {"experiment": "ioffe_lr_study", "claim_id": "D.10c", "claim": "x5 without BN fails", "ours": "2/5 fail",
         "outcome": "TIE", "estimate": None, "ci": None, "no_ci_reason": "count outcome", "n_seeds": 5},
        {"claim": "D.9 old-style row", "paper": "p", "ours": [0.5, 0.7], "seeds": 2, "passed": False, "why": "w"},
    ]
    print_verdict(rows)
    out = capsys.readouterr().out
    assert "[     PASS] ioffe_mnist: D.8a BN is ahead early" in out
    assert "CI:    0.081 [0.052, 0.110] (95% CI)" in out  # digits from the interval's width
    assert "5 seeds (1 diverged); data: Fashion-MNIST (MNIST not installed: fallback); robustness: holds in 3/4" in out
    assert "[      TIE] ioffe_lr_study: D.10c x5 without BN fails" in out and "CI:    none: count outcome" in out
    assert "[     FAIL] D.9 old-style row" in out and "0.60 ± 0.14 (mean ± std, n=2)" in out and "why:   w" in out


def test_report_of_an_empty_directory_is_one_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "report", str(tmp_path / "empty"))
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "empty") in err and "bnlab run" in err


def test_unknown_reproduce_target_lists_groups_and_experiments(capsys):
    code, _, err = _cli(capsys, "reproduce", "imagenet", "--profile", "smoke")
    assert code == 2 and "unknown experiment or group 'imagenet'" in err and "ioffe" in err and "ioffe_mnist" in err
    code, _, err = _cli(capsys, "reproduce", "iofe", "--profile", "smoke")
    assert code == 2 and "did you mean 'ioffe'?" in err


def test_selections_resolve_to_experiments_and_arms():
    from bnlab.cli import SELECTIONS, select_targets
    from bnlab.experiments import get_experiment

    # every arm a selection names exists (a renamed variant must not silently drop out of one)
    for name, (_, parts) in SELECTIONS.items():
        for exp_name, variants in parts:
            exp = get_experiment(exp_name)
            assert variants is None or set(variants) <= set(exp.variants), (name, exp_name)
    assert select_targets([]) == select_targets(["headline"])  # the default
    assert select_targets(["santurkar_noisy"]) == [
        ("santurkar_vgg", ("standard", "bn", "noisy_bn", "standard_noise"))]
    # arms of one experiment asked by two selections are united, once per experiment, in order
    assert select_targets(["santurkar_ics", "santurkar_lp"]) == [
        ("santurkar_vgg", ("standard", "bn", "l1", "l2", "linf")),
        ("santurkar_dln", ("standard", "bn", "standard_lr1e-7", "bn_lr1e-7", "l1", "l2", "linf"))]
    # a whole experiment wins over a selection of its arms, whichever comes first
    assert dict(select_targets(["santurkar_noisy", "santurkar"]))["santurkar_vgg"] is None
    assert dict(select_targets(["santurkar", "santurkar_noisy"]))["santurkar_vgg"] is None


def test_reproduce_a_selection_runs_only_its_arms_and_reports_the_rest_as_not_run(tmp_path, capsys):
    out = tmp_path / "runs"
    code, text, _ = _cli(capsys, "reproduce", "santurkar_noisy", "--profile", "smoke", "--out", str(out), "--quiet")
    assert code == 0, text
    assert "santurkar_vgg (standard, bn, noisy_bn, standard_noise)" in text
    root = out / "smoke" / "santurkar_vgg"
    assert sorted(d.name.rsplit("-", 1)[0] for d in root.iterdir() if d.is_dir() and d.name != "figures") == [
        "bn", "noisy_bn", "standard", "standard_noise"]
    rows = json.loads((root / "verdict.json").read_text())
    ids = {r["claim_id"] for r in rows}
    assert {"D.13a", "D.13e", "D.11b", "D.17c"} <= ids  # every claim has a row: the unrun ones say so
    lp = next(r for r in rows if r["claim_id"] == "D.17c")
    assert lp["outcome"] == "UNDECIDED"
    html = (out / "smoke" / "report.html").read_text(encoding="utf-8")
    assert "noisy" in html.lower()
    # the terminal counts the claims that need arms outside the selection instead of printing them
    assert "need arms outside this selection" in text and "D.17c" in text.split("need arms outside")[1]
    assert "needs finished runs of l1" not in text


def test_set_that_makes_two_variants_identical_is_refused(tmp_path, capsys):
    code, _, err = _cli(capsys, "run", "ioffe_mnist", "--profile", "smoke", "--set", "norm=ghost", "--out",
                        str(tmp_path))
    assert code == 2 and "have the same config" in err and "--variants" in err
    assert not any(tmp_path.rglob("config.json"))  # nothing was created
    code, _, _ = _cli(capsys, "run", "ioffe_mnist", "--profile", "smoke", "--variants", "bn", "--set", "norm=ghost",
                      "--out", str(tmp_path), "--quiet")
    assert code == 0
