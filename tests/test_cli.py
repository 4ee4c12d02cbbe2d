"""The bnlab command: list, run, doctor, and one clear message (exit 2, no traceback) per bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bnlab.experiments as registry
from bnlab.cli import main
from bnlab.experiments.base import Experiment
from bnlab.train.config import TrainConfig
from bnlab.train.tensorboard import tensorboard_available

SMOKE = ["--profile", "smoke", "--quiet", "--threads", "1"]


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
    verdict = json.loads((tmp_path / "ioffe_mnist" / "verdict.json").read_text())
    assert {"claim", "paper", "ours", "seeds", "passed", "why"} <= set(verdict[0])
    assert (tmp_path / "ioffe_mnist" / "figures" / "ioffe_mnist_accuracy.png").stat().st_size > 1000
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path))
    assert code == 0 and "nothing to do: all 2 runs are done" in out


def test_unknown_experiment(capsys):
    code, _, err = bnlab(capsys, "run", "no_such_experiment")
    assert_one_clear_error(code, err, "unknown experiment 'no_such_experiment'", "ioffe_mnist", "bnlab list")


def test_unknown_key_lists_valid_keys(capsys, tmp_path):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--set", "learnrate=0.1")
    assert_one_clear_error(code, err, "unknown config key 'learnrate'", "valid keys:", "lr", "steps", "norm")
    assert not (tmp_path / "ioffe_mnist").exists()


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
    assert not list(tmp_path.glob("ioffe_mnist/*/seed*/config.json"))


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
    assert_one_clear_error(code, err, "exceeds --max-minutes 0.01", "--profile")
    assert "estimated cost:" in out
    assert not list(tmp_path.glob("ioffe_mnist/*/seed*/config.json"))


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


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(capsys, tmp_path):
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--tensorboard")
    assert_one_clear_error(code, err, "pip install tensorboard")


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard not installed")
def test_tensorboard_writes_events(capsys, tmp_path):
    code, _, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--tensorboard")
    assert code == 0
    assert list(tmp_path.glob("ioffe_mnist/*/seed0/tb/events.*"))


def test_doctor(capsys):
    code, out, _ = bnlab(capsys, "doctor")
    assert code == 0
    assert "torch" in out and "threads" in out and "digits" in out and "fashion_mnist" in out


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
    for a in sorted((tmp_path / "ioffe_mnist").glob("*/seed0/metrics.jsonl")):
        b = serial / "ioffe_mnist" / a.parent.parent.name / "seed0" / "metrics.jsonl"
        assert a.read_bytes() == b.read_bytes()


def test_shard_and_variants_run_a_part_and_skip_the_verdict(capsys, tmp_path):
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--shard", "1/2")
    assert code == 0 and "1 done" in out and "verdict: skipped" in out
    assert len(list(tmp_path.glob("ioffe_mnist/*/seed0/done"))) == 1
    code, out, _ = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--out", str(tmp_path), "--variants", "bn,baseline")
    assert code == 0 and "2 runs (1 done, 0 to resume, 1 new)" in out
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--variants", "bn,huge")
    assert_one_clear_error(code, err, "no variant(s) huge", "baseline, bn")
    code, _, err = bnlab(capsys, "run", "ioffe_mnist", *SMOKE, "--shard", "2/2")
    assert_one_clear_error(code, err, "--shard i/n needs 0 <= i < n")


def test_parse_seeds():
    from bnlab.train.runner import parse_seeds

    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_seeds("0-3,7") == (0, 1, 2, 3, 7)
    assert parse_seeds("2,2") == (2,)
