"""The loss of a model on one batch as a pure function of its parameters, for the instruments that
differentiate it (ics, along_gradient, hessian).

``Objective`` evaluates ``L(w) = loss_fn(model(x; w), y)`` as ``torch.func.functional_call`` does,
with the chosen parameters replaced by tensors of its own and *fresh clones of every buffer* per
evaluation (the module slots are found once per session, not per evaluation: on small models the
name lookups of ``functional_call`` cost as much as the pass itself), inside ``_util.isolated``: BN
layers in the mode ``bn_mode`` says (not the model's), dropout off, the global RNG forked and
seeded, module-owned generators (noisy BN) restored. Before every evaluation the seeded state is set
again, so stochastic layers draw the same noise each time and L is a deterministic function of w
(finite differences, symmetric Hessians). Gradients come from
``torch.autograd.grad``, which never writes ``.grad``; the model's parameters, buffers, flags and
``requires_grad`` are never touched.

Every evaluation is counted in ``Cost`` (bnlab.measure.cost): forward passes, backward passes,
backward passes that keep their graph, and backward passes through a gradient's graph (a
Hessian-vector product by double backward); ``cost_model`` converts the counts to passes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from bnlab.errors import ConfigError, ShapeError
from bnlab.measure._util import BnMode, GeneratorSnapshot, _rng_devices, check_choice, isolated
from bnlab.measure.cost import Cost, CostModel

LossFn = Callable[[Tensor, Tensor], Tensor]

def check_batch(batch: object) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        raise ShapeError(f"batch must be a pair (x, y) of tensors, the inputs and targets of loss_fn, got "
                         f"{type(batch).__name__}")
    x, y = batch
    if x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError(f"batch x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    return x, y


def select_params(model: nn.Module, params: Sequence[str] | None) -> list[str]:
    """Names of the parameters L is a function of: ``params``, or every parameter that requires grad."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ConfigError("the model has no parameter that requires grad; pass params=[names] to choose some")
        return names
    if isinstance(params, str):
        params = [params]
    names = list(params)
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        shown = ", ".join(repr(n) for n in list(named)[:12])
        raise ConfigError(f"unknown parameter names {unknown}; valid names (model.named_parameters()) include {shown}")
    return names


# The helpers below work on lists of parameter-shaped tensors with as few torch calls as possible: on
# a small model every call costs about as much as a layer's arithmetic (a few microseconds), so one
# concatenation and one conversion beat one conversion per tensor.

