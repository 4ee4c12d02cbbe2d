"""From a TrainConfig to tensors and a model: the data a run trains on, and the network it trains.

All data lives in memory as one tensor per split (the datasets here are at most CIFAR-10, 180 MB in
float32), so batches are slices of a tensor rather than DataLoader items (about 10x faster for in-memory data).
Loaded datasets are cached per process: a serial sweep over variants and seeds reads the files once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.train.config import TrainConfig, norm_options

REGRESSION = "gaussian_regression"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Task:
    """The tensors of one run's data, already subset, binarized and cast.

    ``x_eval``/``y_eval`` is the fixed subset of the test split used for periodic evaluation;
    ``x_probe``/``y_probe`` the fixed probe batch drawn from the training split. Both are chosen with
    generators seeded by ``cfg.data_seed``, so they are the same for every seed of an experiment.
    """

    name: str  # dataset actually used
    requested: str  # dataset the config asked for
    x_train: Tensor  # (N, C, H, W) images or (N, D) regression inputs
    y_train: Tensor  # (N,) int64 labels or (N, D) regression targets
    x_test: Tensor
    y_test: Tensor
    x_eval: Tensor
    y_eval: Tensor
    x_probe: Tensor
    y_probe: Tensor
    num_classes: int  # output units (regression: output dimension)
    in_shape: tuple[int, ...]
    source: str
    note: str
    is_classification: bool
    binarized: bool = False  # pixels thresholded at 0.5 (real MNIST with binarize=true only)

    def to(self, device: torch.device | str) -> "Task":
        """The same task with every tensor on ``device`` (itself when they already are)."""
        names = ("x_train", "y_train", "x_test", "y_test", "x_eval", "y_eval", "x_probe", "y_probe")
        if all(getattr(self, n).device == torch.device(device) for n in names):
            return self
        return replace(self, **{n: getattr(self, n).to(device) for n in names})

    def describe(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "used": self.name,
            "binarized": self.binarized,
            "source": self.source,
            "note": self.note,
            "train": int(self.x_train.shape[0]),
            "test": int(self.x_test.shape[0]),
            "eval_subset": int(self.x_eval.shape[0]),
            "in_shape": list(self.in_shape),
            "num_classes": self.num_classes,
        }


def binarize_note(name: str) -> str:
    """The sentence a run's dataset note gets when binarize=true meets data other than MNIST."""
    from bnlab.data.locate import dataset_title

    return f"binarize=true applies to MNIST only, so {dataset_title(name)} keeps its grey levels."


@functools.lru_cache(maxsize=4)
def _load(name: str, data_dir: str | None, fallback: bool) -> Any:
    from bnlab.data import load_dataset  # lazy: the data layer is only needed when a run starts

    return load_dataset(name, data_dir, fallback=fallback)


def _take(n_total: int, n: int | None, seed: int) -> Tensor | None:
    """Indices of a fixed random subset of size n (None -> everything, in order)."""
    if n is None or n >= n_total:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=g)[:n]


def build_task(cfg: TrainConfig, data_dir: str | None = None) -> Task:
    return _build_task_cached(_task_key(cfg), data_dir)


def _task_key(cfg: TrainConfig) -> tuple:
    # Only the fields that change the tensors: two variants that differ in lr share one Task.
    return (cfg.dataset, cfg.data_fallback, cfg.binarize, cfg.train_subset, cfg.data_seed,
            cfg.regression_n, cfg.regression_dim, cfg.dtype, cfg.eval_subset, cfg.probe_batch_size,
            cfg.loss)


