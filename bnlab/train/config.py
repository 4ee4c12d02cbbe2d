"""TrainConfig: everything that determines one training run, as one flat, typed, frozen dataclass.

Why flat: ``bnlab run NAME --set lr=0.05 steps=2000`` addresses every field by its plain name, the run
directory's ``config.json`` is a readable dict, and the config hash is a hash of that dict. Model
options that only some models take (``activation``, ``width``, ...) default to ``None`` = "the model's
own default" and are passed to ``build_model`` only when set.

What is *not* here: things that change how fast a run goes but not what it computes (threads, workers,
data directory, TensorBoard). They are runtime options (``runner.RunOptions``), so changing them never
changes a run directory's hash and a killed run can be resumed with other ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

from bnlab.errors import ConfigError

LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")
DTYPES = ("float32", "float64")
LR_SCHEDULES = ("constant", "exp", "step", "cosine")
PROBE_SCHEDULES = ("log", "every", "none")


@dataclass(frozen=True)
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------
    dataset: str = "digits"  # mnist | fashion_mnist | cifar10 | digits | gaussian_regression
    data_fallback: bool = True  # MNIST/CIFAR absent -> Fashion-MNIST (stated in env.json and report)
    binarize: bool = False  # Ioffe's binary MNIST pixels: x > 0.5 (threshold ours); real MNIST only
    train_subset: int | None = None  # use a fixed random subset of N training examples (data_seed)
    data_seed: int = 0  # fixes subsets, the eval subset, the probe batch, synthetic data (not the seed)
    regression_n: int = 1000  # gaussian_regression: samples (Santurkar DLN, App. A.1)
    regression_dim: int = 10  # gaussian_regression: input = output size
    # --- model ------------------------------------------------------------------------------------
    model: str = "ioffe_mlp"  # ioffe_mlp | vgg11 | vgg16 | convnet | dln
    norm: str = "batch"  # any bnlab.norm.factory name; "none" = no normalization
    activation: str | None = None  # None = the model's default
    width: float | None = None  # VGG channel multiplier
    widths: tuple[int, ...] | None = None  # convnet channels / Ioffe MLP hidden widths
    init: str | None = None  # Ioffe MLP: gaussian | glorot; VGG: glorot | kaiming
    init_std: float | None = None  # Ioffe MLP Gaussian init std (None = 1/sqrt(fan_in))
    head: str | None = None  # VGG classifier head: linear | mlp
    dropout: float | None = None  # convnet dropout probability (Ioffe Sec. 4.2.1 removes it)
    depth: int | None = None  # DLN layers
    dtype: str = "float32"  # float32 | float64 (the DLN runs in float64)
    # --- norm layer options (None = the layer's default; each applies to the norms that take it) ----
    norm_eps: float | None = None  # eps of every norm layer
    norm_momentum: float | None = None  # running-statistics momentum, torch's convention (BN: 0.1)
    virtual_batch_size: int | None = None  # norm=ghost: examples per ghost batch (default: the whole batch)
    renorm_rmax: float | None = None  # norm=renorm: final r clipping (Ioffe 2017: 3; >= 1)
    renorm_dmax: float | None = None  # norm=renorm: final d clipping (Ioffe 2017: 5; >= 0)
    renorm_warmup_steps: int | None = None  # norm=renorm: updates of plain BN before the ramp (5000)
    renorm_rmax_steps: int | None = None  # norm=renorm: update at which rmax reaches renorm_rmax (40000)
    renorm_dmax_steps: int | None = None  # norm=renorm: update at which dmax reaches renorm_dmax (25000)
    num_groups: int | None = None  # norm=group: groups of channels
    channels_last: bool = False  # memory format for conv nets (speed; may change low-order bits)
    # --- objective and optimizer ------------------------------------------------------------------
    steps: int = 1000  # number of SGD updates
    batch_size: int = 60
    loss: str = "cross_entropy"  # cross_entropy | mse
    loss_reduction: str = "mean"  # mean | sum (r2rt / Santurkar DLN use sum)
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | exp | step | cosine
    lr_decay: float = 0.1  # exp: lr*decay**(t/decay_steps); step: lr*decay**(t//decay_steps)
    lr_decay_steps: int = 1000
    lr_min: float = 0.0  # cosine floor
    warmup_steps: int = 0  # linear warm-up from 0 over the first steps
    # --- what gets recorded -----------------------------------------------------------------------
    log_every: int = 1  # train loss/acc record every N steps (per step by default)
    eval_every: int = 500  # eval on the fixed subset every N steps (and at the last step)
    eval_subset: int | None = 2000  # fixed subset of the test split for periodic eval; None = all
    eval_batch_size: int = 1000
    probe_schedule: str = "log"  # log | every | none: default schedule for the experiment's probes
    probe_every: int = 100
    probe_points: int = 20  # log schedule: about this many distinct steps, incl. 0 and the last
    probe_batch_size: int = 256  # the fixed probe batch drawn from the training split
    # --- resume granularity (not hashed: it does not change any result) ----------------------------
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        _validate(self)


# Fields that never change a run's outputs; leaving them out of the hash lets a user change them and
# still resume or skip the same run directory.
NOT_HASHED = frozenset({"checkpoint_every"})
# Norm options, added after runs were stored: left out of the hash while unset (None), so every earlier
# run directory keeps its hash, and where the config's norm does not take them (they change nothing).
HASHED_WHEN_SET = frozenset({"norm_eps", "norm_momentum", "virtual_batch_size", "renorm_rmax", "renorm_dmax",
                             "renorm_warmup_steps", "renorm_rmax_steps", "renorm_dmax_steps", "num_groups"})
_RENORM_STEPS = ("renorm_warmup_steps", "renorm_rmax_steps", "renorm_dmax_steps")


# Each norm option key -> the make_norm keyword it becomes (renorm_* become ``schedule`` or rmax/dmax).
_NORM_KWARG = {"norm_eps": "eps", "norm_momentum": "momentum", "virtual_batch_size": "virtual_batch_size",
               "num_groups": "num_groups", "renorm_rmax": "rmax", "renorm_dmax": "dmax",
               "renorm_warmup_steps": "schedule", "renorm_rmax_steps": "schedule", "renorm_dmax_steps": "schedule"}


def applies(cfg: "TrainConfig", key: str) -> bool:
    """Whether the norm option ``key`` reaches the norm layers of ``cfg.norm`` (the norm's constructor
    takes it). An option that does not apply does nothing and is not hashed, so one ``--set`` can
    configure the arms it concerns (e.g. ghost) and leave the others (BN, no norm) as they were."""
    from bnlab.norm.factory import _OPTIONS

    if cfg.norm == "none":
        return False
    allowed = _OPTIONS.get(cfg.norm)
    if allowed is None:  # a norm registered without its options: pass everything through
        return True
    return _NORM_KWARG[key] in allowed


def norm_options(cfg: "TrainConfig") -> dict[str, Any]:
    """The config's norm options that apply to its norm, as ``make_norm`` keyword arguments. The renorm
    keys give a ``RenormSchedule`` when a step count is set (unset ones keep Ioffe 2017's values), else
    fixed clipping (``rmax``, ``dmax``)."""
    set_ = {k: getattr(cfg, k) for k in _NORM_KWARG if getattr(cfg, k) is not None and applies(cfg, k)}
    kw: dict[str, Any] = {_NORM_KWARG[k]: v for k, v in set_.items() if not k.startswith("renorm_")}
    steps = {k[len("renorm_"):]: v for k, v in set_.items() if k in _RENORM_STEPS}
    clip = {k[len("renorm_"):]: v for k, v in set_.items() if k in ("renorm_rmax", "renorm_dmax")}
    if steps:
        from bnlab.norm.renorm import RenormSchedule

        kw["schedule"] = RenormSchedule(**clip, **steps)
    else:
        kw.update(clip)
    return kw


def check_norm_options_used(configs: Mapping[str, "TrainConfig"], keys: Iterable[str]) -> None:
    """Raise ConfigError for a norm option in ``keys`` (the --set keys) that applies to none of the
    variants' norms: it would change nothing (e.g. virtual_batch_size with only BN and no-norm arms)."""
    for key in keys:
        if key in _NORM_KWARG and not any(applies(c, key) for c in configs.values()):
            norms = ", ".join(sorted({c.norm for c in configs.values()}))
            taker = {"virtual_batch_size": "ghost", "num_groups": "group"}.get(
                key, "renorm" if key.startswith("renorm_") else None)
            fix = f"add --set norm={taker}" if taker else "set a norm that has this option"
            raise ConfigError(f"--set {key} changes nothing here: no variant's norm takes it (norms: {norms}); "
                              f"{fix}, or drop {key}")


def _check_norm_options(cfg: "TrainConfig") -> None:
    """The norm options' values (ranges; the renorm schedule's order of steps), whatever the norm."""
    if cfg.norm_eps is not None and not (math.isfinite(cfg.norm_eps) and cfg.norm_eps > 0):
        raise ConfigError(f"norm_eps must be a finite number > 0, got {cfg.norm_eps}")
    if cfg.norm_momentum is not None and not 0.0 <= cfg.norm_momentum <= 1.0:
        raise ConfigError(f"norm_momentum must be in [0, 1] (torch's convention: the weight of the new batch; "
                          f"Keras' 0.99 is 0.01 here), got {cfg.norm_momentum}")
    for key in ("virtual_batch_size", "num_groups"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 or None, got {value}")
    if cfg.renorm_rmax is not None and not cfg.renorm_rmax >= 1:
        raise ConfigError(f"renorm_rmax must be >= 1 (1 = no r correction; Ioffe 2017 ends at 3), got {cfg.renorm_rmax}")
    if cfg.renorm_dmax is not None and not cfg.renorm_dmax >= 0:
        raise ConfigError(f"renorm_dmax must be >= 0 (0 = no d correction; Ioffe 2017 ends at 5), got {cfg.renorm_dmax}")
    steps = {k[len("renorm_"):]: getattr(cfg, k) for k in _RENORM_STEPS if getattr(cfg, k) is not None}
    if steps:
        from bnlab.norm.renorm import RenormSchedule

        clip = {k: getattr(cfg, f"renorm_{k}") for k in ("rmax", "dmax") if getattr(cfg, f"renorm_{k}") is not None}
        try:
            RenormSchedule(**clip, **steps)
        except ConfigError as err:
            raise ConfigError(f"the renorm schedule (--set renorm_warmup_steps, renorm_rmax_steps, renorm_dmax_steps): "
                              f"{err}") from None
    elif (cfg.renorm_rmax is None) != (cfg.renorm_dmax is None):
        raise ConfigError("fixed renorm clipping needs both renorm_rmax and renorm_dmax (e.g. --set renorm_rmax=3 "
                          "renorm_dmax=5); or set renorm_warmup_steps/renorm_rmax_steps/renorm_dmax_steps for "
                          "Ioffe 2017's ramp towards them")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _valid_keys_text() -> str:
    return ", ".join(field_names())


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _validate(cfg: TrainConfig) -> None:
    """Range checks a type check cannot do; each message names the key and what is allowed."""
    _check_choice("loss", cfg.loss, LOSSES)
    _check_choice("loss_reduction", cfg.loss_reduction, REDUCTIONS)
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _check_choice("probe_schedule", cfg.probe_schedule, PROBE_SCHEDULES)
    positive = ("steps", "batch_size", "log_every", "eval_every", "eval_batch_size", "probe_every",
                "probe_points", "probe_batch_size", "checkpoint_every", "lr_decay_steps",
                "regression_n", "regression_dim")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("train_subset", "eval_subset", "depth"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 or None, got {value}")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise ConfigError(f"lr must be a finite number >= 0, got {cfg.lr}")
    if not 0.0 <= cfg.momentum <= 1.0:
        raise ConfigError(f"momentum must be in [0, 1], got {cfg.momentum}")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("nesterov=true needs momentum > 0; set momentum=0.9 or nesterov=false")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1) or None, got {cfg.dropout}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.loss == "cross_entropy" and cfg.dataset == "gaussian_regression":
        raise ConfigError("gaussian_regression is a regression task; set loss=mse")
    _check_norm_options(cfg)


# --- parsing --set key=value strings ---------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"tuple of {_type_name(typing.get_args(tp)[0])} (comma-separated)"
    return getattr(tp, "__name__", str(tp))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (a string from the command line, or a Python value from an experiment file)
    to the field type ``tp``; raise ConfigError naming the key, the expected type and the value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key} expects {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise ConfigError(f"{key} expects {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(key, item, p.strip() if isinstance(p, str) else p) for p in parts)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key} expects bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:  # accept "1e4" / "2000.0" when they are whole numbers
                as_float = float(value)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float == int(as_float):
                return int(as_float)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} expects int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} expects float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects str, got {value!r}")
    raise AssertionError(f"unsupported field type {tp!r} for {key}")  # a bug in TrainConfig


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return ``cfg`` with ``overrides`` applied; values may be strings (parsed by field type).

    Unknown keys raise ConfigError listing every valid key; a value of the wrong type raises
    ConfigError naming the key, the expected type and the value.
    """
    if not overrides:
        return cfg
    types_ = _field_types()
    unknown = [k for k in overrides if k not in types_]
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {_valid_keys_text()}"
        )
    changes = {k: _coerce(k, types_[k], v) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **changes)


def parse_set_args(items: list[str]) -> dict[str, str]:
    """``["lr=0.1", "norm=none"]`` -> ``{"lr": "0.1", "norm": "none"}`` (values stay strings)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}; e.g. --set lr=0.05 steps=2000")
        out[key.strip()] = value.strip()
    return out


# --- serialisation and hashing -----------------------------------------------------------------------

def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists) in field order."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Inverse of ``config_to_dict``; keys that are not TrainConfig fields are ignored (run metadata
    such as experiment/variant/seed live next to the config in config.json)."""
    types_ = _field_types()
    known = {k: v for k, v in data.items() if k in types_}
    return apply_overrides(TrainConfig(), known)


def config_hash(cfg: TrainConfig) -> str:
    """sha256 (hex) of the sorted JSON of every field that can change a result.

    Stable across processes and machines: it hashes the JSON text, never Python's ``hash``.
    ``checkpoint_every`` is left out (see NOT_HASHED).
    """
    data = {k: v for k, v in config_to_dict(cfg).items()
            if k not in NOT_HASHED and not (k in HASHED_WHEN_SET and (v is None or not applies(cfg, k)))}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two configs: name -> (a value, b value)."""
    da, db = config_to_dict(a), config_to_dict(b)
    return {k: (da[k], db[k]) for k in da if da[k] != db[k]}
