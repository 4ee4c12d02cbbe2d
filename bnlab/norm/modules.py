"""Thin module shells around :func:`bnlab.norm.functional.batch_norm`.

``BatchNorm1d/2d/3d`` *are* ``torch.nn.BatchNorm1d/2d/3d`` (subclasses that override ``forward``), so
everything that recognises BN by ``isinstance`` (weight-decay exclusion, freezing,
``fuse_conv_bn_eval``, timm/torchvision utilities) treats them as BN, and every torch.nn attribute,
the constructor (including the keyword-only ``bias=``), ``extra_repr``, ``reset_parameters`` and
``state_dict`` loading (old checkpoints, partial dicts, meta-device modules with ``assign=True``) are
torch.nn's own. Same momentum semantics (``None`` = cumulative average), unbiased running variance,
``track_running_stats=False`` meaning batch statistics in eval too. Exception types are torch.nn's
too (bnlab's classes subclass them): a non-tensor input, mixed dtypes, ``num_features=0`` (which
constructs, as in torch.nn), and ``torch.func.vmap`` over a training layer whose running statistics
are shared by the vmapped examples (a RuntimeError naming the fixes).

What they add over ``torch.nn``: validation with messages that name the cause and a fix valid in the
layer's current state, running statistics that a NaN/inf batch (or a float16 overflow) cannot
poison, numerically stable statistics (large mean relative to spread, tiny variances, half
precision), and an empty batch that leaves the statistics alone. The forward makes no Python
decision on tensor values, so it compiles with ``torch.compile(fullgraph=True)``, exports with
``torch.export`` and runs under ``torch.func`` transforms.

Graph tools: ``torch.fx.symbolic_trace`` records the layer as one call (``bnlab_batch_norm_forward``),
not as a leaf module: FX's default ``Tracer.is_leaf_module`` keeps only classes whose ``__module__``
starts with ``torch.nn`` (bnlab does not misreport its classes' home, which pickling relies on).
FX's ``optimization.fuse`` and quantization's ``fuse_fx`` match exact torch.nn types, so even a
leaf would stay unfused; they leave bnlab's BN unfused (the result is unchanged). Fold after
``bnlab.convert(model, to="torch")``, or use ``torch.nn.utils.fusion.fuse_conv_bn_eval``, which
fuses bnlab's BN. ``torch.jit.script`` compiles a TorchScript forward that runs the same core and
the same input checks (no warnings in TorchScript; errors arrive wrapped in ``torch.jit.Error``, as
for a scripted torch.nn layer).
"""
import inspect
from typing import Any, List, Optional

import torch
import torch.fx
from torch import Tensor, nn

from bnlab.errors import (ChannelError, ConfigError, ConfigTypeError, DtypeError, InputTypeError, NoChannelsError, ShapeError,
                          VmapRunningStatsError)
from bnlab.norm import kernels
from bnlab.norm.functional import (
    batch_norm,
    check_eps,
    check_momentum,
    eval_core,
    report_kernel_rejection,
    _traced,
    report_rejected_batch,
    train_core,
    values_per_channel,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "is_batchnorm", "bnlab_batch_norm_forward"]



# torch >= 2.13's BN takes bias= (an affine weight without a shift); older ones always have the bias.
_TORCH_BN_HAS_BIAS = "bias" in inspect.signature(nn.modules.batchnorm._BatchNorm.__init__).parameters

