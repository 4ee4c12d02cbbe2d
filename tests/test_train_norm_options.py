"""Norm layer options as config keys (--set virtual_batch_size=..., renorm_*, norm_momentum, norm_eps,
num_groups): they reach every norm layer of every model, they enter the config hash only when set (so
earlier run directories keep theirs), and a key that the config's norm does not take, or a bad value,
is one clear error before anything runs."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from bnlab.cli import main
from bnlab.norm.renorm import RenormSchedule
from bnlab.train import TrainConfig, config_hash, config_to_dict
from bnlab.train.config import HASHED_WHEN_SET, NOT_HASHED, apply_overrides
from bnlab.train.task import build_network

SHAPES = {"ioffe_mlp": (1, 8, 8), "convnet": (1, 8, 8), "vgg11": (3, 32, 32), "dln": (10,)}


def _norms(model):
    return [m for n, m in model.named_modules() if n.split(".")[-1].startswith("norm") and not isinstance(m, torch.nn.Identity)]


@pytest.mark.parametrize("model", sorted(SHAPES))
def test_options_reach_every_norm_layer(model):
    extra = {"width": "0.125"} if model == "vgg11" else {}
    base = {"model": model, **extra}
    cfg = apply_overrides(TrainConfig(), {**base, "norm": "ghost", "virtual_batch_size": "4", "norm_momentum": "0.3",
                                          "norm_eps": "0.001"})
    layers = _norms(build_network(cfg, SHAPES[model], 10))
    assert layers and all(m.virtual_batch_size == 4 and m.momentum == 0.3 and m.eps == 0.001 for m in layers)
    cfg = apply_overrides(TrainConfig(), {**base, "norm": "renorm", "renorm_rmax": "2", "renorm_dmax": "1",
                                          "renorm_warmup_steps": "3", "renorm_rmax_steps": "7", "renorm_dmax_steps": "5"})
    layers = _norms(build_network(cfg, SHAPES[model], 10))
    assert layers and all(m.schedule == RenormSchedule(2.0, 1.0, 3, 7, 5) for m in layers)
    cfg = apply_overrides(TrainConfig(), {**base, "norm": "group", "num_groups": "2"})
    assert all(m.num_groups == 2 for m in _norms(build_network(cfg, SHAPES[model], 10)))


def test_fixed_renorm_clipping_rmax_1_dmax_0_is_bn_through_the_config():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    outs = []
    for over in ({"norm": "batch"}, {"norm": "renorm", "renorm_rmax": "1", "renorm_dmax": "0"}):
        torch.manual_seed(1)
        model = build_network(apply_overrides(TrainConfig(model="convnet"), over), (1, 8, 8), 10).train()
        outs.append(model(x))
        assert over["norm"] == "batch" or all(m.clipping() == (1.0, 0.0) for m in _norms(model))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_an_option_reaches_only_the_arms_whose_norm_takes_it():
    ghost = apply_overrides(TrainConfig(norm="ghost"), {"virtual_batch_size": "8"})
    bn = apply_overrides(TrainConfig(norm="batch"), {"virtual_batch_size": "8"})
    none = apply_overrides(TrainConfig(norm="none"), {"virtual_batch_size": "8", "norm_momentum": "0.2"})
    assert config_hash(bn) == config_hash(TrainConfig(norm="batch"))  # the BN arm is the same run as before
    assert config_hash(none) == config_hash(TrainConfig(norm="none"))
    assert config_hash(ghost) != config_hash(TrainConfig(norm="ghost"))
    assert all(not isinstance(m, torch.nn.BatchNorm1d) or not hasattr(m, "virtual_batch_size")
               for m in build_network(bn, (1, 8, 8), 10).modules())


def test_unset_options_leave_the_hash_as_it_was():
    for cfg in (TrainConfig(), TrainConfig(model="vgg16", norm="batch", lr=0.5)):
        old = {k: v for k, v in config_to_dict(cfg).items() if k not in NOT_HASHED and k not in HASHED_WHEN_SET}
        text = json.dumps(old, sort_keys=True, separators=(",", ":"), allow_nan=False)
        assert config_hash(cfg) == hashlib.sha256(text.encode()).hexdigest()
    set_ = apply_overrides(TrainConfig(norm="ghost"), {"virtual_batch_size": "8"})
    assert config_hash(set_) != config_hash(TrainConfig(norm="ghost"))


@pytest.mark.parametrize("sets,message", [
    (["virtual_batch_size=8"], "--set virtual_batch_size changes nothing here: no variant's norm takes it "
                               "(norms: batch, none); add --set norm=ghost, or drop virtual_batch_size"),
    (["norm=group", "norm_momentum=0.1"], "--set norm_momentum changes nothing here"),
    (["norm=renorm", "renorm_rmax=2"], "fixed renorm clipping needs both renorm_rmax and renorm_dmax"),
    (["norm=renorm", "renorm_rmax=0.5", "renorm_dmax=1"], "renorm_rmax must be >= 1"),
    (["norm=renorm", "renorm_warmup_steps=50", "renorm_rmax_steps=10"], "the renorm schedule (--set renorm_warmup_steps"),
    (["norm_momentum=2"], "norm_momentum must be in [0, 1]"),
    (["norm=ghost", "virtual_batch_size=0"], "virtual_batch_size must be >= 1"),
    (["norm_eps=0"], "norm_eps must be a finite number > 0"),
])
def test_bad_norm_options_are_one_clear_error(tmp_path, capsys, sets, message):
    assert main(["run", "ioffe_mnist", "--profile", "smoke", "--out", str(tmp_path), "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_show_config_lists_the_norm_options(capsys):
    assert main(["run", "ioffe_mnist", "--profile", "smoke", "--show-config", "--set", "norm=ghost",
                 "virtual_batch_size=10"]) == 0
    out = capsys.readouterr().out
    assert "virtual_batch_size" in out and "renorm_rmax_steps" in out
