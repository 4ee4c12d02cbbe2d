"""``diagnose``: BN problems in a user's model, ranked, each with the evidence measured and the fix.

The checks (each names the layer; thresholds are stated in the evidence):

* ``train_eval_gap``: the loss (and accuracy) on the data with BN in training mode (batch
  statistics) vs eval mode (running statistics); eval loss above 1.5x the training-mode loss, or
  accuracy 5 points lower, means the running statistics do not describe the data.
* ``stale_running_stats``: per layer, |batch mean - running_mean| / sqrt(running_var) averaged over
  channels (above 0.5) or a batch/running variance ratio off by more than 2x; the first layer where
  it starts is named (the measures of bnlab.measure.covariate_shift).
* ``statistics_never_updated``: num_batches_tracked == 0 (running_mean 0, running_var 1: the
  defaults), though the layer has running statistics.
* ``bn_in_train_mode``: BN layers in training mode in a model handed over for inference.
* ``keras_momentum``: momentum >= 0.9; torch's momentum is 1 - Keras' (0.99 in Keras is 0.01 here):
  the running statistics are then almost only the last batch.
* ``batch_of_one``: one value per channel per batch (N = 1 without spatial size): training fails;
  N = 1 with spatial size normalizes each example alone.
* ``tiny_batch``: fewer than 8 examples per process and batch: noisy statistics.
* ``gamma_collapsed``: |γ| < 1e-3 for some channels: those channels carry nothing.
* ``dead_channels``: channels whose input has (almost) zero variance over the batch.
* ``saturated_channels``: |β| > 3|γ|: the next nonlinearity sees one side almost always.
* ``bias_before_bn``: a Conv/Linear with a bias whose output goes straight into BN: BN subtracts the
  mean, so the bias is a wasted parameter (use bias=False).

The model: a torch.nn.Module, a TorchScript module or a torch.export program (``load_model_file``
reads either from its file). A compiled model's BN layers are read from its graph
(bnlab.doctor_graph); the same checks run, and one that cannot be done on a layer is listed as
"not checked:" with the reason.

Nothing here changes the model: a module's forwards run with cloned buffers and restored flags and
RNGs (bnlab.measure's isolation), a compiled model's on private copies, and parameters are only read.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.doctor_graph import BNCall, ExportSource, InputStats, ScriptSource, input_stats, load_model_file
from bnlab.errors import ConfigError, ShapeError
from bnlab.measure import is_batchnorm
from bnlab.measure._util import isolated

_SEVERITY = {"error": 0, "warning": 1, "info": 2}
MIN_BATCH = 8
GAP_LOSS_RATIO = 1.5
GAP_ACC_POINTS = 0.05
SHIFT = 0.5
VAR_FACTOR = 2.0

__all__ = ["CHECKS", "Finding", "diagnose", "format_findings", "load_model_file"]

CHECKS = (
    ("train_eval_gap", "loss/accuracy with batch statistics vs running statistics on the same data"),
    ("stale_running_stats", "batch vs running mean (in running sd) and variance ratio, per layer; the first "
                            "layer where it starts"),
    ("statistics_never_updated", "num_batches_tracked = 0: running statistics still at their defaults"),
    ("bn_in_train_mode", "BN layers in training mode in a model handed over for inference"),
    ("keras_momentum", "momentum >= 0.9 (torch's momentum is 1 - Keras')"),
    ("batch_of_one", "one example (or one value per channel) per process and batch"),
    ("tiny_batch", f"fewer than {MIN_BATCH} examples per process and batch"),
    ("gamma_collapsed", "channels with |γ| < 1e-3"),
    ("dead_channels", "channels whose input has (almost) no variance over the batch"),
    ("saturated_channels", "channels with |β| > 3|γ|"),
    ("bias_before_bn", "a Conv/Linear bias feeding BN directly (a wasted parameter)"),
)



@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: ``severity`` ("error", "warning", "info"), ``check`` (its name), ``layer`` (module
    name, "" for the whole model), ``evidence`` (what was measured), ``fix``."""

    severity: str
    check: str
    layer: str
    evidence: str
    fix: str


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]


