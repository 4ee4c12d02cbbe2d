"""The Ioffe reproductions: probes do not change training; the verdicts, computed from synthetic stored
runs whose right outcome is known, return it (pass, fail, tie, diverged and collapsed seeds, settings)."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.experiments.ioffe_lr_study import EXPERIMENT as LR_STUDY
from bnlab.experiments.ioffe_lr_study import decide_lr_limit, fig3_table, table
from bnlab.experiments.ioffe_lr_study import verdict as lr_verdict
from bnlab.experiments.ioffe_mnist import EXPERIMENT as MNIST
from bnlab.experiments.ioffe_mnist import drift_after, drift_whole_run, relative_step_change
from bnlab.experiments.ioffe_mnist import verdict as mnist_verdict
from bnlab.train.config import config_hash, config_to_dict
from bnlab.train.results import load_results
from bnlab.train.rundir import run_dir_path
from bnlab.train.runner import run_experiment

SCHEMA_KEYS = {"claim_id", "claim", "paper", "ours", "dataset", "outcome", "rule", "statistic", "estimate",
               "ci", "ci_level", "ci_method", "no_ci_reason", "per_seed", "n_seeds", "n_diverged",
               "n_collapsed", "robustness", "passed"}
FASHION = {"requested": "mnist", "used": "fashion_mnist", "binarized": False}


def fake_run(out: Path, exp, variant: str, seed: int, *, steps, acc, final, status="done", pct=None,
             setting=None, profile="quick", dataset=FASHION, cfg_overrides=None):
    """Write a run directory as the training loop would: config.json, env.json, metrics.jsonl, done."""
    cfg = exp.config(variant, "robust" if setting else profile, cfg_overrides, setting=setting)
    rd = run_dir_path(out, exp.name, variant, config_hash(cfg), seed)
    rd.mkdir(parents=True)
    meta = {"experiment": exp.name, "variant": variant, "seed": seed, "profile": profile,
            "setting": setting or exp.primary_setting, "config_hash": config_hash(cfg),
            "config": config_to_dict(cfg)}
    (rd / "config.json").write_text(json.dumps(meta))
    (rd / "env.json").write_text(json.dumps({"dataset": dataset}))
    lines = [{"step": int(s), "split": "eval", "acc": float(a)} for s, a in zip(steps, acc)]
    if status != "diverged":
        lines.append({"step": int(steps[-1]), "split": "test", "acc": float(final)})
    (rd / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if pct is not None:
        buf = io.BytesIO()
        np.savez(buf, **{"probe/sigmoid_input/steps": np.asarray(steps), "probe/sigmoid_input/percentiles": pct})
        (rd / "arrays.npz").write_bytes(buf.getvalue())
    (rd / "done").write_text(json.dumps({"status": status, "diverged_step": int(steps[-1]) if status == "diverged" else None}))
    return rd


STEPS = np.arange(0, 50_001, 500)


def curve(start, end, k=6.0, noise=0.0, rng=None):
    x = STEPS / STEPS[-1]
    c = end - (end - start) * np.exp(-k * x)
    return c + (rng.normal(0, noise, c.shape) if rng is not None else 0)


def percentiles(rng, drifting: bool):
    """(T, 3, 10): the baseline's median wanders by about 2; BN's stays at 0 with a slowly growing spread."""
    T = len(STEPS)
    if drifting:
        med = np.cumsum(rng.normal(0, 0.3, (T, 10)), axis=0)
        spread = 1.0 + np.abs(np.cumsum(rng.normal(0, 0.2, (T, 10)), axis=0))
    else:
        med = rng.normal(0, 0.01, (T, 10))
        spread = np.linspace(2.6, 2.7, T)[:, None] + rng.normal(0, 0.005, (T, 10))
    return np.stack([med - spread / 2, med, med + spread / 2], axis=1).astype(np.float32)


def mnist_runs(tmp_path, *, final_gap, seeds=(0, 1, 2), diverged_bn=(), setting=None, profile="quick"):
    rng = np.random.default_rng(0)
    if not isinstance(final_gap, dict):  # a gap with some spread over seeds: identical gaps are UNDECIDED
        final_gap = {s: final_gap + 0.003 * (s % 3 - 1) for s in seeds}
    for s in seeds:
        base_final = 0.85 + 0.002 * s
        fake_run(tmp_path, MNIST, "baseline", s, steps=STEPS, acc=curve(0.2, base_final, rng=rng, noise=0.002),
                 final=base_final, pct=percentiles(rng, True), setting=setting, profile=profile)
        status = "diverged" if s in diverged_bn else "done"
        steps = STEPS if status == "done" else STEPS[:10]
        acc = curve(0.8, base_final + final_gap[s] if isinstance(final_gap, dict) else base_final + final_gap,
                    k=40.0, rng=rng, noise=0.002)[: len(steps)]
        fake_run(tmp_path, MNIST, "bn", s, steps=steps, acc=acc,
                 final=base_final + (final_gap[s] if isinstance(final_gap, dict) else final_gap), status=status,
                 pct=percentiles(rng, False)[: len(steps)], setting=setting, profile=profile)
    return load_results(tmp_path, "ioffe_mnist")


def by_id(rows):
    return {r["claim_id"]: r for r in rows}


def test_fig1_verdict_clear_pass_on_synthetic_runs(tmp_path):
    rows = by_id(mnist_verdict(mnist_runs(tmp_path, final_gap=0.02)))
    assert list(rows) == ["D.8a", "D.8b", "D.9a", "D.9b", "D.9c"]
    for cid in rows:
        assert rows[cid]["outcome"] == "PASS", (cid, rows[cid]["ours"])
        assert set(rows[cid]) >= SCHEMA_KEYS and rows[cid]["n_seeds"] == 3 and rows[cid]["ci"] is not None
        assert [p["seed"] for p in rows[cid]["per_seed"]] == [0, 1, 2]
        assert rows[cid]["dataset"] == "Fashion-MNIST, grey levels (MNIST not installed)"
    assert rows["D.8a"]["early_step"] == 1000 and "gap at step 1000" in rows["D.8a"]["ours"]
    assert "after the first 10%" in rows["D.9a"]["secondary"]


def test_fig1_final_accuracy_tie_and_fail(tmp_path):
    rows = by_id(mnist_verdict(mnist_runs(tmp_path / "tie", final_gap={0: 0.004, 1: -0.003, 2: 0.0005})))
    assert rows["D.8b"]["outcome"] == "TIE" and rows["D.8a"]["outcome"] == "PASS"
    rows = by_id(mnist_verdict(mnist_runs(tmp_path / "fail", final_gap=-0.03)))
    assert rows["D.8b"]["outcome"] == "FAIL"


def test_fig1_diverged_seed_counts_as_chance_and_is_shown(tmp_path):
    rows = by_id(mnist_verdict(mnist_runs(tmp_path, final_gap=0.02, diverged_bn=(1,))))
    r = rows["D.8b"]
    assert r["n_diverged"] == 1 and r["n_seeds"] == 3
    seed1 = r["per_seed"][1]
    assert seed1["status"]["bn"] == "diverged" and seed1["values"]["bn"] == pytest.approx(0.1)
    assert r["outcome"] == "TIE"  # one seed at chance makes the gap's interval wide: cannot tell


def test_fig1_one_seed_is_undecided(tmp_path):
    rows = mnist_verdict(mnist_runs(tmp_path, final_gap=0.02, seeds=(0,)))
    assert all(r["outcome"] == "UNDECIDED" and r["ci"] is None and r["no_ci_reason"] for r in rows)


def test_fig1_robust_settings_give_the_headline(tmp_path):
    mnist_runs(tmp_path, final_gap=0.02)
    other = [s for s in MNIST.settings if s != MNIST.primary_setting][0]
    results = mnist_runs(tmp_path, final_gap=-0.03, setting=other, profile="robust")
    rows = by_id(mnist_verdict(results))
    rob = rows["D.8b"]["robustness"]
    # every declared setting is counted; the 4 not run are UNDECIDED "not run" (revised after review:
    # before, the headline was over the 2 settings present and D.8a read "holds in 2/2")
    n = len(MNIST.settings)
    assert rob["of"] == n == 6 and rob["holds"] == 1 and rob["label"] == f"fragile: 1/{n}"
    assert [s["setting"] for s in rob["settings"]][:2] == [MNIST.primary_setting, other]
    assert [s["ours"] for s in rob["settings"]][2:] == ["not run"] * (n - 2)
    assert rows["D.8b"]["outcome"] == "UNDECIDED" and rows["D.8a"]["outcome"] == "UNDECIDED"
    assert rows["D.8a"]["robustness"]["holds"] == 2 and rows["D.8a"]["robustness"]["primary_outcome"] == "PASS"


def test_drift_statistics_see_the_early_transient_and_the_secondary_does_not():
    steps = np.arange(0, 1001, 100)
    pct = np.zeros((len(steps), 3, 4))
    pct[:, 2, :] = 2.0  # spread 2, constant
    pct[0, 1, :] = 3.0  # an early transient of the median at step 0 only
    med, spread = drift_whole_run(pct)
    assert med == pytest.approx(3.0) and spread == pytest.approx(0.0)
    assert drift_after(steps, pct) == (pytest.approx(0.0), pytest.approx(0.0))
    # relative step change: the median jumps by 3 once (then 0) over 10 intervals: mean |Δ| over the
    # three percentiles and the intervals = 3 / 3 / 10, divided by the spread 2
    assert relative_step_change(pct) == pytest.approx(3.0 / 3 / 10 / 2.0)
    per_unit = np.abs(np.diff(pct, axis=0)).mean(axis=(0, 1)) / (pct[:, 2] - pct[:, 0]).mean(axis=0)
    assert relative_step_change(pct) == pytest.approx(per_unit.mean())


LR_STEPS = np.arange(0, 2001, 100)


def lr_runs(tmp_path, outcome: dict[str, list[tuple[str, float]]], reach: dict[str, int]):
    """One run per (variant, seed): (status, final accuracy); the eval curve rises to the final
    accuracy and first reaches the Baseline's level at step ``reach[variant]``."""
    for variant, seeds in outcome.items():
        for s, (status, final) in enumerate(seeds):
            acc = np.where(LR_STEPS >= reach.get(variant, 10**9), final, np.minimum(final, 0.70) * LR_STEPS / 2000)
            if variant == "Baseline":
                acc = 0.80 * np.minimum(1.0, LR_STEPS / 1800)  # max 0.80, first reached at step 1800
            fake_run(tmp_path, LR_STUDY, variant, s, steps=LR_STEPS, acc=acc, final=final, status=status)
    return load_results(tmp_path, "ioffe_lr_study")


