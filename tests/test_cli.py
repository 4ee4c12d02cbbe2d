"""The bnlab command: list, run, doctor, and one clear message (exit 2, no traceback) per bad input.

Every mistake is caught before the first line of output and before anything is created on disk;
runs of each profile live apart (``<out>/<profile>/<experiment>/``)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bnlab.experiments as registry
from bnlab.cli import main
from bnlab.errors import ConfigError
from bnlab.experiments.base import Experiment
from bnlab.train.config import TrainConfig, field_names
from bnlab.train.tensorboard import tensorboard_available

SMOKE = ["--profile", "smoke", "--quiet", "--threads", "1"]
TINY = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(16, 16), batch_size=32, lr=0.2, steps=40,
                   eval_every=20, eval_subset=100, probe_schedule="none")


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


def bnlab(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_clear_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("bnlab: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def with_experiment(monkeypatch):
    """Register a temporary experiment for one test."""
    registry.all_experiments()

    def add(exp: Experiment) -> Experiment:
        monkeypatch.setitem(registry._REGISTRY, exp.name, exp)
        return exp

    return add


def test_list_shows_experiments_and_costs(capsys):
    code, out, _ = bnlab(capsys, "list")
    assert code == 0
    assert "smoke" in out and "quick" in out and "paper" in out
    for exp in registry.all_experiments():
        line = next(line for line in out.splitlines() if line.startswith(exp.name + " "))
        assert exp.description in line


def test_run_smoke_prints_cost_summary_and_verdict(tmp_path, capsys):
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path))
    assert code == 0
    assert "estimated cost:" in out and "2 done, 0 diverged" in out
    root = tmp_path / "smoke" / "ioffe_mnist"  # profiles live apart
    verdict = json.loads((root / "verdict.json").read_text())
    assert {"claim", "paper", "ours", "passed", "dataset"} <= set(verdict[0])
    # a smoke run decides no claim; what the rule alone gives is kept
    assert all(r["outcome"] == "UNDECIDED" and r["passed"] is None and r["computed_outcome"] for r in verdict)
    assert "UNDECIDED" in out and "undecided: smoke run: checks the pipeline, decides nothing" in out
    assert "the rule alone" not in out and ".;" not in out
    figures = sorted(p.name for p in (root / "figures").iterdir())
    assert "ioffe_mnist_accuracy.svg" in figures and not [f for f in figures if f.endswith(".png")]
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path))
    assert code == 0 and "nothing to do: all 2 runs are done" in out
    # an --out that names the profile's folder is the same place; another profile's folder is refused
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path / "smoke"))
    assert code == 0 and "nothing to do" in out
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "quick", "--out", str(tmp_path / "smoke"))
    assert_one_clear_error(code, err, "folder of the smoke profile", f"--out {tmp_path}")


def test_profiles_live_apart_and_smoke_never_decides(tmp_path, capsys, with_experiment):
    """A smoke run next to a quick run: separate folders, separate reports, only quick decides."""
    def verdict(results):
        return [{"claim_id": "T.1", "claim": "BN trains", "paper": "", "ours": "ok", "outcome": "PASS",
                 "passed": True, "n_seeds": len(results.runs)}]

    with_experiment(Experiment(name="_test_profiles", description="tiny", base=TINY,
                               variants={"bn": {"norm": "batch"}}, verdict=verdict))
    for profile in ("smoke", "quick"):
        code, out, _ = bnlab(capsys, "run", "_test_profiles", "--profile", profile, "--quiet", "--threads", "1",
                             "--seeds", "0", "--out", str(tmp_path))
        assert code == 0, out
    smoke = json.loads((tmp_path / "smoke" / "_test_profiles" / "verdict.json").read_text())
    quick = json.loads((tmp_path / "quick" / "_test_profiles" / "verdict.json").read_text())
    assert [r["outcome"] for r in smoke] == ["UNDECIDED"] and [r["outcome"] for r in quick] == ["PASS"]
    code, out, _ = bnlab(capsys, "report", str(tmp_path))
    assert code == 0 and "[smoke]" in out and "[quick]" in out
    quick_html = (tmp_path / "quick" / "report.html").read_text(encoding="utf-8")
    assert "/smoke/" not in quick_html and "smoke</span>" not in quick_html and "(quick profile" in quick_html
    smoke_html = (tmp_path / "smoke" / "report.html").read_text(encoding="utf-8")
    assert "PASS</span> 0" in smoke_html  # the counts badge: no claim decided by smoke runs
    code, _, err = bnlab(capsys, "report", str(tmp_path), "-o", str(tmp_path / "x.html"))
    assert_one_clear_error(code, err, "several profiles", "--profile")
    code, out, _ = bnlab(capsys, "report", str(tmp_path), "--profile", "quick", "-o", str(tmp_path / "q.html"))
    assert code == 0 and (tmp_path / "q.html").exists()


@pytest.fixture
def fallback_experiment(with_experiment):
    """An experiment whose loader reports a fallback (asked for mnist, got digits), like a machine
    without MNIST: hermetic, no dataset needs to be installed."""
    from bnlab.train.task import build_task

    def task(cfg, data_dir):
        t = build_task(cfg, data_dir)
        return type(t)(**{**t.__dict__, "requested": "mnist",
                          "note": "MNIST was requested but not found; used digits instead"})

    return with_experiment(Experiment(name="_test_fallback", description="tiny", base=TINY,
                                      variants={"bn": {"norm": "batch"}, "plain": {"norm": "none"}},
                                      build_task=task))


def test_dataset_fallback_is_printed_once_when_runs_start(tmp_path, capsys, fallback_experiment):
    code, out, _ = bnlab(capsys, "run", "_test_fallback", *SMOKE, "--seeds", "0,1", "--out", str(tmp_path))
    assert code == 0
    assert out.count("MNIST was requested but not found; used digits instead") == 1, out
    lines = out.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("data: "))) < lines.index(
        next(ln for ln in lines if ln.startswith("variant")))  # before the first run starts
    code, out, _ = bnlab(capsys, "run", "_test_fallback", *SMOKE, "--seeds", "0,1", "--out", str(tmp_path))
    assert code == 0 and "nothing to do" in out and "data: " not in out  # nothing runs, nothing to say


def test_fallback_notice_is_whole_sentences_once_per_fallback(monkeypatch):
    """Asked for MNIST (binarized) and got Fashion-MNIST: the console notice is one paragraph of whole
    sentences (no ".;"), the binarize sentence once, however many configs share the fallback."""
    import dataclasses as dc

    import bnlab.train.task as task_mod
    from bnlab.data import load_dataset
    from bnlab.train.runner import fallback_notices

    digits = load_dataset("digits")
    note = ("MNIST was requested but not found (searched /nowhere); used Fashion-MNIST from /x instead: same "
            "10-class setup but different images. To use MNIST: place the files in DIR/mnist/ with --data-dir DIR.")
    fake = dc.replace(digits, name="fashion_mnist", requested="mnist", note=note)
    monkeypatch.setattr(task_mod, "_load", lambda name, data_dir, fallback: fake)
    task_mod._build_task_cached.cache_clear()
    try:
        tasks = [task_mod.build_task(dc.replace(TINY, dataset="mnist", binarize=b, train_subset=n))
                 for b in (True, False) for n in (None, 100)]
    finally:
        task_mod._build_task_cached.cache_clear()
    assert tasks[0].note == note + " binarize=true applies to MNIST only, so Fashion-MNIST keeps its grey levels."
    lines = fallback_notices(tasks)
    assert len(lines) == 1, lines
    text = " ".join(lines[0].split())
    assert text.startswith("data: MNIST was requested but not found") and ".;" not in text and "; binarize" not in text
    assert text.count("binarize=true applies to MNIST only") == 1 and text.count("To use MNIST") == 1
    assert all(len(ln) <= 100 for ln in lines[0].splitlines())
    assert fallback_notices(tasks[:1]) == lines  # the same notice whether one or four configs fall back


@pytest.mark.parametrize("where", ["missing", "file"])
def test_data_dir_that_does_not_exist_is_an_error(tmp_path, capsys, where):
    bad = tmp_path / "no_such_dir"
    if where == "file":
        bad.write_text("x")
    for argv in (["run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path / "runs")],
                 ["reproduce", "ioffe", "--profile", "smoke", "--quiet", "--out", str(tmp_path / "runs")],
                 ["doctor"]):
        code, out, err = bnlab(capsys, *argv, "--data-dir", str(bad))
        assert_one_clear_error(code, err, f"--data-dir {bad}", "does not exist" if where == "missing"
                               else "is not a directory")
        assert "doctor" in argv or out == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("setting, fragments", [
    ("norm=no_such_norm", ["unknown norm 'no_such_norm'"]),
    ("dataset=imagenet", ["unknown dataset 'imagenet'", "mnist"]),
    ("batch_size=100000", ["batch_size=100000 exceeds the 1500 training examples", "at most 1500"]),
    ("model=resnet", ["unknown model 'resnet'"]),
    ("loss=mse", ["loss=mse needs a regression dataset"]),
    ("steps=0", ["steps must be >= 1"]),
    ("lr=fast", ["lr expects float"]),
])
def test_bad_set_values_fail_before_any_output_and_create_nothing(tmp_path, capsys, setting, fragments):
    code, out, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "smoke", "--out", str(tmp_path / "runs"),
                           "--set", setting)
    assert_one_clear_error(code, err, *fragments)
    assert out == "", out  # no plan, no cost estimate printed before the error
    assert files_under(tmp_path / "runs") == []  # no orphan seed directory with a lock file


@pytest.mark.parametrize("argv, fragments", [
    (["--seeds", "0,,1"], ["--seeds has an empty item in '0,,1'"]),
    (["--seeds", "3-1"], ["--seeds range '3-1' is reversed"]),
    (["--seeds", "-1"], ["non-negative"]),
    (["--threads", "0"], ["--threads", "expects a whole number >= 1, got 0"]),
    (["--workers", "0"], ["--workers", ">= 1"]),
    (["--max-minutes", "-5"], ["--max-minutes", "> 0"]),
    (["--set", "lr=0.1", "--set", "lr=0.2"], ["--set lr is given 2 times (lr=0.1, lr=0.2)", "once"]),
    (["--set", "lr=0.1", "lr=0.3"], ["--set lr is given 2 times"]),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, fragments):
    try:
        code = main(["run", "ioffe_mnist", "--profile", "smoke", "--out", str(tmp_path / "runs"), *argv])
    except SystemExit as exit_:  # argparse's own checks (types) exit from parse_args
        code = exit_.code
    out, err = capsys.readouterr()
    assert_one_clear_error(code, err, *fragments)
    assert out == "" and err.count("\n") == 1 and "usage:" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["run ioffe_mnist", "reproduce ioffe", "report"])
def test_profile_typo_is_a_one_line_error(command, capsys, tmp_path):
    code, out, err = bnlab(capsys, *command.split(), "--profile", "quik")
    from bnlab.experiments import PROFILES

    assert_one_clear_error(code, err, "unknown profile 'quik' (did you mean 'quick'?)", ", ".join(PROFILES))
    assert "usage:" not in err and err.count("\n") == 1 and out == ""


def test_command_typo_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["rnu", "ioffe_mnist"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert "unknown command 'rnu' (did you mean 'run'?)" in err


def test_profile_choices_follow_the_experiments_profiles(monkeypatch, capsys, tmp_path):
    """The CLI accepts exactly bnlab.experiments.PROFILES (a new profile needs no CLI change)."""
    import bnlab.experiments as exps
    import bnlab.experiments.base as base

    for module in (exps, base):
        monkeypatch.setattr(module, "PROFILES", ("smoke", "quick", "paper", "extra"))
    code, out, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "extra", "--show-config")
    assert code == 0 and "ioffe_mnist [extra]" in out, err
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "extar", "--out", str(tmp_path))
    assert_one_clear_error(code, err, "did you mean 'extra'?")


def test_show_config_lists_every_key_with_value_and_type(capsys):
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", "--show-config", "--profile", "smoke", "--set", "lr=0.25")
    assert code == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:] if ln.strip() and not ln.startswith("change")}
    assert set(field_names()) <= set(rows)
    cfg = registry.get_experiment("ioffe_mnist").config("bn", "smoke", {"lr": "0.25"})
    assert rows["lr"].split()[1:] == ["float", "0.25"]
    assert rows["steps"].split()[1:] == ["int", str(cfg.steps)]
    assert "int or None" in rows["train_subset"]
    assert 'baseline: "none", bn: "batch"' in rows["norm"]  # differing values per variant
    assert cfg.dataset in rows["dataset"]


def test_unknown_key_suggests_the_closest(capsys, tmp_path):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "stpes=10")
    assert_one_clear_error(code, err, "unknown config key 'stpes' (did you mean 'steps'?)", "valid keys:")
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "batchsize=10")
    assert_one_clear_error(code, err, "did you mean 'batch_size'?")
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", "--show-config", "--set", "lrr=1")
    assert_one_clear_error(code, err, "did you mean 'lr'?")
    code, _, err = bnlab(capsys, "run", "ioffe_mnsit", *SMOKE, "--out", str(tmp_path))
    assert_one_clear_error(code, err, "unknown experiment 'ioffe_mnsit' (did you mean 'ioffe_mnist'?)")
    assert not list(tmp_path.iterdir())


def test_unknown_experiment(capsys):
    code, _, err = bnlab(capsys, "run", "no_such_experiment")
    assert_one_clear_error(code, err, "unknown experiment 'no_such_experiment'", "ioffe_mnist", "bnlab list")


def test_unknown_key_lists_valid_keys(capsys, tmp_path):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "learnrate=0.1")
    assert_one_clear_error(code, err, "unknown config key 'learnrate'", "valid keys:", "lr", "steps", "norm")
    assert files_under(tmp_path) == []


def test_wrong_type_names_key_and_type(capsys, tmp_path):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "steps=lots")
    assert_one_clear_error(code, err, "steps expects int", "'lots'")


def test_bad_set_syntax_and_seeds(capsys):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--set", "lr")
    assert_one_clear_error(code, err, "--set expects key=value")
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--seeds", "a,b")
    assert_one_clear_error(code, err, "--seeds expects integers")


def test_unknown_norm_fails_before_any_run(capsys, tmp_path):
    code, out, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "norm=foo")
    assert_one_clear_error(code, err, "unknown norm 'foo'", "batch", "none")
    assert not list(tmp_path.glob("*/ioffe_mnist/*/seed*/config.json"))


def test_unknown_model(capsys, tmp_path):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "model=resnet")
    assert_one_clear_error(code, err, "unknown model 'resnet'", "ioffe_mlp", "vgg11")


def test_missing_dataset_without_fallback(capsys, tmp_path, monkeypatch):
    import bnlab.data.locate as locate

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BNLAB_DATA", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty))
    monkeypatch.setattr(locate, "SYSTEM_DATA_ROOT", empty)
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path / "runs"), "--data-dir",
                         str(empty), "--set", "dataset=mnist", "data_fallback=false")
    assert_one_clear_error(code, err, "MNIST", str(empty))


def test_max_minutes_refuses_before_running(capsys, tmp_path):
    code, out, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "paper", "--out", str(tmp_path),
                           "--max-minutes", "0.01")
    assert_one_clear_error(code, err, "exceeds --max-minutes 0.01", "--profile", "estimated ")
    assert out == ""  # refused before any output (and before loading any data)
    assert not list(tmp_path.glob("*/ioffe_mnist/*/seed*/config.json"))


def test_reproduce_max_minutes_is_for_the_whole_command(capsys, tmp_path):
    """Each experiment of the smoke plan is estimated below the limit, the whole command above it:
    reproduce refuses in one line, before any output, creating nothing."""
    from bnlab.cli import profile_root
    from bnlab.experiments import get_experiment
    from bnlab.train.cost import EXPERIMENT_OVERHEAD_S, REPORT_OVERHEAD_S, wall_seconds
    from bnlab.train.runner import check_configs, plan_runs

    root = profile_root(tmp_path, "smoke")
    walls = []
    for name in ("ioffe_mnist", "ioffe_lr_study"):
        exp = get_experiment(name)
        plan = plan_runs(exp, "smoke", out=root)
        check_configs(plan, None, exp.run_cost)
        walls.append(wall_seconds([p.est_seconds for p in plan], 2) + EXPERIMENT_OVERHEAD_S)
    total = sum(walls) + REPORT_OVERHEAD_S
    limit = (max(walls) + total) / 2 / 60  # above every experiment, below the whole command
    code, out, err = bnlab(capsys, "reproduce", "ioffe", "--profile", "smoke", "--out", str(tmp_path),
                           "--max-minutes", f"{limit:.4f}")
    assert_one_clear_error(code, err, "exceeds --max-minutes", "estimated ")
    assert out == "" and not list(tmp_path.rglob("seed*"))


def test_divergence_exit_code_zero_and_reported(capsys, tmp_path, with_experiment):
    with_experiment(Experiment(
        name="_test_dln_diverges", description="DLN at a huge learning rate",
        base=TrainConfig(dataset="gaussian_regression", model="dln", depth=6, dtype="float64",
                         loss="mse", loss_reduction="sum", batch_size=1000, lr=1.0, steps=100,
                         eval_every=50, probe_schedule="none", norm="none"),
    ))
    code, out, _ = bnlab(capsys, "run", "_test_dln_diverges", *SMOKE, "--out", str(tmp_path))
    assert code == 0
    assert "1 diverged" in out and "diverged at step" in out and "recorded as a result" in out


def test_tensorboard_missing_is_a_clear_error(capsys, tmp_path, monkeypatch):
    # tensorboard is absent for this test whether or not it is installed (None in sys.modules makes
    # the import fail), so the test runs everywhere instead of skipping where it is installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert not tensorboard_available()
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--tensorboard")
    assert_one_clear_error(code, err, "pip install tensorboard")


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard not installed")
def test_tensorboard_writes_events(capsys, tmp_path):
    code, _, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--tensorboard")
    assert code == 0
    assert list(tmp_path.glob("smoke/ioffe_mnist/*/seed0/tb/events.*"))


def test_doctor(capsys, tmp_path, monkeypatch):
    import bnlab.data.locate as locate

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BNLAB_DATA", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty))
    monkeypatch.setattr(locate, "SYSTEM_DATA_ROOT", empty)
    code, out, _ = bnlab(capsys, "doctor", "--data-dir", str(empty))
    assert code == 0
    assert "torch" in out and "threads" in out and "digits" in out and "fashion_mnist" in out
    assert "fused" not in out.lower() and "numba" not in out.lower()  # no kernels that do not exist
    for name in ("mnist", "fashion_mnist", "cifar10"):  # nothing installed here: complete sentences
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert "missing:" in line and "How to get it:" in line, line
        assert not line.rstrip().endswith(":") and line.rstrip().endswith((".", ")")), line
    assert "use fashion_mnist instead" in next(ln for ln in out.splitlines() if ln.split()[:1] == ["mnist"])


def test_console_script_error_is_one_line(tmp_path):
    """The real entry point (python -m bnlab.cli): exit 2 and one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "bnlab.cli", "run", "ioffe_mnist", "--set", "norm=foo",
                           "--profile", "smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown norm 'foo'" in proc.stderr


