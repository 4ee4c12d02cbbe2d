"""`bnlab reproduce` and `bnlab report` from the command line: the main job, end to end (smoke)."""
from __future__ import annotations

import json
import re

from bnlab.cli import main


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
    report = out / "report.html"
    assert f"report: {report}" in first and "verdicts:" in first
    for name in ("ioffe_mnist", "ioffe_lr_study"):
        rows = json.loads((out / name / "verdict.json").read_text())
        assert rows and all({"claim", "paper", "ours", "seeds", "passed", "why"} <= set(r) for r in rows)
    html = report.read_text(encoding="utf-8")
    assert "Ioffe Fig. 3: steps to reach the Baseline max" in html  # the paper's table
    metrics = {p: p.read_bytes() for p in out.glob("*/*/seed*/metrics.jsonl")}

    code, second, _ = _cli(capsys, "reproduce", "ioffe", "--profile", "smoke", "--out", str(out), "--quiet")
    assert code == 0
    assert second.count("nothing to do") == 2 and " 0 new" in second
    assert {p: p.read_bytes() for p in out.glob("*/*/seed*/metrics.jsonl")} == metrics  # no training
    assert _without_time(report.read_text(encoding="utf-8")) == _without_time(html)

    # `bnlab report` rebuilds the same page from the stored runs only
    code, text, _ = _cli(capsys, "report", str(out), "-o", str(tmp_path / "again.html"))
    assert code == 0 and "again.html" in text
    assert _without_time((tmp_path / "again.html").read_text(encoding="utf-8")) == _without_time(html)


def test_report_of_an_empty_directory_is_one_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "report", str(tmp_path / "empty"))
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "empty") in err and "bnlab run" in err


def test_unknown_reproduce_target_lists_groups_and_experiments(capsys):
    code, _, err = _cli(capsys, "reproduce", "imagenet", "--profile", "smoke")
    assert code == 2 and "unknown experiment or group 'imagenet'" in err and "ioffe" in err and "ioffe_mnist" in err
