"""Where measurements attach to training: a Probe is a named function called on a schedule of steps.

A probe gets a ``ProbeContext`` and returns a flat dict. Scalars (Python numbers, 0-d tensors/arrays)
go to metrics.jsonl as ``{"step": s, "probe": name, key: value, ...}``; arrays go to arrays.npz as
``probe/<name>/<key>`` stacked over the steps at which the probe ran (``probe/<name>/steps``).

Probes must not change what they measure. The measure/ layer guarantees that for its own
probes; the engine adds a second guard around every call: it restores the model's parameters, buffers,
train/eval mode and the global RNG states afterwards, so even a careless probe cannot change the
training trajectory (tests check the trajectory is bit-identical with and without probes).
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.measure._util import GeneratorSnapshot
from bnlab.measure.cost import CostModel
from bnlab.train.config import TrainConfig
from bnlab.train.schedule import probe_steps


@dataclass
class ProbeContext:
    """What a probe sees at step ``step`` (= after ``step`` updates, before the update at ``step``)."""

    step: int
    model: nn.Module  # the training model, in train mode; restored after the call
    cfg: TrainConfig
    seed: int
    probe_batch: tuple[Tensor, Tensor]  # fixed batch from the training split (same at every step)
    batch: tuple[Tensor, Tensor]  # the training batch the update at ``step`` uses
    task: Any  # bnlab.train.task.Task: all tensors of the run (x_train, x_test, x_eval, ...)
    lr: float  # learning rate of the update at ``step``
    loss_fn: Callable[[Tensor, Tensor], Tensor]  # the training loss with the config's reduction
    generator: torch.Generator  # seeded by (seed, probe, step): a probe's own randomness
    # kept across calls and checkpoints: tensors, NumPy values and plain Python values only (checkpoints
    # load with weights_only=True; bnlab.train.safe_state)
    state: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None  # the run's torch.optim.Optimizer (read only: ICS applies its next step to copies)


ProbeFn = Callable[[ProbeContext], Mapping[str, Any]]


@dataclass(frozen=True)
class Probe:
    """A measurement run during training.

    schedule/every/points: ``None`` takes the config's ``probe_schedule``/``probe_every``/
    ``probe_points`` (so ``--set probe_schedule=every probe_every=50`` reaches every probe that
    does not fix its own). ``cost``: forward+backward passes on the probe batch per call, used only
    for the cost estimate printed before a run. ``pairs=True`` also runs the probe at s + 1 for every
    scheduled step s < steps, so that it can measure a change over one training step (Santurkar
    Fig. 8's per-step |Δμ|, |Δσ²|) while running only every so many steps; ``ProbeContext.state``
    carries the first call's numbers to the second. ``cost_note``: how ``cost`` was derived, shown
    next to it in the report (e.g. a forward-only probe over its own images, in training-pass units).
    ``uses_probe_batch``: False for a probe that never reads ``ProbeContext.probe_batch`` (so the
    config's ``probe_batch_size`` does not change what it measures).
    """

    name: str
    fn: ProbeFn
    schedule: str | None = None  # "log" | "every" | "none"
    every: int | None = None
    points: int | None = None
    cost: float = 1.0
    pairs: bool = False
    cost_note: str = ""
    uses_probe_batch: bool = True

    def scheduled(self, cfg: TrainConfig) -> list[int]:
        """The steps of the schedule alone (without the ``pairs`` partners)."""
        return probe_steps(
            self.schedule or cfg.probe_schedule,
            cfg.steps,
            every=self.every or cfg.probe_every,
            points=self.points or cfg.probe_points,
        )

    def steps(self, cfg: TrainConfig) -> list[int]:
        """Every step at which the probe runs, sorted: the schedule, plus s + 1 for each s < steps
        when ``pairs``."""
        base = self.scheduled(cfg)
        if not self.pairs:
            return base
        return sorted(set(base) | {s + 1 for s in base if s < cfg.steps})


def probe_generator(seed: int, name: str, step: int) -> torch.Generator:
    # A stable (not Python-hash-randomized) seed from the probe's name.
    name_code = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2**31)
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + name_code) % (2**63))


class _Guard:
    """Snapshot of everything a probe could disturb; ``restore`` puts it back."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.optimizer_state = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
        # module-owned generators (noisy BN draws its noise from its own torch.Generator)
        self.generators = GeneratorSnapshot(model)
        self.training = [(m, m.training) for m in model.modules()]
        # tensors only: module extra state (a noisy BN's generator) is restored through `generators`
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
                        if isinstance(v, Tensor)}
        self.grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        self.torch_rng = torch.get_rng_state()
        # the default CUDA generators too (dropout on a GPU draws from them): a probe's train-mode
        # forward must not shift the training run's masks there either
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.np_rng = np.random.get_state()
        self.py_rng = random.getstate()

    def restore(self) -> None:
        with torch.no_grad():
            live = self.model.state_dict(keep_vars=True)
            for k, saved in self.tensors.items():
                if k not in live:  # a probe replaced a module; nothing sane to restore into
                    raise RuntimeError(f"a probe removed {k!r} from the model")
                live[k].copy_(saved)
        for p, g in self.grads:
            p.grad = g
        for m, mode in self.training:
            m.training = mode
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.np_rng)
        random.setstate(self.py_rng)
        self.generators.restore()
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self.optimizer_state)


