"""The HTML report: built from stored runs only, self-contained, rendered by a real browser.

Runs come from the "ioffe_mnist" experiment at the smoke profile (scikit-learn digits, a few seconds). The
browser checks load the page in headless Chromium: a screenshot that is not blank, the DOM after
load (verdict table, one data: <img> per figure), no console messages and no request from the page to
anything but the file itself (Chromium's net log). Both detectors are first shown to fire on a page
that does make a request and log an error, so a silently broken check cannot pass.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bnlab.errors import BnlabError, ConfigError, DataNotFoundError
from bnlab.experiments import get_experiment
from bnlab.report import build_report, collect, summary_text
from bnlab.report.plots import mean_spread, new_figure, read_caption, save_figure
from bnlab.train.runner import run_experiment

SMOKE_SEEDS = (0, 1)


def _quiet(_: str) -> None:
    pass


def _run_smoke(out: Path, seeds=SMOKE_SEEDS, overrides=None) -> None:
    run_experiment(get_experiment("ioffe_mnist"), "smoke", out=out, seeds=seeds, overrides=overrides, quiet=True,
                   echo=_quiet)


@pytest.fixture(scope="module")
def mnist_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    _run_smoke(out)
    return out


def _copy_runs(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report*.html", "figures"))
    return dst


def _make_killed_run(out: Path, seed: int = 7) -> Path:
    """A run that was killed mid-way: config/env/metrics written, no done marker, a torn last line."""
    src = sorted((out / "ioffe_mnist").glob("bn-*/seed0"))[0]
    dst = src.parent / f"seed{seed}"
    dst.mkdir()
    meta = json.loads((src / "config.json").read_text())
    meta["seed"] = seed
    (dst / "config.json").write_text(json.dumps(meta))
    shutil.copy(src / "env.json", dst / "env.json")
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[:12]) + '{"step": 12, "spl')
    return dst


@pytest.fixture(scope="module")
def mixed_out(mnist_out, tmp_path_factory) -> Path:
    """smoke runs + the same variants diverged (lr=1e38 overflows at once) + one killed run."""
    out = _copy_runs(mnist_out, tmp_path_factory.mktemp("mixed") / "runs")
    _run_smoke(out, seeds=(3,), overrides={"lr": "1e38"})
    _make_killed_run(out)
    return out


def _strip_time(text: str) -> str:
    return re.sub(r"<time>.*?</time>", "<time></time>", text)


def _img_srcs(text: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)


# --- the page itself -------------------------------------------------------------------------------

def test_report_is_self_contained(mnist_out):
    report = collect(mnist_out)
    path = build_report(mnist_out)
    assert path == mnist_out / "report.html"
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I), "external reference"
    assert not re.search(r"url\(", text), "CSS must not load anything"
    srcs = _img_srcs(text)
    n_figures = sum(len(s.figures) for s in report.sections)
    assert n_figures >= 1 and len(srcs) == n_figures
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # the content the page promises
    assert 'id="summary"' in text and "<th>claim</th>" in text
    assert "PASS" in text or "FAIL" in text or "UNDECIDED" in text
    exp = get_experiment("ioffe_mnist")
    for needle in (exp.description, exp.paper, "sigmoid_input", "probe", "Environment",
                   "torch", "git commit", "full config of"):
        assert needle.replace("&", "&amp;") in text, needle
    assert "deviations from the paper" in text.lower() and "else Fashion-MNIST" in text
    assert os.stat(path).st_mode & 0o044, "the report is readable by others (not mkstemp's 0600)"
    assert not list(mnist_out.glob(".report.html.*")), "no temporary file left behind"


def test_rebuild_is_identical_but_for_the_time(mnist_out, tmp_path):
    a = build_report(mnist_out, output=tmp_path / "a.html").read_text(encoding="utf-8")
    figs_a = {p.name: p.read_bytes() for p in (mnist_out / "ioffe_mnist" / "figures").iterdir()}
    b = build_report(mnist_out, output=tmp_path / "b.html").read_text(encoding="utf-8")
    figs_b = {p.name: p.read_bytes() for p in (mnist_out / "ioffe_mnist" / "figures").iterdir()}
    assert "<time>" in a and _strip_time(a) == _strip_time(b)
    assert figs_a == figs_b


def _chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
               None)
    if exe is None:
        msg = "headless Chromium is needed to check that the report renders: run `apt-get install chromium`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _browse(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _page_requests(net_log: Path) -> list[str]:
    """URLs the page (top frame file://) requested, from Chromium's net log; Chromium's own
    background requests have another network isolation key and are not counted."""
    data = json.loads(net_log.read_text())
    start = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in data["events"]
            if e.get("type") == start and "file://" in str(e.get("params", {}).get("network_isolation_key"))]


def _console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def _load(path: Path, tmp: Path) -> tuple[str, list[str], list[str]]:
    """(DOM after load, console lines, requests other than file:/data:) of ``path``."""
    net_log = tmp / f"{path.stem}-netlog.json"
    proc = _browse(path.as_uri(), tmp, "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}",
                   "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    external = [u for u in _page_requests(net_log) if not u.startswith(("file:", "data:"))]
    return proc.stdout, _console_lines(proc.stderr), external


def test_browser_checks_detect_requests_and_console_errors(tmp_path):
    # Port 9 (discard) on localhost: the request is attempted and fails at once, nothing leaves the machine.
    page = tmp_path / "control.html"
    page.write_text('<html><body><p>x</p><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("control error")</script></body></html>')
    dom, console, external = _load(page, tmp_path)
    assert "<p>x</p>" in dom
    assert any("control error" in ln for ln in console), console
    assert any(u.startswith("http://127.0.0.1:9/") for u in external), external


def test_report_renders_in_chromium(mnist_out, tmp_path):
    import matplotlib.image as mpimg

    report = build_report(mnist_out, output=tmp_path / "report.html")
    n_figures = sum(len(s.figures) for s in collect(mnist_out).sections)

    dom, console, external = _load(report, tmp_path)
    assert console == [], console
    assert external == [], external
    assert 'id="summary"' in dom and "<th>claim</th>" in dom and "bnlab report" in dom
    srcs = _img_srcs(dom)
    assert len(srcs) == n_figures and all(s.startswith("data:image/png;base64,") for s in srcs)

    shot = tmp_path / "shot.png"
    proc = _browse(report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]  # (2000, 1280, 3) floats in [0, 1]
    assert img.shape[:2] == (2000, 1280)
    non_white = (img < 0.9).any(axis=-1)
    assert non_white.mean() > 0.02, "screenshot is (almost) blank"
    assert img.std() > 0.05
    # colour from the figures and the PASS/FAIL badges, not just black text
    assert (img.max(axis=-1) - img.min(axis=-1) > 0.3).mean() > 0.001


# --- runs that did not go to plan -------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:batch norm got a training batch")
def test_report_marks_diverged_and_incomplete_runs(mixed_out):
    report = collect(mixed_out)
    (section,) = report.sections
    assert {r.status for r in section.results.runs} == {"done", "diverged", "incomplete"}
    assert len(section.diverged) == 2 and len(section.incomplete) == 1
    # overridden-config runs are not averaged into the verdict
    assert all(r.config.lr == 1.0 for r in section.finished.runs)
    text = build_report(mixed_out).read_text(encoding="utf-8")
    assert "Diverged runs" in text and "diverged at step 1" in text
    assert "Incomplete runs" in text and "seed 7: reached step" in text
    assert "lr=1e+38 (declared 1)" in text
    assert _img_srcs(text)


@pytest.mark.filterwarnings("ignore:batch norm got a training batch")
def test_report_with_only_diverged_runs(tmp_path):
    _run_smoke(tmp_path, seeds=(0,), overrides={"lr": "1e38"})
    report = collect(tmp_path)
    (section,) = report.sections
    assert all(r.status == "diverged" for r in section.results.runs)
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert text.count('class="status-diverged"') >= 2
    # the claims cannot be decided without finished runs of both variants
    assert report.rows and all(r["passed"] is None for r in report.rows)
    assert "UNDECIDED" in summary_text(tmp_path / "report.html", report.rows)


def test_all_runs_incomplete(mnist_out, tmp_path):
    out = tmp_path / "runs"
    (out / "ioffe_mnist").mkdir(parents=True)
    killed = _make_killed_run(_copy_runs(mnist_out, tmp_path / "src"))
    shutil.copytree(killed.parent, out / "ioffe_mnist" / killed.parent.name,
                    ignore=lambda d, names: [n for n in names if n.startswith("seed") and n != killed.name])
    report = collect(out)
    assert len(report.sections[0].incomplete) == 1 and report.rows == []
    text = build_report(out).read_text(encoding="utf-8")
    assert "no finished run yet" in text and "Incomplete runs" in text


def test_failing_verdict_and_plots_are_shown_not_raised(mnist_out, tmp_path):
    def bad_verdict(results):
        raise RuntimeError("verdict <b>exploded</b>")

    def bad_plots(results, out_dir):
        raise ValueError("plot exploded")

    exp = dataclasses.replace(get_experiment("ioffe_mnist"), verdict=bad_verdict, plots=bad_plots)
    report = collect(mnist_out, [exp])
    (row,) = report.rows
    assert row["error"] and row["passed"] is None and "exploded" in row["why"]
    text = build_report(mnist_out, [exp], output=tmp_path / "r.html").read_text(encoding="utf-8")
    assert "The verdict function raised an error" in text and "The plot function raised an error" in text
    assert "verdict &lt;b&gt;exploded&lt;/b&gt;" in text and "<b>exploded</b>" not in text
    assert "ERROR" in text and "Settings" in text  # the rest of the section is still there
    summary = summary_text(tmp_path / "r.html", report.rows)
    assert "1 verdict error" in summary and "ERROR" in summary


def test_text_from_experiments_is_escaped(mnist_out, tmp_path):
    def verdict(results):
        return [{"claim": "<script>alert(1)</script> & co", "paper": "a < b", "ours": [0.5, 0.7],
                 "seeds": 2, "passed": False, "why": '"quoted"'}]

    exp = dataclasses.replace(get_experiment("ioffe_mnist"), verdict=verdict,
                              notes="<img src=x onerror=alert(1)>\n\n- first\n- second")
    text = build_report(mnist_out, [exp], output=tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text
    assert "<img src=x" not in text and "<li>first</li>" in text
    assert "0.6 ± 0.1414 (mean ± std, n=2)" in text
    assert "FAIL" in summary_text(tmp_path / "r.html", collect(mnist_out, [exp]).rows)


def test_definitions_attribute_and_unregistered_experiment(mnist_out, tmp_path):
    exp = get_experiment("ioffe_mnist")
    object.__setattr__(exp, "definitions", [("drift D", "mean |Δμ| over units (Ioffe Eq. 3)", "1 forward")])
    try:
        text = build_report(mnist_out, output=tmp_path / "r.html").read_text(encoding="utf-8")
    finally:
        object.__delattr__(exp, "definitions")
    assert "drift D" in text and "Ioffe Eq. 3" in text

    # runs whose experiment is no longer registered: settings, runs and generic curves, no verdict
    out = tmp_path / "runs"
    shutil.copytree(mnist_out / "ioffe_mnist", out / "old_name", ignore=shutil.ignore_patterns("figures"))
    report = collect(out)
    (section,) = report.sections
    assert section.experiment is None and report.rows == []
    assert [f.path.name for f in section.figures] == ["old_name_curves.png"]
    text = build_report(out).read_text(encoding="utf-8")
    assert "not a registered experiment" in text and len(_img_srcs(text)) == 1


def test_dataset_fallback_is_a_stated_deviation(mnist_out, tmp_path):
    out = _copy_runs(mnist_out, tmp_path / "runs")
    for env_path in (out / "ioffe_mnist").glob("*/seed*/env.json"):
        env = json.loads(env_path.read_text())
        env["dataset"].update(requested="mnist", used="fashion_mnist",
                              note="MNIST not found; Fashion-MNIST (same format) used instead")
        env_path.write_text(json.dumps(env))
    text = build_report(out).read_text(encoding="utf-8")
    assert "Dataset fallback" in text and "MNIST not found; Fashion-MNIST (same format) used instead" in text


def test_unreadable_run_dir_is_named_not_fatal(mnist_out, tmp_path):
    out = _copy_runs(mnist_out, tmp_path / "runs")
    bad = sorted((out / "ioffe_mnist").glob("baseline-*/seed1"))[0]
    (bad / "config.json").write_text("{not json")
    report = collect(out)
    (section,) = report.sections
    assert len(section.results.runs) == 2 * len(SMOKE_SEEDS) - 1
    assert any(str(bad) in n and "cannot be read" in n for n in section.notes)
    assert report.rows and "cannot be read" in build_report(out).read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", ["missing", "empty", "no_runs"])
def test_nothing_to_report_is_a_clear_error(tmp_path, kind):
    out = tmp_path / "runs"
    if kind != "missing":
        out.mkdir()
    if kind == "no_runs":
        (out / "ioffe_mnist" / "figures").mkdir(parents=True)
        (out / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError) as info:
        build_report(out)
    msg = str(info.value)
    assert str(out) in msg and "bnlab run" in msg
    assert isinstance(info.value, BnlabError)  # the CLI prints it without a traceback
    assert not (out / "report.html").exists()


def test_requested_experiment_without_runs(mnist_out, tmp_path):
    other = dataclasses.replace(get_experiment("ioffe_mnist"), name="other_exp")  # declared, never run here
    with pytest.raises(DataNotFoundError, match="no runs of other_exp") as info:
        build_report(mnist_out, [other], output=tmp_path / "r.html")
    assert "bnlab run other_exp" in str(info.value)
    text = build_report(mnist_out, ["ioffe_mnist", other], output=tmp_path / "r.html").read_text()
    assert "Requested but without runs" in text and "other_exp" in text
    with pytest.raises(ConfigError, match="unknown experiment 'dmeo'"):
        build_report(mnist_out, ["dmeo"], output=tmp_path / "r.html")


def test_summary_text_counts():
    rows = [{"claim": "a", "passed": True}, {"claim": "b", "passed": False, "experiment": "x", "profile": "quick"},
            {"claim": "c", "passed": None}, {"claim": "d", "passed": None, "error": "Traceback", "why": "boom"}]
    text = summary_text("out/report.html", rows)
    assert str(Path("out/report.html").resolve()) in text
    assert "1 PASS, 1 FAIL, 1 UNDECIDED, 1 verdict error (4 claims)" in text
    assert "FAIL      x/quick: b" in text and "boom" in text
    assert "none" in summary_text("r.html", [])


# --- plot helpers --------------------------------------------------------------------------------------

def test_mean_spread_aligns_seeds_and_marks_divergence(tmp_path):
    fig, ax = new_figure()
    a = (np.array([0, 10, 20, 30]), np.array([1.0, 2.0, 3.0, 4.0]))
    b = (np.array([0, 10, 20, 30]), np.array([3.0, 4.0, 5.0, 6.0]))
    c = (np.array([0, 10]), np.array([2.0, np.nan]), 10)  # diverged at step 10
    spread = mean_spread(ax, [a, b, c], label="bn")
    np.testing.assert_array_equal(spread.steps, [0, 10, 20, 30])
    np.testing.assert_allclose(spread.mean, [2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(spread.lo, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(spread.hi, [3.0, 4.0, 5.0, 6.0])
    np.testing.assert_array_equal(spread.count, [3, 2, 2, 2])
    assert spread.diverged == [(10, 2.0)]
    label = ax.get_legend_handles_labels()[1][0]
    assert "3 seeds" in label and "1 diverged" in label

    std = mean_spread(ax, [a, b], label="std", band="std")
    np.testing.assert_allclose(std.hi - std.mean, np.sqrt(2.0))
    with pytest.raises(ValueError, match="band"):
        mean_spread(ax, [a], label="x", band="iqr")

    path = save_figure(fig, tmp_path / "f.png", caption="Accuracy.")
    caption = read_caption(path)
    assert caption.startswith("Accuracy.") and "min–max over seeds" in caption and "diverged" in caption
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in path.read_bytes()


def test_save_figure_is_reproducible_and_atomic(tmp_path):
    def draw() -> bytes:
        fig, ax = new_figure()
        mean_spread(ax, [([0, 1, 2], [0.1, 0.5, 0.9]), ([0, 1, 2], [0.2, 0.4, 0.8])], label="x")
        ax.legend()
        return save_figure(fig, tmp_path / "g.png").read_bytes()

    assert draw() == draw()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.caption.txt", "g.png"]
    assert len(draw()) < 60_000, "figures are inlined in the report: keep them small"


def test_subfigure_notes_reach_the_saved_caption(tmp_path):
    fig, _ = new_figure()
    fig.clear()
    sub = fig.subfigures(1, 2)[1]
    ax = sub.subplots()
    mean_spread(ax, [([0, 1], [1.0, 2.0]), ([0, 1], [2.0, 3.0])], label="x", band="std")
    assert "±1 std over seeds" in read_caption(save_figure(fig, tmp_path / "s.png"))


def test_mean_spread_reads_run_results(mnist_out):
    from bnlab.train.results import load_results

    runs = load_results(mnist_out, "ioffe_mnist").by_variant()["bn"]
    fig, ax = new_figure()
    spread = mean_spread(ax, runs, label="bn", split="eval", key="acc")
    assert spread.n_seeds == len(SMOKE_SEEDS) and np.isfinite(spread.mean).all()
    probe = mean_spread(ax, runs, label="p50", probe="sigmoid_input", key="p50_unit0")
    assert probe.steps.size >= 2