def test_workers_pool(capsys, tmp_path):
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", "--profile", "smoke", "--quiet", "--workers", "2",
                         "--out", str(tmp_path))
    assert code == 0 and "2 done" in out
    serial = tmp_path / "serial"
    assert bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(serial))[0] == 0
    # one thread per worker in the pool, --threads 1 serially: the same numbers
    for a in sorted((tmp_path / "smoke" / "ioffe_mnist").glob("*/seed0/metrics.jsonl")):
        b = serial / "smoke" / "ioffe_mnist" / a.parent.parent.name / "seed0" / "metrics.jsonl"
        assert a.read_bytes() == b.read_bytes()


def test_shard_and_variants_run_a_part_and_skip_the_verdict(capsys, tmp_path):
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--shard", "1/2")
    assert code == 0 and "1 done" in out and "verdict: skipped" in out
    assert len(list(tmp_path.glob("smoke/ioffe_mnist/*/seed0/done"))) == 1
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--variants", "bn,baseline")
    assert code == 0 and "2 runs (1 done, 0 to resume, 1 new)" in out
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--variants", "bn,huge")
    assert_one_clear_error(code, err, "no variant(s) huge", "baseline, bn")
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--shard", "2/2")
    assert_one_clear_error(code, err, "--shard i/n needs 0 <= i < n")


