"""Santurkar et al. 2018, the VGG experiments on a CPU: Fig. 1 (with/without BN at LR 0.1 and 0.5), Fig. 2
and Fig. 8 (noisy BN), Fig. 3a (gradient-based ICS), Figs. 4 and 11 (the landscape along the gradient),
Figs. 5a and 6 (ℓp normalization). Claims D.11-D.17 (VGG parts); see docs/claims.md for each claim, the
paper's numbers and the rule that decides it.

Protocol, fixed before any run of it was looked at (the paper's App. A.1 where it says something; the
rest is ours and listed below):

* Network: the VGG-16 conv stack (13 3x3 convs, 2x2 max-pools) at 1/8 of the widths, i.e. 8-8 | 16-16 |
  32-32-32 | 64-64-64 | 64-64-64 channels, one linear layer to the 10 classes (bnlab.models.vgg). A
  normalization layer (BN, noisy BN, ℓp) after every conv and before its ReLU; the conv bias is dropped
  where a layer with a learnable shift follows. Glorot (uniform) init, zero biases, γ = 1, β = 0.
* Data: CIFAR-10 when it is installed, else Fashion-MNIST (28x28 grey levels; then 4 of the 5 pools run,
  the 5th is skipped at 1x1). Pixels in [0, 1], no augmentation, no other preprocessing. Every number
  says which data made it.
* Training: plain SGD (momentum 0, weight decay 0), batch 128, constant learning rate 0.1 (the paper's
  default; the paper chose it by a hyper-parameter search for the best training performance of the
  standard network) and 0.5 for Fig. 1's second pair; 2000 steps in the quick profile (the paper: 15,000).
  3 seeds per arm; a seed fixes the initial weights, the batch order and the noise streams.
* Arms: ``standard`` and ``bn`` at LR 0.1 and ``standard_lr0.5``, ``bn_lr0.5`` (Fig. 1); ``noisy_bn``
  (BN, then Algorithm 1's noise on every BN output: per channel and step mu_t ~ U(-0.5, 0.5),
  sigma_t ~ U(1, 1.25); per element m ~ U(mu_t ± 0.1), s ~ N(sigma_t, 0.1²), a <- s·a + m; training
  mode only) and ``standard_noise`` (the same noise where BN would be, no normalization; the convs keep
  their biases) (Fig. 2); ``l1``, ``l2``, ``linf`` (Fig. 5a; bnlab.norm.lp: centred by the batch mean,
  divided by a scaled batch ℓp norm of the centred values). All at LR 0.1 unless named.
* Measurements: training loss and accuracy of every 10th training batch; accuracy on a fixed
  2000-image test subset every 100 steps; the full test set at the end. Every 100 steps (and at the
  last step), on that step's training batch: ICS (Def. 2.1) of conv layers #5 and #10 (the paper's
  Fig. 3a layers) with the run's own update, and the landscape along the gradient for η ∈ {1/2, 1, 2,
  4} × LR (BN in training mode). At every 100th step s and at s + 1, on a fixed probe batch of 128
  training images (BN in training mode, noise drawn as in the training step): the per-channel mean and
  variance of the input of the ReLU after conv layers #2, #9 and #13 (after the norm and the noise),
  giving the per-step |Δμ| and |Δσ²| of Fig. 8 between s and s + 1, averaged over channels; and a
  histogram of channel 0 of layers #2, #3, #9, #11 and #13 over batch x height x width (Figs. 1c, 2, 6).

Choices the paper leaves open, ours:

* Width 1/8 and 2000 steps: the CPU budget (the quick profile's 27 runs took about 50 min on 2 cores:
  2.2-2.9 min per standard/BN run, 3.5-4.7 min per noisy-BN and ℓp run). At this scale the standard
  net (no BN, Glorot init) does not train at all: its signal vanishes through the 13 convs (rule R-S1
  in docs/claims.md). Whether the FC layers have BN is unknown: the robustness grid adds an FC head with the norm
  (``head=mlp``). The VGG variant is unknown; the figures' "Layer #13" fits VGG-16's 13 convs.
* "Reaches the accuracy sooner" (D.11a) uses the training-batch accuracy averaged over the last 100
  steps (10 logged batches) and a target fixed per dataset before the runs: 0.85 on Fashion-MNIST, 0.60
  on CIFAR-10 (the quick scale does not approach the paper's 100 %). A run that never reaches it counts
  as the run's length, so a difference involving it is a lower bound.
* "Final training accuracy" is the mean logged training-batch accuracy over the last 10 % of the run; a
  diverged run counts as chance (0.1). Training accuracy of the noisy arms is measured with their noise
  on, as they train.
* Per-step moment changes are measured on a fixed batch, so that they show the change of the network
  (and of the noise) over one step, not the change of the batch.
* Which unit's distribution the histograms show: channel 0 (channels are exchangeable at init).

Added after the first quick runs were seen (rule R-S2 in docs/claims.md), before any run of it: the
robustness grid holds a third setting, He init (``init=kaiming``, N(0, 2/fan_in)), a deviation from
the paper's Glorot init, because the Glorot standard net never trains at this scale. With it the
standard net trains (test accuracy 0.86 after 2000 steps), so the claims that R-S1 leaves UNDECIDED
get a measured outcome at that setting; the headline keeps the primary setting's UNDECIDED (PASS only
if PASS in every setting). He init also changes the BN arms (larger initial weights: BN reaches the
accuracy target later than with Glorot), so its contrasts are against that BN.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from bnlab.experiments.base import Experiment, ExperimentResults, Probe, ProbeContext, SettingRuns
from bnlab.experiments.figures import (Curve, FigureSpec, Panel, grad_change_panels, ics_panels,
                                       landscape_panels)
from bnlab.experiments.verdict import Claim, Seed, fmt_mean_sd, paired_difference, undecided
from bnlab.measure.activations import record_activations
from bnlab.train.config import TrainConfig
from bnlab.train.probes import instrument_probe
from bnlab.train.schedule import probe_steps

LR = 0.1
LR_HIGH = 0.5
WIDTH = 0.125  # 1/8 of VGG-16's channels: 8-16-32-64-64
ICS_LAYERS = ("conv5", "conv10")  # the paper's Fig. 3a "Layer #5" and "Layer #10"
MOMENT_LAYERS = (2, 9, 13)  # Fig. 2 / Fig. 8: layers #2, #9, #13
HIST_LAYERS = (2, 3, 9, 11, 13)  # + Fig. 1c's #3 and #11, Fig. 6's #11
HIST_UNIT = 0
HIST_BINS = 40
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)  # Fig. 4/11 VGG grid: eta in {1/2, 1, 2, 4} x LR
LP_NORMS = ("l1", "l2", "linf")
CHANCE = 0.1

# Rules fixed before any run was looked at.
TARGET_ACC = {"fashion_mnist": 0.85, "cifar10": 0.60, "mnist": 0.95, "digits": 0.85}  # D.11a, per dataset used
SMOOTH_STEPS = 100  # D.11a: trailing window of the training-batch accuracy
FINAL_FRACTION = 0.1  # final training accuracy = mean over the last 10 % of the run
EARLY_FRACTION = 0.25  # D.15g: "early" = probe steps in the first quarter of the run
TRAIN_GAP = 0.5  # D.11b: at LR 0.5, BN ends at least 0.5 above the standard net
FEW_POINTS = 0.03  # D.13a, D.17c: "within a few points" of BN
NEAR_CHANCE = 0.05  # D.13e: "fails to train" = within 5 points of chance
DRAMATIC = 1.0  # D.12: "dramatically more stable" = an order of magnitude
ICS_MARGIN = math.log10(2.0)  # D.14d: BN's ICS "not lower" = not lower by more than a factor 2
COS_MARGIN = 0.1  # D.14e: BN's cos(G, G') not higher by more than 0.1
EARLY_DECADES = 1.0  # D.15g: "close to two orders of magnitude early"; we ask for one

CLAIMS = {
    "D.11a": Claim(
        "D.11a", "VGG at LR 0.1: BN reaches a fixed training accuracy in fewer steps than the standard net",
        "BN trains faster at LR 0.1; both reach ≈100 % training accuracy by ≈10k steps (Fig. 1a)",
        "paired difference standard - BN of the first step at which the training-batch accuracy averaged "
        "over the last 100 steps reaches the target (0.85 on Fashion-MNIST, 0.60 on CIFAR-10); a run that "
        "never reaches it counts as the run's length (steps)", threshold=0.0),
    "D.11b": Claim(
        "D.11b", "VGG at LR 0.5: the standard net stays near chance while BN trains",
        "standard at ≈10 % (chance) for all 15k steps, BN trains to ≈100 % (Fig. 1a)",
        "paired difference BN - standard of the final training accuracy (mean over the last 10 % of the "
        "run; diverged = chance 0.1) at LR 0.5", threshold=TRAIN_GAP, diverged_value=CHANCE),
    "D.11c": Claim(
        "D.11c", "VGG at LR 0.1: BN ends with a test accuracy at least the standard net's",
        "test accuracy 83 % with BN vs 80 % standard (App. A.1, Fig. 1b)",
        "paired difference BN - standard of the final full-test accuracy at LR 0.1 (diverged = chance)",
        threshold=0.0, diverged_value=CHANCE),
    "D.12a": Claim(
        "D.12a", "VGG: the mean of sampled activations is not dramatically more stable step to step with BN",
        "distributional stability differs marginally with/without BN (Fig. 1c; Fig. 8 moments)",
        "paired difference log10(standard) - log10(BN) of the median over probe pairs of |μ_{t+1} - μ_t| "
        "(mean over channels), geometric mean over layers #2, #9, #13, LR 0.1 (decades); PASS if below "
        "one decade", threshold=DRAMATIC, direction=-1),
    "D.12b": Claim(
        "D.12b", "VGG: the variance of sampled activations is not dramatically more stable step to step with BN",
        "as D.12a (Fig. 8)",
        "as D.12a for |σ²_{t+1} - σ²_t| (decades)", threshold=DRAMATIC, direction=-1),
    "D.13a": Claim(
        "D.13a", "VGG: noisy BN trains within a few points of BN",
        "performance difference between BN and noisy BN \"almost non-existent\" (Fig. 2)",
        "paired difference noisy BN - BN of the final training accuracy (diverged = chance); PASS if above "
        "-0.03", threshold=-FEW_POINTS, diverged_value=CHANCE),
    "D.13b": Claim(
        "D.13b", "VGG: noisy BN trains better than the standard net",
        "noisy BN ≈ BN, both above standard (Fig. 2: standard ≈90 % at 5k steps, BN ≈95 % by 3k)",
        "paired difference noisy BN - standard of the final training accuracy (diverged = chance)",
        threshold=0.0, diverged_value=CHANCE),
    "D.13c": Claim(
        "D.13c", "VGG: the mean of noisy BN's activations moves more per step than the standard net's",
        "noisy BN has \"significantly higher ICS\" than the standard net: larger |Δμ| (Fig. 8)",
        "paired difference log10(noisy BN) - log10(standard) of the median over probe pairs of "
        "|μ_{t+1} - μ_t|, geometric mean over layers #2, #9, #13 (decades)", threshold=0.0),
    "D.13d": Claim(
        "D.13d", "VGG: the variance of noisy BN's activations moves more per step than the standard net's",
        "larger |Δσ²| with noisy BN (Fig. 8)",
        "as D.13c for |σ²_{t+1} - σ²_t| (decades)", threshold=0.0),
    "D.13e": Claim(
        "D.13e", "VGG: the standard net with the same noise fails to train",
        "adding the same noise to the standard net \"prevents it from training entirely\" (Sec. 2.1)",
        "paired difference final training accuracy of standard + noise - chance (0.1); diverged = chance; "
        "PASS if below +0.05", threshold=NEAR_CHANCE, direction=-1, diverged_value=CHANCE),
    "D.14d": Claim(
        "D.14d", "VGG: the ICS (||G - G'||) with BN is not lower than without",
        "BN networks have similar or worse ICS (Fig. 3a, layers #5 and #10, ≈1e-3..1e1)",
        "paired difference log10(BN) - log10(standard) of the median over probe steps of ||G - G'||_2, "
        "geometric mean over conv layers #5 and #10, LR 0.1 (decades); PASS if above -log10(2) (not lower "
        "by more than a factor 2)", threshold=-ICS_MARGIN),
    "D.14e": Claim(
        "D.14e", "VGG: cos(G, G') with BN is not higher than without",
        "cos(G, G') with BN similar or lower (Fig. 3a)",
        "paired difference standard - BN of the median over probe steps of cos(G, G'), mean over conv "
        "layers #5 and #10, LR 0.1; PASS if above -0.1", threshold=-COS_MARGIN),
    "D.15d": Claim(
        "D.15d", "VGG: the loss varies less along the gradient with BN (loss landscape)",
        "loss band wide with spikes for standard, narrow with BN (Fig. 4a)",
        "paired difference log10(standard) - log10(BN) of the median over probe steps of max_eta L - "
        "min_eta L, eta in {1/2, 1, 2, 4} x LR 0.1 (decades)", threshold=0.0),
    "D.15e": Claim(
        "D.15e", "VGG: gradients are more predictive with BN (gradient predictiveness)",
        "max ||g_eta - g|| up to ≈250 (standard) vs ≈0-30 (BN) (Fig. 4b)",
        "paired difference log10(standard) - log10(BN) of the median over probe steps of "
        "max_eta ||g_eta - g||_2 (decades)", threshold=0.0),
    "D.15f": Claim(
        "D.15f", "VGG: the effective β-smoothness is smaller with BN",
        "≈20 for both late, standard spikes to ≈45 early, BN flat (Fig. 4c)",
        "paired difference log10(standard) - log10(BN) of the median over probe steps of "
        "max_eta ||g_eta - g|| / ||eta g|| (decades)", threshold=0.0),
    "D.15g": Claim(
        "D.15g", "VGG: early in training the gradients are far more predictive with BN",
        "\"close to two orders of magnitude\" difference in gradient predictiveness early (Fig. 4b)",
        "paired difference log10(standard) - log10(BN) of the median over the probe steps in the first "
        "quarter of the run of max_eta ||g_eta - g||_2 (decades); PASS if above one decade",
        threshold=EARLY_DECADES),
    "D.16a": Claim(
        "D.16a", "VGG: the standard net's gradient change grows super-linearly in the step eta",
        "||g_eta - g|| of the standard net bends upwards to ≈250 at eta = 0.4 (Fig. 11)",
        "per probe step, the least-squares slope of log ||g_eta - g|| against log eta over eta in "
        "{1/2, 1, 2, 4} x LR; per seed the median over probe steps; paired difference standard - 1 (a "
        "slope above 1 is super-linear)", threshold=0.0),
    "D.16b": Claim(
        "D.16b", "VGG: the gradient change grows less steeply in eta with BN than without",
        "BN stays small (≤ ≈40) and ≈linear (Fig. 11)",
        "paired difference standard - BN of the median log-log slope of ||g_eta - g|| against eta (as "
        "D.16a)", threshold=0.0),
    "D.17c": Claim(
        "D.17c", "VGG: every ℓp normalization (p = 1, 2, ∞) trains within a few points of BN",
        "all ℓp ≈ BN in training accuracy (Fig. 5a)",
        "per seed min over p in {1, 2, ∞} of the final training accuracy of ℓp - BN (diverged = chance); "
        "PASS if the interval lies above -0.03", threshold=-FEW_POINTS),
    "D.17d": Claim(
        "D.17d", "VGG: every ℓp normalization trains better than the standard net",
        "all ℓp above standard (Fig. 5a)",
        "per seed min over p of the final training accuracy of ℓp - standard (diverged = chance)",
        threshold=0.0),
}


# --- the moments-and-histograms probe ------------------------------------------------------------------

def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centers (HIST_BINS,), density (HIST_BINS,)) of the finite values over their min..max."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.full(HIST_BINS, np.nan), np.full(HIST_BINS, np.nan)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    density, edges = np.histogram(v, bins=HIST_BINS, range=(lo, hi), density=True)
    return (edges[:-1] + edges[1:]) / 2, density


def moments_probe(ctx: ProbeContext) -> dict[str, Any]:
    """Per-channel moments of the ReLU inputs of layers #2, #9, #13 on the fixed probe batch, their
    change since the previous step (Santurkar Fig. 8), and histograms of one channel (Figs. 1c, 2, 6).

    The input of ``act{k}`` is the norm layer's output (after the noise for the noisy arms; the conv's
    output for the standard net). BN layers use the probe batch's statistics (training mode, running
    statistics untouched); noise layers draw from their generators as the training step would (the
    engine restores the generators afterwards). Scalars: ``layer{k}.mean``/``.var`` (mean over channels
    of the per-channel mean / biased variance over batch x height x width); at a step s + 1 that follows
    a probed step s, ``layer{k}.dmean`` = mean over channels of |μ_{s+1} - μ_s| and ``layer{k}.dvar``
    likewise. Arrays, at the scheduled steps only: ``layer{k}.hist_centers``, ``layer{k}.hist_density``
    (HIST_BINS,) of channel HIST_UNIT. Cost: 1 forward pass of the probe batch.
    """
    x = ctx.probe_batch[0]
    layers = {f"layer{k}": f"act{k}" for k in sorted(set(MOMENT_LAYERS) | set(HIST_LAYERS))}
    acts = record_activations(ctx.model, x, layers, where="input", bn_mode="batch", bins=None,
                              units=[HIST_UNIT], seed=int(torch.randint(0, 2**31 - 1, (), generator=ctx.generator)))
    out: dict[str, Any] = {}
    prev = ctx.state.get("prev")
    follows = prev is not None and prev["step"] == ctx.step - 1
    now: dict[str, Any] = {"step": ctx.step}
    for k in MOMENT_LAYERS:
        a = acts[f"layer{k}"]
        out[f"layer{k}.mean"] = float(a.mean.mean())
        out[f"layer{k}.var"] = float(a.var.mean())
        now[f"layer{k}"] = (a.mean.tolist(), a.var.tolist())
        if follows:
            m0, v0 = (np.asarray(t) for t in prev[f"layer{k}"])
            out[f"layer{k}.dmean"] = float(np.abs(a.mean - m0).mean())
            out[f"layer{k}.dvar"] = float(np.abs(a.var - v0).mean())
    ctx.state["prev"] = now
    cfg = ctx.cfg
    if ctx.step in probe_steps(cfg.probe_schedule, cfg.steps, every=cfg.probe_every, points=cfg.probe_points):
        for k in HIST_LAYERS:
            centers, density = _histogram(acts[f"layer{k}"].sample[:, 0])
            out[f"layer{k}.hist_centers"] = centers
            out[f"layer{k}.hist_density"] = density
    return out


# --- per-seed statistics ------------------------------------------------------------------------------

def _train_acc(run) -> tuple[np.ndarray, np.ndarray]:
    steps, acc = run.series("train", "acc")
    keep = np.isfinite(acc)
    return steps[keep], acc[keep]


def trailing_mean(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """At each record i, the mean of the values of the records with step in (steps[i] - window, steps[i]].

    ``steps`` ascending. Shapes (T,) -> (T,).
    """
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    first = np.searchsorted(steps, steps - window, side="right")
    idx = np.arange(steps.size)
    return (csum[idx + 1] - csum[first]) / (idx + 1 - first)


def steps_to_target(run, target: float) -> tuple[int | None, bool]:
    """(first step at which the trailing-100-step training accuracy reaches ``target``, censored?).

    A run that never reaches it (diverged runs included: the curve before the divergence counts) gives
    (its configured length, True). None for a missing run.
    """
    if run is None:
        return None, False
    steps, acc = _train_acc(run)
    if steps.size:
        hit = np.nonzero(trailing_mean(steps, acc, SMOOTH_STEPS) >= target)[0]
        if hit.size:
            return int(steps[hit[0]]), False
    return int(run.config.steps), True


def final_train_acc(run) -> float | None:
    """Mean logged training-batch accuracy over the last FINAL_FRACTION of the run; None if the run is
    missing or diverged (a claim that declares it counts it as chance)."""
    if run is None or run.status == "diverged":
        return None
    steps, acc = _train_acc(run)
    if not steps.size:
        return None
    first = run.config.steps - max(1, round(FINAL_FRACTION * run.config.steps))
    sel = acc[steps >= first]
    return float(sel.mean()) if sel.size else float(acc[-1])


def _acc_or_chance(run) -> float | None:
    if run is None:
        return None
    return CHANCE if run.status == "diverged" else final_train_acc(run)


def final_test_acc(run) -> float | None:
    if run is None or run.status == "diverged":
        return None
    return run.final("acc")


def _median(values: np.ndarray) -> float | None:
    """Median with non-finite values counted as +inf (a loss that overflowed along the gradient is a
    very large value, not a missing one); None if nothing is stored or the median is not finite."""
    v = np.asarray(values, dtype=float)
    if not v.size:
        return None
    v = np.where(np.isfinite(v), v, np.inf)
    m = float(np.median(v))
    return m if math.isfinite(m) else None


def probe_median(run, probe: str, key: str, until: float | None = None) -> float | None:
    """Median over the probe steps (those <= ``until`` if given) of a probe scalar; None for a
    missing or diverged run."""
    if run is None or run.status == "diverged":
        return None
    steps, v = run.probe_series(probe, key)
    if until is not None:
        v = v[steps <= until]
    return _median(v)


def _log10(v: float | None) -> float | None:
    return math.log10(v) if v is not None and v > 0 and math.isfinite(v) else None


def layers_log10(run, probe: str, keys: Sequence[str]) -> float | None:
    """Mean over ``keys`` of log10 of each key's median over probe steps (a geometric mean over layers)."""
    logs = [_log10(probe_median(run, probe, k)) for k in keys]
    return float(np.mean(logs)) if logs and all(v is not None for v in logs) else None


