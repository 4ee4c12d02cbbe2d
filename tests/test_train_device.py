"""Where runs compute: --device auto|cpu|cuda|cuda:N (bnlab.train.device).

No GPU is needed: the CPU path is checked end to end (auto picks it here, and an explicit cpu gives
the same bytes), the CUDA choices through their errors and through a faked torch.cuda."""
from __future__ import annotations

import json
import sys
import subprocess
from pathlib import Path

import pytest
import torch

from bnlab.errors import ConfigError
from bnlab.experiments.base import Experiment
from bnlab.train.config import TrainConfig
from bnlab.train.device import resolve_device
from bnlab.train.runner import run_experiment
from bnlab.train.task import build_task

TINY = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(16, 16), batch_size=32, lr=0.2, steps=30,
                   eval_every=10, eval_subset=100, checkpoint_every=10, probe_schedule="none")


def test_names_resolve_or_fail_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == resolve_device(" CPU ") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ConfigError, match="unknown device.*auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(ConfigError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_task_moves_every_tensor_once():
    task = build_task(TINY)
    assert task.to("cpu") is task  # already there: no copy
    moved = task.to(torch.device("meta"))
    for name in ("x_train", "y_train", "x_test", "y_test", "x_eval", "y_eval", "x_probe", "y_probe"):
        assert getattr(moved, name).device.type == "meta" and getattr(moved, name).shape == getattr(task, name).shape
    assert moved.name == task.name and moved.num_classes == task.num_classes


def test_explicit_cpu_equals_auto_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto means the CPU, also on a GPU machine
    exp = Experiment(name="_dev", description="tiny", base=TINY, variants={"bn": {"norm": "batch"}},
                     profiles={"smoke": {}})
    dirs = {}
    for device in ("auto", "cpu"):
        r = run_experiment(exp, "smoke", out=tmp_path / device, seeds=(0,), quiet=True, threads=1,
                           echo=lambda s: None, device=device)
        dirs[device] = r.planned[0].spec.run_dir
    assert (dirs["auto"] / "metrics.jsonl").read_bytes() == (dirs["cpu"] / "metrics.jsonl").read_bytes()
    env = json.loads((dirs["cpu"] / "env.json").read_text())
    assert env["device"] == "cpu" and "gpu" not in env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_refuses_a_missing_gpu_before_creating_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bnlab.cli", "run", "ioffe_mnist", "--profile", "smoke",
                           "--device", "cuda", "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr and "--device cpu" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_verdict_over_cpu_and_gpu_runs_says_so(tmp_path, monkeypatch):
    """dataset_text, which every verdict row and report section carries, names a non-CPU device."""
    from bnlab.experiments.base import dataset_text
    from bnlab.train.results import ExperimentResults

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exp = Experiment(name="_dev2", description="tiny", base=TINY, variants={"bn": {"norm": "batch"}},
                     profiles={"smoke": {}})
    r = run_experiment(exp, "smoke", out=tmp_path, seeds=(0, 1), quiet=True, threads=1, echo=lambda s: None)
    dirs = [p.spec.run_dir for p in r.planned]
    assert dataset_text(ExperimentResults.from_run_dirs(dirs, "_dev2").runs) == "scikit-learn 8x8 digits"
    env_path = dirs[1] / "env.json"  # as a GPU run records itself
    env = json.loads(env_path.read_text())
    env.update(device="cuda", gpu="NVIDIA H200")
    env_path.write_text(json.dumps(env))
    text = dataset_text(ExperimentResults.from_run_dirs(dirs, "_dev2").runs)
    assert text == "scikit-learn 8x8 digits / scikit-learn 8x8 digits, on cuda (NVIDIA H200)"