def test_parse_seeds():
    from bnlab.errors import ConfigError
    from bnlab.train.runner import parse_seeds

    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_seeds("0-3,7") == (0, 1, 2, 3, 7)
    assert parse_seeds("2,2") == (2,)
    assert parse_seeds(" 4 ") == (4,)
    for bad in ("", "0,,1", ",1", "1,", "a", "1-", "3-1", "-2", "1.5"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


# --- progress ----------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_in_a_log_is_plain_periodic_lines():
    from bnlab.train.progress import Progress

    stream, clock = io.StringIO(), FakeClock()
    p = Progress(1200, desc="exp", unit="steps", stream=stream, interval=30.0, clock=clock)
    assert not p.tty
    for _ in range(1200):  # one update per step for 600 s: a bar would redraw 1200 times
        clock.t += 0.5
        p.update(1)
    p.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 600 / 30 - 1 <= len(lines) <= 600 / 30 + 1, lines  # one line per interval, plus the last
    assert lines[-1].startswith("exp: 100% (1200/1200 steps), elapsed 10m") and "left" not in lines[-1]
    assert "(60/1200 steps)" in lines[0]  # integer step counts, never 60.0/1200.0


def test_progress_eta_is_measured_and_smoothed():
    from bnlab.train.progress import Progress

    clock = FakeClock()
    q = Progress(10_000, unit="steps", stream=io.StringIO(), clock=clock, sample_seconds=2.0)
    assert q.eta() is None  # nothing measured: unknown, not made up
    for _ in range(50):
        clock.t += 1.0
        q.update(10)
    assert q.eta() == pytest.approx((10_000 - 500) / 10)
    clock.t += 2.0  # one slow interval (an evaluation: 2 s without steps, then a burst) ...
    q.update(10)
    # ... the sample since the last one (t=49: 490 steps; now t=52: 510) is 20/3 steps/s; it moves the
    # smoothed rate by 30 %, not 100 %
    assert q.rate == pytest.approx(0.3 * 20 / 3 + 0.7 * 10)


@pytest.mark.parametrize("startup, step_seconds", [(40.0, 0.05), (3.0, 0.5), (0.0, 0.01), (120.0, 2.0)])
def test_progress_eta_ignores_startup_and_waits_for_a_measurement(startup, step_seconds):
    """A seconds-long run after a long start-up (worker processes, imports, data) once showed "12.9h
    left": the first update's time must not be extrapolated. Until 2 s (or 5 updates) are measured
    after the first update the time left is "estimating…"; from then on it is within 20 % of the
    truth at every update, for slow and fast steps alike."""
    from bnlab.train.progress import ESTIMATING, Progress

    clock, stream = FakeClock(), io.StringIO()
    total = 60
    p = Progress(total, desc="smoke", unit="steps", stream=stream, clock=clock, interval=0.0)
    clock.t += startup  # nothing reported while the workers start
    shown = []
    for step in range(1, total + 1):
        clock.t += step_seconds
        p.update(1)
        truth = (total - step) * step_seconds
        eta = p.eta()
        measured = (step - 1) * step_seconds  # time since the first update
        if measured < 2.0 and step - 1 < 5:
            assert eta is None and ESTIMATING in p.status(), (step, eta)
        else:
            assert eta == pytest.approx(truth, rel=0.2, abs=1e-9), (step, eta, truth)
        shown.append(p.status())
    p.close()
    assert "left" not in shown[-1] and ESTIMATING not in shown[-1]  # done: no time left shown
    assert ESTIMATING in stream.getvalue().splitlines()[0]  # the first plain line says so, in words


def test_reproduce_eta_in_estimated_seconds_is_measured_too():
    """bnlab reproduce counts work in estimated seconds, which can be far off on another machine (here
    7 s of estimated work that really takes 3 min): the time left comes from the measured rate of that
    work, not from the estimate."""
    from bnlab.train.progress import Progress

    clock = FakeClock()
    p = Progress(7.0, desc="reproduce", unit=None, stream=io.StringIO(), clock=clock)
    assert p.eta() is None and "estimating" in p.status()
    clock.t += 40.0  # start-up
    for _ in range(70):  # the real cost: 0.1 estimated seconds every 2.5 s
        clock.t += 2.5
        p.update(0.1)
        if p.eta() is not None:
            assert p.eta() == pytest.approx((7.0 - p.done) / 0.1 * 2.5, rel=0.2)
    assert p.eta() == 0.0 or "left" not in p.status()


def test_progress_on_a_terminal_is_a_bar_with_integer_steps_and_measured_eta():
    from bnlab.train.progress import Progress

    stream, clock = io.StringIO(), FakeClock()
    p = Progress(120, desc="exp", unit="steps", stream=stream, clock=clock, tty=True, sample_seconds=1.0)
    for _ in range(60):
        clock.t += 0.5
        p.update(1)
    p._bar.refresh()
    last = stream.getvalue().split("\r")[-1]
    assert "exp:  50%" in last and "60/120 steps" in last and "30s left" in last, last  # 2 steps/s measured
    assert ".0/" not in stream.getvalue()
    p.close()


def test_progress_with_nothing_to_do_shows_nothing():
    from bnlab.train.progress import Progress

    stream = io.StringIO()
    p = Progress(0, unit="steps", stream=stream, tty=True)
    p.update(5)
    p.close()
    assert stream.getvalue() == "" and p._bar is None


def test_run_progress_when_stdout_is_not_a_terminal(tmp_path, capsys):
    """Not --quiet, output captured (not a TTY): no bar redraws, integer steps, no unexplained marks."""
    code, out, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "smoke", "--threads", "1",
                           "--out", str(tmp_path))
    assert code == 0
    assert "\r" not in err and len(err.splitlines()) <= 3, err
    assert "ioffe_mnist: 100% (120/120 steps)" in err
    assert "@" not in out and ".0/" not in err
    code, out, err = bnlab(capsys, "run", "ioffe_mnist", "--profile", "smoke", "--out", str(tmp_path))
    assert code == 0 and err == "" and "nothing to do" in out  # no empty 0 % bar