class _ModuleSource:
    """The BN layers of a Python nn.Module, measured with forward hooks on isolated passes."""

    kind = "module"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = _bn_layers(model)
        self.calls = [BNCall(name, getattr(bn, "weight", None), getattr(bn, "bias", None),
                             getattr(bn, "running_mean", None), getattr(bn, "running_var", None),
                             getattr(bn, "num_batches_tracked", None), bool(bn.training), getattr(bn, "momentum", None),
                             True, float(getattr(bn, "eps", 1e-5))) for name, bn in self.layers]

    def run(self, x: Tensor, bn_mode: str) -> tuple[Any, dict[str, InputStats]]:
        stats: dict[str, InputStats] = {}
        hooks = [bn.register_forward_pre_hook(lambda mod, args, name=name: stats.__setitem__(name, input_stats(args[0])))
                 for name, bn in self.layers]
        try:
            with isolated(self.model, x, bn_mode=bn_mode, seed=0), _cloned_buffers(self.model), torch.no_grad():
                out = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return out, stats

    def bias_pairs(self, x: Tensor) -> list[tuple[str, str, str]]:
        """(Linear/Conv name, its type, BN name) where a trainable bias feeds BN directly: the module
        that ran just before each BN (forward hooks on leaves, one pass on clones)."""
        model = self.model
        order: list[tuple[str, nn.Module]] = []
        hooks = [m.register_forward_hook(lambda mod, args, out, name=name: order.append((name, mod)))
                 for name, m in model.named_modules() if len(m._modules) == 0]
        # the call order only: running statistics where every BN has them (a batch of one works then)
        mode = "running" if all(getattr(m, "running_mean", None) is not None for _, m in self.layers) else "batch"
        try:
            with isolated(model, x, bn_mode=mode, seed=0), _cloned_buffers(model), torch.no_grad():
                model(x)
        except ValueError:  # one value per channel in training mode: reported by the batch checks
            return []
        finally:
            for h in hooks:
                h.remove()
        return [(pname, type(prev).__name__, name) for (pname, prev), (name, mod) in zip(order, order[1:])
                if is_batchnorm(mod) and isinstance(prev, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                and prev.bias is not None and prev.bias.requires_grad]


def _graph_bias_pairs(source: Any, x: Tensor) -> list[tuple[str, str, str]]:
    return [(c.prev[0], c.prev[1], c.name) for c in source.calls if c.prev is not None]


class _cloned_buffers:
    """Swap every buffer for a clone during a forward and put the originals back (running statistics
    and num_batches_tracked are not moved)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[dict, str, Tensor]] = []

    def __enter__(self) -> None:
        for m in self.model.modules():
            for k, b in list(m._buffers.items()):
                if b is not None:
                    self.saved.append((m._buffers, k, b))
                    m._buffers[k] = b.clone()

    def __exit__(self, *exc: Any) -> None:
        for d, k, b in self.saved:
            d[k] = b
        self.saved.clear()


def _source(model: Any) -> Any:
    """The BN calls of ``model`` and a runner: an nn.Module (hooks), a TorchScript module or a
    torch.export program / its GraphModule (graph; bnlab.doctor_graph)."""
    if isinstance(model, torch.jit.ScriptModule):
        return ScriptSource(model)
    if isinstance(model, torch.export.ExportedProgram):
        return ExportSource(model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model is a {type(model).__name__}; give a torch.nn.Module, a TorchScript module "
                          "(torch.jit.load) or a torch.export program (torch.export.load), e.g. "
                          "bnlab.doctor.load_model_file(path)")
    if isinstance(model, torch.fx.GraphModule) and not _bn_layers(model):
        return ExportSource(model)  # e.g. ep.module(): BN are calls in the graph, not modules
    return _ModuleSource(model)


def _not_checked(check: str, layer: str, why: str, fix: str) -> Finding:
    return Finding("info", check, layer, f"not checked: {why}", fix)


def diagnose(model: nn.Module | torch.export.ExportedProgram, x: Tensor, y: Tensor | None = None, *,
             loss_fn: Callable | None = None, batch_per_process: int | None = None,
             for_inference: bool = True) -> list[Finding]:
    """BN problems of ``model`` on the batch ``x`` (N, ...) (and targets ``y``), most severe first.

    ``model``: a torch.nn.Module; a TorchScript module (``torch.jit.load``, scripted or traced); or a
    ``torch.export.ExportedProgram`` (``torch.export.load``) or the GraphModule its ``.module()``
    gives. The same checks run on all three: a compiled model's BN layers are read from its graph
    (bnlab.doctor_graph), and a check that cannot be done on some layer is listed as an "info"
    finding starting "not checked:" with the reason. ``batch_per_process``: the batch size each
    process trains with (default: len(x)), for the small batch checks. ``loss_fn`` (default
    cross-entropy for integer targets, MSE otherwise) for the train/eval gap, which needs ``y``.
    ``for_inference``: the model as it will be deployed (BN in training mode is then reported).
    Raises ConfigError for a model without BN (or of another type), ShapeError for an empty batch;
    an error of the model's own forward on ``x`` (RuntimeError) passes through. The model is not
    changed: modules run on cloned buffers with flags and RNGs restored; compiled models run as
    private copies."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError("x must be a non-empty batch (N, ...) of the model's inputs")
    src = _source(model)
    calls = src.calls
    if not calls:
        raise ConfigError("the model has no BatchNorm layer; nothing for the BN doctor to check")
    findings: list[Finding] = []
    n = batch_per_process or x.shape[0]

    seen: set[str] = set()
    for c in calls:
        name = c.name
        if name in seen:  # a layer called twice: its parameters are checked once, as for a module
            continue
        seen.add(name)
        has_stats = c.running_mean is not None
        nbt = c.num_batches_tracked
        if has_stats and nbt is not None and int(nbt) == 0:
            findings.append(Finding("error", "statistics_never_updated", name,
                                    "num_batches_tracked = 0: running_mean/var are still their defaults (0, 1)",
                                    "train the model (BN in training mode) or recalibrate: "
                                    "bnlab.norm.deploy.recalibrate(model, batches)"))
        elif has_stats and nbt is None and src.kind != "module" and bool((c.running_mean == 0).all()) \
                and bool((c.running_var == 1).all()):
            findings.append(Finding("error", "statistics_never_updated", name,
                                    "running_mean = 0 and running_var = 1 in every channel (the defaults; the "
                                    "file holds no num_batches_tracked)",
                                    "train the model (BN in training mode) or recalibrate before saving it"))
        if c.training and for_inference:
            how = ("the layer is in training mode" if src.kind != "torch.export"
                   else "the program computes this BN in training mode (exported from a model in train mode)")
            findings.append(Finding("error", "bn_in_train_mode", name,
                                    f"{how}: at inference it normalizes with each batch's statistics (and updates "
                                    "its running statistics)",
                                    "call model.eval() before inference" + ("" if src.kind == "module" else
                                                                            " (and before saving or exporting it)")))
        mom = c.momentum
        if not c.momentum_known:
            findings.append(_not_checked("keras_momentum", name, f"the {src.kind} graph computes momentum at run "
                                         "time and the layer has no momentum attribute",
                                         "check the momentum the model was built with (torch's is 1 - Keras')"))
        elif mom is not None and mom >= 0.9:
            findings.append(Finding("warning", "keras_momentum", name,
                                    f"momentum = {mom:g}: torch's momentum weighs the new batch (Keras' 0.99 is "
                                    f"torch's 0.01); the running statistics are almost only the last batch",
                                    f"use momentum={1 - mom:.2g} (1 - the Keras value)"))
        w, b = c.weight, c.bias
        if w is not None:
            wa = w.detach().abs()
            dead = int((wa < 1e-3).sum())
            if dead:
                findings.append(Finding("warning", "gamma_collapsed", name,
                                        f"{dead}/{wa.numel()} channels have |γ| < 1e-3 (smallest {float(wa.min()):.2g})",
                                        "those channels carry nothing: check weight decay on γ (often excluded) "
                                        "or prune them"))
            if b is not None:
                sat = int(((b.detach().abs() > 3 * wa) & (wa >= 1e-3)).sum())  # collapsed γ: reported above
                if sat:
                    findings.append(Finding("warning", "saturated_channels", name,
                                            f"{sat}/{wa.numel()} channels have |β| > 3|γ|: their output stays on one "
                                            "side of 0 for almost every input",
                                            "check the learning rate and initialization; a ReLU after them is dead "
                                            "or linear"))
        if not c.recordable:
            for check in ("stale_running_stats", "dead_channels", "tiny_batch", "batch_of_one"):
                findings.append(_not_checked(check, name, f"this BN call sits inside control flow (an if/loop block "
                                             f"of the {src.kind} graph), so its input cannot be measured",
                                             "check it on the Python model (module:factory)"))

    # the input of each BN with batch statistics: one pass (isolated / a private copy)
    stats: dict[str, InputStats] = {}
    try:
        _, stats = src.run(x, "batch")
    except ValueError as err:  # torch's "expected more than 1 value per channel"
        findings.append(Finding("error", "batch_of_one", "", f"a training-mode forward fails: {err}",
                                "train with more than one example per process, or use GroupNorm/LayerNorm"))
    else:
        single = [(nm, s.shape) for nm, s in stats.items() if s.count == 1]
        if single:  # graph ops do not raise it: the same finding as for a module
            findings.append(Finding("error", "batch_of_one", "", "a training-mode forward fails: expected more than 1 "
                                    f"value per channel when training, got input size {single[0][1]} at {single[0][0]!r}",
                                    "train with more than one example per process, or use GroupNorm/LayerNorm"))
            stats = {}  # as when the forward raises: no per-layer statistics from a failed pass
    for c in calls:
        name = c.name
        s = stats.get(name)
        if s is None:
            continue
        shape = s.shape
        per_channel = n * (int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1)
        if n == 1:
            what = "one value per channel" if per_channel == 1 else "one example: it normalizes each example alone"
            findings.append(Finding("error", "batch_of_one", name, f"batch of 1 per process ({what})",
                                    "use a larger batch per process, SyncBatchNorm (bnlab.norm.sync) across "
                                    "processes, or GroupNorm"))
        elif n < MIN_BATCH:
            findings.append(Finding("warning", "tiny_batch", name,
                                    f"{n} examples per process ({per_channel} values per channel): noisy batch "
                                    f"statistics (below {MIN_BATCH})",
                                    "use a larger batch per process, SyncBatchNorm across processes, or GroupNorm"))
        v = s.var
        if s.count > 1 and v.numel() > 1:
            ref = float(v.median())
            dead = int((v <= 1e-8 * max(ref, 1e-30)).sum()) if ref > 0 else int((v == 0).sum())
            if dead:
                findings.append(Finding("warning", "dead_channels", name,
                                        f"{dead}/{v.numel()} channels have (almost) zero input variance over the batch",
                                        "those inputs are constant (a dead unit before BN): check the layer feeding it"))

    # running statistics vs the data's batch statistics (bnlab.measure.covariate_shift's measures)
    first = None
    for c in calls:
        s = stats.get(c.name)
        if s is None or c.running_mean is None or x.shape[0] < 2 or (
                c.num_batches_tracked is not None and int(c.num_batches_tracked) == 0):
            continue
        rm, rv = c.running_mean.detach().double(), c.running_var.detach().double()
        if rm.numel() != s.mean.numel():
            raise ShapeError(f"layer {c.name!r}: input has {s.mean.numel()} channels but running stats have {rm.numel()}")
        mean_shift = float(((s.mean - rm).abs() / torch.sqrt(rv + c.eps)).mean())
        var_ratio = float((s.var / rv).mean())
        if mean_shift > SHIFT or not 1 / VAR_FACTOR <= var_ratio <= VAR_FACTOR:
            first = first or c.name
            findings.append(Finding(
                "warning", "stale_running_stats", c.name,
                f"batch vs running statistics: mean shift {mean_shift:.2f} running sd (mean over channels; "
                f"flag above {SHIFT}), variance ratio {var_ratio:.2f} (flag outside 1/{VAR_FACTOR:g}..{VAR_FACTOR:g})"
                + (" — the first layer where it starts" if first == c.name else ""),
                "recalibrate the running statistics on data like this (bnlab.norm.deploy.recalibrate), or check "
                "that eval data is preprocessed like training data"))

    if y is not None:
        lf = loss_fn or (nn.functional.cross_entropy if not y.is_floating_point() else nn.functional.mse_loss)
        lt, at = _loss_and_acc(src, x, y, "batch", lf)
        all_stats = all(c.running_mean is not None for c in calls)
        le, ae = _loss_and_acc(src, x, y, "running", lf) if all_stats else (lt, at)
        gap_acc = at is not None and ae is not None and at - ae > GAP_ACC_POINTS
        if le > GAP_LOSS_RATIO * lt or gap_acc:
            acc = f", accuracy {at:.3f} vs {ae:.3f}" if at is not None and ae is not None else ""
            findings.append(Finding("error", "train_eval_gap", "",
                                    f"loss with batch statistics {lt:.4g} vs with running statistics {le:.4g}{acc}",
                                    "the running statistics do not describe this data: recalibrate them "
                                    "(bnlab.norm.deploy.recalibrate) or check the layers flagged below"))
    pairs = src.bias_pairs(x) if isinstance(src, _ModuleSource) else _graph_bias_pairs(src, x)
    for pname, ptype, name in pairs:
        findings.append(Finding("info", "bias_before_bn", pname,
                                f"{ptype} {pname!r} has a bias and feeds {name!r} directly; BN removes "
                                "the per-channel mean, so the bias has no effect on the output",
                                f"build {pname!r} with bias=False (a wasted parameter, and weight decay acts on it)"))
    return sorted(findings, key=lambda f: _SEVERITY[f.severity])


def _loss_and_acc(src: Any, x: Tensor, y: Tensor, bn_mode: str,
                  loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[float, float | None]:
    out, _ = src.run(x, bn_mode)
    loss = float(loss_fn(out, y))
    acc = float((out.argmax(1) == y).float().mean()) if out.dim() == 2 and not y.is_floating_point() else None
    return loss, acc


def format_findings(findings: list[Finding]) -> str:
    """The findings as terminal text, most severe first; one line saying so when there are none."""
    if not findings:
        return "BN doctor: no problem found"
    lines = [f"BN doctor: {len(findings)} finding(s), most severe first"]
    for f in findings:
        where = f" {f.layer}" if f.layer else ""
        lines += [f"  [{f.severity.upper():7s}] {f.check}{where}", f"            evidence: {f.evidence}",
                  f"            fix:      {f.fix}"]
    return "\n".join(lines)
