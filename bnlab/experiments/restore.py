"""A trained model back from its run directory: the network its config builds, with its saved weights.

Used by ``bnlab fold``, ``bnlab recalibrate`` and the report's doctor section. The weights are read
with torch's restricted unpickler (``weights_only=True``): a file that would construct or call Python
objects on load is refused, nothing executed, as everywhere run directories are read.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.errors import ConfigError, CorruptDataError
from bnlab.train.config import TrainConfig, config_from_dict
from bnlab.train.rundir import CHECKPOINT, CONFIG, MODEL, RunDir, read_json
from bnlab.train.task import Task, build_network, build_task

__all__ = ["Restored", "restore_model", "sequential_chain"]


@dataclass
class Restored:
    model: nn.Module  # in eval mode, float weights as trained
    cfg: TrainConfig
    task: Task  # the run's data (for batches to recalibrate or diagnose on)
    run_dir: Path
    weights: Path  # the file the weights came from (model.pt, or checkpoint.pt of an unfinished run)
    meta: dict[str, Any]  # config.json


def _load_weights(path: Path) -> dict[str, Any]:
    if path.name == CHECKPOINT:
        ckpt = RunDir(path.parent).load_checkpoint()  # weights_only, with its own refusal message
        return ckpt["model"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CorruptDataError(f"{path} was refused: it holds Python objects that loading would have to construct or "
                               f"call, and run directories can come from anywhere; nothing was executed "
                               f"({str(err).strip().splitlines()[0]})") from None
    except Exception as err:  # truncated, not a zip, ...
        raise CorruptDataError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptDataError(f"{path} is not a state_dict (a dict of tensors)")
    return state


def restore_model(path: Path | str, data_dir: str | None = None) -> Restored:
    """The model of the run at ``path``: a run directory (its ``model.pt``, else its ``checkpoint.pt``)
    or one of those two files inside one. The run's ``config.json`` says how to build it (the
    experiment's own model builder if it has one) and on which data. Raises ConfigError for a path
    that is not a run directory or a file in one, CorruptDataError for weights that are refused or do
    not fit the model."""
    path = Path(path)
    if path.is_dir():
        run_dir = path
        weights = path / MODEL if (path / MODEL).exists() else path / CHECKPOINT
    elif path.is_file():
        run_dir, weights = path.parent, path
    else:
        raise ConfigError(f"{path} does not exist; give a run directory (runs/<profile>/<experiment>/<variant>/seed<k>) "
                          "or its model.pt / checkpoint.pt")
    if not (run_dir / CONFIG).exists():
        raise ConfigError(f"{run_dir} has no {CONFIG}, so the model cannot be rebuilt; give a run directory "
                          "(runs/<profile>/<experiment>/<variant>/seed<k>) or a file inside one")
    if not weights.exists():
        raise ConfigError(f"{run_dir} has neither {MODEL} nor {CHECKPOINT}: the run has not trained yet; run it first")
    meta = read_json(run_dir / CONFIG)
    cfg = config_from_dict(meta["config"])
    exp = None
    try:
        from bnlab.experiments import get_experiment

        exp = get_experiment(meta.get("experiment", ""))
    except ConfigError:
        pass  # a run of an experiment this bnlab does not know: the config's own model
    task = ((exp.build_task if exp is not None and exp.build_task else None) or build_task)(cfg, data_dir)
    if exp is not None and exp.build_model is not None:
        model = exp.build_model(cfg, task)
    else:
        model = build_network(cfg, task.in_shape, task.num_classes)
    state = _load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CorruptDataError(f"{weights} does not fit the model that {run_dir / CONFIG} describes "
                               f"({str(err).strip().splitlines()[0]})") from None
    return Restored(model.eval(), cfg, task, run_dir, weights, meta)


def sequential_chain(model: nn.Module) -> nn.Module:
    """bnlab's models run their children in order (``LayeredModel``): the same network as an
    ``nn.Sequential`` of the same modules, which ``bnlab.norm.deploy.fold`` walks. Other models are
    returned unchanged."""
    from bnlab.models._base import LayeredModel

    if isinstance(model, LayeredModel):
        return nn.Sequential(OrderedDict(model.named_children()))
    return model