def test_resumed_run_says_so_in_words(tmp_path, capsys, with_experiment):
    """A run killed after its checkpoint at step 20 resumes; the line says so (no bare "done@20")."""
    from bnlab.train.loop import RunOptions, train_run
    from bnlab.train.runner import plan_runs

    exp = with_experiment(Experiment(name="_test_resume", description="tiny", base=TINY,
                                     variants={"bn": {"norm": "batch"}}, profiles={"smoke": {"checkpoint_every": 20}}))

    class Killed(Exception):
        pass

    def kill_at_30(step: int) -> None:
        if step >= 30:
            raise Killed

    spec = plan_runs(exp, "smoke", out=tmp_path / "smoke", seeds=(0,))[0].spec
    with pytest.raises(Killed):
        train_run(spec, RunOptions(threads=1, progress_every=1), kill_at_30)
    code, out, _ = bnlab(capsys, "run", "_test_resume", *SMOKE, "--seeds", "0", "--out", str(tmp_path))
    assert code == 0 and "1 to resume" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("bn "))
    assert " done " in line and "(resumed from the checkpoint at step 20)" in line and "@" not in line, line


def test_sigterm_ends_the_worker_pool_and_frees_the_runs(tmp_path):
    """`kill PID` of `bnlab run --workers 2` ends it like Ctrl-C (exit 130) and leaves no worker
    training on: every run's lock is free right after, so the same command resumes at once."""
    import os
    import signal
    import time

    from bnlab.train.rundir import RunLock

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "bnlab.cli", "run", "ioffe_mnist", "--profile", "smoke",
                             "--set", "steps=1000000", "--set", "checkpoint_every=1000000", "--workers", "2",
                             "--quiet", "--out", str(tmp_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list(tmp_path.glob("smoke/ioffe_mnist/*/seed0/metrics.jsonl"))) < 2:
            time.sleep(0.2)
        runs = [p.parent for p in tmp_path.glob("smoke/ioffe_mnist/*/seed0/metrics.jsonl")]
        assert len(runs) == 2, "both workers should have started training"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert "interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    for run in runs:  # an orphaned worker would still hold its lock
        lock = RunLock(run)
        lock.acquire(10)
        lock.release()


