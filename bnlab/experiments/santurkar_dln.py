"""Santurkar et al. 2018, the 25-layer deep linear network (DLN): Fig. 3b (ICS), Fig. 10 and Fig. 11
(landscape along the gradient), Fig. 5b (ℓp normalization). Claims D.14 (DLN part), D.15 (DLN part) and
D.17 (DLN part); see docs/claims.md for each claim, the paper's numbers and the rule that decides it.

Protocol, as the paper states it (App. A.1): minimize the summed squared error ||W_25 ... W_1 x - A x||^2
over 1000 samples x ~ N(0, I_10), A with i.i.d. N(0, 1) entries, 25 square 10x10 layers, Glorot
(uniform) init, full-batch gradient descent, learning rate 1e-6 (Fig. 3b also 1e-7), 10,000 steps,
float64. Variants: standard, BN, ℓ1, ℓ2, ℓ∞ at 1e-6, standard and BN at 1e-7.

Choices the paper leaves open, ours:

* BN/ℓp placement: after every linear layer except the last, with its affine (γ, β); no biases, no
  nonlinearity (bnlab.models.dln). ℓp: centred by the batch mean, divided by the batch ℓp norm of the
  uncentred activations (bnlab.norm.lp). BN eps 1e-5, momentum 0.1.
* The loss is the sum over samples and output coordinates (the reported initial losses, ≈10^4.5-10^5,
  match n·E||Ax||^2 ≈ 1e5; a per-sample mean would start near 1e2). One draw of A and x per data
  seed (data_seed 0 in the primary setting, shared by every variant and seed); the seed draws the
  initial weights only. Other draws of A are settings of the robustness grid.
* Probes: ICS (Def. 2.1) of layers #9 and #17 (``fc9``, ``fc17``: the 9th and 17th linear layers) every
  500 steps, with the run's own update; the landscape along the gradient on the grid {1/100, 1/10, 1,
  10, 30} × LR (the vertices of the paper's Fig. 11 DLN curves) on a log-spaced schedule (30 points:
  dense early, where the paper's Fig. 10 differences are largest), on the full batch, BN in training
  mode; the residual of the end-to-end map per singular mode of A (below), on the same schedule.

Why our absolute losses are about 10x above the paper's (the factor-10 question), measured with
``bench/dln_factor10.py`` and ``bench/dln_oscillation.py`` (details and numbers: docs/claims.md, "The
factor-10 question"):

* The loss at step 10k is the energy of the singular modes of A not yet learned: a deep linear net
  learns them one after another, the larger first (Saxe et al. 2014). The ``modes`` probe measures
  it: M = the least-squares affine fit of the net's end-to-end map, residual ||(M - A) v_i||^2 per
  right singular vector v_i of A; n times their sum is the loss to within 9 %. With A ~ N(0, 1), 10k
  steps at LR 1e-6 learn the top 4-5 of the 10 modes in every draw of A we tried (8 draws: final
  loss 6.4e3-2.1e4); two init seeds stop at the same saddle (2.059e4 on data_seed 0).
* With A ~ N(0, 1) the standard net at LR 1e-6 oscillates with period 2: layer #17's gradient flips
  sign every step (cosine between consecutive gradients -0.999) and so its ICS cosine is ≈ -1, where
  the paper's Fig. 3b shows ≈ +1. With A's entries N(0, 1/10) (unit-variance targets) the same net
  does not oscillate (both cosines ≈ +1, as in the paper) and ends at 1.1e3-2.1e3 (4 draws), the
  paper's ≈1.7e3; but then it starts near 1e4, not at the 10^4.5-10^5 of the paper's curves.
* We keep the protocol as the paper states it (A ~ N(0, 1)) and report these numbers beside the
  verdicts; we do not rescale A to match the paper's level.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from bnlab.experiments.base import Experiment, ExperimentResults, Probe, ProbeContext, SettingRuns
from bnlab.experiments.figures import (Curve, FigureSpec, Panel, grad_change_panels, ics_panels,
                                       landscape_panels)
from bnlab.experiments.verdict import Claim, Seed, paired_difference
from bnlab.train.config import TrainConfig
from bnlab.train.probes import instrument_probe

LR = 1e-6
LR_SMALL = 1e-7
ICS_LAYERS = ("fc9", "fc17")  # the paper's "Layer #9" and "Layer #17" (1-based linear layers)
MULTIPLIERS = (0.01, 0.1, 1.0, 10.0, 30.0)  # Fig. 10/11 DLN grid: eta in {1e-8, 1e-7, 1e-6, 1e-5, 3e-5}
LP_NORMS = ("l1", "l2", "linf")

# Rules fixed before the quick runs, after a pilot of the same protocol (docs/claims.md, "The factor-10
# question"); thresholds in decades or cosine units.
COS_GAP = 0.5  # D.14a: standard's median cos(G, G') minus BN's: "≈1" vs "far from 1 (≈0)"
DECADE = 1.0  # D.15: "orders of magnitude": at least one decade between standard and BN

CLAIMS = {
    "D.14a": Claim(
        "D.14a", "DLN: the standard net has almost no ICS (cos ≈ 1) while with BN G and G' are far apart",
        "cos(G, G') ≈ 1 for the standard DLN all run; ≈0 for long stretches with BN (Fig. 3b, layers #9, #17)",
        "paired difference standard - BN of the median over probe steps (every 500 steps) of cos(G, G'), "
        "mean of layers #9 and #17, LR 1e-6", threshold=COS_GAP),
    "D.14b": Claim(
        "D.14b", "DLN: BN reaches a lower training loss than the standard net despite its larger ICS",
        "final loss ≈5e2 with BN vs ≈1.7e3 standard (ratio ≈3.4; Fig. 3b, LR 1e-6, 10k steps)",
        "paired difference log10(standard) - log10(BN) of the final training loss (summed over the 1000 "
        "samples; decades), LR 1e-6", threshold=0.0),
    "D.14c": Claim(
        "D.14c", "DLN at LR 1e-7: BN reaches a lower training loss than the standard net",
        "BN below standard at LR 1e-7 too (Fig. 3b, right)",
        "paired difference log10(standard) - log10(BN) of the final training loss (decades), LR 1e-7",
        threshold=0.0),
    "D.15a": Claim(
        "D.15a", "DLN: the loss varies far less along the gradient with BN (loss landscape)",
        "loss band up to 1e14 (standard) vs ≈1e4-1e5 (BN) (Fig. 10a)",
        "paired difference log10(standard) - log10(BN) of the median over probe steps of the loss range "
        "max_eta L - min_eta L, eta in {1/100 .. 30} x LR (decades)", threshold=DECADE),
    "D.15b": Claim(
        "D.15b", "DLN: gradients are far more predictive with BN (gradient predictiveness)",
        "max ||g_eta - g|| up to 1e16 (standard) vs ≈1e4-1e6 (BN) (Fig. 10b)",
        "paired difference log10(standard) - log10(BN) of the median over probe steps of "
        "max_eta ||g_eta - g||_2 (decades)", threshold=DECADE),
    "D.15c": Claim(
        "D.15c", "DLN: the effective β-smoothness is far smaller with BN",
        "effective β up to 1e15 early (standard) vs ≈1e7 flat (BN) (Fig. 10c)",
        "paired difference log10(standard) - log10(BN) of the median over probe steps of the effective β, "
        "max_eta ||g_eta - g|| / ||eta g|| (decades)", threshold=DECADE),
    "D.17a": Claim(
        "D.17a", "DLN: ℓ1 normalization reaches a lower training loss than BN",
        "ℓ1 ≈1e2 vs BN ≈5e2 at 10k steps (Fig. 5b)",
        "paired difference log10(BN) - log10(ℓ1) of the final training loss (decades), LR 1e-6",
        threshold=0.0),
    "D.17b": Claim(
        "D.17b", "DLN: every ℓp normalization (p = 1, 2, ∞) reaches a lower training loss than the standard net",
        "standard ≈1.7e3; ℓ∞ ≈1e3, ℓ2 ≈5e2, ℓ1 ≈1e2 (Fig. 5b)",
        "paired difference of min over p in {1, 2, ∞} of [log10(standard) - log10(ℓp)] of the final "
        "training loss (decades), LR 1e-6", threshold=0.0),
}
PAPER_FINAL = {"standard": 1.7e3, "bn": 5e2, "l1": 1e2, "l2": 5e2, "linf": 1e3}  # read off Fig. 3b/5b


# --- the probe that answers the factor-10 question ----------------------------------------------------

def a_matrix(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """A (d, d) from the data y = x A^T (exact least squares: the data are noiseless)."""
    sol = torch.linalg.lstsq(x.double(), y.double()).solution  # (d, d) = A^T
    return sol.T.cpu().numpy()


def end_to_end(out: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M (d, d), c (d,)): the least-squares affine fit out ≈ x M^T + c (exact for an affine net)."""
    xa = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(xa, out, rcond=None)
    return coef[:-1].T, coef[-1]