def flat(ts: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """The concatenation of ``ts`` (flattened) as one vector of ``dtype`` on the first one's device
    (torch.cat promotes mixed dtypes, which only widens, so converting once at the end is exact)."""
    device = ts[0].device
    return torch.cat([t.reshape(-1) if t.device == device else t.reshape(-1).to(device) for t in ts]).to(dtype)


def unflat(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split the flat vector ``v`` into tensors shaped like ``like`` (views, converted to each one's
    dtype and device: once for the whole vector when ``like`` has a single dtype and device)."""
    kinds = {(t.dtype, t.device) for t in like}
    if len(kinds) == 1:
        dtype, device = kinds.pop()
        v = v.to(device=device, dtype=dtype)
        return [p.view_as(t) for p, t in zip(v.split([t.numel() for t in like]), like)]
    return [p.view_as(t).to(device=t.device, dtype=t.dtype) for p, t in zip(v.split([t.numel() for t in like]), like)]


class _Slots:
    """Where each parameter/buffer lives: (module, "_parameters" | "_buffers", attribute) per alias.

    Found once; ``swap`` writes tensors into those dict entries and ``restore`` puts the originals
    back, exactly what ``torch.func.functional_call`` does per call (tied aliases get the same tensor)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        named = dict(model.named_parameters())
        index = {id(named[n]): i for i, n in enumerate(names)}
        self.params: list[tuple[dict, str, int]] = []
        self.buffers: list[tuple[dict, str, int]] = []
        buffer_ids: dict[int, int] = {}
        self.buffer_values: list[Tensor] = []
        for mod in model.modules():
            for attr, p in mod._parameters.items():
                if p is not None and id(p) in index:
                    self.params.append((mod._parameters, attr, index[id(p)]))
            for attr, b in mod._buffers.items():
                if b is not None:
                    k = buffer_ids.setdefault(id(b), len(self.buffer_values))
                    if k == len(self.buffer_values):
                        self.buffer_values.append(b)
                    self.buffers.append((mod._buffers, attr, k))
        self._saved: list[tuple[dict, str, Tensor]] = []

    def swap(self, w: Sequence[Tensor]) -> None:
        clones = [b.clone() for b in self.buffer_values]
        for d, attr, i in self.params:
            self._saved.append((d, attr, d[attr]))
            d[attr] = w[i]
        for d, attr, k in self.buffers:
            self._saved.append((d, attr, d[attr]))
            d[attr] = clones[k]

    def restore(self) -> None:
        while self._saved:
            d, attr, t = self._saved.pop()
            d[attr] = t


class _FirstUse(TorchFunctionMode):
    """Records the order in which tensors (by identity) are first passed to a torch op: the order in
    which the forward pass uses each parameter, whichever module owns it and wherever it is called
    (a parent's own parameter used after its children's, a parameter shared by two layers).
    Attribute reads (``weight.shape``) are not uses."""

    def __init__(self, ids: dict[int, int], order: dict[int, int]) -> None:
        super().__init__()
        self.ids, self.order = ids, order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    i = self.ids.get(id(t))
                    if i is not None and i not in self.order:
                        self.order[i] = len(self.order)
        return func(*args, **kwargs)


class Objective:
    """``L(w)`` on one batch; use inside ``with obj.session():``.

    Args:
        model: any ``nn.Module``; never modified.
        loss_fn: ``loss_fn(model(x), y) -> scalar tensor`` (e.g. the training loss).
        batch: ``(x, y)``.
        bn_mode: ``"batch"`` (BN normalizes with the batch's statistics, as in training) or
            ``"running"`` (with the running statistics, as at inference); running statistics are
            never updated either way.
        params: the parameter names L is a function of (default: all that require grad); the
            other parameters are held at their current values.
        seed: seeds the forked global RNG of every evaluation (stochastic layers that use it).
        cost_model: converts the counted work to passes (default ``CostModel()``, generic).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: tuple[Tensor, Tensor], *, bn_mode: BnMode = "batch",
                 params: Sequence[str] | None = None, seed: int | None = 0,
                 cost_model: CostModel | None = None) -> None:
        if cost_model is not None and not isinstance(cost_model, CostModel):
            raise ConfigError(f"cost_model must be a bnlab.measure.CostModel (e.g. from calibrate_cost), got "
                              f"{type(cost_model).__name__}")
        check_choice("bn_mode", bn_mode, ("batch", "running"))
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable as loss_fn(model(x), y), got {type(loss_fn).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.x, self.y = check_batch(batch)
        self.bn_mode, self.seed = bn_mode, seed
        self.names = select_params(model, params)
        named = dict(model.named_parameters())
        self.w0 = [named[n].detach() for n in self.names]  # read only: never written
        self.cost = Cost(model=cost_model if cost_model is not None else CostModel())
        self._active = False

    @property
    def batch_size(self) -> int:
        return int(self.x.shape[0])

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.w0)

    @contextlib.contextmanager
    def session(self) -> Iterator[Objective]:
        # isolated() forks the global RNGs and seeds them once; their states (and those of module-owned
        # generators) are then set again before every evaluation, which is much cheaper than reseeding.
        self.cost.setups += 1
        with isolated(self.model, self.x, bn_mode=self.bn_mode, seed=self.seed, grad=True):
            self._generators = GeneratorSnapshot(self.model)
            self._global_state = torch.default_generator.get_state()
            devices = _rng_devices(self.model, self.x)
            self._cuda_states = [(d, torch.cuda.get_rng_state(d)) for d in devices]
            self._slots = _Slots(self.model, self.names)
            self._active = True
            try:
                yield self
            finally:
                self._active = False

    def _reset_randomness(self) -> None:
        self._generators.restore()
        torch.default_generator.set_state(self._global_state)
        for d, state in self._cuda_states:
            torch.cuda.set_rng_state(state, d)

    def loss_at(self, w: Sequence[Tensor], first_use: dict[int, int] | None = None) -> Tensor:
        """L(w) with autograd graph to ``w`` (tensors shaped like the parameters). ``first_use``: filled
        with {parameter index: rank of its first use by an op in the forward pass}."""
        if not self._active:
            raise RuntimeError("Objective evaluated outside its session(); use `with obj.session():`")
        self._reset_randomness()
        self._slots.swap(w)
        try:
            if first_use is None:
                out = self.model(self.x)
            else:
                with _FirstUse({id(t): i for i, t in enumerate(w)}, first_use):
                    out = self.model(self.x)
        finally:
            self._slots.restore()
        loss = self.loss_fn(out, self.y)
        self.cost.forward += 1
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ShapeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}; reduce it (mean or sum)")
        return loss.reshape(())

    def leaves(self, w: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Fresh autograd leaves with the values of ``w`` (default: the model's parameters). ``detach``
        makes a new tensor on the same storage, so no values are copied: the forward pass only reads
        them, and autograd.grad never writes ``.grad``."""
        return [t.detach().requires_grad_(True) for t in (self.w0 if w is None else w)]

    def loss_and_grad(self, w: Sequence[Tensor] | None = None, *, only: Sequence[int] | None = None,
                      first_use: dict[int, int] | None = None) -> tuple[float, list[Tensor]]:
        """(L(w), ∇L(w)); ``only`` restricts the gradient to those parameter indices; ``first_use`` as
        in ``loss_at``."""
        leaves = self.leaves(w)
        loss = self.loss_at(leaves, first_use)
        wrt = leaves if only is None else [leaves[i] for i in only]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        self.cost.backward += 1
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]  # no graph: already detached
        return float(loss.detach()), grads

    def gradient_graph(self, w: Sequence[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """(leaves, ∇L(leaves)) with the graph kept, for repeated Hessian-vector products."""
        leaves = self.leaves(w)
        loss = self.loss_at(leaves)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self.cost.graph_backward += 1
        grads = [torch.zeros_like(t, requires_grad=True) if g is None else g for t, g in zip(leaves, grads)]
        return leaves, grads

    def hvp(self, leaves: Sequence[Tensor], grads: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
        """H v by double backward: the gradient of <∇L(w), v> with respect to w (Pearlmutter 1994),
        computed as the vector-Jacobian product vᵀ ∂∇L/∂w (``grad_outputs=v``; H is symmetric), which
        is the same backward without building the inner product's graph first."""
        live = [(g, vi) for g, vi in zip(grads, v) if g.grad_fn is not None]
        self.cost.double_backward += 1
        if not live:  # the gradient does not depend on w (L is linear in w): H = 0
            return [torch.zeros_like(t) for t in leaves]
        hv = torch.autograd.grad([g for g, _ in live], list(leaves), grad_outputs=[vi.to(g.dtype) for g, vi in live],
                                 retain_graph=True, allow_unused=True)
        return [torch.zeros_like(t) if h is None else h for t, h in zip(leaves, hv)]