def median_cosine(run) -> float | None:
    vals = [probe_median(run, "ics", f"{layer}.cosine") for layer in ICS_LAYERS]
    return float(np.mean(vals)) if all(v is not None for v in vals) else None


def loglog_slopes(etas: np.ndarray, change: np.ndarray) -> np.ndarray:
    """Per probe step, the least-squares slope of log ||g_eta - g|| on log eta; NaN where fewer than
    two positive finite points. ``etas``, ``change``: (steps, len(grid)) -> (steps,)."""
    etas, change = np.atleast_2d(etas), np.atleast_2d(change)
    out = np.full(change.shape[0], np.nan)
    for i, (e, c) in enumerate(zip(etas, change)):
        ok = np.isfinite(c) & (c > 0) & (e > 0)
        if ok.sum() >= 2:
            out[i] = np.polyfit(np.log(e[ok]), np.log(c[ok]), 1)[0]
    return out


def median_slope(run) -> float | None:
    if run is None or run.status == "diverged":
        return None
    a = run.arrays
    if "probe/landscape/grad_change" not in a:
        return None
    s = loglog_slopes(a["probe/landscape/etas"], a["probe/landscape/grad_change"])
    s = s[np.isfinite(s)]
    return float(np.median(s)) if s.size else None


# --- the verdict ------------------------------------------------------------------------------------