def mode_residuals(m: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(singular values of A, descending (d,); ||(M - A) v_i||^2 per right singular vector v_i (d,))."""
    _, s, vt = np.linalg.svd(a)
    r = (m - a) @ vt.T
    return s, (r ** 2).sum(0)


def modes_probe(ctx: ProbeContext) -> dict[str, Any]:
    """Residual of the end-to-end map per singular mode of A, on the full training set, train mode.

    Returns arrays ``sigma`` (d,) and ``residual`` (d,) and scalars ``n_residual`` = n·Σ residual
    (≈ the summed loss when x^T x ≈ n I) and ``n_offset`` = n·||c||^2. Cost: 1 forward pass.
    """
    x, y = ctx.task.x_train, ctx.task.y_train
    with torch.no_grad():
        out = ctx.model(x).double().cpu().numpy()
    xn = x.double().cpu().numpy()
    m, c = end_to_end(out, xn)
    s, res = mode_residuals(m, a_matrix(x, y))
    n = x.shape[0]
    return {"sigma": s, "residual": res, "n_residual": float(n * res.sum()), "n_offset": float(n * (c ** 2).sum()),
            "smallest_sigma": float(s[-1])}


# --- per-seed statistics ------------------------------------------------------------------------------

def final_loss(run) -> float | None:
    """The last logged full-batch training loss (summed); None if the run diverged or has none."""
    if run is None or run.status == "diverged":
        return None
    _, loss = run.series("train", "loss")
    loss = loss[np.isfinite(loss)]
    return float(loss[-1]) if loss.size else None


def median_probe(run, probe: str, key: str) -> float | None:
    if run is None:
        return None
    _, v = run.probe_series(probe, key)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def _max_probe(run, probe: str, key: str) -> float | None:
    if run is None:
        return None
    _, v = run.probe_series(probe, key)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else None


def median_cosine(run) -> float | None:
    vals = [median_probe(run, "ics", f"{layer}.cosine") for layer in ICS_LAYERS]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if len(vals) == len(ICS_LAYERS) else None


def _log10(v: float | None) -> float | None:
    return math.log10(v) if v is not None and v > 0 and math.isfinite(v) else None


def _mean(values: list[float | None]) -> str:
    v = [x for x in values if x is not None]
    return f"{np.mean(v):+.2f}" if v else "n/a"


def _sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _geo(values: list[float | None]) -> float | None:
    v = [math.log10(x) for x in values if x is not None and x > 0]
    return 10 ** float(np.mean(v)) if v else None


def verdict_setting(results: ExperimentResults, declared: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The claim rows for the runs of one setting; ``declared``: the seeds the profile declares (one
    without a finished run is listed as "missing" and leaves its rows UNDECIDED)."""
    sr = SettingRuns(results, declared)
    groups, dataset, seeds, rows = sr.groups, sr.dataset, sr.seeds, sr.rows
    run, status, need = sr.run, sr.status, sr.need

    finals = {v: [final_loss(run(v, s)) for s in seeds] for v in groups}
    paper_vs_ours = "; ".join(f"{v} {_sci(_geo(finals.get(v, [])))} (paper ≈{_sci(p)})"
                              for v, p in PAPER_FINAL.items() if v in finals)

    c = CLAIMS["D.14a"]
    if need(c, "standard", "bn"):
        sd = [Seed(s, {"standard": median_cosine(run("standard", s)), "bn": median_cosine(run("bn", s))},
                   status(s, "standard", "bn")) for s in seeds]
        r = paired_difference(c, sd, "standard", "bn", dataset=dataset,
                              describe="median cos(G, G'), standard - BN")
        per_layer = "; ".join(
            f"{v} layer #{layer[2:]} {_mean([median_probe(run(v, s), 'ics', f'{layer}.cosine') for s in seeds])}"
            for v in ("standard", "bn") for layer in ICS_LAYERS)
        r["ours"] += f"; per layer (median cosine, mean over seeds): {per_layer}"
        rows.append(r)
    for cid, std, bn, lr in (("D.14b", "standard", "bn", LR), ("D.14c", "standard_lr1e-7", "bn_lr1e-7", LR_SMALL)):
        c = CLAIMS[cid]
        if need(c, std, bn):
            sd = [Seed(s, {"standard": _log10(final_loss(run(std, s))), "bn": _log10(final_loss(run(bn, s)))},
                       status(s, std, bn)) for s in seeds]
            r = paired_difference(c, sd, "standard", "bn", dataset=dataset,
                                  describe=f"log10 final loss, standard - BN (LR {lr:g})")
            fs, fb = _geo([final_loss(run(std, s)) for s in seeds]), _geo([final_loss(run(bn, s)) for s in seeds])
            if fs and fb:
                r["ours"] += f"; final loss standard {_sci(fs)} vs BN {_sci(fb)} (geometric means), ratio {fs / fb:.3g}"
            r["paper_vs_ours"] = paper_vs_ours
            rows.append(r)
    for cid, key in (("D.15a", "loss_range"), ("D.15b", "predictiveness_max"), ("D.15c", "effective_beta")):
        c = CLAIMS[cid]
        if need(c, "standard", "bn"):
            vals = {v: {s: median_probe(run(v, s), "landscape", key) for s in seeds} for v in ("standard", "bn")}
            sd = [Seed(s, {v: _log10(vals[v][s]) for v in vals}, status(s, "standard", "bn")) for s in seeds]
            r = paired_difference(c, sd, "standard", "bn", dataset=dataset,
                                  describe=f"log10 median {key}, standard - BN")
            peaks = {v: [_max_probe(run(v, s), "landscape", key) for s in seeds] for v in ("standard", "bn")}
            r["ours"] += (f"; medians standard {_sci(_geo(list(vals['standard'].values())))} vs BN "
                          f"{_sci(_geo(list(vals['bn'].values())))}; not the rule: maxima over the run "
                          f"standard {_sci(_geo(peaks['standard']))} vs BN {_sci(_geo(peaks['bn']))}")
            rows.append(r)
    c = CLAIMS["D.17a"]
    if need(c, "bn", "l1"):
        sd = [Seed(s, {"bn": _log10(final_loss(run("bn", s))), "l1": _log10(final_loss(run("l1", s)))},
                   status(s, "bn", "l1")) for s in seeds]
        r = paired_difference(c, sd, "bn", "l1", dataset=dataset, describe="log10 final loss, BN - ℓ1")
        r["ours"] += f"; {paper_vs_ours}"
        rows.append(r)
    c = CLAIMS["D.17b"]
    if need(c, "standard", *LP_NORMS):
        sd = []
        for s in seeds:
            ls = _log10(final_loss(run("standard", s)))
            gaps = [None if ls is None or _log10(final_loss(run(p, s))) is None
                    else ls - _log10(final_loss(run(p, s))) for p in LP_NORMS]
            worst = None if any(g is None for g in gaps) else min(gaps)
            sd.append(Seed(s, {"min_gap": worst, "zero": 0.0 if worst is not None else None},
                           status(s, "standard", *LP_NORMS)))
        r = paired_difference(c, sd, "min_gap", "zero", dataset=dataset,
                              describe="min over p of log10 standard - log10 ℓp")
        r["ours"] += f"; {paper_vs_ours}"
        rows.append(r)
    return rows


def verdict(results: ExperimentResults) -> list[dict[str, Any]]:
    return EXPERIMENT.verdict_by_setting(results, verdict_setting, list(CLAIMS.values()))


# --- figures, as data (bnlab.report draws them) --------------------------------------------------------

_LOSS_VARIANTS = (("standard", "Standard"), ("bn", "Standard + BN"))
FIGURES = (
    FigureSpec(
        "santurkar_dln_fig3b",
        "Santurkar Fig. 3b (DLN): training loss (summed over 1000 samples) and ICS of layers #9 and #17, "
        "ℓ2 difference ||G - G'|| and cos(G, G'), standard vs BN at LR 1e-6 (the 1e-7 runs in the loss panel).",
        (
            Panel("training loss", "training step", "loss (sum)", yscale="log", curves=tuple(
                [Curve(v, l, split="train", key="loss") for v, l in _LOSS_VARIANTS]
                + [Curve(f"{v}_lr1e-7", f"{l}, LR 1e-7", split="train", key="loss", linestyle="--")
                   for v, l in _LOSS_VARIANTS])),
            *ics_panels(ICS_LAYERS, _LOSS_VARIANTS, lambda layer: layer[2:]),
        )),
    FigureSpec(
        "santurkar_dln_fig10",
        "Santurkar Fig. 10 (DLN): along the gradient, eta in {1/100, 1/10, 1, 10, 30} x LR (LR 1e-6), per "
        "probe step: (a) the loss band [min, max] over eta, (b) the band of ||g_eta - g||, (c) the "
        "effective β-smoothness max_eta ||g_eta - g|| / ||eta g||.",
        landscape_panels(_LOSS_VARIANTS)),
    FigureSpec(
        "santurkar_dln_fig11",
        "Santurkar Fig. 11 (DLN): ||g_eta - g|| against the step eta along the gradient, one curve per "
        "probe step (darker = later), first seed, standard vs BN.",
        grad_change_panels(_LOSS_VARIANTS)),
    FigureSpec(
        "santurkar_dln_fig5b",
        "Santurkar Fig. 5b (DLN): training loss of standard, BN, ℓ1, ℓ2 and ℓ∞ normalization at LR 1e-6.",
        (Panel("training loss", "training step", "loss (sum)", yscale="log",
               curves=tuple(Curve(v, l, split="train", key="loss") for v, l in (
                   ("standard", "Standard"), ("bn", "BN"), ("l1", "ℓ1"), ("l2", "ℓ2"), ("linf", "ℓ∞")))),)),
    FigureSpec(
        "santurkar_dln_modes",
        "Factor-10 evidence: n·||(M - A) v_i||^2 summed over the singular modes of A (≈ the loss) and the "
        "residual of the smallest mode alone, per variant; the plateau is the energy of the modes not learned.",
        (Panel("residual of all modes (n x sum)", "training step", "n · Σ_i ||(M - A) v_i||²", yscale="log",
               curves=tuple(Curve(v, l, probe="modes", key="n_residual") for v, l in (
                   ("standard", "Standard"), ("bn", "BN"), ("l1", "ℓ1")))),)),
)

# --- the experiment ----------------------------------------------------------------------------------

BASE = TrainConfig(
    dataset="gaussian_regression", regression_n=1000, regression_dim=10, data_seed=0, model="dln", depth=25,
    norm="none", dtype="float64", steps=10_000, batch_size=1000, loss="mse", loss_reduction="sum", lr=LR,
    momentum=0.0, log_every=10, eval_every=1000, eval_subset=None, eval_batch_size=1000,
    probe_schedule="log", probe_points=30, probe_every=500, probe_batch_size=1000, checkpoint_every=2000,
)

PRIMARY = "A: data_seed 0"
SETTINGS: dict[str, dict[str, Any]] = {PRIMARY: {}, "A: data_seed 1": {"data_seed": 1},
                                       "A: data_seed 2": {"data_seed": 2}}

EXPERIMENT = Experiment(
    name="santurkar_dln",
    description="Santurkar Figs. 3b/5b/10/11: 25-layer deep linear network, standard vs BN vs ℓp (paper scale)",
    paper="Santurkar, Tsipras, Ilyas & Madry 2018, App. A.1, Figs. 3b, 5b, 10, 11 (claims D.14, D.15, D.17 "
          "DLN parts in docs/claims.md)",
    base=BASE,
    variants={
        "standard": {"norm": "none"},
        "bn": {"norm": "batch"},
        "l1": {"norm": "l1"},
        "l2": {"norm": "l2"},
        "linf": {"norm": "linf"},
        "standard_lr1e-7": {"norm": "none", "lr": LR_SMALL},
        "bn_lr1e-7": {"norm": "batch", "lr": LR_SMALL},
    },
    profiles={
        # smoke: the same network and data, 30 steps (seconds): checks the pipeline, decides nothing.
        "smoke": {"steps": 30, "log_every": 1, "eval_every": 10, "probe_every": 10, "probe_points": 5,
                  "checkpoint_every": 15},
        "quick": {},  # the paper's scale: the DLN is cheap enough on a CPU
        "paper": {},
    },
    seeds={"smoke": (0,), "quick": (0, 1, 2), "paper": (0, 1, 2, 3, 4)},
    settings=SETTINGS,
    robust_seeds=(0, 1),
    probes=(
        instrument_probe("ics", layers=list(ICS_LAYERS), schedule="every"),
        instrument_probe("along_gradient", name="landscape", multipliers=MULTIPLIERS),
        Probe("modes", modes_probe, cost=1.0),
    ),
    definitions=(
        ("final loss (D.14b/c, D.17)", "the summed squared error over the 1000 samples at the last logged "
         "step (full batch, training mode)", "none (logged every 10 steps)"),
        ("ICS (Fig. 3b, D.14a)", "||G - G'||_2 and cos(G, G') of the weight of layers #9 and #17 (Def. 2.1), "
         "G' after the earlier layers took the run's own update, same full batch, every 500 steps; the "
         "verdict uses the median over probe steps of the cosine, mean of the two layers",
         "3 forward+backward passes per probe"),
        ("landscape along the gradient (Figs. 10, 11, D.15)", "at a probe step with parameters w and full-batch "
         "gradient g, for eta in {1/100, 1/10, 1, 10, 30} x LR: L(w - eta g) and ||∇L(w - eta g) - g||; loss "
         "range = max - min over eta, gradient predictiveness = max over eta, effective β = max over eta of "
         "||g_eta - g|| / ||eta g||; the verdict uses the median over the 30 log-spaced probe steps",
         "6 forward+backward passes per probe"),
        ("mode residuals (factor-10 question)", "M, c = least-squares affine fit of the net's output on x; per "
         "right singular vector v_i of A, ||(M - A) v_i||^2; n·Σ_i is the loss up to the sampling error of x",
         "1 forward pass per probe"),
    ),
    figures=FIGURES,
    verdict=verdict,
    notes=__doc__.split("Choices the paper leaves open, ours:", 1)[1].strip(),
)
