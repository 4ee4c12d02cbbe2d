"""The report over a robust run (several settings), run statuses (done/diverged/collapsed/incomplete),
what a profile folder's report covers, and the texts a reader sees. Tiny real runs (digits, 4 steps)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import bnlab.experiments as registry
from bnlab.cli import main
from bnlab.experiments.base import Experiment
from bnlab.experiments.figures import Curve, FigureSpec, Panel
from bnlab.report.build import collect, write_report
from bnlab.train.config import TrainConfig
from bnlab.train.results import load_results
from bnlab.train.runner import run_experiment

TINY = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(8,), batch_size=32, lr=0.1, steps=4,
                   eval_every=2, eval_subset=64, log_every=1, checkpoint_every=4, probe_schedule="none")


def _grid_experiment(seen: list) -> Experiment:
    def figures(results):  # what the report hands to the figures: recorded, one simple curve drawn
        seen.append([(r.setting, r.seed, r.config.lr) for r in results.runs])
        return (FigureSpec("acc", f"{len(results.runs)} runs", (Panel("p", "step", "acc", (
            Curve("a", "a", split="eval", key="acc"),)),)),)

    return Experiment(name="grid2", description="a grid of two settings", base=TINY, variants={"a": {}},
                      settings={"as declared": {}, "lr 0.3": {"lr": 0.3}}, robust_seeds=(5, 6),
                      figures=figures, verdict=lambda results: [])


@pytest.fixture(scope="module")
def robust_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robust")
    run_experiment(_grid_experiment([]), "robust", out=out, quiet=True, threads=1, echo=lambda *_: None)
    return out


def test_figures_use_the_primary_setting_only(robust_out):
    seen: list = []
    exp = _grid_experiment(seen)
    assert len(load_results(robust_out, "grid2").runs) == 5  # 3 seeds primary + 2 of "lr 0.3"
    report = collect(robust_out, [exp])
    assert seen == [[("as declared", s, 0.1) for s in (0, 1, 2)]]  # never the lr 0.3 runs
    (section,) = report.sections
    assert any("primary robustness setting (as declared) only: 3 finished runs" in n for n in section.notes)
    # the caption computed from the runs counts the primary setting's runs
    assert section.figures and section.figures[0].caption.startswith("3 runs ")


def _set_status(run_dir: Path, status: str) -> None:
    done = json.loads((run_dir / "done").read_text())
    done["status"] = status
    (run_dir / "done").write_text(json.dumps(done))


def test_collapsed_runs_are_counted_and_shown_everywhere(robust_out, tmp_path):
    import shutil

    out = tmp_path / "runs"
    shutil.copytree(robust_out, out)
    runs = sorted((out / "grid2").glob("*/seed*"))
    _set_status(runs[0], "collapsed")
    (runs[1] / "done").unlink()  # killed: incomplete
    report = collect(out, [_grid_experiment([])])
    write_report(report)
    html = report.output.read_text(encoding="utf-8")
    assert "5 runs: 3 done, 0 diverged, 1 collapsed, 1 incomplete." in html
    # Results over seeds: a column per status; Runs table and Settings name the collapsed seed
    assert "<th>done</th><th>diverged</th><th>collapsed</th><th>incomplete</th>" in html
    assert '<span class="status-collapsed">collapsed</span>' in html
    assert re.search(r'<span class="status-collapsed">\d+ \(collapsed\)</span>', html)
    assert html.count("(no done marker") == 2  # the killed run (its note and its row), never the collapsed one


@pytest.fixture
def two_registered(monkeypatch):
    registry.all_experiments()
    for name in ("tiny_one", "tiny_two"):
        monkeypatch.setitem(registry._REGISTRY, name, Experiment(name=name, description=name, base=TINY))


def test_profile_report_covers_every_experiment_whichever_command_wrote_it(tmp_path, capsys, two_registered):
    out = tmp_path / "runs"
    common = ["--profile", "smoke", "--out", str(out), "--quiet"]
    assert main(["reproduce", "tiny_one", "tiny_two", *common]) == 0
    assert main(["reproduce", "tiny_one", *common]) == 0  # a later command for one experiment only
    html = (out / "smoke" / "report.html").read_text(encoding="utf-8")
    assert 'id="exp-tiny_one-smoke"' in html and 'id="exp-tiny_two-smoke"' in html
    capsys.readouterr()


@pytest.mark.parametrize("row, ci_line, estimate_line", [
    ({"estimate": 0.25, "no_ci_reason": "1 seed: no interval can be formed (needs >= 2)"},
     "CI:    none: 1 seed: no interval can be formed (needs >= 2)", "estimate: 0.25"),
    ({"estimate": 0.8047}, "CI:    none: the verdict gives no interval for this estimate", "estimate: 0.8047"),
    ({"estimate": 0.08123, "ci": [0.05234, 0.11012], "ci_level": 0.95}, "CI:    0.081 [0.052, 0.110] (95% CI)", None),
])
def test_console_ci_line_is_an_interval_or_none_with_a_reason(capsys, row, ci_line, estimate_line):
    from bnlab.cli import print_verdict

    print_verdict([{"claim": "c", "ours": "o", "outcome": "TIE", "n_seeds": 1, **row}])
    out = capsys.readouterr().out
    (line,) = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("CI:")]
    assert line == ci_line
    assert re.fullmatch(r"CI:\s+(none: .+|\S+ \[\S+, \S+\] \(95% CI\))", line)
    if estimate_line:
        assert estimate_line in out


def test_report_of_a_wrong_folder_suggests_commands_that_fit_the_layout(robust_out, tmp_path, capsys):
    exp_dir = robust_out / "grid2"  # one experiment's folder, not a folder of experiments
    assert main(["report", str(exp_dir)]) == 2
    err = capsys.readouterr().err
    assert f"`bnlab report {robust_out}`" in err and f"--out {exp_dir}" not in err
    profile_dir = tmp_path / "runs" / "smoke"  # an empty profile folder: runs go to its parent
    profile_dir.mkdir(parents=True)
    assert main(["report", str(profile_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--profile smoke --out {tmp_path / 'runs'}`" in err and f"--out {profile_dir}" not in err


def test_css_wraps_at_words_and_wide_tables_scroll_in_their_own_box(robust_out, tmp_path):
    from bnlab.report.html import CSS

    assert "anywhere" not in CSS and "break-all" not in CSS and "word-break" not in CSS
    rules = {k.strip(): v for k, v in re.findall(r"([^{}]+)\{([^}]*)\}", CSS)}
    assert "overflow-wrap: break-word" in rules["th, td"]
    assert "white-space: nowrap" in rules[".badge"]
    assert "overflow-x: auto" in rules[".table-wrap"]
    report = collect(robust_out, [_grid_experiment([])], tmp_path / "r.html")
    html = write_report(report).read_text(encoding="utf-8")
    tables = [m.start() for m in re.finditer("<table", html)]
    # the report's own tables sit in a scrolling box; Markdown tables (docstrings, claims) scroll themselves
    assert tables and all(html[:t].endswith('<div class="table-wrap">') or html[t:].startswith("<table>\n<thead>")
                          for t in tables)
    assert "overflow-x: auto" in rules[".doc table, .claims-doc table, td table"]


def test_grid_settings_are_labelled_as_such_not_as_set_overrides(robust_out, tmp_path):
    html = write_report(collect(robust_out, [_grid_experiment([])], tmp_path / "r.html")).read_text(encoding="utf-8")
    assert "<strong>Robustness-grid setting</strong> <em>lr 0.3</em>" in html
    assert "lr=0.3 (primary setting: 0.1)" in html
    assert "Overridden settings" not in html  # no --set was given


def test_report_texts_are_clean_sentences():
    from types import SimpleNamespace

    from bnlab.report.html import _binarize_caveat, _declared_text, _note_html

    stored = ("To use CIFAR-10: extract it with `mkdir -p /c && tar xzf c.tar.gz -C /c` (a torchvision "
              "download works too).; binarize=true applies to MNIST only, so Fashion-MNIST keeps its grey levels.")
    out = str(_note_html(stored))
    assert "`" not in out and not re.search(r"[.)]\s*;", out)
    assert "<code>mkdir -p /c &amp;&amp; tar xzf c.tar.gz -C /c</code>" in out
    assert "works too). binarize=true applies to MNIST only" in out
    assert str(_note_html("<b>x</b>")) == "&lt;b&gt;x&lt;/b&gt;"  # still escaped
    assert _declared_text("init_std", None) == "the model's default, N(0, 1/fan_in)"
    assert _declared_text("lr", 0.5) == "0.5"
    fashion = SimpleNamespace(dataset={"used": "fashion_mnist"})
    mnist = SimpleNamespace(dataset={"used": "mnist"})
    assert _binarize_caveat("binarize", True, [fashion, mnist]) == \
        " (applies to MNIST only: Fashion-MNIST kept its grey levels)"
    assert _binarize_caveat("binarize", True, [mnist]) == "" and _binarize_caveat("binarize", False, [fashion]) == ""


def test_probe_cost_text_matches_its_definition_and_unused_fields_are_marked(capsys):
    from types import SimpleNamespace

    from bnlab.experiments import get_experiment
    from bnlab.report.html import _definitions_view

    exp = get_experiment("ioffe_mnist")
    (probe,) = exp.probes
    assert "no backward" in (probe.fn.__doc__ or "") and not probe.uses_probe_batch
    rows = _definitions_view(SimpleNamespace(experiment=exp, results=SimpleNamespace(runs=[])))
    cost = next(r["cost"] for r in rows if r["quantity"] == "probe: sigmoid_input")
    assert "forward only, no backward" in cost and "1.6 forward+backward pass equivalents" in cost
    assert main(["run", "ioffe_mnist", "--show-config"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("probe_batch_size"))
    assert line.endswith("(unused by this experiment's probes)")


def test_a_count_of_seeds_is_shown_as_a_count_not_as_a_bare_fraction():
    """A per-seed-outcome row's estimate is the fraction of seeds (1.00); the compact table shows
    "5/5 seeds" so that it cannot be read as an accuracy; paired rows keep their signed number."""
    from bnlab.report.verdicts import estimate_text

    row = {"kind": "seed_count", "estimate": 0.8, "ci": [0.28, 0.99],
           "per_seed": [{"seed": s, "outcome": s != 0} for s in range(5)]}
    assert estimate_text(row) == "4/5 seeds"
    paired = {"estimate": 0.054, "ci": [0.008, 0.101], "per_seed": [{"seed": 0, "diff": 0.05}]}
    assert estimate_text(paired) == "+0.054"


def test_dataset_note_keeps_its_clause_breaks():
    """Only an old ".;" sentence join is cleaned; "...mnist); used ..." keeps its semicolon."""
    from bnlab.report.html import _note_html

    assert str(_note_html("searched /a, /b); used Fashion-MNIST.; Next")) == "searched /a, /b); used Fashion-MNIST. Next"
