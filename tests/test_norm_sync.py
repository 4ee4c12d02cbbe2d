"""Synchronized BN across 2 real processes (gloo on the loopback interface, CPU): outputs, input,
weight and bias gradients and running statistics against single-process torch.nn BN on the
concatenated batch in float64; unequal batch sizes and an empty one; a dead process gives a clear
error within the group's timeout instead of a hang."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.norm.sync import SyncBatchNorm, convert_sync, merge_moments

WORKER = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from bnlab.norm.sync import SyncBatchNorm, SyncBatchNormError
    rank, out, mode = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5))
    if mode == "die" and rank == 1:
        os._exit(0)  # a process that dies before the collective
    data = torch.load(sys.argv[3])
    x = data["x"][rank].clone().requires_grad_(True)
    bn = SyncBatchNorm(data["c"], momentum=0.3).double()
    bn.load_state_dict(data["state"])
    t0 = time.monotonic()
    try:
        y = bn(x)
    except SyncBatchNormError as err:
        torch.save({"error": str(err), "seconds": time.monotonic() - t0}, out)
        sys.exit(0)
    (y * data["gy"][rank]).sum().backward()
    torch.save({"y": y.detach(), "gx": x.grad, "gw": bn.weight.grad, "gb": bn.bias.grad,
                "rm": bn.running_mean, "rv": bn.running_var, "nbt": bn.num_batches_tracked}, out)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, data: dict, mode: str = "run") -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    inp = tmp_path / "data.pt"
    torch.save(data, inp)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"out{r}.pt"), mode, str(inp)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    return [torch.load(tmp_path / f"out{r}.pt") if (tmp_path / f"out{r}.pt").exists() else None for r in range(2)]


@pytest.mark.parametrize("sizes,spatial", [((3, 5), ()), ((0, 4), ()), ((2, 3), (3, 4))])
def test_two_processes_equal_one_bn_on_the_concatenated_batch(tmp_path, sizes, spatial):
    gen = torch.Generator().manual_seed(sum(sizes))
    c = 3
    xs = [torch.randn((n, c) + spatial, generator=gen, dtype=torch.float64) * 2 + 1 for n in sizes]
    gys = [torch.randn((n, c) + spatial, generator=gen, dtype=torch.float64) for n in sizes]
    ref = (nn.BatchNorm1d if not spatial else nn.BatchNorm2d)(c, momentum=0.3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(c, generator=gen))
        ref.bias.copy_(torch.randn(c, generator=gen))
        ref.running_var.fill_(2.0)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    out = _launch(tmp_path, {"x": xs, "gy": gys, "c": c, "state": state})
    x = torch.cat(xs).requires_grad_(True)
    y = ref(x)
    (y * torch.cat(gys)).sum().backward()
    got_y = torch.cat([o["y"] for o in out])
    got_gx = torch.cat([o["gx"] for o in out])
    assert torch.allclose(got_y, y.detach(), rtol=1e-10, atol=1e-10)
    assert torch.allclose(got_gx, x.grad, rtol=1e-10, atol=1e-10)
    # weight and bias gradients: each process's share; their sum is the full-batch gradient
    assert torch.allclose(out[0]["gw"] + out[1]["gw"], ref.weight.grad, rtol=1e-10, atol=1e-10)
    assert torch.allclose(out[0]["gb"] + out[1]["gb"], ref.bias.grad, rtol=1e-10, atol=1e-10)
    for o in out:  # every process holds the same running statistics: those of the whole batch
        assert torch.allclose(o["rm"], ref.running_mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(o["rv"], ref.running_var, rtol=1e-10, atol=1e-12)
        assert int(o["nbt"]) == 1


def test_a_dead_process_gives_a_clear_error_within_the_timeout(tmp_path):
    data = {"x": [torch.randn(4, 3, dtype=torch.float64)] * 2, "gy": [torch.zeros(4, 3)] * 2, "c": 3,
            "state": nn.BatchNorm1d(3).double().state_dict()}
    t0 = time.monotonic()
    out = _launch(tmp_path, data, mode="die")
    assert out[1] is None and "error" in out[0], out
    assert "another process died or stalled" in out[0]["error"] and "timeout" in out[0]["error"]
    assert out[0]["seconds"] < 60 and time.monotonic() - t0 < 120


def test_single_process_is_plain_bn_and_convert_keeps_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 4))
    x = torch.randn(6, 2, 4, 4)
    ref = __import__("copy").deepcopy(model)
    sd = model.state_dict()
    convert_sync(model)
    assert isinstance(model[1], SyncBatchNorm) and isinstance(model[4], SyncBatchNorm)
    assert model.state_dict().keys() == sd.keys()
    assert torch.allclose(model(x), ref(x)) and torch.equal(model[1].running_mean, ref[1].running_mean)


def test_merge_moments_is_exact_for_unequal_and_empty_groups():
    gen = torch.Generator().manual_seed(0)
    groups = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * 3 + 1 for n in (5, 0, 1, 9)]
    counts = torch.tensor([float(len(g)) for g in groups], dtype=torch.float64)
    means = torch.stack([g.mean(0) if len(g) else torch.zeros(3, dtype=torch.float64) for g in groups])
    m2s = torch.stack([((g - g.mean(0)) ** 2).sum(0) if len(g) else torch.zeros(3, dtype=torch.float64)
                       for g in groups])
    n, mean, m2 = merge_moments(counts, means, m2s)
    allx = torch.cat(groups)
    assert int(n) == 15 and torch.allclose(mean, allx.mean(0), rtol=1e-13)
    assert torch.allclose(m2 / (n - 1), allx.var(0), rtol=1e-12)
