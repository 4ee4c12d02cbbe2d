"""Internal covariate shift as a change of gradient (Santurkar, Tsipras, Ilyas & Madry 2018, Def. 2.1,
Fig. 3).

Definition. With loss L, the parameters W_1^(t) .. W_k^(t) of the k layers and the batch (x_t, y_t):

    G_i  = ∇_{W_i} L(W_1^(t),   ..., W_{i-1}^(t),   W_i^(t), ..., W_k^(t); x_t, y_t)
    G'_i = ∇_{W_i} L(W_1^(t+1), ..., W_{i-1}^(t+1), W_i^(t), ..., W_k^(t); x_t, y_t)
    ICS_i = ||G_i - G'_i||_2,  also cos(G_i, G'_i) = <G_i, G'_i> / (||G_i|| ||G'_i||)

G_i is the gradient the usual simultaneous update applies to layer i; G'_i the gradient layer i would
see after every earlier layer took its update on the same batch. Ideal (no shift): ℓ2 = 0, cosine 1.

Choices made here (the paper leaves them open):

* "Layer i's parameters" = one parameter tensor of the chosen module, ``param="weight"`` by default
  (not its bias, nor a BN's gamma/beta).
* "The layers before i" = every parameter that the forward pass first uses (passes to a torch op)
  before it first uses layer i's parameter, recorded during the G pass; BN's gamma and beta
  included. For a chain this is the usual order of layers; for branches it is the execution order;
  a parameter a block owns but uses after its children (a LayerScale gamma, a temperature) comes
  after them.
* W^(t+1) is the run's own update applied to a copy: ``update`` is a learning rate (plain SGD,
  W - lr * G), a ``torch.optim.Optimizer`` (cloned with a deep copy of its state, so momentum
  buffers, weight decay and per-group learning rates act exactly as in the next real step; the
  optimizer is not touched), or a function ``update(params, grads) -> new params`` (dicts keyed by
  parameter name).
* The same batch, BN in training mode (``bn_mode="batch"``, batch statistics) without updating the
  running statistics; stochastic layers (dropout is off; noisy BN, global-RNG layers) draw the same
  noise in both passes, so the difference is due to the update alone.

Cost: 1 forward + 1 backward pass for G, plus 1 forward + 1 backward per probed layer for G' (the
backward for G' stops at layer i, so a layer near the output costs less than a full pass: an upper
bound), plus the update applied to copies (parameter-length vector work) and the isolation of the
model, which on a model whose pass takes about a millisecond add 20-35 % (``result.cost`` counts
them; ``calibrate_cost`` prices them); no side effects on the model or the optimizer.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.measure._objective import LossFn, Objective, flat
from bnlab.measure.cost import Cost, CostModel
from bnlab.measure._util import BnMode, ModuleSpec, resolve_modules

__all__ = ["ICSResult", "ics"]

UpdateFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Mapping[str, Tensor]]
Update = Union[float, torch.optim.Optimizer, UpdateFn]

DEFINITION = "Santurkar et al. 2018, Def. 2.1 (Fig. 3): ||G - G'||_2 and cos(G, G'), G' after the earlier layers' update"


@dataclasses.dataclass(frozen=True)
class ICSResult:
    """Internal covariate shift of each probed layer (arrays of shape (len(layers),), float64).

    ``l2`` = ||G - G'||_2, ``cosine`` = cos(G, G'), ``grad_norm`` = ||G||, ``grad_norm_after`` =
    ||G'||, ``n_before`` = number of parameter tensors updated before each layer.
    """

    layers: tuple[str, ...]
    params: tuple[str, ...]
    l2: np.ndarray
    cosine: np.ndarray
    grad_norm: np.ndarray
    grad_norm_after: np.ndarray
    n_before: np.ndarray
    loss: float
    update: str
    bn_mode: str
    batch_size: int
    cost: Cost
    definition: str = DEFINITION

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"loss": self.loss}
        for i, label in enumerate(self.layers):
            out[f"{label}.l2"] = float(self.l2[i])
            out[f"{label}.cosine"] = float(self.cosine[i])
            out[f"{label}.relative"] = float(self.l2[i] / self.grad_norm[i]) if self.grad_norm[i] > 0 else float("nan")
        return out


def _owner_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _describe(update: Update) -> str:
    if isinstance(update, torch.optim.Optimizer):
        g = update.param_groups[0]
        hp = ", ".join(f"{k}={g[k]}" for k in ("lr", "momentum", "weight_decay") if k in g)
        return f"{type(update).__name__}({hp})"
    if callable(update):
        return f"callable {getattr(update, '__name__', type(update).__name__)}"
    return f"SGD(lr={update})"


def _check_update(update: object) -> None:
    if isinstance(update, torch.optim.LBFGS):
        raise ConfigError("update=LBFGS: its step needs a closure that re-evaluates the loss, which a copy of "
                          "the update cannot call on the instrument's batch; pass a function update(params, "
                          "grads) -> new params that does what your step does")
    if isinstance(update, torch.optim.Optimizer) or callable(update):
        return
    if isinstance(update, bool) or not isinstance(update, (int, float)):
        raise ConfigError(f"update must be a learning rate (plain SGD), a torch.optim.Optimizer or a function "
                          f"update(params, grads) -> new params, got {type(update).__name__}")


@functools.lru_cache(maxsize=None)
def _constructor_keywords(cls: type) -> tuple[frozenset[str], bool]:
    """The keyword names an optimizer class's constructor takes, and whether it takes **kwargs."""
    accepted = inspect.signature(cls).parameters
    return frozenset(accepted), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())


