"""Data-parallel training (``bnlab run --nproc``): 2 real processes on the loopback interface (gloo, CPU).

- the engine: a conv net with synchronized BN trained over 2 ranks with an odd global batch (slices
  of 3 and 4) equals the single-process run on the full batch to float32 rounding: losses, accuracies,
  evaluations, a probe that runs the model in training mode (on rank 0 alone, no deadlock),
  parameters and running statistics; rank 1 writes nothing; a run stopped mid-way and resumed equals
  the uninterrupted 2-process run bit for bit;
- the CLI: ``bnlab run ioffe_mnist --profile smoke --nproc 2`` through torchrun; a rank killed mid-run
  ends the command with one line naming it, in bounded time; argument errors before anything starts.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.train.ddp import Ranks, local_loss_weight, torchrun_argv

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import datetime, os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from bnlab.train import RunOptions, RunSpec, TrainConfig, config_hash, train_run
    from bnlab.train import ddp
    from bnlab.train.probes import Probe

    def train_forward(ctx):
        # runs the model in training mode on the probe batch: synchronized BN would wait for the other
        # rank here if the probe were not run with local statistics
        ctx.model.train()
        out = ctx.model(ctx.probe_batch[0])
        return {"out_mean": float(out.double().mean()), "out_std": float(out.double().std())}

    mode, root = sys.argv[1], Path(sys.argv[2])
    cfg = TrainConfig(dataset="digits", model="convnet", widths=(4, 6), batch_size=7, steps=8, lr=0.05,
                      momentum=0.9, eval_every=4, eval_subset=60, probe_schedule="every", probe_every=3,
                      probe_batch_size=32, checkpoint_every=2, log_every=1)
    rank = int(os.environ.get("RANK", 0))
    # rank 1 gets its own root: it must not create anything there
    base = root if rank == 0 else root / "rank1"
    run_dir = base / "ddp_test" / f"bn-{config_hash(cfg)[:8]}" / "seed0"
    spec = RunSpec("ddp_test", "bn", 0, "smoke", cfg, run_dir, probes=(Probe("trainfwd", train_forward),))
    if mode == "single":
        print(train_run(spec, RunOptions(threads=1)).status)
        sys.exit(0)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    options = RunOptions(threads=1, distributed=True, progress_every=1)
    if rank == 0:
        def stop_at_5(step):
            if mode == "stop" and step >= 5:
                raise KeyboardInterrupt
        print(train_run(spec, options, stop_at_5).status)
        ddp.end(ddp.current())
    else:
        assert ddp.follow([spec], options) == 1
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _launch(tmp_path: Path, mode: str, root: Path) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    if mode == "single":
        ranks = [_env()]
    else:
        port = str(_free_port())
        ranks = [_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r)) for r in range(2)]
    return [subprocess.Popen([sys.executable, str(script), mode, str(root)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in ranks]


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]


def _run_dir(root: Path) -> Path:
    (d,) = list((root / "ddp_test").glob("bn-*/seed0"))
    return d


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_and_resume_bit_for_bit(tmp_path):
    single, twice, stopped = tmp_path / "single", tmp_path / "ddp", tmp_path / "stopped"
    _finish(_launch(tmp_path, "single", single) + _launch(tmp_path, "ddp", twice))
    a, b = _run_dir(single), _run_dir(twice)
    ra, rb = _records(a), _records(b)
    # the same records at the same steps (train every step, eval, the probe on rank 0), values to float32 rounding
    assert [(r["step"], r.get("split"), r.get("probe")) for r in ra] == \
        [(r["step"], r.get("split"), r.get("probe")) for r in rb]
    assert sum(r.get("probe") == "trainfwd" for r in rb) == 4 and sum(r.get("split") == "train" for r in rb) == 8
    for x, y in zip(ra, rb):
        for k, v in x.items():
            if isinstance(v, float):
                assert y[k] == pytest.approx(v, rel=2e-5, abs=2e-6), (x, y)
            else:
                assert y[k] == v, (x, y)
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and any(k.endswith("running_var") for k in wa)
    for k in wa:
        if k.endswith("num_batches_tracked"):
            assert int(wa[k]) == int(wb[k]) == 8
        else:
            torch.testing.assert_close(wb[k], wa[k], rtol=2e-5, atol=2e-6, msg=k)
    # it trained: the comparison is not of two untouched models (losses move, running statistics left 0 and 1)
    train = [r["loss"] for r in ra if r.get("split") == "train"]
    assert max(abs(v - train[0]) for v in train) > 0.05
    assert wa["norm1.running_mean"].abs().min() > 0 and (wa["norm2.running_var"] - 1).abs().min() > 0
    env = json.loads((b / "env.json").read_text())
    assert env["distributed"]["nproc"] == 2 and env["distributed"]["sync_bn_layers"] >= 2
    assert not (twice / "rank1").exists()  # rank 1 wrote nothing

    # stopped at step 5 (rank 0 raises; rank 1 is left waiting and is killed), then resumed: the same
    # bytes and weights as the uninterrupted 2-process run
    procs = _launch(tmp_path, "stop", stopped)
    procs[0].communicate(timeout=180)
    assert procs[0].returncode != 0
    procs[1].kill()
    procs[1].communicate()
    c = _run_dir(stopped)
    assert (c / "checkpoint.pt").exists() and not (c / "done").exists()
    # a single process refuses to continue it (its sums would round otherwise), with the fix
    (p,) = _launch(tmp_path, "single", stopped)
    _, err = p.communicate(timeout=180)
    assert p.returncode != 0
    assert "written by a run over 2 process(es), this one has 1; resume it with --nproc 2" in err.decode()
    _finish(_launch(tmp_path, "ddp", stopped))
    assert json.loads((c / "done").read_text())["resumed_from"] == 4
    assert (c / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    wc = torch.load(c / "model.pt", weights_only=True)
    assert all(torch.equal(wc[k], wb[k]) for k in wb)
    assert not (stopped / "rank1").exists()


def test_slices_and_loss_weights_give_the_global_mean():
    for world, n in ((2, 7), (3, 10), (4, 4)):
        slices = [Ranks(r, world).slice(n) for r in range(world)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        sizes = [hi - lo for lo, hi in slices]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        # per-example losses: the rank means weighted by W·n_r/B, averaged over ranks (DDP), = the global mean
        losses = torch.rand(n, dtype=torch.float64)
        ddp_mean = sum(losses[lo:hi].mean() * local_loss_weight(Ranks(r, world), hi - lo, n, "mean")
                       for r, (lo, hi) in enumerate(slices)) / world
        ddp_sum = sum(losses[lo:hi].sum() * local_loss_weight(Ranks(r, world), hi - lo, n, "sum")
                      for r, (lo, hi) in enumerate(slices)) / world
        assert float(ddp_mean) == pytest.approx(float(losses.mean()), rel=1e-14)
        assert float(ddp_sum) == pytest.approx(float(losses.sum()), rel=1e-14)


def test_torchrun_arguments():
    assert torchrun_argv(2, None) == ["--standalone", "--nproc-per-node", "2", "-m", "bnlab.cli"]
    words = torchrun_argv(4, "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint host:29500")
    assert "--standalone" not in words and words[:3] == ["--nproc-per-node", "4", "--nnodes"]
    assert words[-2:] == ["-m", "bnlab.cli"]
    from bnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="must not contain --nproc-per-node"):
        torchrun_argv(2, "--nproc-per-node 3")


@pytest.mark.parametrize("argv,message", [
    (["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--workers", "2"], "drop --workers"),
    (["run", "ioffe_mnist", "--profile", "smoke", "--torchrun-args", "--nnodes 2"], "--torchrun-args needs --nproc"),
    (["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--set", "batch_size=1"],
     "batch_size=1, fewer examples than --nproc 2"),
    (["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--torchrun-args", "--nproc-per-node 2"],
     "must not contain --nproc-per-node"),
    (["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--torchrun-args", "--no-such-option 1"],
     "torchrun refuses it"),
    (["reproduce", "--profile", "smoke", "--nproc", "2"], "--nproc is for `bnlab run NAME --nproc N`"),
])
def test_cli_errors_before_anything_starts(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def _bnlab(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnlab.cli", *args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_cli_nproc_2_smoke_trains_through_torchrun(tmp_path):
    proc = _bnlab(["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--out", str(tmp_path), "--quiet"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "ioffe_mnist [smoke]: 2 runs" in out and out.count("ioffe_mnist [smoke]") == 1  # rank 0 prints alone
    exp = tmp_path / "smoke" / "ioffe_mnist"
    runs = sorted(exp.glob("*/seed0"))
    assert [r.parent.name.split("-")[0] for r in runs] == ["baseline", "bn"]
    for r in runs:
        assert {p.name for p in r.iterdir()} == {"config.json", "env.json", "metrics.jsonl", "arrays.npz",
                                                 "model.pt", "done", "lock"}
        assert json.loads((r / "done").read_text())["status"] == "done"
        assert json.loads((r / "env.json").read_text())["distributed"]["nproc"] == 2
        records = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        keys = [(x["step"], x.get("split"), x.get("probe")) for x in records]
        assert len(keys) == len(set(keys))  # one writer: no record twice
        assert sum(k[1] == "train" for k in keys) == 6  # 60 steps logged every 10
    assert (exp / "verdict.json").exists() and list((exp / "figures").glob("*.svg"))


def _rank_pid(out: Path, rank: int, timeout: float = 300.0) -> int:
    """The pid of the rank process of the `bnlab run --nproc` writing to ``out``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and any(e.startswith(b"BNLAB_DDP_RANK_ARGV=") and str(out).encode() in e
                                                      for e in env):
                return int(d.name)
        time.sleep(0.1)
    raise AssertionError("rank process not found")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank process through /proc")