@functools.lru_cache(maxsize=8)
def _build_task_cached(key: tuple, data_dir: str | None) -> Task:
    (dataset, fallback, binarize, train_subset, data_seed, reg_n, reg_dim, dtype_name, eval_subset,
     probe_batch, loss) = key
    dtype = _DTYPES[dtype_name]
    if dataset == REGRESSION:
        from bnlab.data import make_gaussian_regression

        x, y, _ = make_gaussian_regression(n=reg_n, dim=reg_dim, seed=data_seed, dtype=dtype)
        # The DLN fits a fixed data set (Santurkar et al. 2018, App. A.1); there is no held-out split, so "test" is the
        # training set, evaluated with the network in eval mode.
        x_train, y_train, x_test, y_test = x, y, x, y
        name, requested, source = REGRESSION, REGRESSION, f"synthetic (data_seed={data_seed})"
        note = "regression: the test split is the training set"
        num_classes, in_shape, is_cls = reg_dim, (reg_dim,), False
        binarized = False
    else:
        ds = _load(dataset, data_dir, fallback)
        x_train, y_train, x_test, y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        name, requested, source, note = ds.name, ds.requested, ds.source, ds.note
        num_classes, in_shape, is_cls = int(ds.num_classes), tuple(ds.in_shape), True
        if loss == "mse":
            raise ConfigError(f"loss=mse needs a regression dataset; {dataset} has class labels: "
                              "set loss=cross_entropy")
        # Ioffe's "binary" MNIST (Sec. 4.1; the 0.5 threshold is ours). Only real MNIST is binarized:
        # the Fashion-MNIST fallback keeps its grey levels, which carry most of its information.
        binarized = bool(binarize and name == "mnist")
        if binarized:
            x_train, x_test = (x_train > 0.5).to(dtype), (x_test > 0.5).to(dtype)
        if binarize and not binarized:
            note = " ".join(x for x in (note, binarize_note(name)) if x)
        x_train, x_test = x_train.to(dtype), x_test.to(dtype)
        idx = _take(x_train.shape[0], train_subset, data_seed)
        if idx is not None:
            x_train, y_train = x_train[idx], y_train[idx]
    x_train, x_test = x_train.contiguous(), x_test.contiguous()
    ev = _take(x_test.shape[0], eval_subset, data_seed + 1)
    x_eval, y_eval = (x_test, y_test) if ev is None else (x_test[ev], y_test[ev])
    pb = _take(x_train.shape[0], probe_batch, data_seed + 2)
    x_probe, y_probe = (x_train, y_train) if pb is None else (x_train[pb], y_train[pb])
    return Task(name=name, requested=requested, x_train=x_train, y_train=y_train, x_test=x_test,
                y_test=y_test, x_eval=x_eval, y_eval=y_eval, x_probe=x_probe, y_probe=y_probe,
                num_classes=num_classes, in_shape=in_shape, source=source, note=note,
                is_classification=is_cls, binarized=binarized)


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The model options that are set (None = leave the model's default)."""
    kw: dict[str, Any] = {}
    if cfg.activation is not None:
        kw["activation"] = cfg.activation
    if cfg.width is not None:
        kw["width"] = cfg.width
    if cfg.widths is not None:
        kw["hidden" if cfg.model == "ioffe_mlp" else "widths"] = tuple(cfg.widths)
    if cfg.init is not None:
        kw["init"] = cfg.init
    if cfg.init_std is not None:
        kw["init_std"] = cfg.init_std
    if cfg.head is not None:
        kw["head"] = cfg.head
    if cfg.depth is not None:
        kw["depth"] = cfg.depth
    if cfg.dropout is not None:
        kw["dropout"] = cfg.dropout
    norm_kwargs = norm_options(cfg)
    if norm_kwargs:
        kw["norm_kwargs"] = norm_kwargs
    return kw


def build_network(cfg: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model of ``cfg`` in its dtype and memory format (parameters drawn from torch's global RNG)."""
    from bnlab.models import build_model

    model = build_model(cfg.model, norm=cfg.norm, in_shape=tuple(in_shape), num_classes=num_classes,
                        **model_kwargs(cfg))
    model = model.to(_DTYPES[cfg.dtype])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def loss_function(cfg: TrainConfig):
    """The training loss as ``fn(output, target) -> scalar`` with the config's reduction."""
    reduction = cfg.loss_reduction
    if cfg.loss == "cross_entropy":
        return functools.partial(nn.functional.cross_entropy, reduction=reduction)
    return functools.partial(nn.functional.mse_loss, reduction=reduction)


def per_example_loss_sum(cfg: TrainConfig, out: Tensor, y: Tensor) -> Tensor:
    """Sum over the examples of the per-example loss (evaluation divides by n): mean reduction's
    numbers for cross-entropy, and the summed squared error per example for mse."""
    if cfg.loss == "cross_entropy":
        return nn.functional.cross_entropy(out, y, reduction="sum")
    return nn.functional.mse_loss(out, y, reduction="sum")
