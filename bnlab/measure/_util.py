"""Shared machinery of the probes: find layers, and run a forward pass that changes nothing.

The contract ("probes never change what they measure"): switching a probe on must leave
the training trajectory bit-identical. A forward pass can change a model in four ways, and
`capture` isolates each of them:

1. buffers (BN running statistics, ``num_batches_tracked``): the forward runs through
   ``torch.func.functional_call`` on *clones* of every buffer, fresh clones per chunk;
2. ``.training`` flags: set explicitly from ``bn_mode`` and restored for every module in ``finally``;
3. the global RNG (dropout, noisy BN): the pass runs inside ``torch.random.fork_rng`` and is
   re-seeded there, so it is also reproducible;
4. module-owned ``torch.Generator`` attributes (a noisy BN with its own generator): which generator
   each attribute holds, and its state, are saved and restored.

Parameters are not cloned (a forward pass under ``no_grad`` does not write them). Other Python state
a custom ``forward`` mutates (counters, caches) is outside what can be isolated generically.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Callable, Literal, Union

import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError, ShapeError
from bnlab.norm.modules import is_batchnorm  # noqa: F401  (re-exported for the probes)
from bnlab.norm.noisy import NoiseOnly

Where = Literal["input", "output"]
BnMode = Literal["batch", "running"]
# A probe target: one name, a list of names, or {label: name or module} (labels key the results).
ModuleSpec = Union[str, Sequence[str], Mapping[str, Union[str, nn.Module]]]

_BN_MODES = ("batch", "running")
_WHERES = ("input", "output")


def is_dropout(module: nn.Module) -> bool:
    """Dropout-like modules: always evaluated in eval mode by probes (the statistic of interest is
    that of the network, not of one random mask)."""
    return isinstance(module, nn.modules.dropout._DropoutNd)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, choices))}.")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive int or None (one chunk).")


def _name_hint(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return shown + more


def resolve_modules(model: nn.Module, modules: ModuleSpec) -> dict[str, tuple[str, nn.Module]]:
    """Map each requested label to ``(qualified name, module)`` of ``model``.

    Accepts a name, a sequence of names (label = name), or a mapping ``label -> name | module``
    (labels let an experiment call ``"features.7"`` simply ``"layer3"``). Unknown names are a
    ConfigError that lists valid ones, because a typo would otherwise silently measure nothing.
    """
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    if isinstance(modules, str):
        modules = [modules]
    if isinstance(modules, Mapping):
        items = list(modules.items())
    elif isinstance(modules, Sequence):
        items = [(n, n) for n in modules]
    else:
        raise ConfigError(
            f"modules must be a name, a list of names or a dict label -> name, got {type(modules).__name__}."
        )
    if not items:
        raise ConfigError(f"modules is empty; pass names such as {_name_hint([n for n in named if n])}.")
    out: dict[str, tuple[str, nn.Module]] = {}
    for label, ref in items:
        if isinstance(ref, nn.Module):
            if id(ref) not in by_id:
                raise ConfigError(f"module given for {label!r} is not part of the model; pass its name instead.")
            name = by_id[id(ref)]
        elif isinstance(ref, str):
            name = ref
        else:
            raise ConfigError(f"modules[{label!r}] must be a module name or module, got {type(ref).__name__}.")
        if name not in named:
            valid = [n for n in named if n] or [""]
            raise ConfigError(
                f"unknown module name {name!r}; valid names (dict(model.named_modules())) include "
                f"{_name_hint(valid)}."
            )
        out[str(label)] = (name, named[name])
    return out


def batchnorm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_batchnorm(m)]


def to_units(t: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N*prod(spatial), C) float64 copy; BN's convention: unit = channel,
    samples = batch and spatial positions. A copy, because in-place ops later in the forward
    (ReLU(inplace=True)) would otherwise change what was recorded."""
    if not isinstance(t, Tensor):
        raise ShapeError(f"expected a tensor activation, got {type(t).__name__}.")
    if t.dim() == 0:
        raise ShapeError("cannot take per-unit statistics of a 0-d activation; measure another module.")
    if t.dim() == 1:
        t = t.unsqueeze(1)  # (N,) -> (N, 1): one unit
    c = t.shape[1]
    return t.detach().movedim(1, -1).reshape(-1, c).to(torch.float64, copy=True)  # (S, C)


