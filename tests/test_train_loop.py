"""The training engine: determinism, SIGKILL resume, skip, divergence, locks, corrupt checkpoints,
probe isolation and the stored-results API. Tiny models on scikit-learn's digits: seconds, not minutes."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.errors import ConfigError, CorruptDataError, RunLockedError
from bnlab.experiments.base import Experiment, Probe
from bnlab.train.config import TrainConfig
from bnlab.train.loop import RunOptions, train_run
from bnlab.train.results import load_results
from bnlab.train.rundir import RunLock, read_metrics
from bnlab.train.runner import plan_runs, run_experiment

TINY = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(16, 16), batch_size=32, lr=0.2,
                   steps=60, eval_every=20, eval_subset=100, checkpoint_every=25, probe_schedule="log",
                   probe_points=5, probe_batch_size=64)


def tiny(name: str = "tiny", probes=(), **overrides) -> Experiment:
    return Experiment(name=name, description="tiny test experiment", base=TINY,
                      variants={"bn": {"norm": "batch"}, "plain": {"norm": "none"}},
                      profiles={"smoke": overrides}, probes=tuple(probes))


def run(exp: Experiment, out: Path, **kw):
    kw.setdefault("quiet", True)
    kw.setdefault("threads", 1)
    return run_experiment(exp, "smoke", out=out, echo=lambda s: None, **kw)


def metrics_bytes(run_dir: Path) -> bytes:
    return (run_dir / "metrics.jsonl").read_bytes()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --- determinism -------------------------------------------------------------------------------------

def test_same_seed_identical_and_different_seeds_differ(tmp_path):
    exp = tiny()
    a = run(exp, tmp_path / "a", seeds=(0, 1))
    b = run(exp, tmp_path / "b", seeds=(0,))
    dirs_a = {(p.spec.variant, p.spec.seed): p.spec.run_dir for p in a.planned}
    dirs_b = {(p.spec.variant, p.spec.seed): p.spec.run_dir for p in b.planned}
    for variant in ("bn", "plain"):
        assert metrics_bytes(dirs_a[variant, 0]) == metrics_bytes(dirs_b[variant, 0])
        assert_same_weights(dirs_a[variant, 0], dirs_b[variant, 0])
        assert metrics_bytes(dirs_a[variant, 0]) != metrics_bytes(dirs_a[variant, 1])
    recs = read_metrics(dirs_a["bn", 0] / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("split") == "eval"] == [0, 20, 40, 60]
    assert [r["step"] for r in recs if r.get("split") == "train"] == list(range(60))
    assert recs[-1]["split"] == "test" and recs[-1]["n"] == 297


def test_done_run_is_skipped(tmp_path):
    exp = tiny()
    first = run(exp, tmp_path)
    run_dir = first.planned[0].spec.run_dir
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    second = run(exp, tmp_path)
    assert all(p.state == "done" for p in second.planned)
    assert second.outcomes == []
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    # the engine itself also refuses to redo a finished run
    assert train_run(first.planned[0].spec, RunOptions(threads=1)).status == "skipped"


# --- probes ------------------------------------------------------------------------------------------

def careless(ctx):
    """A probe that does everything a probe must not: moves weights, BN statistics, global RNGs."""
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(1.0)
        ctx.model(ctx.probe_batch[0])  # train mode: updates BN running statistics
    torch.rand(10)
    np.random.rand(3)
    return {"first_weight": float(next(ctx.model.parameters()).detach().flatten()[0]),
            "hist": np.histogram(ctx.probe_batch[0].numpy(), bins=4, range=(0, 1))[0]}


def test_probes_never_change_the_trajectory(tmp_path):
    plain = run(tiny(), tmp_path / "plain")
    probed = run(tiny(probes=[Probe("careless", careless)]), tmp_path / "probed")
    for p0, p1 in zip(plain.planned, probed.planned):
        a = read_metrics(p0.spec.run_dir / "metrics.jsonl")
        b = read_metrics(p1.spec.run_dir / "metrics.jsonl")
        assert a == [r for r in b if "probe" not in r]
        assert_same_weights(p0.spec.run_dir, p1.spec.run_dir)
    res = load_results(tmp_path / "probed", "tiny")
    bn = res.by_variant()["bn"][0]
    steps, first = bn.probe_series("careless", "first_weight")
    assert list(steps) == Probe("c", careless).steps(bn.config)
    assert bn.arrays["probe/careless/hist"].shape == (len(steps), 4)
    assert list(bn.arrays["probe/careless/steps"]) == list(steps)


# --- SIGKILL and resume --------------------------------------------------------------------------------

SLOW_SCRIPT = """
import os, sys, time
from bnlab.experiments.base import Experiment, Probe
from bnlab.train.config import TrainConfig
from bnlab.train.runner import run_experiment

