"""The report as one self-contained HTML page: inline CSS, figures (SVG) as data: URIs, no JavaScript,
no external URL of any kind, so the file can be mailed, archived and opened offline.

``render(report)`` turns a ``bnlab.report.build.Report`` into the page with the Jinja2 templates in
``bnlab/report/templates/`` (autoescaping on: every value from runs or experiments is escaped; only
what this module marks as ``Markup`` is inserted as HTML: Markdown rendered in safe mode by
``bnlab.report.markdown``, and data: URIs of figures). This module prepares the values: numbers
formatted with the one rule of ``bnlab.numfmt``, outcomes from ``bnlab.report.verdicts``.
"""

from __future__ import annotations

import base64
import functools
import html
import inspect
import json
import re
from pathlib import Path
from typing import Any, Sequence

from markupsafe import Markup

from bnlab.errors import BnlabError
from bnlab.numfmt import fmt_pm, fmt_value, values_decimals
from bnlab.report.markdown import (ANCHOR_PREFIX, claim_anchor, claim_id_of, render_claims, render_inline,
                                   render_markdown)
from bnlab.report.verdicts import (PROFILE_NOTES, UNDECIDING_PROFILES, counts, estimate_text, interval_text,
                                   outcome_of, ours_text, per_seed_compact, per_seed_table, robustness_grid,
                                   seeds_text, short_reason)
from bnlab.train.results import RUN_STATUSES
from bnlab.train.config import NOT_HASHED, TrainConfig, config_diff, config_to_dict

__all__ = ["CSS", "esc", "format_cell", "render", "settings_fields", "verdict_label"]

# Words wrap at word boundaries only (overflow-wrap: break-word breaks a word only when it alone is
# wider than its column); a table wider than the page scrolls inside its own .table-wrap box.
CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --tie: #0550ae; --undecided: #7d6608; --error: #8250df;
        --muted: #57606a; --line: #d0d7de; --bg2: #f6f8fa; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; font-size: 15px;
       line-height: 1.45; color: #1f2328; max-width: 1240px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 28px; margin: 0 0 4px; } h2 { font-size: 22px; margin: 40px 0 6px; padding-top: 12px;
     border-top: 3px solid var(--line); } h3 { font-size: 17px; margin: 24px 0 8px; }
h2 .muted { font-size: 16px; font-weight: 500; }
.muted, .generated { color: var(--muted); } .generated { margin: 0 0 16px; }
.data-used { font-size: 16px; background: var(--bg2); border: 1px solid var(--line); padding: 6px 10px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; width: 100%; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
.table-wrap { overflow-x: auto; max-width: 100%; margin: 8px 0 12px; }
.table-wrap > table { margin: 0; }
.doc table, .claims-doc table, td table { display: block; overflow-x: auto; width: auto; max-width: 100%; }
th { background: var(--bg2); font-weight: 600; } td.num { font-variant-numeric: tabular-nums; }
.rule { color: var(--muted); font-size: 12.5px; margin-top: 2px; white-space: normal; }
table.verdicts { table-layout: fixed; }
table.verdicts col.c-claim { width: 25%; } table.verdicts col.c-data { width: 11%; }
table.verdicts col.c-paper { width: 19%; } table.verdicts col.c-ours { width: 9%; }
table.verdicts col.c-ci { width: 12%; } table.verdicts col.c-seeds { width: 11%; }
table.verdicts col.c-outcome { width: 13%; }
table.verdicts tr.more td { border-top: none; padding: 0 8px 2px; font-size: 12.5px; }
table.verdicts tr.claim-row td { border-bottom: none; }
table.verdicts details { margin: 0; } table.verdicts summary { font-size: 12px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 4px 0; }
dt { font-weight: 600; color: var(--muted); } dd { margin: 0; }
table.per-seed { width: auto; font-size: 12.5px; } table.per-seed td, table.per-seed th { padding: 2px 6px; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--bg2); border: 1px solid var(--line); padding: 8px 10px; overflow-x: auto;
      white-space: pre-wrap; overflow-wrap: break-word; }