class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared forward of bnlab's BatchNorm{1,2,3}d; parameters and buffers are torch.nn's."""

    _is_bnlab_batchnorm = True  # lets probes recognise bnlab BN variants without importing them

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise ConfigTypeError(f"num_features must be an int (the number of channels C), got {num_features!r}")
        if num_features < 0:
            raise ChannelError(f"num_features must be a non-negative int (the number of channels C), got {num_features!r}")
        if _TORCH_BN_HAS_BIAS:
            super().__init__(num_features, check_eps(eps), check_momentum(momentum), affine, track_running_stats,
                             device, dtype, bias=bias)
        elif not bias:
            raise ConfigError(f"bias=False needs torch >= 2.13 (this is torch {torch.__version__}): upgrade torch, "
                              "or keep the bias")
        else:  # an older torch (its BN always has the bias): the rest works the same
            super().__init__(num_features, check_eps(eps), check_momentum(momentum), affine, track_running_stats,
                             device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_script(input)
        return self._forward_eager(input)

    @torch.jit.unused
    def _forward_eager(self, input: Tensor) -> Tensor:
        return bnlab_batch_norm_forward(self, input)

    def _forward_script(self, input: Tensor) -> Tensor:
        """The TorchScript forward: same core and semantics, without the eager-only warning."""
        self._check_input_dim(input)
        if self.training or self.running_mean is None:
            update = self.training and self.track_running_stats
            running_mean: Optional[Tensor] = None
            running_var: Optional[Tensor] = None
            count: Optional[Tensor] = None
            if update:
                running_mean = self.running_mean
                running_var = self.running_var
                count = self.num_batches_tracked
            if input.numel() // input.shape[1] == 1:
                raise ValueError("expected more than 1 value per channel to compute batch statistics")
            res = train_core(input, self.weight, self.bias, running_mean, running_var, count, self.momentum, self.eps)
            rm = self.running_mean
            rv = self.running_var
            nbt = self.num_batches_tracked
            new_mean = res.running_mean
            new_var = res.running_var
            new_count = res.num_batches_tracked
            if update and rm is not None and rv is not None and nbt is not None:
                if new_mean is not None and new_var is not None and new_count is not None:
                    rm.copy_(new_mean)
                    rv.copy_(new_var)
                    nbt.copy_(new_count)
            return res.out
        rm = self.running_mean
        rv = self.running_var
        assert rm is not None and rv is not None
        return eval_core(input, self.weight, self.bias, rm, rv, self.eps)

    def _check_input_dim(self, input: Tensor) -> None:
        """Raise ShapeError (a ValueError, like torch.nn's check) for a non-tensor or a wrong rank.
        TorchScript compiles it too, so a scripted layer refuses a wrong rank with the same message
        (wrapped in torch.jit.Error, as for a scripted torch.nn layer)."""
        if not isinstance(input, Tensor):
            raise InputTypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(input).__name__}; convert it "
                                 f"with torch.as_tensor(x, dtype=torch.float32)")
        if input.dim() not in self._ranks():
            name = self._script_name() if torch.jit.is_scripting() else self._class_name()
            raise ShapeError(_rank_message(name, self._ranks(), self._layout(), self._hint(), input.shape))

    @torch.jit.unused
    def _class_name(self) -> str:
        return type(self).__name__

    def _script_name(self) -> str:
        raise NotImplementedError

    def _ranks(self) -> List[int]:
        raise NotImplementedError

    def _layout(self) -> str:
        raise NotImplementedError

    def _hint(self) -> str:
        raise NotImplementedError


def _shape_text(shape: List[int]) -> str:
    """``str(tuple(shape))``, written so that TorchScript compiles it."""
    if len(shape) == 1:
        return "(" + str(shape[0]) + ",)"
    return "(" + ", ".join([str(s) for s in shape]) + ")"


def _rank_message(name: str, ranks: List[int], layout: str, hint: str, shape: List[int]) -> str:
    wanted = " or ".join([str(r) + "-D" for r in ranks])
    return (name + " expects a " + wanted + " input " + layout + ", got a " + str(len(shape))
            + "-D input of shape " + _shape_text(shape) + "; " + hint)


# Traced as one call by torch.fx.symbolic_trace (FX cannot follow Python checks on tensor shapes).
@torch.fx.wrap
def bnlab_batch_norm_forward(module: _BatchNorm, x: Tensor) -> Tensor:
    """Forward of a bnlab BN module: validation, the functional core, in-place buffer update."""
    out = _kernel_forward(module, x)
    if out is not None:
        return out
    module._check_input_dim(x)
    if module.num_features == 0 and x.shape[1] == 0:
        raise NoChannelsError(
            f"{type(module).__name__} was built with num_features=0, so it has no channel to normalize (input of "
            f"shape {tuple(x.shape)}); build it with num_features equal to the input's channel count x.shape[1], "
            f"or skip the layer when there are no channels")
    _check_dtypes(module, x)
    # torch.nn semantics: batch statistics in training, and in eval when no running stats are kept.
    update = module.training and module.track_running_stats
    use_batch = module.training or module.running_mean is None
    if use_batch and values_per_channel(x) == 1:
        if module.training and module.track_running_stats:
            fix = "use a batch size > 1, or call .eval() on the layer to use its running statistics"
        elif module.training:
            fix = ("use a batch size > 1; this layer keeps no running statistics (track_running_stats=False), "
                   "so eval mode would use batch statistics too")
        else:
            fix = ("the layer is in eval mode but keeps no running statistics (track_running_stats=False), so it "
                   "normalizes with batch statistics: pass more than one value per channel, or use a layer built "
                   "with track_running_stats=True and trained, whose running statistics then apply in eval")
        raise ShapeError(
            f"{type(module).__name__} expected more than 1 value per channel to compute batch statistics, got "
            f"input of shape {tuple(x.shape)}: the batch variance of a single value is 0 and BN would output "
            f"beta; {fix}"
        )
    if update and not torch.compiler.is_compiling() and _vmapped_over_shared_stats(x, module.running_mean):
        raise VmapRunningStatsError(
            f"{type(module).__name__} is in training mode with track_running_stats=True, and torch.func.vmap maps "
            f"its input while its running_mean/running_var buffers are shared by all vmapped examples: the in-place "
            f"update of these buffers cannot take a different value per example. Fixes: build the layer with "
            f"track_running_stats=False (batch statistics per vmapped example, the MAML pattern); or give each "
            f"example its own buffers, vmapping torch.func.functional_call(model, (params, buffers), x) with "
            f"buffers stacked along the vmapped dimension; or call "
            f"torch.func.replace_all_batch_norm_modules_(model) to stop tracking running statistics; or call "
            f".eval() to use the running statistics without updating them")
    if module.momentum is None and update and module.num_batches_tracked is None:
        raise ShapeError(f"{type(module).__name__}: momentum=None needs the num_batches_tracked buffer; "
                         f"reload the state dict or call reset_running_stats()")
    result = batch_norm(
        x,
        module.weight,
        module.bias,
        module.running_mean if update or not use_batch else None,
        module.running_var if update or not use_batch else None,
        training=use_batch,
        momentum=module.momentum,
        eps=module.eps,
        num_batches_tracked=module.num_batches_tracked if update else None,
    )
    if update:
        # In place, like torch.nn: functional_call with cloned buffers then updates the clones.
        with torch.no_grad():
            module.running_mean.copy_(result.running_mean)
            module.running_var.copy_(result.running_var)
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.copy_(result.num_batches_tracked)
    return result.out


def _vmapped_over_shared_stats(x: Tensor, running_mean: Tensor) -> bool:
    """Whether ``x`` is batched by ``torch.func.vmap`` (at any level) while ``running_mean`` is not:
    then an in-place update of the buffer would need one value per vmapped example."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if not is_wrapped(x):
        return False

    def batched(t: Tensor) -> bool:
        while is_wrapped(t):
            if torch._C._functorch.is_batchedtensor(t):
                return True
            t = torch._C._functorch.get_unwrapped(t)
        return False

    return batched(x) and not batched(running_mean)


_HALF = (torch.float16, torch.bfloat16)


def _dtypes_agree(x: Tensor, *others: Optional[Tensor]) -> bool:
    """torch.nn's rule for BN on mixed dtypes: parameters and buffers share the input's dtype, or
    all are float32 for a float16/bfloat16 input (half precision with float32 statistics)."""
    dtype = x.dtype
    if all(t is None or t.dtype == dtype for t in others):  # the common case, without building a set
        return True
    dtypes = {t.dtype for t in others if t is not None}
    return dtypes == {torch.float32} and dtype in _HALF


def _check_dtypes(module: _BatchNorm, x: Tensor) -> None:
    """Raise DtypeError (a RuntimeError, like torch.nn's "mixed dtype" error) for a float input whose
    dtype does not fit the layer's parameters and buffers."""
    if not x.is_floating_point():
        return  # an integer input gets its own message from the functional core
    tensors = (module.weight, module.bias, module.running_mean, module.running_var)
    if _dtypes_agree(x, *tensors):
        return
    have = ", ".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors if t is not None}))
    want = str(x.dtype).replace("torch.", "")
    raise DtypeError(
        f"{type(module).__name__} got a {want} input but its parameters/buffers are {have}; torch.nn's BN accepts "
        f"the same dtype for both, or float32 parameters with a float16/bfloat16 input. Convert the input "
        f"(x.to({have.split(', ')[0]})) or the layer (layer.to(torch.{want})), or run the model under torch.autocast")