def slow(ctx):
    delay = float(os.environ.get("BNLAB_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)  # makes the run slow enough to be killed mid-way; returns nothing
    return {}

EXP = Experiment(
    name="killme", description="resume test",
    base=TrainConfig(dataset="digits", model="ioffe_mlp", widths=(16, 16), batch_size=32, lr=0.2,
                     steps=300, eval_every=50, eval_subset=100, checkpoint_every=40,
                     probe_schedule="every", probe_every=1, probe_batch_size=32),
    variants={"bn": {"norm": "batch"}},
    probes=(Probe("slow", slow),),
)

if __name__ == "__main__":
    run_experiment(EXP, "smoke", out=sys.argv[1], quiet=True, threads=1)
"""


def _load_script(tmp_path: Path):
    path = tmp_path / "slow_experiment.py"
    path.write_text(textwrap.dedent(SLOW_SCRIPT))
    spec = importlib.util.spec_from_file_location("slow_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _start_slow(script: Path, out: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "BNLAB_TEST_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def test_sigkill_mid_training_then_resume_is_identical(tmp_path):
    script, module = _load_script(tmp_path)
    ref = run(module.EXP, tmp_path / "ref")
    ref_dir = ref.planned[0].spec.run_dir

    out = tmp_path / "killed"
    run_dir = plan_runs(module.EXP, "smoke", out=out)[0].spec.run_dir
    proc = _start_slow(script, out, delay=0.01)
    ckpt = run_dir / "checkpoint.pt"
    # Kill once a checkpoint exists *and* training has gone past it (so truncation is exercised).
    _wait_for(lambda: ckpt.exists() and len(read_metrics(run_dir / "metrics.jsonl")) > 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert not (run_dir / "done").exists() and ckpt.exists()
    state = torch.load(ckpt, weights_only=True)  # what bnlab writes loads without unpickling code
    assert 0 < state["step"] < 300
    # (usually >: records after the checkpoint that the resume must cut off; see the next test)
    assert (run_dir / "metrics.jsonl").stat().st_size >= state["metrics_bytes"]

    again = run(module.EXP, out)
    assert again.planned[0].state == "resume" and again.outcomes[0].resumed_from == state["step"]
    assert metrics_bytes(run_dir) == metrics_bytes(ref_dir)
    assert_same_weights(run_dir, ref_dir)
    assert not ckpt.exists() and (run_dir / "done").exists()


class _Crash(BaseException):
    pass


def test_crash_after_checkpoint_truncates_metrics_and_resumes_identically(tmp_path):
    """Deterministic version of the SIGKILL test: die at step 37, after the checkpoint at 25."""
    state = {"armed": False}

    def crash(ctx):
        if state["armed"] and ctx.step == 37:
            raise _Crash()
        return {}

    exp = tiny(probes=[Probe("crash", crash, schedule="every", every=1)])
    ref = run(exp, tmp_path / "ref", variants=["bn"])
    state["armed"] = True
    with pytest.raises(_Crash):
        run(exp, tmp_path / "crashed", variants=["bn"])
    run_dir = plan_runs(exp, "smoke", out=tmp_path / "crashed")[0].spec.run_dir
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 25
    assert (run_dir / "metrics.jsonl").stat().st_size > ckpt["metrics_bytes"]
    state["armed"] = False
    # resumed with another --threads: the run continues with the thread count it started with
    again = run(exp, tmp_path / "crashed", variants=["bn"], threads=2)
    assert again.outcomes[0].resumed_from == 25
    assert metrics_bytes(run_dir) == metrics_bytes(ref.planned[0].spec.run_dir)
    assert_same_weights(run_dir, ref.planned[0].spec.run_dir)


def test_two_processes_on_one_run_dir(tmp_path, capsys, monkeypatch):
    """A second `bnlab run` on a run being written refuses with a clear message; nothing is corrupted."""
    import bnlab.experiments as registry
    from bnlab.cli import main

    script, module = _load_script(tmp_path)
    ref = run(module.EXP, tmp_path / "ref")
    out = tmp_path / "shared" / "smoke"  # the folder `bnlab run --profile smoke --out <it>` uses as is
    run_dir = plan_runs(module.EXP, "smoke", out=out)[0].spec.run_dir
    proc = _start_slow(script, out, delay=0.004)
    try:
        _wait_for(lambda: RunLock(run_dir).owner() == proc.pid, proc)
        registry.all_experiments()
        monkeypatch.setitem(registry._REGISTRY, "killme", module.EXP)
        code = main(["run", "killme", "--profile", "smoke", "--out", str(out), "--quiet", "--threads", "1"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"being written by another process (pid {proc.pid})" in err
        assert "--wait" in err and "Traceback" not in err
        # with --wait the second process blocks until the first is done, then skips the run
        code = main(["run", "killme", "--profile", "smoke", "--out", str(out), "--quiet", "--wait"])
        assert code == 0 and (run_dir / "done").exists()
        assert "1 skipped" in capsys.readouterr().out
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert metrics_bytes(run_dir) == metrics_bytes(ref.planned[0].spec.run_dir)
    assert_same_weights(run_dir, ref.planned[0].spec.run_dir)


def test_lock_wait_then_skip(tmp_path):
    exp = tiny()
    run_dir = plan_runs(exp, "smoke", out=tmp_path)[0].spec.run_dir
    holder = RunLock(run_dir)
    holder.acquire()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(run_dir).acquire(wait=0.3)
    holder.release()
    lock = RunLock(run_dir)
    lock.acquire(wait=0.3)
    lock.release()


# --- divergence ----------------------------------------------------------------------------------------

def test_divergence_is_a_result(tmp_path):
    exp = Experiment(
        name="dln_diverge", description="DLN with a huge learning rate",
        base=TrainConfig(dataset="gaussian_regression", model="dln", depth=6, dtype="float64",
                         loss="mse", loss_reduction="sum", batch_size=1000, lr=1.0, steps=200,
                         eval_every=50, probe_schedule="none", norm="none"),
    )
    res = run(exp, tmp_path)
    outcome = res.outcomes[0]
    assert outcome.status == "diverged" and 0 <= outcome.diverged_step < 200
    run_dir = outcome.run_dir
    done = (run_dir / "done").read_text()
    assert '"status": "diverged"' in done and f'"diverged_step": {outcome.diverged_step}' in done
    recs = read_metrics(run_dir / "metrics.jsonl")
    assert recs[-1]["event"] == "diverged" and recs[-1]["step"] == outcome.diverged_step
    assert [r for r in recs if r.get("split") == "train"][-1]["step"] == outcome.diverged_step - 1
    stored = load_results(tmp_path, "dln_diverge").runs[0]
    assert stored.status == "diverged" and stored.diverged_step == outcome.diverged_step
    assert stored.final("loss") is None
    # a diverged run is finished: running again skips it
    assert run(exp, tmp_path).planned[0].state == "done"


# --- bad checkpoints -----------------------------------------------------------------------------------

def test_corrupt_checkpoint_names_file_and_fix(tmp_path):
    exp = tiny()
    run_dir = plan_runs(exp, "smoke", out=tmp_path)[0].spec.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage, not a zip")
    with pytest.raises(CorruptDataError) as err:
        run(exp, tmp_path, variants=["bn"])
    assert str(run_dir / "checkpoint.pt") in str(err.value) and "delete it" in str(err.value)


class _Payload:
    """Unpickling this calls ``exec``: what a crafted checkpoint in a downloaded run directory does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    exp = tiny()
    run_dir = plan_runs(exp, "smoke", out=tmp_path)[0].spec.run_dir
    run_dir.mkdir(parents=True)
    marker = tmp_path / "marker"
    torch.save({"step": 5, "config_hash": "0" * 64, "rng": _Payload(marker)}, run_dir / "checkpoint.pt")
    with pytest.raises(CorruptDataError, match="refused: it holds Python objects.*nothing was executed; delete it"):
        run(exp, tmp_path, variants=["bn"])
    assert not marker.exists()
    # the same file with full unpickling would have run the payload: the test's payload is real
    torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_safe_state_round_trips_numpy_values_exactly():
    import random

    import numpy as np

    from bnlab.train import safe_state

    state = {"numpy": np.random.RandomState(3).get_state(), "python": random.Random(4).getstate(),
             "arrays": {"a": [np.arange(6, dtype=np.float32).reshape(2, 3), np.asarray(7, dtype=np.int64)],
                        "empty": np.zeros((0, 4)), "u": np.array([2**32 - 1], dtype=np.uint32)},
             "scalar": np.float64(0.1), "t": torch.arange(3), "none": None}
    back = safe_state.decode(safe_state.encode(state))
    rs = np.random.RandomState()
    rs.set_state(back["numpy"])
    ref = np.random.RandomState(3)
    assert np.array_equal(rs.random_sample(5), ref.random_sample(5))
    assert back["python"] == state["python"]
    for k in ("a",):
        for x, y in zip(back["arrays"][k], state["arrays"][k]):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    assert back["arrays"]["empty"].shape == (0, 4) and back["arrays"]["u"][0] == 2**32 - 1
    assert type(back["scalar"]) is np.float64 and back["scalar"] == 0.1 and torch.equal(back["t"], state["t"])
    with pytest.raises(TypeError, match="cannot be stored safely"):
        safe_state.encode({"f": lambda: 0})


def test_checkpoint_of_another_config_is_refused(tmp_path):
    exp = tiny()
    run_dir = plan_runs(exp, "smoke", out=tmp_path)[0].spec.run_dir
    run_dir.mkdir(parents=True)
    torch.save({"step": 5, "config_hash": "0" * 64}, run_dir / "checkpoint.pt")
    with pytest.raises(ConfigError, match="belongs to another config.*delete it"):
        run(exp, tmp_path, variants=["bn"])


# --- results API ---------------------------------------------------------------------------------------

def test_results_api(tmp_path):
    exp = tiny()
    run(exp, tmp_path, seeds=(0, 1))
    res = load_results(tmp_path, "tiny", profile="smoke")
    groups = res.by_variant()
    assert set(groups) == {"bn", "plain"} and [r.seed for r in groups["bn"]] == [0, 1]
    r = groups["bn"][0]
    assert r.status == "done" and r.config.norm == "batch" and r.profile == "smoke"
    steps, acc = r.series("eval", "acc")
    assert list(steps) == [0, 20, 40, 60] and np.all((acc >= 0) & (acc <= 1))
    assert 0 <= r.final("acc") <= 1
    assert r.env["threads"] == 1 and r.dataset["used"] == "digits"
    assert set(r.model_state()) == set(weights(r.run_dir))
    assert load_results(tmp_path, "tiny", profile="quick").runs == []