.badge { display: inline-block; min-width: 86px; text-align: center; padding: 1px 8px; border-radius: 10px;
         color: #fff; font-weight: 700; font-size: 12px; letter-spacing: .03em; white-space: nowrap; }
.PASS { background: var(--pass); } .FAIL { background: var(--fail); } .TIE { background: var(--tie); }
.UNDECIDED { background: var(--undecided); } .ERROR { background: var(--error); }
.claim-id { font-weight: 700; white-space: nowrap; }
.status-diverged, .status-collapsed { color: var(--fail); font-weight: 600; }
.status-incomplete { color: var(--undecided); font-weight: 600; } .status-done { color: var(--pass); }
.counts span { margin-right: 14px; }
.note { border-left: 4px solid var(--undecided); background: #fff8c5; padding: 6px 10px; margin: 8px 0; }
.error { border-left: 4px solid var(--error); background: #fbefff; padding: 6px 10px; margin: 8px 0; }
.diverged { border-left: 4px solid var(--fail); background: #ffebe9; padding: 6px 10px; margin: 8px 0; }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line);
  background: #fff; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; }
details { margin: 6px 0; } summary { cursor: pointer; color: #0969da; }
nav ul { margin: 4px 0; padding-left: 20px; } a { color: #0969da; text-decoration: none; }
.doc p, .claims-doc p { margin: 6px 0; } td p { margin: 0 0 4px; } td ul { margin: 2px 0; padding-left: 18px; }
"""

# Settings: always shown (they define the run even at their default value) ...
_CORE_FIELDS = ("dataset", "model", "norm", "steps", "batch_size", "lr", "eval_every", "eval_subset")
# ... the parameters of the learning-rate schedule in use (lr_min of cosine, even at its default) ...
_SCHEDULE_FIELDS = ("lr_decay", "lr_decay_steps", "lr_min")
# ... never shown outside the full config (they change how a run is written or how fast, not what
# it computes) ...
_NEVER_FIELDS = set(NOT_HASHED) | {"eval_batch_size", "data_fallback"}


def _used(field: str, cfg: TrainConfig) -> bool:
    """False for a field the run's other settings make irrelevant (e.g. lr_min without cosine)."""
    if field in ("regression_n", "regression_dim"):
        return cfg.dataset == "gaussian_regression"
    if field in ("lr_decay", "lr_decay_steps"):
        return cfg.lr_schedule in ("exp", "step")
    if field == "lr_min":
        return cfg.lr_schedule == "cosine"
    if field == "nesterov":
        return cfg.momentum > 0
    if field == "probe_every":
        return cfg.probe_schedule == "every"
    if field == "probe_points":
        return cfg.probe_schedule == "log"
    if field == "channels_last":
        return cfg.model in ("vgg11", "vgg16", "convnet")
    if field == "binarize":
        return cfg.dataset != "gaussian_regression"
    return True


def settings_fields(configs: Sequence[TrainConfig]) -> list[str]:
    """The config fields worth a reader's attention for these configs, in field order: the core
    fields, and every field some config sets away from the TrainConfig default, minus fields the
    config makes irrelevant or that do not change results. The full config stays one click away."""
    if not configs:
        return []
    default = config_to_dict(TrainConfig())
    dicts = [config_to_dict(c) for c in configs]
    out = []
    for k in default:
        if k in _NEVER_FIELDS:
            continue
        differs = any(d[k] != default[k] for d in dicts)
        core = k in _CORE_FIELDS or k in _SCHEDULE_FIELDS  # schedule fields only count when used
        if (core or differs) and any(_used(k, c) for c in configs):
            out.append(k)
    return out


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def verdict_label(row: dict[str, Any]) -> str:
    return outcome_of(row)


def format_cell(value: Any) -> str:
    """A table cell as text (the CLI prints paper tables with it too)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return fmt_value(value)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            d = values_decimals(value)
            return ", ".join(fmt_value(v, d) for v in value)
        return ", ".join(format_cell(v) for v in value)
    return str(value)


@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("bnlab.report", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=False, lstrip_blocks=False)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


# --- the claims document ---------------------------------------------------------------------------------

def claims_doc_path() -> Path | None:
    """docs/claims.md of the bnlab checkout this module runs from (None in an installed wheel)."""
    import bnlab

    path = Path(bnlab.__file__).resolve().parent.parent / "docs" / "claims.md"
    return path if path.is_file() else None


# --- verdict rows -------------------------------------------------------------------------------------------

def _row_view(r: dict[str, Any], anchors: dict[tuple, str], claim_anchors: set[str]) -> dict[str, Any]:
    cid = claim_id_of(r)
    claim = str(r.get("claim") or "")
    if cid and not r.get("claim_id") and claim.startswith(cid):
        claim = claim[len(cid):].lstrip(" :")  # the id is shown (and linked) on its own
    anchor = claim_anchor(cid) if cid else ""
    rob = r.get("robustness") if isinstance(r.get("robustness"), dict) else None
    reason = str(r.get("undecided_reason") or "")
    by_profile = reason in UNDECIDING_PROFILES.values()  # smoke: one plain sentence, nothing else to say
    estimate, interval = estimate_text(r), interval_text(r)
    ours = ours_text(r.get("ours", ""))
    seeds = per_seed_compact(r)
    if len(seeds) == 1 and seeds[0].lstrip("+") == estimate.lstrip("+"):
        seeds = []  # one seed: its value is the estimate; the column says "1 seed" instead of repeating it
    outcome = outcome_of(r)
    if outcome == "UNDECIDED" and not reason:
        reason = short_reason(r.get("no_ci_reason"))
    return {
        "experiment": r.get("experiment", ""), "profile": r.get("profile", ""),
        "section_anchor": anchors.get((r.get("experiment"), r.get("profile")), ""),
        "claim_id": cid, "claim_anchor": anchor,
        "claim_href": f"#{ANCHOR_PREFIX}{anchor}" if anchor in claim_anchors else "",
        "claim_text": render_inline(claim), "paper": render_inline(r.get("paper")),
        # the cells: the estimate alone (the experiment's own sentence when it has no number), the
        # interval alone, one entry per seed; everything longer goes to the row's details
        "estimate": estimate or _no_estimate(r, ours), "interval": interval,
        # why there is no interval, unless the outcome cell already says it
        "no_interval": "" if interval or (outcome == "UNDECIDED" and reason == short_reason(r.get("no_ci_reason")))
                       else short_reason(r.get("no_ci_reason")),
        "per_seed_compact": seeds, "n_seeds": seeds_text(r),
        "ours": ours, "statistic": r.get("statistic") or "",
        "ci_method": r.get("ci_method") or "", "no_ci_reason": r.get("no_ci_reason") or "",
        "rule": render_inline(r.get("rule")) if r.get("rule") else "",
        "why": (r.get("why") or "") if r.get("why") != r.get("rule") else "",
        "dataset": r.get("dataset") or "",
        "outcome": outcome, "per_seed": per_seed_table(r),
        "robust_label": (rob or {}).get("label") or "",
        "undecided_reason": reason if outcome == "UNDECIDED" else "",
        "computed_outcome": "" if by_profile else (r.get("computed_outcome") or ""),
    }


def _no_estimate(r: dict[str, Any], ours: str) -> str:
    """The "ours" cell of a row without a numeric estimate: "k/n yes" for per-seed outcomes, else the
    experiment's sentence up to its first parenthesis (the whole sentence is in the row's details)."""
    items = r.get("per_seed") if isinstance(r.get("per_seed"), list) else []
    if items and r.get("kind") != "decided" and all("outcome" in it for it in items):
        yes = sum(it.get("outcome") is True for it in items)
        answered = sum(it.get("outcome") is not None for it in items)
        return f"{yes}/{len(items)} yes" + (f" ({len(items) - answered} no answer)" if answered < len(items) else "")
    return ours.split(" (", 1)[0]


def _robustness_view(rows: list[dict[str, Any]], views: list[dict[str, Any]], title: str) -> dict[str, Any] | None:
    grid = robustness_grid(rows)
    if grid is None:
        return None
    settings, claims = grid
    by_id = {id(r): v for r, v in zip(rows, views)}
    return {"title": title, "settings": settings,
            "claims": [{"row": by_id[id(c["row"])], "label": c["label"], "cells": c["cells"]} for c in claims]}


# --- sections -----------------------------------------------------------------------------------------------

def _config_groups(s: Any) -> dict[tuple[str, str], list[Any]]:
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in s.results.runs:
        groups.setdefault((r.variant, r.config_hash), []).append(r)
    # The experiment's declared variant order (the paper's table order), unknown variants last.
    order = {v: i for i, v in enumerate(getattr(s.experiment, "variants", None) or {})}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0])))


def _results_view(s: Any) -> dict[str, Any]:
    rows = []
    left_out = {id(r) for r in s.excluded}
    for (variant, h), runs in _config_groups(s).items():
        done = [r for r in runs if r.status == "done"]
        if any(id(r) in left_out for r in runs):
            used = "no (other config)"
        elif all(r.status == "incomplete" for r in runs):
            used = "no (unfinished)"
        else:
            used = "yes"
        cells: list[Any] = [variant, Markup(f"<code>{esc(h[:8])}</code>"),
                            *(sum(r.status == st for r in runs) for st in RUN_STATUSES)]
        for key in ("acc", "loss"):
            vals = [(r.done_info.get("test") or {}).get(key) for r in done]
            vals = [float(v) for v in vals if isinstance(v, (int, float))]
            if not vals:
                cells.append("–")
            elif len(vals) == 1:
                cells.append(f"{fmt_value(vals[0])} (1 seed)")
            else:
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                d = values_decimals(vals)
                cells.append(Markup(f"{esc(fmt_pm(mean, std))} <span class=\"muted\">"
                                    f"[{esc(fmt_value(min(vals), d))}, {esc(fmt_value(max(vals), d))}]</span>"))
        cells.append(used)
        rows.append(cells)
    return {"headers": ["variant", "config", *RUN_STATUSES, "test accuracy", "test loss",
                        "in verdict"], "rows": rows}


def _figures_view(s: Any, out_dir: Path) -> list[dict[str, Any]]:
    out = []
    for f in s.figures:
        caption = f.caption or f.path.stem.replace("_", " ")
        view = {"rel": _rel(f.path, out_dir), "caption": render_inline(caption),
                "caption_text": re.sub(r"\s+", " ", caption), "uri": "", "width": None}
        if f.data is not None:
            view["uri"] = Markup(f"data:{f.mime};base64,{base64.b64encode(f.data).decode('ascii')}")
            view["width"] = _svg_width(f.data) if f.mime == "image/svg+xml" else None
        out.append(view)
    return out


def _svg_width(data: bytes) -> int | None:
    """The SVG's own width in CSS pixels (matplotlib writes pt), so it shows at its natural size."""
    m = re.search(rb'<svg[^>]*\swidth="([0-9.]+)(pt|px)?"', data[:4000])
    if not m:
        return None
    value = float(m.group(1)) * (96 / 72 if m.group(2) in (b"pt", None) else 1.0)
    return int(round(value))


def _same(values: list[Any], none_text: str, varies_text: str) -> str:
    if not values or any(v != values[0] for v in values):
        return varies_text
    return none_text if values[0] is None else str(values[0])


def _definitions_view(s: Any) -> list[dict[str, Any]]:
    exp = s.experiment
    cfgs = [r.config for r in s.results.runs]
    rows: list[dict[str, Any]] = []
    for item in (getattr(exp, "definitions", None) if exp is not None else None) or ():
        q, d, c = (list(item) + ["", "", ""])[:3]
        rows.append({"quantity": str(q), "definition": render_markdown(str(d)), "cost": render_inline(str(c))})
    for probe in getattr(exp, "probes", ()) if exp is not None else ():
        fn = getattr(probe.fn, "func", probe.fn)
        doc = inspect.getdoc(fn) or ""
        if not doc:
            mod = inspect.getmodule(fn)
            doc = inspect.cleandoc(mod.__doc__) if mod is not None and mod.__doc__ else "(no docstring)"
        calls = sorted({len(probe.steps(c)) for c in cfgs})
        calls_txt = "/".join(str(c) for c in calls) or "?"
        # The probe's own docstring says on which examples it runs; here only what the runner knows.
        note = getattr(probe, "cost_note", "")
        cost = (f"{probe.cost:g} forward+backward pass equivalents per call "
                + (f"({note}; declared by the probe)" if note else "(declared by the probe)")
                + f"; {calls_txt} calls per run")
        rows.append({"quantity": f"probe: {probe.name}", "definition": render_markdown(doc), "cost": cost})
    ev = _same([c.eval_subset for c in cfgs], "all", "eval_subset (see Settings)")
    every = _same([c.eval_every for c in cfgs], "?", "eval_every (see Settings)")
    log_every = _same([c.log_every for c in cfgs], "?", "log_every (see Settings)")
    tests = {(r.done_info.get("test") or {}).get("n") for r in s.results.runs if r.status == "done"}
    tests.discard(None)
    n_test = _same(sorted(tests), "?", "the") if tests else "the"
    rows += [
        {"quantity": "train loss / acc",
         "definition": ("Loss (the config's loss and reduction) and accuracy of the training minibatch at step s, "
                        "in training mode (BN normalizes with the minibatch's own statistics), from the forward "
                        f"pass of the update at s, before that update; every {log_every} step(s)."),
         "cost": "0 extra passes (the update's own forward pass)"},
        {"quantity": "eval acc / loss",
         "definition": (f"Accuracy and mean per-example loss on a fixed subset of {ev} test examples (the same "
                        "for every seed: chosen with data_seed), model in eval mode (BN uses its running "
                        f"statistics); every {every} steps and at the last step."),
         "cost": "1 forward pass over the subset per evaluation"},
        {"quantity": "test acc / loss",
         "definition": (f"The same on the full test split ({n_test} examples), once, at the end of a finished run "
                        "(the final value in the results table)."),
         "cost": "1 forward pass over the test split"},
    ]
    return rows


def _seed_status(runs: list[Any]) -> Markup:
    parts = []
    for r in sorted(runs, key=lambda r: r.seed):
        if r.status == "done":
            parts.append(esc(r.seed))
        elif r.status == "diverged":
            parts.append(f'<span class="status-diverged">{esc(r.seed)} (diverged at step {esc(r.diverged_step)})</span>')
        elif r.status == "collapsed":
            parts.append(f'<span class="status-collapsed">{esc(r.seed)} (collapsed)</span>')
        else:
            parts.append(f'<span class="status-incomplete">{esc(r.seed)} (incomplete)</span>')
    return Markup(", ".join(parts))


def _setting_value(v: Any) -> str:
    return format_cell(tuple(v) if isinstance(v, list) else v)


def _settings_view(s: Any) -> dict[str, Any]:
    groups = _config_groups(s)
    cfgs = {k: rs[0].config for k, rs in groups.items()}
    dicts = {k: config_to_dict(c) for k, c in cfgs.items()}
    fields = settings_fields(list(cfgs.values()))
    varying = [k for k in fields if len({json.dumps(d[k]) for d in dicts.values()}) > 1]
    shared = [k for k in fields if k not in varying]
    headers = ["variant", "config", "seeds", "data used"] + varying
    rows = []
    for (variant, h), rs in groups.items():
        d = dicts[(variant, h)]
        data = " / ".join(dict.fromkeys(_run_dataset(r) for r in rs))
        rows.append([variant, Markup(f"<code>{esc(h[:8])}</code>"), _seed_status(rs), data]
                    + [_setting_value(d[k]) + _binarize_caveat(k, d[k], rs) for k in varying])
    note = ""
    if shared and dicts:
        first = next(iter(dicts.values()))
        all_runs = [r for rs in groups.values() for r in rs]
        items = ", ".join(f"{k}={_setting_value(first[k])}{_binarize_caveat(k, first[k], all_runs)}" for k in shared)
        note = Markup(f"Shared by every run: <code>{esc(items)}</code>. ") + (
            Markup("Columns after <em>data used</em> are the settings that differ between the configs. ")
            if varying else "") + Markup(
            "Listed: the settings that define a run and those set away from their default; "
            "every field is in the full config below. <code>dataset</code> is what the config asked "
            "for; <em>data used</em> is what the run really loaded (from its env.json).")
    full = [{"variant": v, "hash": h[:8], "json": json.dumps(dicts[(v, h)], indent=2)} for v, h in groups]
    return {"headers": headers, "rows": rows, "shared_note": note, "full": full}


def _binarize_caveat(key: str, value: Any, runs: list[Any]) -> str:
    """binarize=true thresholds real MNIST only: say so where runs used other data (grey levels)."""
    if key != "binarize" or value is not True:
        return ""
    other = []
    for r in runs:
        try:
            used = r.dataset.get("used")
        except BnlabError:
            continue
        if used and used != "mnist" and used not in other:
            other.append(used)
    if not other:
        return ""
    from bnlab.data.locate import dataset_title

    return (f" (applies to MNIST only: {', '.join(dataset_title(u) for u in other)} "
            f"kept {'its' if len(other) == 1 else 'their'} grey levels)")


def _run_dataset(r: Any) -> str:
    from bnlab.report.build import run_dataset_text

    return run_dataset_text(r)


def _who(runs: list[Any]) -> str:
    if len(runs) > 4:
        return f"{len(runs)} runs"
    return ", ".join(f"{r.variant}/seed{r.seed}" for r in runs)


def _deviations_view(s: Any) -> list[Markup]:
    exp = s.experiment
    items: list[Markup] = []
    if exp is not None and getattr(exp, "notes", ""):
        items.append(Markup("<strong>Documented choices and deviations (the experiment's notes):</strong>")
                     + render_markdown(exp.notes))
    datasets: dict[tuple, list[Any]] = {}
    for r in s.results.runs:
        try:
            d = r.dataset
        except BnlabError:
            d = {}
        key = (d.get("requested"), d.get("used"), d.get("note") or "", d.get("source") or "")
        datasets.setdefault(key, []).append(r)
    for (requested, used, note, source), runs in datasets.items():
        who = esc(_who(runs))
        if requested and used and requested != used:
            items.append(Markup(f"<strong>Dataset fallback</strong> ({who}): asked for <code>{esc(requested)}</code>, "
                                f"used <code>{esc(used)}</code>. ") + _note_html(note))
        elif note:
            items.append(Markup(f"<strong>Dataset</strong> ({who}): <code>{esc(used)}</code>. ") + _note_html(note))
        if source:
            items.append(Markup(f"Data source ({who}): {esc(source)}"))
    for (variant, h), rs in _config_groups(s).items():
        grid = _grid_deviation(exp, rs[0])
        if grid:
            changes = ", ".join(f"{k}={_setting_value(b)} (primary setting: {_declared_text(k, a)})"
                                for k, (a, b) in grid.items())
            items.append(Markup(f"<strong>Robustness-grid setting</strong> <em>{esc(rs[0].setting)}</em> of "
                                f"<code>{esc(variant)}</code> (<code>{esc(h[:8])}</code>, {esc(_who(rs))}): "
                                f"{esc(changes)}"))
        dev = _config_deviation(exp, rs[0])
        if isinstance(dev, str):
            items.append(Markup(f"<code>{esc(variant)}</code> (<code>{esc(h[:8])}</code>): {esc(dev)}"))
        elif dev:
            changes = ", ".join(f"{k}={_setting_value(b)} (declared {_declared_text(k, a)})" for k, (a, b) in dev.items())
            items.append(Markup(f"<strong>Overridden settings</strong> (<code>--set</code>) of "
                                f"<code>{esc(variant)}</code> (<code>{esc(h[:8])}</code>, {esc(_who(rs))}): "
                                f"{esc(changes)}"))
    return items


# What a field left at None (null) means, where the model or loop fills it in.
_NONE_MEANS = {"init_std": "the model's default, N(0, 1/fan_in)"}


def _declared_text(key: str, value: Any) -> str:
    if value is None:
        return _NONE_MEANS.get(key, "null: the model's default")
    return _setting_value(value)


def _note_html(note: str) -> Markup:
    """A stored dataset note as clean sentences: `code` as <code> (safe inline Markdown), and the
    ".;" of notes joined with "; " by older versions as a sentence break."""
    text = re.sub(r"([.!?])\s*;\s+", r"\1 ", str(note or "")).strip()  # not ");": a clause break
    return Markup(render_inline(text)) if text else Markup("")


def _grid_deviation(exp: Any, r: Any) -> dict[str, tuple[Any, Any]] | None:
    """The fields a robustness-grid setting changes against the primary setting (None for the
    primary setting, or when that cannot be resolved)."""
    if exp is None or not r.setting or r.setting == getattr(exp, "primary_setting", r.setting):
        return None
    try:
        return config_diff(exp.config(r.variant, r.profile), exp.config(r.variant, r.profile, setting=r.setting))
    except Exception:  # variant, profile or setting no longer declared: _config_deviation says so
        return None


def _last_step(r: Any) -> Any:
    try:
        steps = [rec.get("step") for rec in r.metrics if isinstance(rec.get("step"), int)]
    except BnlabError as err:
        return f"unreadable ({err})"
    return max(steps) if steps else 0


def _runs_view(s: Any, out_dir: Path) -> dict[str, Any]:
    rows = []
    for r in sorted(s.results.runs, key=lambda r: (r.variant, r.config_hash, r.seed)):
        test = r.done_info.get("test") or {}
        if r.status == "done":
            status = Markup('<span class="status-done">done</span>')
            steps = r.done_info.get("steps", r.config.steps)
        elif r.status == "diverged":
            status = Markup(f'<span class="status-diverged">diverged at step {esc(r.diverged_step)}</span>')
            steps = r.diverged_step
        elif r.status == "collapsed":
            status = Markup('<span class="status-collapsed">collapsed</span> <span class="muted">(finite loss, '
                            "test accuracy at chance level)</span>")
            steps = r.done_info.get("steps", r.config.steps)
        else:
            status = Markup('<span class="status-incomplete">incomplete</span> <span class="muted">(no done '
                            "marker: killed or still running; <code>bnlab run</code> resumes it)</span>")
            steps = f"{_last_step(r)} of {r.config.steps}"
        secs = r.done_info.get("seconds_last_attempt")
        resumed = r.done_info.get("resumed_from")
        time_text = Markup(esc(f"{secs:.1f} s" if isinstance(secs, (int, float)) else "–")
                           + (f' <span class="muted">(resumed at step {esc(resumed)})</span>' if resumed else ""))
        rows.append([r.variant, r.seed, status, steps, fmt_value(test.get("acc")), fmt_value(test.get("loss")),
                     time_text, Markup(f"<code>{esc(_rel(r.run_dir, out_dir))}</code>")])
    return {"headers": ["variant", "seed", "status", "steps", "test acc", "test loss", "time", "directory"],
            "rows": rows}


def _environment_view(s: Any) -> dict[str, Any]:
    combos: dict[tuple, list[Any]] = {}
    for r in s.results.runs:
        try:
            env = r.env
        except BnlabError:
            env = {}
        git = env.get("git") or {}
        commit = "–"
        if git:
            commit = git.get("commit", "")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
        key = (env.get("python", "?"), env.get("torch", "?"), env.get("numpy", "?"), env.get("bnlab", "?"),
               f"{env.get('threads', '?')} / {env.get('interop_threads', '?')}", str(env.get("cpu_count", "?")),
               f"{env.get('machine', '?')}, {env.get('platform', '?')}", env.get("host", "?"), commit)
        combos.setdefault(key, []).append(r)
    return {"headers": ["python", "torch", "numpy", "bnlab", "threads (intra / inter-op)", "cpu cores", "machine",
                        "host", "git commit", "runs"],
            "rows": [[*key, len(rs)] for key, rs in combos.items()]}


def _module_doc(exp: Any) -> tuple[str, str]:
    """(module file relative to the package, docstring) of the module that defines ``exp``."""
    for fn in (getattr(exp, "verdict", None), getattr(exp, "plots", None)):
        if fn is None:
            continue
        mod = inspect.getmodule(fn)
        if mod is not None and mod.__doc__:
            path = getattr(mod, "__file__", "") or ""
            rel = path.split("bnlab/", 1)[-1] if "bnlab/" in path else Path(path).name
            return (f"bnlab/{rel}" if "bnlab/" in path else rel), inspect.cleandoc(mod.__doc__)
    return "", ""


def _config_deviation(exp: Any, r: Any) -> dict[str, tuple[Any, Any]] | str | None:
    """Fields where a run's config differs from what the experiment declares for its variant and
    profile (``--set`` overrides); a string when that cannot be compared."""
    if exp is None:
        return None
    try:  # against the run's own robustness setting: grid settings are not --set overrides
        declared = exp.config(r.variant, r.profile, setting=r.setting or None)
    except Exception as err:  # variant, profile or setting no longer declared
        why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"cannot compare with the declared config ({why})"
    return config_diff(declared, r.config)


def _section_view(s: Any, out_dir: Path, anchors: dict[tuple, str], claim_anchors: set[str]) -> dict[str, Any]:
    exp = s.experiment
    rows = [{"experiment": s.name, "profile": s.profile, **r} for r in s.rows]
    views = [_row_view(r, anchors, claim_anchors) for r in rows]
    tables = []
    for title, trows in s.tables.items():
        headers = list(trows[0]) if trows else []
        tables.append({"title": title, "headers": headers,
                       "rows": [[format_cell(r.get(h)) for h in headers] for r in trows]})
    path, doc = _module_doc(exp) if exp is not None else ("", "")
    return {
        "anchor": s.anchor, "name": s.name, "profile": s.profile, "dataset": s.dataset_text,
        "title": f"{s.name} ({s.profile or 'no'} profile, data: {s.dataset_text})",
        "description": render_inline(getattr(exp, "description", "")) if exp is not None else "",
        "paper": render_inline(getattr(exp, "paper", "")) if exp is not None else "",
        "n_runs": len(s.results.runs), "n_done": sum(r.status == "done" for r in s.results.runs),
        "n_diverged": len(s.diverged), "n_collapsed": len(s.collapsed), "n_incomplete": len(s.incomplete),
        "notes": s.notes,
        "diverged": [{"variant": r.variant, "hash": r.config_hash[:8], "seed": r.seed, "step": r.diverged_step,
                      "loss": r.done_info.get("diverged_loss") or "non-finite"}
                     for r in sorted(s.diverged, key=lambda r: (r.variant, r.config_hash, r.seed))],
        "incomplete": [{"variant": r.variant, "hash": r.config_hash[:8], "seed": r.seed, "step": _last_step(r),
                        "steps": r.config.steps}
                       for r in sorted(s.incomplete, key=lambda r: (r.variant, r.config_hash, r.seed))],
        "verdict_error": s.verdict_error or "", "verdict_error_last": _last_line(s.verdict_error or ""),
        "rows": views, "robustness": _robustness_view(rows, views, s.name),
        "tables": tables, "results": _results_view(s),
        "plot_error": s.plot_error or "", "plot_error_last": _last_line(s.plot_error or ""),
        "figures": _figures_view(s, out_dir), "definitions": _definitions_view(s),
        "settings": _settings_view(s), "deviations": _deviations_view(s), "runs": _runs_view(s, out_dir),
        "environment": _environment_view(s), "module_path": path,
        "module_doc": render_markdown(doc) if doc else "", "doctor": _doctor_view(s, out_dir),
    }


def _doctor_view(s: Any, out_dir: Path) -> dict[str, Any] | None:
    """The BN doctor's findings per variant (first seed), for the section's "BN doctor" table."""
    entries = getattr(s, "doctor", None)
    if entries is None:
        return None
    rows = []
    for e in entries:
        try:
            where = str(Path(e.run_dir).relative_to(out_dir))
        except ValueError:
            where = str(e.run_dir)
        head = {"variant": e.variant, "seed": e.seed, "run": where, "examples": e.examples,
                "batch": e.batch_per_process}
        if e.findings is None:
            rows.append({**head, "kind": "note", "text": e.note})
        elif not e.findings:
            rows.append({**head, "kind": "healthy"})
        else:
            for f in e.findings:
                rows.append({**head, "kind": "finding", "severity": f.severity, "check": f.check, "layer": f.layer,
                             "evidence": f.evidence, "fix": f.fix})
    counts = {sev: sum(r.get("severity") == sev for r in rows) for sev in ("error", "warning", "info")}
    return {"rows": rows, "counts": counts, "n_models": len(entries)}


# --- the page -----------------------------------------------------------------------------------------------

def render(report: Any) -> str:
    claims_path = claims_doc_path()
    claims = render_claims(claims_path.read_text(encoding="utf-8")) if claims_path else None
    claim_anchors = claims.anchors if claims else set()
    anchors = {(s.name, s.profile): s.anchor for s in report.sections}
    rows = report.rows
    views = [_row_view(r, anchors, claim_anchors) for r in rows]
    robustness = []
    for s in report.sections:
        mine = [(r, v) for r, v in zip(rows, views) if r.get("experiment") == s.name and r.get("profile") == s.profile]
        block = _robustness_view([r for r, _ in mine], [v for _, v in mine], f"{s.name} ({s.profile} profile)")
        if block is not None:
            robustness.append(block)
    n = counts(rows)
    profiles = getattr(report, "profiles", [])
    profile = getattr(report, "profile", None) or (profiles[0] if len(profiles) == 1 else None)
    profile_note = ""
    if profile in PROFILE_NOTES:
        profile_note = PROFILE_NOTES[profile]
    elif len(profiles) > 1:
        profile_note = (f"This directory holds runs of several profiles ({', '.join(profiles)}), shown as separate "
                        "sections; smoke-profile rows decide nothing. Run bnlab report DIR --profile P for one "
                        "profile's report.")
    page = {
        "profile": profile, "profile_note": profile_note, "generated": report.generated,
        "out_dir": str(report.out_dir),
        "datasets": list(report.datasets.items()) if hasattr(report, "datasets") else [],
        "counts": [(k, v) for k, v in n.items() if v or k != "ERROR"],
        "rows": views, "robustness": robustness, "missing": report.missing,
        "claims_doc": claims.html if claims else "",
    }
    sections = [_section_view(s, report.out_dir, anchors, claim_anchors) for s in report.sections]
    return _env().get_template("report.html.j2").render(page=page, sections=sections, css=Markup(CSS)) + "\n"


def render_doctor(findings: Sequence[Any], *, model: str, data: str, checks: Sequence[tuple[str, str]]) -> str:
    """The BN doctor's findings (bnlab.doctor.Finding) as one self-contained HTML page."""
    import datetime

    generated = datetime.datetime.now().isoformat(timespec="seconds")
    return _env().get_template("doctor.html.j2").render(findings=findings, model=model, data=data, checks=checks,
                                                        generated=generated, css=Markup(CSS)) + "\n"
