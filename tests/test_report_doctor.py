"""The report's BN doctor section: the doctor's findings on the first seed of each variant's final
model, in the HTML; a defect put into a trained model (γ of one channel set to 0) shows up with its
layer, a model without BN says there is nothing to check, and --no-doctor leaves the section out."""
from __future__ import annotations

import re

import torch

from bnlab.cli import main
from bnlab.experiments.base import Experiment
from bnlab.report.build import collect
from bnlab.report.html import render
from bnlab.train import TrainConfig, run_experiment

TINY = TrainConfig(dataset="digits", model="ioffe_mlp", widths=(16, 16), batch_size=32, lr=0.2, steps=30,
                   eval_every=30, eval_subset=100, checkpoint_every=100, probe_schedule="none")


def _doctor_html(html: str) -> str:
    m = re.search(r'<h3 id="[^"]*-doctor">BN doctor</h3>(.*?)</table>', html, re.S)
    assert m, "no BN doctor section"
    return m.group(1)


def test_report_shows_the_doctor_per_variant(tmp_path, capsys):
    exp = Experiment(name="doctor_tiny", description="tiny", base=TINY,
                     variants={"bn": {"norm": "batch"}, "plain": {"norm": "none"}}, profiles={"smoke": {}},
                     seeds={"smoke": (1, 0)})
    out = tmp_path / "smoke"
    run = run_experiment(exp, "smoke", out=out, quiet=True, threads=1, echo=lambda s: None)
    seed0 = [d for d in run.run_dirs if d.parent.name.startswith("bn-") and d.name == "seed0"][0]

    first = _doctor_html(render(collect(out, [exp])))
    assert first.count("<code>bn</code>") >= 1 and "seed1" not in first  # the first seed only
    # 30 steps leave the running statistics behind the weights; recalibrated over the same first 4
    # batches the doctor looks at, the model is healthy
    assert main(["recalibrate", str(seed0), "--batches", "4", "--out", str(seed0 / "model.pt"), "--quiet"]) == 0
    healthy = _doctor_html(render(collect(out, [exp])))
    assert "no problem found (128 training examples, batch per process 32)" in healthy
    assert "no BatchNorm layer: nothing for the doctor to check" in healthy  # the variant without BN
    assert healthy.count("<code>bn</code>") == 1 and "gamma_collapsed" not in healthy  # one model per variant

    # a defect in the first seed's model: the section names it (check, layer, evidence)
    state = torch.load(seed0 / "model.pt", weights_only=True)
    state["norm2.weight"][3] = 0.0
    torch.save(state, seed0 / "model.pt")
    sick = _doctor_html(render(collect(out, [exp])))
    assert re.search(r"<code>gamma_collapsed</code></td><td><code>norm2</code></td><td>1/16 channels have \|γ\| &lt; 1e-3",
                     sick)
    assert "0 errors, 1 warning." in sick

    # --no-doctor: no section
    assert "BN doctor" not in render(collect(out, [exp], doctor=False))