def _first_tensor(args: tuple, kwargs: dict | None) -> Tensor:
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, Tensor):
            return a
    raise ShapeError("the measured module was called without a tensor argument; measure its output instead.")


def _first_output(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ShapeError(f"the measured module returned {type(out).__name__}, not a tensor; measure another module.")


def _rng_devices(model: nn.Module, x: Tensor) -> list[int]:
    if not torch.cuda.is_initialized():  # no CUDA tensor can exist: skip the walk over every tensor
        return []
    devs = {t.device.index or 0 for t in [x, *model.parameters(), *model.buffers()] if t.device.type == "cuda"}
    return sorted(devs)


def _generator_slots(model: nn.Module) -> list[tuple[dict, str, torch.Generator]]:
    """(module ``__dict__``, attribute, generator) for every module-owned generator."""
    # `Generator in type(v).__mro__`, not isinstance: torch.Generator's metaclass answers isinstance in
    # Python, which over every attribute of every module costs more than a small model's forward pass.
    return [(d, k, v) for m in model.modules() for d in (vars(m),) for k, v in d.items()
            if torch.Generator in type(v).__mro__]


class GeneratorSnapshot:
    """The module-owned generators (noisy BN's noise streams): which attribute holds which generator
    and its state. ``restore`` puts both back: a layer may have *replaced* its generator meanwhile
    (noisy BN continues its stream on a new generator on the first call on another device), and
    restoring only the old object's state would leave the model holding the new, advanced one."""

    def __init__(self, model: nn.Module) -> None:
        self.slots = [(d, k, g, g.get_state()) for d, k, g in _generator_slots(model)]

    def restore(self) -> None:
        for d, k, g, state in self.slots:
            d[k] = g
            g.set_state(state)


@contextlib.contextmanager
def isolated(model: nn.Module, x: Tensor, *, bn_mode: BnMode, seed: int | None, grad: bool = False) -> Iterator[None]:
    """Training flags from ``bn_mode``, forked and seeded RNGs, and restoration of all of it.

    ``grad=False`` runs the body under ``no_grad`` (activation probes); ``grad=True`` enables autograd
    for the instruments that differentiate the loss (they never write ``.grad``)."""
    check_choice("bn_mode", bn_mode, _BN_MODES)
    if bn_mode == "running":
        stateless = [n for n, m in model.named_modules() if is_batchnorm(m) and getattr(m, "running_mean", None) is None]
        if stateless:
            raise ConfigError(f"bn_mode='running' but BN layer(s) {stateless[:5]} keep no running statistics "
                              "(track_running_stats=False: they normalize with the batch's statistics in eval "
                              "mode too); use bn_mode='batch', or measure a model whose BN tracks them")
    flags = [(m, m.training) for m in model.modules()]
    gens = GeneratorSnapshot(model)
    devices = _rng_devices(model, x)
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.default_generator.manual_seed(seed)
                for d in devices:
                    with torch.cuda.device(d):
                        torch.cuda.manual_seed(seed)
            for m in model.modules():
                if is_batchnorm(m) or isinstance(m, NoiseOnly):
                    # not .train(): that would recurse into children. The noise of noisy BN and of the
                    # noise-only layer (Santurkar Fig. 2's two noisy arms) follows bn_mode alike.
                    m.training = bn_mode == "batch"
                elif is_dropout(m):
                    m.training = False
            with torch.enable_grad() if grad else torch.no_grad():
                yield
    finally:
        for m, flag in flags:
            m.training = flag
        gens.restore()


def _chunks(x: Tensor, chunk_size: int | None) -> Sequence[Tensor]:
    if not isinstance(x, Tensor):
        raise ShapeError(f"x must be a tensor (the probe batch), got {type(x).__name__}.")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}.")
    return [x] if chunk_size is None else list(torch.split(x, chunk_size, dim=0))