def _copy_state(state: Mapping[str, object], memo: dict[int, object]) -> dict[str, object]:
    """A deep copy of one parameter's optimizer state: tensors cloned (``Tensor.__deepcopy__`` does the
    same through several Python frames per tensor), anything else deep-copied; ``memo`` keeps tensors
    shared between states shared."""
    out: dict[str, object] = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            if id(v) not in memo:
                memo[id(v)] = v.detach().clone()
            out[k] = memo[id(v)]
        else:
            out[k] = copy.deepcopy(v, memo)
    return out


def _optimizer_step(opt: torch.optim.Optimizer, model: nn.Module, w: Mapping[str, Tensor],
                    grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The optimizer's next step applied to copies of the parameters, with a copy of its state.

    Each parameter's state (momentum buffer, Adam's moments and step) is copied straight into the
    clone's ``state`` under the copy of that parameter: the same result as ``load_state_dict(deepcopy(
    opt.state_dict()))`` without packing and unpacking the whole optimizer (the deep copy of the
    state_dict alone took about a quarter of a forward+backward pass of the Ioffe MLP, 1 CPU core)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    copies: dict[str, Tensor] = {}
    groups = []
    states = []
    memo: dict[int, object] = {}  # one memo: tensors shared between parameters' states stay shared
    for group in opt.param_groups:
        ps = []
        for p in group["params"]:
            n = name_of.get(id(p))
            if n is None:
                raise ConfigError("the optimizer holds a tensor that is not a parameter of the model; pass the "
                                  "optimizer that trains this model")
            c = (w[n] if n in w else p).detach().clone()
            c.grad = grads[n].detach().clone() if n in grads else None  # cloned: some steps write grads in place
            copies[n] = c
            ps.append(c)
            if p in opt.state:
                states.append((c, _copy_state(opt.state[p], memo)))
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ps})
    # Every group carries all its hyperparameters; the constructor gets the defaults it accepts by name
    # (AdamW's defaults hold a key, decoupled_weight_decay, that its constructor does not take).
    accepted, takes_any = _constructor_keywords(type(opt))
    clone = type(opt)(groups, **{k: v for k, v in opt.defaults.items() if takes_any or k in accepted})
    for c, state in states:
        clone.state[c] = state
    with torch.no_grad():
        clone.step()
    return {n: c.detach() for n, c in copies.items()}