GOOD = [("done", 0.82)] * 5


def test_lr_study_verdict_on_synthetic_runs(tmp_path):
    results = lr_runs(tmp_path, {
        "Baseline": [("done", 0.80)] * 5, "BN-Baseline": GOOD, "BN-x5": GOOD, "BN-x30": GOOD,
        "BN-x5-Sigmoid": [("done", 0.78)] * 5,
        "Baseline-x5": [("collapsed", 0.10), ("collapsed", 0.11), ("diverged", 0.0), ("done", 0.79), ("done", 0.70)],
        "Baseline-Sigmoid": [("collapsed", 0.1)] * 5,
    }, reach={"BN-Baseline": 900, "BN-x5": 300, "BN-x30": 400})
    rows = by_id(lr_verdict(results))
    assert list(rows) == ["D.10a", "D.10b", "D.10c", "D.10d", "D.10e", "D.10f", "D.10g", "D.10h", "D.10i"]
    assert all(set(r) >= SCHEMA_KEYS for r in rows.values())
    assert {c: r["outcome"] for c, r in rows.items()} == {c: "PASS" for c in rows}, {c: r["ours"] for c, r in rows.items()}
    f = rows["D.10f"]
    assert f["n_collapsed"] == 2 and f["n_diverged"] == 1 and f["estimate"] == pytest.approx(4 / 5)
    assert [p["outcome"] for p in f["per_seed"]] == [True, True, True, False, True]  # 0.70 < 0.80 - 0.05
    assert rows["D.10a"]["baseline_max"] == pytest.approx(0.80) and rows["D.10a"]["baseline_max_step"] == 1800
    assert rows["D.10i"]["ci"] is None and rows["D.10i"]["no_ci_reason"]
    (title, fig3), = fig3_table(results).items()
    assert "0.800 at step 1800" in title and [r["variant"] for r in fig3] == list(LR_STUDY.variants)
    assert fig3[-2]["collapsed"] == 2 and fig3[-2]["diverged"] == 1


