"""Run outcomes beyond NaN: a finished run at chance level is recorded as "collapsed" (with the numbers
behind it), counted by the runner, and read back by the results API; settings are stored per run."""
from __future__ import annotations

import json
import math

import pytest

from bnlab.experiments.base import Experiment
from bnlab.train.config import TrainConfig
from bnlab.train.loop import COLLAPSE_MARGIN, COLLAPSE_MIN_STEPS, collapse_check
from bnlab.train.results import load_results
from bnlab.train.runner import run_experiment

# lr 0 and weights ~1e-6: every hidden unit sits at sigmoid(0) for every input, so the logits are the
# same for all images and the net predicts one class everywhere: accuracy = that class's frequency.
FROZEN = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(8,), norm="none", init="gaussian",
                     init_std=1e-6, lr=0.0, batch_size=32, steps=COLLAPSE_MIN_STEPS, eval_every=50,
                     eval_subset=100, log_every=10, checkpoint_every=50, probe_schedule="none")


def test_collapse_rule_is_accuracy_within_the_margin_of_chance_after_enough_steps():
    c = collapse_check(0.1 + COLLAPSE_MARGIN, 10, 100, [2.30, 2.31])
    assert c["collapsed"] and c["chance"] == 0.1 and math.isclose(c["ln_classes"], math.log(10))
    assert c["train_loss_window"] == pytest.approx(2.305)
    assert not collapse_check(0.1 + COLLAPSE_MARGIN + 1e-6, 10, 100, [])["collapsed"]
    assert not collapse_check(0.1, 10, COLLAPSE_MIN_STEPS - 1, [])["collapsed"], "too early to tell"
    assert not collapse_check(None, 10, 100, [])["collapsed"]
    assert collapse_check(0.52, 2, 100, [])["collapsed"] and not collapse_check(0.56, 2, 100, [])["collapsed"]


def test_a_run_at_chance_is_recorded_as_collapsed_and_counted(tmp_path):
    exp = Experiment(name="frozen", description="a net that cannot learn", base=FROZEN,
                     variants={"frozen": {}, "short": {"steps": COLLAPSE_MIN_STEPS - 1}})
    lines = []
    run = run_experiment(exp, "smoke", out=tmp_path, quiet=True, threads=1, echo=lines.append)
    statuses = {o.variant: o.status for o in run.outcomes}
    assert statuses == {"frozen": "collapsed", "short": "done"}
    summary = next(line for line in lines if line.startswith("frozen:"))
    assert "1 collapsed" in summary and "1 done" in summary
    assert any("collapsed: finite loss but test accuracy" in line for line in lines)
    results = load_results(tmp_path, "frozen")
    frozen = results.get("frozen")[0]
    assert frozen.status == "collapsed" and frozen.final("acc") <= 0.1 + COLLAPSE_MARGIN
    done = json.loads((frozen.run_dir / "done").read_text())
    assert done["status"] == "collapsed" and done["steps"] == COLLAPSE_MIN_STEPS
    assert done["collapse"]["collapsed"] and done["collapse"]["test_acc"] == frozen.final("acc")
    assert done["collapse"]["train_loss_window"] == pytest.approx(math.log(10), abs=0.01)
    assert [r.variant for r in results.finished().runs] == ["frozen", "short"]
    # a second invocation skips the collapsed run: it is finished, not failed
    again = run_experiment(exp, "smoke", out=tmp_path, quiet=True, threads=1, echo=lambda *_: None)
    assert all(p.state == "done" for p in again.planned)


def test_runs_store_their_robustness_setting(tmp_path):
    exp = Experiment(name="grid", description="a grid", base=FROZEN.__class__(**{**FROZEN.__dict__, "steps": 4}),
                     variants={"a": {}}, settings={"as declared": {}, "lr 0.1": {"lr": 0.1}},
                     robust_seeds=(0,))
    run_experiment(exp, "robust", out=tmp_path, seeds=None, quiet=True, threads=1, echo=lambda *_: None)
    results = load_results(tmp_path, "grid")
    # the primary setting with the profile's seeds (0-2), the other with robust_seeds
    assert sorted((r.setting, r.config.lr, r.seed) for r in results.runs) == [
        ("as declared", 0.0, 0), ("as declared", 0.0, 1), ("as declared", 0.0, 2), ("lr 0.1", 0.1, 0)]
    assert list(exp.split_by_setting(results)) == ["as declared", "lr 0.1"]
    assert len(load_results(tmp_path, "grid", profile="robust").runs) == 4


