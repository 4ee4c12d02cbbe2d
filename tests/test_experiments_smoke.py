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


def _imports(path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included), and every string
    passed to importlib.import_module / __import__."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def test_imports_point_downwards_from_the_experiments(tmp_path):
    """Experiments sit below the report: no module under bnlab/experiments imports bnlab.report,
    bnlab.cli or matplotlib (figures are declared as data and drawn by the report)."""
    from pathlib import Path

    root = Path(registry.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert {"ioffe_mnist.py", "ioffe_lr_study.py", "santurkar_dln.py", "figures.py"} <= {f.name for f in files}
    bad = {str(f.relative_to(root)): sorted(m for m in _imports(f)
                                            if m.split(".")[0] == "matplotlib"
                                            or m.startswith(("bnlab.report", "bnlab.cli")))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad
    # the check itself: a file that imports the report inside a function is caught
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from bnlab.report.plots import save_figure\n    import matplotlib.pyplot\n")
    assert {"bnlab.report.plots", "matplotlib.pyplot"} <= _imports(probe)