def forward_chunks(
    model: nn.Module,
    x: Tensor,
    *,
    bn_mode: BnMode,
    chunk_size: int | None = None,
    seed: int | None = 0,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Run ``model`` over ``x`` (optionally in chunks) without side effects; hooks do the measuring.

    Each chunk gets fresh buffer clones, so every chunk sees the model's state as it was (a chunk
    must not see running statistics that an earlier chunk updated, e.g. batch renorm).
    """
    check_chunk_size(chunk_size)
    chunks = _chunks(x, chunk_size)
    with isolated(model, x, bn_mode=bn_mode, seed=seed):
        for i, xc in enumerate(chunks):
            if on_chunk is not None:
                on_chunk(i)
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            try:
                torch.func.functional_call(model, buffers, (xc,))
            except ValueError as e:
                if bn_mode == "batch" and xc.shape[0] == 1:
                    raise ShapeError(
                        f"bn_mode='batch' needs more than one sample per chunk, but a chunk has 1 "
                        f"(batch {x.shape[0]}, chunk_size {chunk_size}); choose a chunk_size that "
                        f"does not leave a single sample, or bn_mode='running'."
                    ) from e
                raise


def call_key(label: str, call: int, calls: int) -> str:
    """Result key of one call site: the label itself for a module called once per forward,
    ``"label#i"`` (i = 0, 1, ... in call order) for a module called several times."""
    return label if calls == 1 else f"{label}#{call}"


def capture(
    model: nn.Module,
    x: Tensor,
    targets: Mapping[str, nn.Module],
    *,
    where: Where = "input",
    bn_mode: BnMode = "batch",
    chunk_size: int | None = None,
    seed: int | None = 0,
    per_call: bool = False,
) -> dict[str, Tensor]:
    """Activations of each target module as ``(samples, units)`` float64, pooled over chunks.

    ``where="input"`` uses a *pre*-hook: an in-place module (``ReLU(inplace=True)``) would have
    overwritten its input by the time a post-hook runs. A module called several times in one
    forward (a ResNet block's shared ``relu``, weight sharing) has several call sites whose
    activations are different quantities: with ``per_call=True`` each call site is recorded
    separately under ``"label#0"``, ``"label#1"``, ... (call order within one forward; the same
    call index is pooled over chunks); with ``per_call=False`` such a module is refused with a
    ConfigError. Nothing is ever pooled across call sites. Hooks are always removed.
    """
    check_choice("where", where, _WHERES)
    # store[label][call index] -> list of per-chunk activations
    store: dict[str, dict[int, list[Tensor]]] = {label: {} for label in targets}
    calls_in_chunk: dict[str, int] = {label: 0 for label in targets}
    calls_per_chunk: dict[str, set[int]] = {label: set() for label in targets}
    handles = []

    def record(label: str, value: Tensor) -> None:
        i = calls_in_chunk[label]
        calls_in_chunk[label] = i + 1
        store[label].setdefault(i, []).append(to_units(value))

    def make_hook(label: str):
        if where == "input":
            def pre(module, args, kwargs):
                record(label, _first_tensor(args, kwargs))
            return pre

        def post(module, args, output):
            record(label, _first_output(output))
        return post

    def end_chunk() -> None:
        for label in targets:
            calls_per_chunk[label].add(calls_in_chunk[label])
            calls_in_chunk[label] = 0

    def on_chunk(i: int) -> None:
        if i > 0:
            end_chunk()

    try:
        for label, module in targets.items():
            if where == "input":
                handles.append(module.register_forward_pre_hook(make_hook(label), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(make_hook(label)))
        forward_chunks(model, x, bn_mode=bn_mode, chunk_size=chunk_size, seed=seed, on_chunk=on_chunk)
        end_chunk()
    finally:
        for h in handles:
            h.remove()

    out: dict[str, Tensor] = {}
    for label, by_call in store.items():
        if not by_call:
            raise ConfigError(
                f"module {label!r} was not called during the forward pass, so nothing was recorded; "
                f"measure a module that the model's forward uses."
            )
        counts = calls_per_chunk[label]
        if len(counts) != 1:
            raise ShapeError(f"module {label!r} was called a different number of times in different chunks "
                             f"({sorted(counts)}); its call sites cannot be matched, use chunk_size=None.")
        calls = counts.pop()
        if calls > 1 and not per_call:
            raise ConfigError(
                f"module {label!r} is called {calls} times per forward pass, and its call sites see different "
                f"activations; pooling them would mix two distributions. Measure a module that is called once "
                f"(e.g. give each call site its own module), or use record_activations, which records each "
                f"call site separately as '{label}#0' ... '{label}#{calls - 1}'."
            )
        for i in range(calls):
            parts = by_call[i]
            key = call_key(label, i, calls)
            widths = {p.shape[1] for p in parts}
            if len(widths) != 1:
                raise ShapeError(
                    f"module {key!r} saw activations with different unit counts {sorted(widths)} "
                    f"across chunks; measure a module with a fixed number of channels."
                )
            out[key] = torch.cat(parts, dim=0)
    return out