def _kernel_forward(module: _BatchNorm, x: Tensor) -> Optional[Tensor]:
    """The common case in one fused-kernel call (bnlab.norm.kernels): a valid CPU input in training
    or eval with running statistics. Returns None for everything else, which the general path
    handles (and explains, for bad input). Small layers are dominated by per-call overhead, so this
    path reads the module's dicts directly and makes only the checks that pick it."""
    params, buffers = module._parameters, module._buffers
    weight, bias, rm, rv = params.get("weight"), params.get("bias"), buffers.get("running_mean"), buffers.get("running_var")
    if module.affine and (weight is None or bias is None):
        return None  # weight/bias reparametrized (torch.nn.utils.parametrize, weight_norm): the general path reads them
    eps, momentum = module.eps, module.momentum
    if (rm is None or rv is None or not isinstance(x, Tensor) or x.dim() not in module._ranks()
            or x.shape[1] != module.num_features or not (isinstance(eps, float) and eps > 0)
            or not (momentum is None or (isinstance(momentum, float) and 0.0 <= momentum <= 1.0))
            or not _dtypes_agree(x, weight, bias, rm, rv) or not kernels.applies(x, weight, bias, rm, rv)):
        return None
    if not module.training:
        return torch.ops.bnlab.bn_eval(x, weight, bias, rm, rv, eps)
    count = buffers.get("num_batches_tracked")
    if not module.track_running_stats or x.numel() // x.shape[1] <= 1 or (momentum is None and count is None):
        return None
    if type(x) is Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        # Eager: the buffers are updated in place by the kernel (no returned copies to write back).
        # Only a plain tensor (not a FakeTensor or another subclass) has a flag that may be read.
        out, stats, accepted = torch.ops.bnlab.bn_train_(
            x, weight, bias, rm, rv, count, 0.0 if momentum is None else momentum, momentum is None, eps)
        if not accepted:  # nothing was updated, so the buffers still hold the statistics before the batch
            report_kernel_rejection(accepted, stats, x.dtype, rm, rv, count, momentum)
        return out
    out, stats, new_mean, new_var, new_count, accepted = torch.ops.bnlab.bn_train(
        x, weight, bias, rm, rv, count, 0.0 if momentum is None else momentum, momentum is None, eps)
    if not _traced(accepted):  # same rule as the functional path: never read a fake/traced flag
        report_kernel_rejection(accepted, stats, x.dtype, rm, rv, count, momentum)
    # The new statistics are not differentiable, so copying them records no autograd history.
    rm.copy_(new_mean)
    rv.copy_(new_var)
    if count is not None:
        count.copy_(new_count)
    return out


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """BN over (N, C) or (N, C, L) inputs; a ``torch.nn.BatchNorm1d`` (subclass)."""

    def _script_name(self) -> str:
        return "BatchNorm1d"

    def _ranks(self) -> List[int]:
        return [2, 3]

    def _layout(self) -> str:
        return "(N, C) or (N, C, L)"

    def _hint(self) -> str:
        return "use BatchNorm2d for images (N, C, H, W), or flatten to (N, C)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """BN over (N, C, H, W) inputs, per channel over N, H, W; a ``torch.nn.BatchNorm2d`` (subclass)."""

    def _script_name(self) -> str:
        return "BatchNorm2d"

    def _ranks(self) -> List[int]:
        return [4]

    def _layout(self) -> str:
        return "(N, C, H, W)"

    def _hint(self) -> str:
        return ("use BatchNorm1d for (N, C) or (N, C, L), BatchNorm3d for (N, C, D, H, W); add a batch dim "
                "with x.unsqueeze(0)")


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """BN over (N, C, D, H, W) inputs; a ``torch.nn.BatchNorm3d`` (subclass)."""

    def _script_name(self) -> str:
        return "BatchNorm3d"

    def _ranks(self) -> List[int]:
        return [5]

    def _layout(self) -> str:
        return "(N, C, D, H, W)"

    def _hint(self) -> str:
        return "use BatchNorm2d for (N, C, H, W); add a batch dim with x.unsqueeze(0)"


def store_statistics(module: nn.Module, result: Any) -> None:
    """Write a functional result's new running statistics into ``module``'s buffers, in place (like
    BN), without autograd history (the statistics are not differentiable)."""
    with torch.no_grad():
        module.running_mean.copy_(result.running_mean)
        module.running_var.copy_(result.running_var)
        module.num_batches_tracked.copy_(result.num_batches_tracked)


def is_batchnorm(module: nn.Module) -> bool:
    """True for BN layers: torch.nn's BatchNorm1d/2d/3d, SyncBatchNorm and lazy variants, bnlab's
    (which subclass them) and bnlab variants marked ``_is_bnlab_batchnorm``; not for layer, group
    or instance norm, whose statistics are per example."""
    return getattr(module, "_is_bnlab_batchnorm", False) or isinstance(module, nn.modules.batchnorm._BatchNorm)