def test_cli_a_killed_rank_ends_the_command_with_one_line(tmp_path):
    proc = _bnlab(["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--out", str(tmp_path), "--quiet",
                   "--variants", "bn", "--set", "steps=100000"])
    try:
        run = tmp_path / "smoke" / "ioffe_mnist"
        pid = _rank_pid(tmp_path, 1)
        deadline = time.monotonic() + 300
        while '"split":"train"' not in "".join(p.read_text() for p in run.glob("*/seed0/metrics.jsonl")):
            # the first update is logged: both ranks are in the training loop
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"no training step: {proc.communicate()[1][-2000:]}")
            time.sleep(0.1)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert f"bnlab: error: rank 1 of the --nproc 2 run was killed by signal SIGKILL (pid {pid})" in err
    assert "run the same command again to resume" in err and "Traceback" not in err
    # The bound (bnlab.train.ddp): torchrun's agent sees the death within 0.1 s and stops the other
    # rank with SIGTERM, then SIGKILL after its 30-s grace period when that rank is blocked in a
    # collective; usually 3-6 s here, 31 s once on a loaded CI machine. Never the 30-min gloo timeout.
    assert seconds < 60


def test_missing_torch_distributed_or_torchrun_is_one_clear_error(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    argv = ["run", "ioffe_mnist", "--profile", "smoke", "--nproc", "2", "--out", str(tmp_path)]
    monkeypatch.setitem(sys.modules, "torch.distributed.run", None)  # importing it raises ImportError
    monkeypatch.delattr(dist, "run", raising=False)  # (set on the package once another test imported it)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "torchrun (torch.distributed.run) cannot be imported" in err and err.count("\n") == 1
    monkeypatch.setattr(dist, "is_available", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "this torch build has no torch.distributed, which --nproc needs" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_nproc_refuses_arms_that_would_not_equal_one_process(tmp_path, capsys):
    """Dropout and per-rank-statistics norms: one error naming them and the --variants that can run."""
    from bnlab.cli import main

    code = main(["run", "ioffe_lr_study", "--profile", "smoke", "--nproc", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--nproc trains arms with plain BN" in err and "dropout=" in err and "--variants " in err
    code = main(["run", "santurkar_vgg", "--profile", "smoke", "--nproc", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "noisy_bn (norm=noisy_batch)" in err and "l1 (norm=l1)" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_rank_that_failed_is_named_not_the_one_torchrun_stopped():
    """A rank that raised (exit 1) is the cause; a rank torchrun then stopped (-SIGTERM) is not, even
    when its failure was recorded first."""
    import signal
    from types import SimpleNamespace

    from bnlab.train import ddp

    failures = {0: SimpleNamespace(exitcode=-signal.SIGTERM, timestamp=1.0, pid=10, signal_name=lambda: "SIGTERM"),
                1: SimpleNamespace(exitcode=1, timestamp=2.0, pid=11, signal_name=lambda: "")}
    assert ddp.failure_cause(failures)[0] == 1


def test_the_cli_reads_the_rank_variable_ddp_sets():
    import bnlab.cli
    from bnlab.train import ddp

    assert bnlab.cli._RANK_ENV == ddp.RANK_PROCESS_ENV