def test_lr_study_fails_and_ties(tmp_path):
    results = lr_runs(tmp_path, {
        "Baseline": [("done", 0.80)] * 5, "BN-Baseline": [("done", 0.80)] * 5,
        "BN-x5": [("done", 0.82)] * 2 + [("collapsed", 0.1)] * 3, "BN-x30": [("diverged", 0.0)] * 5,
        "Baseline-x5": [("done", 0.80)] * 5,
    }, reach={"BN-Baseline": 1900, "BN-x5": 300})
    rows = by_id(lr_verdict(results))
    assert rows["D.10a"]["outcome"] == "FAIL"  # reaches it later than the Baseline's step 1800
    assert rows["D.10d"]["outcome"] == "TIE"  # 2 of 5 train, 3 collapse: neither side has 2/3
    assert rows["D.10e"]["outcome"] == "FAIL" and rows["D.10e"]["n_diverged"] == 5
    assert rows["D.10f"]["outcome"] == "FAIL"  # every Baseline-x5 seed trains
    assert rows["D.10g"]["outcome"] == "UNDECIDED" and "no finished Baseline-Sigmoid" in rows["D.10g"]["ours"]
    # with BN only 1x trains (5x: 2/5 seeds), without BN 5x trains: the BN limit is bracketed below 5x
    # the no-BN one, whatever lies above the tested rates
    assert rows["D.10i"]["outcome"] == "FAIL"