def _fmt(values: Sequence[float | None]) -> str:
    return fmt_mean_sd(values)


def verdict_setting(results: ExperimentResults, declared: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The claim rows for the runs of one setting; ``declared``: the seeds the profile declares (one
    without a finished run is listed as "missing" and leaves its rows UNDECIDED)."""
    sr = SettingRuns(results, declared)
    groups, dataset, seeds, rows = sr.groups, sr.dataset, sr.seeds, sr.rows
    run, status, need = sr.run, sr.status, sr.need

    def pair(cid: str, a: str, b: str, value, describe: str, va: str | None = None, vb: str | None = None,
             note=None) -> dict[str, Any] | None:
        """Paired row of ``value(run)`` between variants ``va`` and ``vb`` (arms named ``a``, ``b``)."""
        va, vb = va or a, vb or b
        c = CLAIMS[cid]
        if not need(c, va, vb):
            return None
        sd = [Seed(s, {a: value(run(va, s)), b: value(run(vb, s))}, _rename(status(s, va, vb), {va: a, vb: b}),
                   note=note(s) if note else "") for s in seeds]
        r = paired_difference(c, sd, a, b, dataset=dataset, describe=describe)
        rows.append(r)
        return r

    # D.11a: steps to the target training accuracy at LR 0.1
    used = {r.dataset.get("used") for rs in groups.values() for r in rs.values()}
    target = TARGET_ACC.get(next(iter(used)), None) if len(used) == 1 else None
    c = CLAIMS["D.11a"]
    if target is None:
        rows.append(undecided(c, f"no declared target accuracy for the data used ({dataset})", dataset=dataset))
    elif need(c, "standard", "bn"):
        sd = []
        for s in seeds:
            (ts, cs), (tb, cb) = steps_to_target(run("standard", s), target), steps_to_target(run("bn", s), target)
            note = "; ".join(f"{v} never reached {target:g} (counted as the run's length)"
                             for v, cens in (("standard", cs), ("BN", cb)) if cens)
            sd.append(Seed(s, {"standard": ts, "bn": tb}, status(s, "standard", "bn"), note=note))
        r = paired_difference(c, sd, "standard", "bn", dataset=dataset,
                              describe=f"steps to a training accuracy of {target:g}, standard - BN")
        n_cens = sum(bool(x.note) for x in sd)
        r["ours"] += f"; target {target:g} (trailing {SMOOTH_STEPS}-step mean); {n_cens} seed(s) with a censored arm"
        rows.append(r)

    pair("D.11b", "bn", "standard", final_train_acc, "final training accuracy at LR 0.5, BN - standard",
         va="bn_lr0.5", vb="standard_lr0.5")
    pair("D.11c", "bn", "standard", final_test_acc, "final full-test accuracy at LR 0.1, BN - standard")

    dmean = [f"layer{k}.dmean" for k in MOMENT_LAYERS]
    dvar = [f"layer{k}.dvar" for k in MOMENT_LAYERS]
    for cid, keys, what in (("D.12a", dmean, "|Δμ|"), ("D.12b", dvar, "|Δσ²|")):
        pair(cid, "standard", "bn", lambda r, keys=keys: layers_log10(r, "moments", keys),
             f"log10 median {what} (geometric mean of layers #2, #9, #13), standard - BN")

    pair("D.13a", "noisy_bn", "bn", final_train_acc, "final training accuracy, noisy BN - BN")
    pair("D.13b", "noisy_bn", "standard", final_train_acc, "final training accuracy, noisy BN - standard")
    for cid, keys, what, stat in (("D.13c", dmean, "|Δμ|", "dmean"), ("D.13d", dvar, "|Δσ²|", "dvar")):
        r = pair(cid, "noisy_bn", "standard", lambda r, keys=keys: layers_log10(r, "moments", keys),
                 f"log10 median {what} (geometric mean of layers #2, #9, #13), noisy BN - standard")
        if r is not None:
            per_layer = "; ".join(
                f"{v} layer #{k} {_sci(_geo([probe_median(run(v, s), 'moments', f'layer{k}.{stat}') for s in seeds]))}"
                for v in ("standard", "bn", "noisy_bn") for k in MOMENT_LAYERS)
            r["ours"] += f"; medians of {what} per layer (geometric mean over seeds): {per_layer}"
    c = CLAIMS["D.13e"]
    if need(c, "standard_noise"):
        sd = [Seed(s, {"standard_noise": final_train_acc(run("standard_noise", s)),
                       "chance": CHANCE if run("standard_noise", s) else None},
                   status(s, "standard_noise")) for s in seeds]
        rows.append(paired_difference(c, sd, "standard_noise", "chance", dataset=dataset,
                                      describe="final training accuracy of standard + noise - chance"))

    r = pair("D.14d", "bn", "standard", lambda r: layers_log10(r, "ics", [f"{ly}.l2" for ly in ICS_LAYERS]),
             "log10 median ||G - G'|| (geometric mean of conv #5, #10), BN - standard")
    if r is not None:
        per_layer = "; ".join(
            f"{v} {ly} {_sci(_geo([probe_median(run(v, s), 'ics', f'{ly}.l2') for s in seeds]))}"
            for v in ("standard", "bn") for ly in ICS_LAYERS)
        r["ours"] += f"; medians of ||G - G'|| (geometric mean over seeds): {per_layer}"
    pair("D.14e", "standard", "bn", median_cosine, "median cos(G, G') (mean of conv #5, #10), standard - BN")

    for cid, key in (("D.15d", "loss_range"), ("D.15e", "predictiveness_max"), ("D.15f", "effective_beta")):
        r = pair(cid, "standard", "bn", lambda r, key=key: _log10(probe_median(r, "landscape", key)),
                 f"log10 median {key}, standard - BN")
        if r is not None:
            r["ours"] += "; " + _landscape_text(run, seeds, key)
    steps = next((x.config.steps for rs in groups.values() for x in rs.values()), None)
    until = None if steps is None else EARLY_FRACTION * steps
    pair("D.15g", "standard", "bn",
         lambda r: _log10(probe_median(r, "landscape", "predictiveness_max", until=until)),
         f"log10 median predictiveness_max over probe steps <= {until:g}, standard - BN" if until else "early")

    c = CLAIMS["D.16a"]
    if need(c, "standard"):
        sd = [Seed(s, {"standard": median_slope(run("standard", s)),
                       "linear": 1.0 if run("standard", s) else None}, status(s, "standard")) for s in seeds]
        r = paired_difference(c, sd, "standard", "linear", dataset=dataset,
                              describe="median log-log slope of ||g_eta - g|| vs eta, standard - 1")
        rows.append(r)
    r = pair("D.16b", "standard", "bn", median_slope, "median log-log slope of ||g_eta - g|| vs eta, standard - BN")

    for cid, ref in (("D.17c", "bn"), ("D.17d", "standard")):
        c = CLAIMS[cid]
        if need(c, ref, *LP_NORMS):
            sd = []
            for s in seeds:
                a_ref = _acc_or_chance(run(ref, s))
                gaps = [None if a_ref is None or _acc_or_chance(run(p, s)) is None
                        else _acc_or_chance(run(p, s)) - a_ref for p in LP_NORMS]
                worst = None if any(g is None for g in gaps) else min(gaps)
                sd.append(Seed(s, {"min_gap": worst, "zero": 0.0 if worst is not None else None},
                               status(s, ref, *LP_NORMS)))
            r = paired_difference(c, sd, "min_gap", "zero", dataset=dataset,
                                  describe=f"min over p of final training accuracy ℓp - {ref}")
            r["ours"] += "; final training accuracy: " + "; ".join(
                f"{v} {_fmt([_acc_or_chance(run(v, s)) for s in seeds])}" for v in (ref, *LP_NORMS))
            rows.append(r)
    _comparator_never_trained(rows, [s for s in seeds if status(s, "standard")["standard"] == "collapsed"], seeds)
    order = list(CLAIMS)
    return sorted(rows, key=lambda x: order.index(x["claim_id"]))


# Rule revision R-S1 (docs/claims.md, "Rule revisions"), made after the first quick runs were seen:
# the claims whose contrast is with a *trained* standard net (the paper's trains at LR 0.1) are
# UNDECIDED when the standard net at LR 0.1 never left chance in a seed: they would compare with a
# constant predictor (PASS by default for accuracy, FAIL for the flat landscape of a dead net,
# UNDECIDED where its statistics are exactly zero). The original outcome stays in the row.
NEEDS_TRAINED_STANDARD = ("D.11a", "D.11b", "D.11c", "D.12a", "D.12b", "D.13b", "D.13c", "D.13d", "D.13e", "D.14d",
                          "D.14e", "D.15d", "D.15e", "D.15f", "D.15g", "D.16a", "D.16b", "D.17d")


def _comparator_never_trained(rows: list[dict[str, Any]], dead: Sequence[int], seeds: Sequence[int]) -> None:
    if not dead:
        return
    for r in rows:
        if r["claim_id"] not in NEEDS_TRAINED_STANDARD:
            continue
        before = r["outcome"]
        r["outcome"], r["passed"] = "UNDECIDED", None
        r["original_outcome"] = before
        r["ours"] = (f"comparator never trained: the standard net at LR 0.1 stayed at chance in {len(dead)}/"
                     f"{len(seeds)} seeds (its conv gradients vanish), so this compares with a constant "
                     f"predictor (rule R-S1; without it: {before}; rule R-S2: the robust profile's He-init "
                     f"setting, a declared deviation); " + r["ours"])


def _rename(status: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    return {names.get(k, k): v for k, v in status.items()}


def _sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _geo(values: Sequence[float | None]) -> float | None:
    v = [math.log10(x) for x in values if x is not None and x > 0 and math.isfinite(x)]
    return 10 ** float(np.mean(v)) if v else None


def _landscape_text(run, seeds: Sequence[int], key: str) -> str:
    """Medians and 95th percentiles over probe steps (geometric means over seeds), the secondary view."""
    def p95(r) -> float | None:
        if r is None or r.status == "diverged":
            return None
        _, v = r.probe_series("landscape", key)
        v = np.where(np.isfinite(v), v, np.inf)
        return float(np.percentile(v, 95)) if v.size else None

    parts = []
    for v in ("standard", "bn"):
        med = _geo([probe_median(run(v, s), "landscape", key) for s in seeds])
        top = _geo([p95(run(v, s)) for s in seeds])
        parts.append(f"{v} median {_sci(med)}, 95th percentile {_sci(top)}")
    return "not the rule: " + "; ".join(parts) + " (geometric means over seeds)"


def verdict(results: ExperimentResults) -> list[dict[str, Any]]:
    return EXPERIMENT.verdict_by_setting(results, verdict_setting, list(CLAIMS.values()))


# --- figures, as data (bnlab.report draws them) --------------------------------------------------------

_STD_BN = (("standard", "Standard"), ("bn", "Standard + BN"))
_NOISY = (("standard", "Standard"), ("bn", "Standard + BN"), ("noisy_bn", "Standard + noisy BN"))
_LP = (("standard", "Standard"), ("bn", "BN"), ("l1", "ℓ1"), ("l2", "ℓ2"), ("linf", "ℓ∞"))


def _hist_panels(layer: int, variants) -> tuple[Panel, ...]:
    return tuple(Panel(f"{label}, layer #{layer}", "activation (channel 0)", "density", curves=(
        Curve(v, label, probe="moments", key=f"layer{layer}.hist_density", x_key=f"layer{layer}.hist_centers",
              kind="per_step"),)) for v, label in variants)


FIGURES = (
    FigureSpec(
        "santurkar_vgg_fig1",
        "Santurkar Fig. 1a,b (VGG): training accuracy (training batches) and test accuracy (fixed 2000-image "
        "test subset) against steps, standard vs BN at LR 0.1 and 0.5.",
        (
            Panel("(a) training accuracy", "training step", "accuracy", curves=tuple(
                [Curve(v, f"{l}, LR 0.1", split="train", key="acc") for v, l in _STD_BN]
                + [Curve(f"{v}_lr0.5", f"{l}, LR 0.5", split="train", key="acc", linestyle="--")
                   for v, l in _STD_BN])),
            Panel("(b) test accuracy", "training step", "accuracy", curves=tuple(
                [Curve(v, f"{l}, LR 0.1", split="eval", key="acc") for v, l in _STD_BN]
                + [Curve(f"{v}_lr0.5", f"{l}, LR 0.5", split="eval", key="acc", linestyle="--")
                   for v, l in _STD_BN])),
        )),
    FigureSpec(
        "santurkar_vgg_fig1c",
        "Santurkar Fig. 1c (VGG, LR 0.1): distribution over batch x height x width of channel 0 of the ReLU "
        "input of layers #3 and #11, one curve per probe step (darker = later), first seed.",
        _hist_panels(3, _STD_BN) + _hist_panels(11, _STD_BN)),
    FigureSpec(
        "santurkar_vgg_fig2",
        "Santurkar Fig. 2 (VGG, LR 0.1): training accuracy of the standard net, BN, noisy BN (Algorithm 1's "
        "noise after every BN layer) and the standard net with the same noise.",
        (Panel("training accuracy", "training step", "accuracy", curves=tuple(
            Curve(v, l, split="train", key="acc") for v, l in
            (*_NOISY, ("standard_noise", "Standard + noise")))),)),
    FigureSpec(
        "santurkar_vgg_fig2_layers",
        "Santurkar Fig. 2, right (VGG): distribution of channel 0 of the ReLU input of layers #2, #9 and #13 "
        "over training (darker = later), standard vs noisy BN, first seed.",
        tuple(p for k in MOMENT_LAYERS for p in _hist_panels(k, (("standard", "Standard"), ("noisy_bn", "Noisy BN"))))),
    FigureSpec(
        "santurkar_vgg_fig8_mean",
        "Santurkar Fig. 8 (VGG, LR 0.1): per-step change of the mean, |μ_{t+1} - μ_t| (mean over channels), "
        "of the ReLU input of layers #2, #9, #13, measured between steps s and s + 1 every 100 steps.",
        tuple(Panel(f"|Δμ|, layer #{k}", "training step", "|μ_{t+1} - μ_t|", yscale="log", curves=tuple(
            Curve(v, l, probe="moments", key=f"layer{k}.dmean") for v, l in _NOISY)) for k in MOMENT_LAYERS)),
    FigureSpec(
        "santurkar_vgg_fig8_var",
        "Santurkar Fig. 8 (VGG, LR 0.1): per-step change of the variance, |σ²_{t+1} - σ²_t| (mean over "
        "channels), of the ReLU input of layers #2, #9, #13.",
        tuple(Panel(f"|Δσ²|, layer #{k}", "training step", "|σ²_{t+1} - σ²_t|", yscale="log", curves=tuple(
            Curve(v, l, probe="moments", key=f"layer{k}.dvar") for v, l in _NOISY)) for k in MOMENT_LAYERS)),
    FigureSpec(
        "santurkar_vgg_fig3a",
        "Santurkar Fig. 3a (VGG, LR 0.1): training accuracy and ICS of conv layers #5 and #10, ||G - G'|| "
        "and cos(G, G') (Def. 2.1, the run's own update, the step's batch), every 100 steps.",
        (
            Panel("training accuracy", "training step", "accuracy",
                  curves=tuple(Curve(v, l, split="train", key="acc") for v, l in _STD_BN)),
            *ics_panels(ICS_LAYERS, _STD_BN, lambda ly: ly[4:]),
        )),
    FigureSpec(
        "santurkar_vgg_fig4",
        "Santurkar Fig. 4 (VGG, LR 0.1): along the gradient, eta in {1/2, 1, 2, 4} x LR, every 100 steps on "
        "the step's batch: (a) the loss band [min, max] over eta, (b) the band of ||g_eta - g||, (c) the "
        "effective β-smoothness max_eta ||g_eta - g|| / ||eta g||.",
        landscape_panels(_STD_BN)),
    FigureSpec(
        "santurkar_vgg_fig11",
        "Santurkar Fig. 11 (VGG, LR 0.1): ||g_eta - g|| against the step eta along the gradient, one curve "
        "per probe step (darker = later), first seed, standard vs BN.",
        grad_change_panels(_STD_BN)),
    FigureSpec(
        "santurkar_vgg_fig5a",
        "Santurkar Fig. 5a (VGG, LR 0.1): training accuracy of the standard net, BN, and ℓ1, ℓ2, ℓ∞ "
        "normalization.",
        (Panel("training accuracy", "training step", "accuracy",
               curves=tuple(Curve(v, l, split="train", key="acc") for v, l in _LP)),)),
    FigureSpec(
        "santurkar_vgg_fig6",
        "Santurkar Fig. 6 (VGG, LR 0.1): distribution of channel 0 of the ReLU input of layer #11 over "
        "training (darker = later), standard, BN, ℓ1, ℓ2, ℓ∞, first seed.",
        _hist_panels(11, _LP)),
)

# --- the experiment ----------------------------------------------------------------------------------

BASE = TrainConfig(
    dataset="cifar10", model="vgg16", width=WIDTH, head="linear", norm="none", steps=2000, batch_size=128,
    loss="cross_entropy", lr=LR, momentum=0.0, weight_decay=0.0, log_every=10, eval_every=100,
    eval_subset=2000, eval_batch_size=1000, probe_schedule="every", probe_every=100, probe_batch_size=128,
    checkpoint_every=500,
)

PRIMARY = "as declared"
HE_INIT = "He init (init=kaiming)"
SETTINGS: dict[str, dict[str, Any]] = {PRIMARY: {}, "FC head with the norm (head=mlp)": {"head": "mlp"},
                                       HE_INIT: {"init": "kaiming"}}

EXPERIMENT = Experiment(
    name="santurkar_vgg",
    description="Santurkar Figs. 1-6, 8, 11: VGG-16 at 1/8 width, standard vs BN vs noisy BN vs ℓp (CPU scale)",
    paper="Santurkar, Tsipras, Ilyas & Madry 2018, App. A.1, Figs. 1, 2, 3a, 4, 5a, 6, 8, 11 (claims D.11-D.17, "
          "VGG parts, in docs/claims.md)",
    base=BASE,
    variants={
        "standard": {"norm": "none"},
        "bn": {"norm": "batch"},
        "standard_lr0.5": {"norm": "none", "lr": LR_HIGH},
        "bn_lr0.5": {"norm": "batch", "lr": LR_HIGH},
        "noisy_bn": {"norm": "noisy_batch"},
        "standard_noise": {"norm": "noise_only"},
        "l1": {"norm": "l1"},
        "l2": {"norm": "l2"},
        "linf": {"norm": "linf"},
    },
    profiles={
        # smoke: the same pipeline on the 8x8 digits (always installed), 6 steps: seconds, decides nothing.
        "smoke": {"dataset": "digits", "width": 0.0625, "steps": 6, "batch_size": 32, "log_every": 1,
                  "eval_every": 3, "eval_subset": 100, "probe_every": 3, "probe_batch_size": 32,
                  "checkpoint_every": 3},
        "quick": {},
        # the paper's scale: full width, 15k steps (on CIFAR-10 when installed)
        "paper": {"width": 1.0, "steps": 15_000, "eval_every": 500, "probe_every": 250, "checkpoint_every": 1000},
    },
    seeds={"smoke": (0,), "quick": (0, 1, 2), "paper": (0, 1, 2)},
    settings=SETTINGS,
    robust_seeds=(0, 1, 2),
    probes=(
        instrument_probe("ics", layers=list(ICS_LAYERS)),
        instrument_probe("along_gradient", name="landscape", multipliers=MULTIPLIERS),
        Probe("moments", moments_probe, cost=0.4, pairs=True),
    ),
    definitions=(
        ("final training accuracy (D.11b, D.13a/b/e, D.17c/d)", "mean logged accuracy of the training batches "
         "(every 10th step, in training mode, noise on for the noisy arms) over the last 10 % of the run; a "
         "diverged run counts as chance (0.1)", "none"),
        ("steps to the target (D.11a)", "first logged step at which the training-batch accuracy averaged over "
         "the last 100 steps reaches 0.85 (Fashion-MNIST) or 0.60 (CIFAR-10); the run's length if never",
         "none"),
        ("per-step moment change (Fig. 8, D.12, D.13c/d)", "on a fixed batch of 128 training images, per "
         "channel of the ReLU input of layers #2, #9, #13: mean and biased variance over batch x height x "
         "width at step s and s + 1 (s every 100 steps); |Δμ|, |Δσ²| averaged over channels; per seed the "
         "median over the pairs, geometric mean over the layers", "2 forward passes per pair"),
        ("ICS (Fig. 3a, D.14d/e)", "||G - G'||_2 and cos(G, G') of the weight of conv layers #5 and #10 (Def. "
         "2.1), G' after the earlier layers took the run's own SGD step, the step's batch, every 100 steps; "
         "per seed the median over probe steps", "3 forward+backward passes per probe"),
        ("landscape along the gradient (Figs. 4, 11, D.15, D.16)", "at a probe step with parameters w and the "
         "step's batch gradient g, for eta in {1/2, 1, 2, 4} x LR: L(w - eta g) and ||∇L(w - eta g) - g||; loss "
         "range = max - min over eta, gradient predictiveness = max over eta, effective β = max over eta of "
         "||g_eta - g|| / ||eta g||; D.16's slope = least-squares slope of log ||g_eta - g|| on log eta",
         "5 forward+backward passes per probe"),
    ),
    figures=FIGURES,
    verdict=verdict,
    notes=__doc__.split("Protocol, fixed before any run of it was looked at", 1)[1].split(":", 1)[1].strip(),
)
