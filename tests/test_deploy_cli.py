"""`bnlab fold` and `bnlab recalibrate` on a trained run directory: the folded, exported model's eval
outputs equal the trained model's to 1e-5; recalibrated running statistics equal the population mean
and unbiased variance of each BN layer's inputs over the same batches (float64 reference) to 1e-6;
weights that would run code on load are refused, nothing executed."""
from __future__ import annotations

import pytest
import torch

from bnlab.cli import main
from bnlab.data import Batches
from bnlab.experiments.restore import restore_model
from bnlab.norm.modules import is_batchnorm
from bnlab.train import RunOptions, RunSpec, TrainConfig, config_hash, train_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = TrainConfig(dataset="digits", model="convnet", widths=(4, 6), batch_size=16, steps=12, lr=0.1,
                      eval_every=12, eval_subset=100, probe_schedule="none", checkpoint_every=100)
    d = tmp_path_factory.mktemp("runs") / "deploy_test" / f"bn-{config_hash(cfg)[:8]}" / "seed3"
    assert train_run(RunSpec("deploy_test", "bn", 3, "smoke", cfg, d), RunOptions(threads=1)).status == "done"
    return d


def test_fold_cli_exports_a_model_with_the_same_eval_outputs(run_dir, tmp_path, capsys):
    out = tmp_path / "folded.pt2"
    assert main(["fold", str(run_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "folded 2 of 2 BN layers" in text
    folded = torch.export.load(str(out)).module()
    assert not any(is_batchnorm(m) for m in folded.modules())
    r = restore_model(run_dir)
    for n in (1, 5, 97):  # the batch dimension stays free
        x = r.task.x_test[:n]
        with torch.no_grad():
            torch.testing.assert_close(folded(x), r.model(x), rtol=0, atol=1e-5)
    # the file inside the run directory works too
    assert main(["fold", str(run_dir / "model.pt"), "--out", str(tmp_path / "b.pt2")]) == 0


def test_recalibrate_cli_sets_population_statistics(run_dir, tmp_path, capsys):
    out = tmp_path / "recal.pt"
    assert main(["recalibrate", str(run_dir), "--batches", "5", "--batch-size", "13", "--out", str(out),
                 "--quiet"]) == 0
    assert "recalibrated 2 BN layers over 5 batches of 13" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    # reference: each BN layer's inputs over the same 5 batches (model in training mode), in float64
    r = restore_model(run_dir)
    batches = Batches(r.task.x_train, r.task.y_train, 13, 3)
    seen: dict[str, list[torch.Tensor]] = {}
    bns = [(n, m) for n, m in r.model.named_modules() if is_batchnorm(m)]
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in bns]
    r.model.train()
    with torch.no_grad():
        for i in range(5):
            r.model(batches.batch(i)[0])
    for h in hooks:
        h.remove()
    for name, _ in bns:
        v = torch.cat(seen[name]).double().transpose(0, 1).reshape(len(seen[name][0][0]), -1)
        torch.testing.assert_close(state[f"{name}.running_mean"].double(), v.mean(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(state[f"{name}.running_var"].double(), v.var(1, unbiased=True), rtol=0, atol=1e-6)
        # stale statistics were replaced (the trained ones are a momentum average, not these)
        assert not torch.allclose(r.model.get_submodule(name).running_var.double(), v.var(1), atol=1e-4)


def test_weights_that_would_run_code_are_refused(run_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": Payload()}, bad / "model.pt")
    for argv in (["fold", str(bad), "--out", str(tmp_path / "x.pt2")], ["recalibrate", str(bad), "--batches", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "was refused" in err and "nothing was executed" in err
    assert not marker.exists() and not (tmp_path / "x.pt2").exists()


def test_paths_that_are_not_runs(tmp_path, capsys):
    assert main(["fold", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["recalibrate", str(tmp_path), "--batches", "2"]) == 2
    assert "has no config.json" in capsys.readouterr().err