@pytest.mark.parametrize("with_bn, without, expected", [
    ({1: True, 5: True, 30: True}, {1: True, 5: False}, "PASS"),  # >= 30 vs < 5
    ({1: True, 5: True, 30: False}, {1: True, 5: False}, "PASS"),  # 5 vs 1: ratio 5
    ({1: True, 5: False, 30: False}, {1: True, 5: False}, "FAIL"),  # 1 vs 1
    ({1: True, 5: True, 30: True}, {1: True, 5: True}, "UNDECIDED"),  # no-BN limit unknown above 5
    ({1: True, 5: True, 30: False}, {1: True, 5: True}, "FAIL"),  # BN limit 5 <= no-BN's >= 5
    ({1: False, 5: False, 30: False}, {1: True, 5: False}, "FAIL"),
])
def test_lr_limit_rule(with_bn, without, expected):
    assert decide_lr_limit(with_bn, without)[0] == expected


def test_percentile_probe_leaves_the_training_trajectory_bit_identical(tmp_path):
    without = dataclasses.replace(MNIST, probes=())
    for exp, out in ((MNIST, tmp_path / "with"), (without, tmp_path / "without")):
        run_experiment(exp, "smoke", out=out, seeds=[0], variants=["bn"], quiet=True, echo=lambda *_: None)
    with_runs = load_results(tmp_path / "with", "ioffe_mnist").runs
    without_runs = load_results(tmp_path / "without", "ioffe_mnist").runs
    a, b = with_runs[0].model_state(), without_runs[0].model_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = lambda r: [(m["step"], m["loss"]) for m in r.records(split="train")]  # noqa: E731
    assert train(with_runs[0]) == train(without_runs[0])
    pct = with_runs[0].arrays["probe/sigmoid_input/percentiles"]
    assert pct.shape[1:] == (3, 10) and np.all(pct[:, 0] <= pct[:, 1]) and np.all(pct[:, 1] <= pct[:, 2])


