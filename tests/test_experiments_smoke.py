"""Every registered experiment's smoke profile runs end to end through the CLI (seconds each)."""

from __future__ import annotations

import json

import pytest

import bnlab.experiments as registry
from bnlab.cli import main
from bnlab.train.results import load_results

NAMES = registry.experiment_names()
# The verdict row schema shared with the report and the CLI (docs/claims.md explains each key).
SCHEMA_KEYS = {"claim_id", "claim", "paper", "ours", "dataset", "outcome", "rule", "statistic", "estimate",
               "ci", "ci_level", "ci_method", "no_ci_reason", "per_seed", "n_seeds", "n_diverged",
               "n_collapsed", "robustness", "passed"}


def test_registry_is_not_empty():
    assert "ioffe_mnist" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_smoke_profile_runs(name, tmp_path, capsys):
    exp = registry.get_experiment(name)
    assert exp.estimate_cost("smoke") < 60, "a smoke profile must take seconds"
    code = main(["run", name, "--profile", "smoke", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    tmp_path = tmp_path / "smoke"  # the CLI keeps each profile's runs in <out>/<profile>/
    results = load_results(tmp_path, name, profile="smoke")
    n_runs = len(exp.variants) * len(exp.default_seeds("smoke"))
    assert len(results.runs) == n_runs
    assert all(r.status in ("done", "diverged", "collapsed") for r in results.runs)
    if exp.verdict is not None:
        rows = json.loads((tmp_path / name / "verdict.json").read_text())
        assert rows, "a verdict function returns one row per claim"
        for row in rows:
            assert SCHEMA_KEYS <= set(row), SCHEMA_KEYS - set(row)
            assert row["outcome"] in ("PASS", "FAIL", "TIE", "UNDECIDED")
            assert row["ci"] is not None or row["no_ci_reason"], "a row without a CI says why"
            assert row["passed"] == {"PASS": True, "FAIL": False}.get(row["outcome"])
            assert len(row["per_seed"]) == row["n_seeds"] and row["dataset"]
    if exp.plots is not None or exp.figures:
        assert list((tmp_path / name / "figures").iterdir())