def ics(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    layers: ModuleSpec,
    *,
    update: Update,
    param: str = "weight",
    bn_mode: BnMode = "batch",
    seed: int | None = 0,
    cost_model: CostModel | None = None,
) -> ICSResult:
    """Santurkar's gradient-based internal covariate shift of ``layers`` at the model's current weights.

    Args:
        loss_fn: ``loss_fn(model(x), y)`` -> scalar, the training loss; ``batch`` = (x, y) of shape
            (N, ...) and whatever ``loss_fn`` takes.
        layers: module name(s) or ``{label: name}``; each must own a parameter ``param``.
        update: the run's update rule (module docstring): a float learning rate, an optimizer, or a
            function ``update(params, grads) -> new params``.
        bn_mode: ``"batch"`` (the definition's training mode) or ``"running"``.
        seed: seeds the global RNG inside both passes (layers that draw from it get the same draws).
        cost_model: converts the counted work to passes in ``result.cost`` (default generic; see
            ``calibrate_cost``).

    Returns an :class:`ICSResult`. Raises ConfigError for unknown layers, a layer without ``param``
    or with ``param`` frozen, a bad ``update``; ShapeError for a bad batch or a non-scalar loss.
    Cost: ``1 + len(layers)`` forward+backward passes (the G' backwards partial), plus the update's
    parameter-length vector operations and one isolation of the model (``result.cost``).
    """
    _check_update(update)
    targets = resolve_modules(model, layers)
    obj = Objective(model, loss_fn, batch, bn_mode=bn_mode, seed=seed, cost_model=cost_model)
    index = {n: i for i, n in enumerate(obj.names)}
    pnames = []
    for label, (mname, module) in targets.items():
        pname = f"{mname}.{param}" if mname else param
        if pname not in index:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            p = getattr(module, param, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:  # an alias of a parameter named elsewhere
                first = next(n for n, q in model.named_parameters() if q is p)
                raise ConfigError(f"layer {label!r}: its {param!r} is the parameter {first!r} (tied weights); "
                                  f"probe the layer that owns it under that name, {_owner_of(first)!r}")
            raise ConfigError(f"layer {label!r} ({type(module).__name__}) has no trainable parameter {param!r}; "
                              f"its own parameters are {own or 'none'}; choose another layer or param=")
        pnames.append(pname)

    # The order in which the forward pass first uses each parameter (recorded during the G pass).
    order: dict[int, int] = {}
    with obj.session():
        loss, grads = obj.loss_and_grad(first_use=order)
        w0 = dict(zip(obj.names, obj.w0))
        g0 = dict(zip(obj.names, grads))
        if isinstance(update, torch.optim.Optimizer):
            w1 = _optimizer_step(update, model, w0, g0)
            # copies of the parameters and gradients, of each state tensor (momentum, moments), the step
            state = next(iter(update.state.values()), {})
            obj.cost.vector_ops += 4 + sum(isinstance(v, Tensor) and v.dim() > 0 for v in state.values())
        elif callable(update):
            w1 = dict(update(dict(w0), dict(g0)))
            obj.cost.vector_ops += 1
            bad = [n for n in w1 if n not in w0]
            if bad:
                raise ConfigError(f"update returned unknown parameter names {bad[:5]}; return a dict keyed "
                                  f"like its params argument")
        else:
            w1 = {n: torch.add(w0[n], g0[n], alpha=-float(update)) for n in obj.names}
            obj.cost.vector_ops += 1
        l2, cos, gn, gn1, nb = [], [], [], [], []
        for pname in pnames:
            mine = order.get(index[pname])
            if mine is None:
                raise ConfigError(f"parameter {pname!r} was not used in the forward pass; probe a layer the "
                                  f"model uses")
            before = {n for n in obj.names if order.get(index[n], mine) < mine}
            w = [w1[n].to(t.dtype) if (n in before and n in w1) else t for n, t in zip(obj.names, obj.w0)]
            i = index[pname]
            _, (g_after,) = obj.loss_and_grad(w, only=[i])
            g, g1 = flat([grads[i]]), flat([g_after])  # float64: exact difference, float64 sums
            diff = float(torch.linalg.vector_norm(g - g1))
            a, b = float(torch.linalg.vector_norm(g)), float(torch.linalg.vector_norm(g1))
            l2.append(diff)
            cos.append(float(g @ g1) / (a * b) if a > 0 and b > 0 else float("nan"))
            gn.append(a)
            gn1.append(b)
            nb.append(sum(1 for n in before if n in w1))
    return ICSResult(
        layers=tuple(targets), params=tuple(pnames), l2=np.asarray(l2), cosine=np.asarray(cos),
        grad_norm=np.asarray(gn), grad_norm_after=np.asarray(gn1), n_before=np.asarray(nb, dtype=np.int64),
        loss=loss, update=_describe(update), bn_mode=bn_mode, batch_size=obj.batch_size, cost=obj.cost,
    )