def test_lr_study_smoke_runs_give_schema_rows_and_fig3_table(tmp_path):
    run_experiment(LR_STUDY, "smoke", out=tmp_path, overrides={"dataset": "digits"}, quiet=True,
                   echo=lambda *_: None)
    results = load_results(tmp_path, "ioffe_lr_study")
    rows = lr_verdict(results)
    assert all(set(r) >= SCHEMA_KEYS for r in rows)
    assert all(r["outcome"] == "UNDECIDED" for r in rows), "1 seed and 12-step runs decide nothing"
    by = by_id(rows)
    # 12 steps is too short to tell trains / fails / at chance (collapse is judged from 100 steps on):
    # no per-seed answer, and the text says so instead of "1/1 seeds yes"
    for cid in ("D.10d", "D.10e", "D.10f", "D.10g", "D.10h"):
        r = by[cid]
        assert [p["outcome"] for p in r["per_seed"]] == [None], (cid, r["per_seed"])
        assert "0/1 seeds yes, 1 without an answer" in r["ours"] and "12-step run: too short to judge" in r["ours"]
    # D.10i counts seeds, not runs: one seed, whose five runs are its per-arm values
    i = by["D.10i"]
    assert i["n_seeds"] == len(i["per_seed"]) == 1 and len(i["per_seed"][0]["status"]) == 5
    assert "5 runs over 1 seed" in i["ours"] and "too short to judge" in i["ours"]
    fig3 = table(results)
    lrs = {r["variant"]: r["lr"] for r in fig3}
    assert np.isclose(lrs["BN-x30"], 30 * lrs["Baseline"]) and np.isclose(lrs["BN-x5"], 5 * lrs["Baseline"])


def test_robust_profile_plans_every_setting_with_its_seeds(tmp_path):
    from bnlab.train.runner import plan_runs

    quick = plan_runs(MNIST, "quick", out=tmp_path)
    robust = plan_runs(MNIST, "robust", out=tmp_path)
    assert {p.spec.setting for p in quick} == {MNIST.primary_setting}
    assert [s for s in dict.fromkeys(p.spec.setting for p in robust)] == list(MNIST.settings)
    per = {s: sum(p.spec.setting == s for p in robust) for s in MNIST.settings}
    assert per[MNIST.primary_setting] == 2 * len(MNIST.default_seeds("quick"))
    assert all(n == 2 * len(MNIST.robust_seeds) for s, n in per.items() if s != MNIST.primary_setting)
    # the primary setting of robust is exactly quick's protocol: the same run directories
    assert {p.spec.run_dir for p in quick} <= {p.spec.run_dir for p in robust}
    n01 = [p.spec.cfg for p in robust if p.spec.setting.startswith("init N(0,1),")]
    assert n01 and all(c.init_std == 1.0 for c in n01)
    lr = plan_runs(LR_STUDY, "robust", out=tmp_path)
    half = {p.spec.variant: p.spec.cfg.lr for p in lr if p.spec.setting == "every rate x0.5"}
    full = {p.spec.variant: p.spec.cfg.lr for p in lr if p.spec.setting == LR_STUDY.primary_setting}
    assert all(np.isclose(half[v], full[v] / 2) for v in full)
    # every D.10 claim is decided per seed and needs min_seeds: a setting with fewer could never decide
    from bnlab.experiments.ioffe_lr_study import CLAIMS

    need = max(c.min_seeds for c in CLAIMS.values() if c.kind == "seed_count")
    assert all(len(LR_STUDY.default_seeds("robust", s)) >= need for s in LR_STUDY.setting_names("robust"))
    # The target was "the whole robust run within 45 min"; it was relaxed to "robust after quick" when
    # the Sec. 4.2 runs became 3x longer and the measured from-scratch run took 56.7 min (docs/claims.md,
    # "Cost of the robust run"). Quick's runs are robust's primary setting and are copied, not retrained:
    # the other settings' estimated CPU time / 2 must fit in 45 min.
    extra = sum(e.run_cost(cfg) * len(e.default_seeds("robust", s))
                for e in (LR_STUDY, MNIST) for s in e.setting_names("robust")[1:]
                for cfg in e.configs("robust", setting=s).values())
    assert extra / 60 / 2 < 45


