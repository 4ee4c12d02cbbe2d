"""``calibrate_cost``: measure the ``CostModel`` of one model and batch (bnlab.measure.cost).

The instruments count their work by kind; what each kind costs relative to a plain forward+backward
depends on the model (see bnlab.measure.cost). This times each kind on the model and batch the
instruments will see, with the same code path they use (``Objective``: buffers cloned, BN in the
given mode, the model untouched), so that ``instrument(..., cost_model=calibrate_cost(...))`` states
its cost in that model's passes.
"""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlab.errors import ConfigError
from bnlab.measure._objective import LossFn, Objective, flat, unflat
from bnlab.measure._util import BnMode, _rng_devices
from bnlab.measure.cost import CostModel

__all__ = ["calibrate_cost"]

_BASIS = 16  # Lanczos-like basis size for timing the vector operations


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CUDA kernels are asynchronous
    fn()  # warm-up: allocator, autograd caches
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _plain_pass(model: nn.Module, loss_fn: LossFn, obj: Objective) -> Callable[[], object]:
    """One plain forward+backward, the unit: on a copy of the model (a training-mode forward updates
    running statistics), BN in the mode ``obj`` uses, gradients by ``autograd.grad`` (no ``.grad``)."""
    twin = copy.deepcopy(model)
    twin.train(obj.bn_mode == "batch")
    named = dict(twin.named_parameters())
    wrt = [named[n] for n in obj.names]

    def one_pass() -> None:
        # layers drawing from the global RNG must not advance it
        with torch.random.fork_rng(devices=_rng_devices(model, obj.x)):
            torch.autograd.grad(loss_fn(twin(obj.x), obj.y), wrt, allow_unused=True)
    return one_pass


def calibrate_cost(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    *,
    bn_mode: BnMode = "batch",
    params: Sequence[str] | None = None,
    repeats: int = 9,
) -> CostModel:
    """The cost of each kind of work on ``model`` and ``batch``, in plain forward+backward passes.

    Times (median of ``repeats`` after one warm-up, wall clock): a plain forward+backward of (a copy
    of) the model (1 pass, the unit), the instruments' forward alone (with its graph) and their
    gradient evaluation, a gradient that keeps its graph, one
    Hessian-vector product by double backward (with the flatten/unflatten the Hessian instruments
    do), a parameter-length float64 operation with a fresh result, dot products/axpys with a basis
    of such vectors, and the isolation of the model an instrument call starts with. The model is not changed (same
    contracts as the instruments). Cost of the calibration itself: about ``9 x (repeats + 1)``
    passes. Times are wall clock: calibrate on the machine, threads and load the instruments will
    run under. On a model whose pass takes about a millisecond, two calibrations moments apart differ
    by 10-40 % per constant on a loaded machine: use more ``repeats`` there.

    Raises ConfigError for ``repeats < 1``; the instruments' errors for a bad batch, loss or params.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an int >= 1, got {repeats!r}")
    obj = Objective(model, loss_fn, batch, bn_mode=bn_mode, params=params, seed=0)
    t_pass = _median_time(_plain_pass(model, loss_fn, obj), repeats)
    with obj.session():
        t_eval = _median_time(obj.loss_and_grad, repeats)
        t_fwd = _median_time(lambda: obj.loss_at(obj.leaves()), repeats)
        t_graph = _median_time(obj.gradient_graph, repeats)
        leaves, grads = obj.gradient_graph()
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(obj.numel, generator=gen, dtype=torch.float64)
        t_hvp = _median_time(lambda: flat(obj.hvp(leaves, grads, unflat(v, obj.w0))), repeats)
        device = obj.w0[0].device
        basis = torch.randn(_BASIS, obj.numel, generator=gen, dtype=torch.float64).to(device)
        w = v.to(device)
        u = torch.randn(obj.numel, generator=gen, dtype=torch.float64).to(device)
        t_vec = _median_time(lambda: w - u, repeats)  # fresh result, as the instruments' vector work
        # one Gram-Schmidt pass against the basis: _BASIS dots + _BASIS axpys, and one fresh result
        t_dot = max(_median_time(lambda: basis.T @ (basis @ w), repeats) - t_vec, 0.0) / (2 * _BASIS)

    def setup() -> None:
        with Objective(model, loss_fn, batch, bn_mode=bn_mode, params=params, seed=0).session():
            pass

    t_setup = _median_time(setup, repeats)
    fwd = min(t_fwd, t_eval) / t_pass
    return CostModel(forward=fwd, backward=(t_eval / t_pass) - fwd, graph_backward=max(t_graph / t_pass - fwd, 0.0),
                     double_backward=t_hvp / t_pass, vector_op=t_vec / t_pass, basis_dot=t_dot / t_pass,
                     setup=t_setup / t_pass,
                     source=f"calibrated: {type(model).__name__}, batch {obj.batch_size}, bn_mode {bn_mode}, "
                            f"{torch.get_num_threads()} threads, 1 pass = {t_pass * 1e3:.3g} ms")