def test_bad_settings_are_refused_when_the_experiment_is_defined():
    from bnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="primary"):
        Experiment(name="g", description="", base=FROZEN, settings={"first": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="same configs"):
        Experiment(name="g", description="", base=FROZEN, settings={"p": {}, "again": {"lr": 0.0}})
    with pytest.raises(ConfigError, match="lrr"):
        Experiment(name="g", description="", base=FROZEN, settings={"p": {}, "typo": {"lrr": 0.1}})


def test_robust_copies_the_finished_quick_runs_of_its_primary_setting(tmp_path):
    """robust's primary setting is the quick profile's protocol: with the quick folder given as
    share_from, those runs are copied (same config hash and seed), the rest are trained."""
    import torch

    from bnlab.cli import sibling_profile_roots
    from bnlab.train.rundir import read_json

    exp = Experiment(name="grid", description="a grid", base=FROZEN.__class__(**{**FROZEN.__dict__, "steps": 4}),
                     variants={"a": {}}, settings={"as declared": {}, "lr 0.1": {"lr": 0.1}},
                     robust_seeds=(0,))
    quiet = {"quiet": True, "threads": 1, "echo": lambda *_: None}
    quick = run_experiment(exp, "quick", out=tmp_path / "quick", **quiet)
    assert len(quick.outcomes) == 3
    (tmp_path / "robust").mkdir()
    roots = sibling_profile_roots(tmp_path / "robust")
    assert roots == [tmp_path / "quick"] and sibling_profile_roots(tmp_path / "robust", no_reuse=True) == []
    lines = []
    robust = run_experiment(exp, "robust", out=tmp_path / "robust", share_from=roots,
                            **{**quiet, "echo": lines.append})
    assert sorted(p.state for p in robust.planned) == ["copy", "copy", "copy", "new"]
    assert [(o.variant, o.seed) for o in robust.outcomes] == [("a", 0)]  # only lr 0.1 trained
    assert any(line.startswith("copied 3 finished run(s)") for line in lines)
    assert any("3 copied from another profile's folder" in line for line in lines)
    src = {p.spec.seed: p.spec.run_dir for p in quick.planned}
    for p in robust.planned:
        if p.state != "copy":
            continue
        dst = p.spec.run_dir
        assert (dst / "metrics.jsonl").read_bytes() == (src[p.spec.seed] / "metrics.jsonl").read_bytes()
        a, b = torch.load(dst / "model.pt", weights_only=True), torch.load(src[p.spec.seed] / "model.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
        meta = read_json(dst / "config.json")
        assert (meta["profile"], meta["setting"], meta["copied_from"]["profile"]) == ("robust", "as declared", "quick")
        assert not (dst / "lock").exists()
    assert not list((tmp_path / "robust").rglob(".*copy-*")), "no half-copied folder is left"
    results = load_results(tmp_path / "robust", "grid", profile="robust")
    assert sorted((r.setting, r.seed) for r in results.runs) == [
        ("as declared", 0), ("as declared", 1), ("as declared", 2), ("lr 0.1", 0)]
    assert {r.status for r in results.runs} == {"done"}
    again = run_experiment(exp, "robust", out=tmp_path / "robust", share_from=roots, **quiet)
    assert all(p.state == "done" for p in again.planned) and again.outcomes == []
    # the report says which runs were copied, and from where
    from bnlab.report.build import collect

    section = next(s for s in collect(tmp_path / "robust", ["grid"]).sections if s.name == "grid")
    assert any("3 of these 4 runs were copied from the quick profile's folder" in n for n in section.notes)
    # without share_from (--no-reuse) every run trains
    fresh = run_experiment(exp, "robust", out=tmp_path / "fresh", **quiet)
    assert len(fresh.outcomes) == 4 and all(p.state == "new" for p in fresh.planned)


def test_only_a_finished_run_of_the_same_config_seed_and_dataset_is_copied(tmp_path):
    """Negative cases: an unfinished source, a source trained on another dataset (a fallback, then the
    real data installed), a source whose config.json names another config: each is trained here."""
    import json

    from bnlab.train.rundir import DONE, ENV

    exp = Experiment(name="grid", description="a grid", base=FROZEN.__class__(**{**FROZEN.__dict__, "steps": 4}),
                     variants={"a": {}}, settings={"as declared": {}, "lr 0.1": {"lr": 0.1}},
                     robust_seeds=(0,))
    quiet = {"quiet": True, "threads": 1, "echo": lambda *_: None}
    quick = run_experiment(exp, "quick", out=tmp_path / "quick", **quiet)
    src = {p.spec.seed: p.spec.run_dir for p in quick.planned}
    (src[0] / DONE).unlink()  # seed 0: unfinished
    env = json.loads((src[1] / ENV).read_text())  # seed 1: made on another dataset
    env["dataset"]["used"] = "fashion_mnist"
    (src[1] / ENV).write_text(json.dumps(env))
    cfg = json.loads((src[2] / "config.json").read_text())  # seed 2: its config.json says another seed
    cfg["seed"] = 7
    (src[2] / "config.json").write_text(json.dumps(cfg))
    robust = run_experiment(exp, "robust", out=tmp_path / "robust", share_from=[tmp_path / "quick"], **quiet)
    assert all(p.state == "new" for p in robust.planned)
    assert sorted((o.variant, o.seed) for o in robust.outcomes) == [("a", 0), ("a", 0), ("a", 1), ("a", 2)]
    assert not any(r.copied_from for r in load_results(tmp_path / "robust", "grid").runs)


def test_cli_copies_from_the_quick_folder_unless_no_reuse(tmp_path, capsys, monkeypatch):
    from bnlab import cli
    import bnlab.experiments as registry

    registry.all_experiments()
    exp = Experiment(name="gridcli", description="a grid",
                     base=FROZEN.__class__(**{**FROZEN.__dict__, "steps": 4}), variants={"a": {}},
                     settings={"as declared": {}, "lr 0.1": {"lr": 0.1}}, robust_seeds=(0,))
    monkeypatch.setitem(registry._REGISTRY, "gridcli", exp)
    out = str(tmp_path / "runs")
    assert cli.main(["run", "gridcli", "--profile", "quick", "--out", out, "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "gridcli", "--profile", "robust", "--out", out, "--quiet", "--threads", "1",
                     "--no-reuse"]) == 0
    text = capsys.readouterr().out
    assert "4 runs (0 done, 0 to resume, 4 new)" in text and "copied" not in text
    assert cli.main(["run", "gridcli", "--profile", "robust", "--out", str(tmp_path / "other"), "--quiet",
                     "--threads", "1"]) == 0  # no quick folder next to it: nothing to copy
    capsys.readouterr()
    import shutil
    shutil.copytree(tmp_path / "runs" / "quick", tmp_path / "third" / "quick")
    assert cli.main(["run", "gridcli", "--profile", "robust", "--out", str(tmp_path / "third"), "--quiet",
                     "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "4 runs (0 done, 3 copied, 0 to resume, 1 new)" in text