def test_lr_study_declared_seeds_that_never_ran_leave_the_rows_undecided(tmp_path):
    # quick declares 5 seeds; only 0-2 ran and every one of them says yes: 3/5 could still be a TIE
    results = lr_runs(tmp_path, {
        "Baseline": [("done", 0.80)] * 3, "BN-Baseline": GOOD[:3], "BN-x5": GOOD[:3], "BN-x30": GOOD[:3],
        "BN-x5-Sigmoid": [("done", 0.78)] * 3, "Baseline-x5": [("collapsed", 0.10)] * 3,
        "Baseline-Sigmoid": [("collapsed", 0.1)] * 3,
    }, reach={"BN-Baseline": 900, "BN-x5": 300, "BN-x30": 400})
    rows = by_id(lr_verdict(results))
    for cid in ["D.10a", "D.10b", "D.10c", "D.10d", "D.10e", "D.10f", "D.10g", "D.10h", "D.10i"]:
        assert rows[cid]["outcome"] == "UNDECIDED", (cid, rows[cid]["ours"])
    assert rows["D.10d"]["n_seeds"] == 5
    assert [p["status"]["run"] for p in rows["D.10d"]["per_seed"]] == ["done"] * 3 + ["missing"] * 2


def noisy_baseline_runs(tmp_path, variants):
    """5 Baseline seeds with noisy rising curves; each variant in ``variants`` gets the very same curves."""
    rng = np.random.default_rng(3)
    for s in range(5):
        acc = 0.80 * np.minimum(1.0, LR_STEPS / 1500) + rng.normal(0, 0.01, LR_STEPS.shape)
        for v in ("Baseline", *variants):
            fake_run(tmp_path, LR_STUDY, v, s, steps=LR_STEPS, acc=acc, final=0.80)
    return load_results(tmp_path, "ioffe_lr_study")


def test_placebo_the_baseline_is_not_sooner_than_itself(tmp_path):
    # BN-Baseline identical to the Baseline seed by seed: "reaches the Baseline max sooner" must not
    # PASS. Against the Baseline's seed-mean curve (the rule before review) a noisy single curve crosses
    # the mean's maximum earlier, and this placebo passed.
    rows = by_id(lr_verdict(noisy_baseline_runs(tmp_path, ["BN-Baseline"])))
    r = rows["D.10a"]
    assert r["outcome"] == "FAIL", r["ours"]
    assert all(p["outcome"] is False for p in r["per_seed"])
    assert all(p["values"]["steps_to_baseline_max"] == p["values"]["baseline_steps"] for p in r["per_seed"])


def test_baseline_max_keeps_a_diverged_baseline_seed_at_chance(tmp_path):
    from bnlab.experiments.ioffe_lr_study import baseline_max
    for s in range(3):
        fake_run(tmp_path, LR_STUDY, "Baseline", s, steps=LR_STEPS, acc=0.80 * np.minimum(1.0, LR_STEPS / 1800),
                 final=0.80)
    fake_run(tmp_path, LR_STUDY, "Baseline", 3, steps=LR_STEPS[:5], acc=np.full(5, 0.2), final=0.0,
             status="diverged")
    bmax = baseline_max(load_results(tmp_path, "ioffe_lr_study"))
    # seed-mean of three curves reaching 0.80 and one at chance after its divergence (not dropped)
    assert bmax["n_diverged"] == 1 and bmax["seeds"] == 4
    assert bmax["target"] == pytest.approx((3 * 0.80 + 0.1) / 4)


def test_fig1_a_declared_seed_without_runs_makes_the_rows_undecided(tmp_path):
    # quick declares seeds 0-2; seed 2 never ran: the rows list it as missing and decide nothing
    rows = by_id(mnist_verdict(mnist_runs(tmp_path, final_gap=0.02, seeds=(0, 1))))
    for cid, r in rows.items():
        assert r["outcome"] == "UNDECIDED" and r["n_seeds"] == 3, (cid, r["ours"])
        assert r["per_seed"][2]["status"] == {"bn": "missing", "baseline": "missing"}
