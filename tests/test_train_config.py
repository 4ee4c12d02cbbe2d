"""TrainConfig: overrides parsed by type, clear errors, a stable hash, schedules."""

import os
import subprocess
import sys

import pytest

from bnlab.errors import ConfigError
from bnlab.train.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    field_names,
    parse_set_args,
)
from bnlab.train.schedule import lr_at, probe_steps


def test_overrides_parse_strings_by_field_type():
    cfg = apply_overrides(TrainConfig(), {
        "lr": "0.05", "steps": "2000", "nesterov": "true", "momentum": "0.9", "norm": "none",
        "widths": "16,32,32", "width": "0.25", "train_subset": "none", "eval_subset": "500",
        "binarize": "yes",
    })
    assert cfg.lr == 0.05 and isinstance(cfg.lr, float)
    assert cfg.steps == 2000 and isinstance(cfg.steps, int)
    assert cfg.nesterov is True and cfg.binarize is True
    assert cfg.norm == "none"
    assert cfg.widths == (16, 32, 32)
    assert cfg.width == 0.25
    assert cfg.train_subset is None and cfg.eval_subset == 500


def test_overrides_accept_python_values_and_scientific_ints():
    cfg = apply_overrides(TrainConfig(), {"lr": 1, "steps": "1e4", "widths": [8, 8]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.steps == 10000
    assert cfg.widths == (8, 8)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), {"learning_rate": "0.1"})
    msg = str(err.value)
    assert "'learning_rate'" in msg and "valid keys" in msg
    for key in ("lr", "steps", "norm", "batch_size", "momentum"):
        assert key in msg


@pytest.mark.parametrize("key, value, expected", [
    ("steps", "many", "int"),
    ("lr", "fast", "float"),
    ("nesterov", "maybe", "bool"),
    ("widths", "a,b", "int"),
    ("batch_size", "1.5", "int"),
])
def test_wrong_type_names_key_type_and_value(key, value, expected):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), {key: value})
    msg = str(err.value)
    assert key in msg and expected in msg and repr(value).strip("'") in msg


@pytest.mark.parametrize("overrides, fragment", [
    ({"loss": "hinge"}, "cross_entropy, mse"),
    ({"steps": "0"}, "steps must be >= 1"),
    ({"momentum": "1.5"}, "momentum must be in [0, 1]"),
    ({"nesterov": "true"}, "nesterov=true needs momentum > 0"),
    ({"lr_schedule": "linear"}, "constant, exp, step, cosine"),
    ({"lr": "nan"}, "lr must be a finite number"),
])
def test_range_checks(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), overrides)
    assert fragment in str(err.value)


def test_parse_set_args():
    assert parse_set_args(["lr=0.1", "norm = none"]) == {"lr": "0.1", "norm": "none"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["lr"])


def test_dict_round_trip():
    cfg = TrainConfig(widths=(4, 5), lr=0.3, norm="none")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_hash_ignores_checkpoint_every_but_not_results():
    base = TrainConfig()
    assert config_hash(base) == config_hash(apply_overrides(base, {"checkpoint_every": "7"}))
    assert config_hash(base) != config_hash(apply_overrides(base, {"lr": "0.2"}))
    assert config_hash(base) != config_hash(apply_overrides(base, {"eval_every": "10"}))


def test_hash_is_stable_across_processes():
    code = ("from bnlab.train.config import TrainConfig, config_hash; "
            "print(config_hash(TrainConfig(widths=(3, 4), lr=0.25)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own hash() differs; ours must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.strip()
    assert out == config_hash(TrainConfig(widths=(3, 4), lr=0.25))


def test_every_field_is_overridable_from_a_string():
    cfg = TrainConfig()
    data = config_to_dict(cfg)
    as_strings = {k: ("none" if v is None else ",".join(map(str, v)) if isinstance(v, list) else str(v))
                  for k, v in data.items()}
    assert apply_overrides(cfg, as_strings) == cfg
    assert set(as_strings) == set(field_names())


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, steps=100, lr_decay=0.5, lr_decay_steps=10)
    assert lr_at(cfg, 50) == 1.0
    exp = apply_overrides(cfg, {"lr_schedule": "exp"})
    assert lr_at(exp, 10) == pytest.approx(0.5) and lr_at(exp, 5) == pytest.approx(0.5 ** 0.5)
    step = apply_overrides(cfg, {"lr_schedule": "step"})
    assert lr_at(step, 19) == 0.5 and lr_at(step, 20) == 0.25
    cos = apply_overrides(cfg, {"lr_schedule": "cosine", "lr_min": "0.1"})
    assert lr_at(cos, 0) == pytest.approx(1.0) and lr_at(cos, 50) == pytest.approx(0.55)
    warm = apply_overrides(cfg, {"warmup_steps": "4"})
    assert [lr_at(warm, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_probe_steps():
    log = probe_steps("log", 10_000, points=20)
    assert log[0] == 0 and log[-1] == 10_000 and len(log) >= 20 and log == sorted(set(log))
    assert probe_steps("every", 10, every=4) == [0, 4, 8, 10]
    assert probe_steps("none", 10) == []
    assert probe_steps("log", 3, points=20) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="log, every, none"):
        probe_steps("sometimes", 10)


def test_experiment_definitions_are_checked_when_defined():
    from bnlab.experiments.base import Experiment

    with pytest.raises(ConfigError, match="unknown config key 'lrate'"):
        Experiment(name="x", description="", base=TrainConfig(), variants={"a": {"lrate": 0.1}})
    with pytest.raises(ConfigError, match="steps expects int"):
        Experiment(name="x", description="", base=TrainConfig(), profiles={"smoke": {"steps": "few"}})
    with pytest.raises(ConfigError, match="unknown profile 'fast'"):
        Experiment(name="x", description="", base=TrainConfig(), profiles={"fast": {}})
    with pytest.raises(ConfigError, match="directory name"):
        Experiment(name="x", description="", base=TrainConfig(), variants={"a/b": {}})


def test_resolution_order_base_profile_variant_set():
    from bnlab.experiments.base import Experiment

    exp = Experiment(name="x", description="", base=TrainConfig(lr=0.1, steps=10),
                     variants={"fast": {"lr": 1.0}, "slow": {}},
                     profiles={"smoke": {"lr": 0.5, "steps": 3}},
                     variant_profiles={"smoke": {"slow": {"steps": 4}}})
    assert exp.config("fast", "smoke").lr == 1.0 and exp.config("slow", "smoke").lr == 0.5
    assert exp.config("slow", "smoke").steps == 4 and exp.config("fast", "smoke").steps == 3
    assert exp.config("fast", "smoke", {"lr": "2"}).lr == 2.0
    assert exp.config("fast", "quick").steps == 10