def call_probe(probe: Probe, ctx: ProbeContext) -> tuple[dict[str, float | None], dict[str, np.ndarray]]:
    """Run one probe under the guard; split its output into scalars and arrays."""
    guard = _Guard(ctx.model, ctx.optimizer)
    try:
        out = probe.fn(ctx)
    finally:
        guard.restore()
    if out is None:
        return {}, {}
    if not isinstance(out, Mapping):
        raise ConfigError(f"probe {probe.name!r} returned {type(out).__name__}; return a dict of "
                          "numbers and/or arrays")
    scalars: dict[str, float | None] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in out.items():
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (bool, int, float, np.number)):
            scalars[str(key)] = float(value)
        elif isinstance(value, (np.ndarray, list, tuple)):
            arrays[str(key)] = np.asarray(value)
        elif value is None:
            scalars[str(key)] = None
        else:
            raise ConfigError(f"probe {probe.name!r} returned {key!r} of type {type(value).__name__}; "
                              "values must be numbers, tensors or numpy arrays")
    return scalars, arrays


class ArrayStore:
    """Probe arrays collected in memory, saved stacked to arrays.npz (and inside checkpoints)."""

    def __init__(self, data: dict[str, list[np.ndarray]] | None = None) -> None:
        self.data: dict[str, list[np.ndarray]] = data or {}

    def add(self, probe: str, step: int, arrays: Mapping[str, np.ndarray]) -> None:
        if not arrays:
            return
        for key, arr in arrays.items():
            full = f"probe/{probe}/{key}"
            old = self.data.setdefault(full, [])
            if old and old[0].shape != arr.shape:
                raise ConfigError(
                    f"probe {probe!r} returned {key!r} with shape {arr.shape} at step {step} but "
                    f"{old[0].shape} before; a probe array must keep one shape (pad or summarize it)"
                )
            old.append(arr)
        self.data.setdefault(f"probe/{probe}/steps", []).append(np.asarray(step, dtype=np.int64))

    def stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack(v) for k, v in self.data.items() if v}


# --- the measure/ instruments as scheduled probes ---------------------------------------------------------

INSTRUMENTS = ("ics", "along_gradient", "hessian_eigenvalues", "hessian_trace")
_INSTRUMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ics": {"param": "weight"},
    "along_gradient": {"multipliers": (0.5, 1.0, 2.0, 4.0)},
    "hessian_eigenvalues": {"k": 1, "max_iter": 20, "tol": 1e-3, "which": "largest"},
    "hessian_trace": {"samples": 20},
}
_INSTRUMENT_OPTIONS = {
    "ics": {"layers", "param"},
    "along_gradient": {"multipliers", "etas", "params"},
    "hessian_eigenvalues": {"k", "max_iter", "tol", "which", "params"},
    "hessian_trace": {"samples", "params"},
}


def _stated_passes(instrument: str, opts: Mapping[str, Any]) -> float:
    """Forward+backward passes per call, as each instrument's docstring states them (upper bound
    for Lanczos, which may stop before max_iter)."""
    generic = CostModel()
    if instrument == "ics":
        layers = opts["layers"]
        return 1.0 + (1 if isinstance(layers, str) else len(layers))
    if instrument == "along_gradient":
        return 1.0 + len(opts["etas"] if opts.get("etas") is not None else opts["multipliers"])
    n = opts["max_iter"] if instrument == "hessian_eigenvalues" else opts["samples"]
    return generic.forward + generic.graph_backward + n * generic.double_backward