def test_version(capsys):
    import bnlab

    with pytest.raises(SystemExit) as exc:
        from bnlab.cli import main
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"bnlab {bnlab.__version__}"


def test_run_one_robustness_setting_alone(tmp_path, capsys, with_experiment):
    """--setting NAME (robust profile) plans and trains only that setting's runs; a name the profile
    does not run is one error listing the settings; the verdict waits for the whole grid."""
    from bnlab.train.runner import plan_runs

    exp = with_experiment(Experiment(name="_test_settings", description="tiny", base=TINY,
                                     variants={"bn": {"norm": "batch"}},
                                     settings={"as declared": {}, "lr 0.05": {"lr": 0.05}, "wide": {"widths": (24, 24)}},
                                     robust_seeds=(0,), profiles={"robust": {"steps": 4, "eval_every": 2}}))
    every = plan_runs(exp, "robust", out=tmp_path / "robust")
    assert sorted({p.spec.setting for p in every}) == ["as declared", "lr 0.05", "wide"]
    one = plan_runs(exp, "robust", out=tmp_path / "robust", settings=["lr 0.05"])
    assert {p.spec.setting for p in one} == {"lr 0.05"} and {p.spec.cfg.lr for p in one} == {0.05}
    assert [p.spec.run_dir for p in one] == [p.spec.run_dir for p in every if p.spec.setting == "lr 0.05"]
    assert plan_runs(exp, "robust", out=tmp_path / "robust", settings=["LR 0.05"])[0].spec.setting == "lr 0.05"
    with pytest.raises(ConfigError, match="no setting.*'lr 0.5'.*settings: as declared; lr 0.05; wide"):
        plan_runs(exp, "robust", out=tmp_path / "robust", settings=["lr 0.5"])
    with pytest.raises(ConfigError, match="only the primary setting.*--profile robust"):
        plan_runs(exp, "quick", out=tmp_path / "quick", settings=["lr 0.05"])

    code, out, _ = bnlab(capsys, "run", "_test_settings", "--profile", "robust", "--quiet", "--threads", "1",
                         "--setting", "wide", "--out", str(tmp_path))
    assert code == 0 and "verdict: skipped for a partial run" in out
    done = sorted(p.parent.name for p in (tmp_path / "robust" / "_test_settings").rglob("config.json"))
    assert len(done) == 1  # the one seed of the one variant of "wide", nothing of the others
    code, out, err = bnlab(capsys, "run", "_test_settings", "--profile", "robust", "--setting", "nope",
                           "--out", str(tmp_path))
    assert code != 0 and "has no setting(s) 'nope'" in err + out


def test_show_config_lists_the_robustness_settings(capsys):
    code, out, _ = bnlab(capsys, "run", "santurkar_vgg", "--profile", "robust", "--show-config")
    assert code == 0 and "robustness settings" in out and "'He init (init=kaiming)': init=kaiming" in out
    from bnlab.experiments import get_experiment
    from bnlab.train.runner import plan_runs

    planned = plan_runs(get_experiment("santurkar_vgg"), "robust", out="unused", settings=["he init"], seeds=(0,))
    assert {p.spec.setting for p in planned} == {"He init (init=kaiming)"} and {p.spec.cfg.init for p in planned} == {"kaiming"}
