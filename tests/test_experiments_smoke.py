"""Every registered experiment's smoke profile runs end to end through the CLI (seconds each)."""

from __future__ import annotations

import json

import pytest

import bnlab.experiments as registry
from bnlab.cli import main
from bnlab.train.results import load_results

NAMES = registry.experiment_names()


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
    assert all(r.status in ("done", "diverged") for r in results.runs)
    if exp.verdict is not None:
        rows = json.loads((tmp_path / name / "verdict.json").read_text())
        for row in rows:
            assert {"claim", "paper", "ours", "seeds", "passed", "why"} <= set(row)
    if exp.plots is not None:
        assert list((tmp_path / name / "figures").iterdir())