def _run_instrument(instrument: str, batch: str, bn_mode: str, opts: Mapping[str, Any],
                    ctx: ProbeContext) -> dict[str, Any]:
    """One call of an instrument probe (see ``instrument_probe``)."""
    from bnlab.measure import along_gradient, hessian_eigenvalues, hessian_trace, ics

    xb, yb = ctx.batch if batch == "train" else ctx.probe_batch
    seed = int(torch.randint(0, 2**31 - 1, (), generator=ctx.generator))
    common = dict(bn_mode=bn_mode)
    arrays: dict[str, Any] = {}
    if instrument == "ics":
        update = ctx.optimizer if ctx.optimizer is not None else ctx.lr
        if ctx.optimizer is not None:  # the loop sets the step's lr after the probes; the guard restores it
            for group in ctx.optimizer.param_groups:
                group["lr"] = ctx.lr
        res = ics(ctx.model, ctx.loss_fn, (xb, yb), opts["layers"], update=update, param=opts["param"],
                  seed=seed, **common)
    elif instrument == "along_gradient":
        etas = opts.get("etas") or [m * ctx.lr for m in opts["multipliers"]]
        res = along_gradient(ctx.model, ctx.loss_fn, (xb, yb), etas, params=opts.get("params"), seed=seed,
                             **common)
        arrays = res.arrays()
    elif instrument == "hessian_eigenvalues":
        res = hessian_eigenvalues(ctx.model, ctx.loss_fn, (xb, yb), k=opts["k"], max_iter=opts["max_iter"],
                                  tol=opts["tol"], which=opts["which"], params=opts.get("params"),
                                  seed=seed, **common)
    else:
        res = hessian_trace(ctx.model, ctx.loss_fn, (xb, yb), samples=opts["samples"],
                            params=opts.get("params"), seed=seed, **common)
    return {**res.summary(), "cost_passes": res.cost.passes, **arrays}



def instrument_probe(instrument: str, *, name: str | None = None, batch: str = "train", bn_mode: str = "batch",
                     schedule: str | None = None, every: int | None = None, points: int | None = None,
                     **options: Any) -> Probe:
    """A Probe that runs one of bnlab.measure's landscape instruments on a schedule.

    instrument: ``"ics"`` (options ``layers``, ``param``; the update is the run's own: its optimizer,
    momentum buffers included), ``"along_gradient"`` (``multipliers`` × the step's learning rate,
    default (1/2, 1, 2, 4), or fixed ``etas``), ``"hessian_eigenvalues"`` (``k``, ``max_iter``,
    ``tol``, ``which``) or ``"hessian_trace"`` (``samples``). ``batch="train"`` measures on the batch
    of the update at that step (Santurkar's "same batch"); ``"probe"`` on the run's fixed probe batch.
    Scalars (the result's ``summary()`` and ``cost_passes``) go to metrics.jsonl, the per-η curves of
    along_gradient to arrays.npz; ``Probe.cost`` is the stated passes per call, which the cost
    estimate printed before a run includes.
    """
    if instrument not in INSTRUMENTS:
        raise ConfigError(f"unknown instrument {instrument!r}; choose one of {', '.join(INSTRUMENTS)}")
    if batch not in ("train", "probe"):
        raise ConfigError(f"batch={batch!r}: use 'train' (the step's batch) or 'probe' (the fixed probe batch)")
    if bn_mode not in ("batch", "running"):
        raise ConfigError(f"bn_mode={bn_mode!r}: use 'batch' or 'running'")
    unknown = set(options) - _INSTRUMENT_OPTIONS[instrument]
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)} for {instrument}; valid: "
                          f"{sorted(_INSTRUMENT_OPTIONS[instrument])}")
    if instrument == "ics" and "layers" not in options:
        raise ConfigError("instrument 'ics' needs layers=[module names] (the layers i of Def. 2.1)")
    opts = {**_INSTRUMENT_DEFAULTS[instrument], **options}

    # a partial of a module-level function, not a closure: experiments are pickled to worker processes
    fn = functools.partial(_run_instrument, instrument, batch, bn_mode, opts)

    return Probe(name or instrument, fn, schedule=schedule, every=every, points=points,
                 cost=_stated_passes(instrument, opts))
