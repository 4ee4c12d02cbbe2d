"""The report as one self-contained HTML page: inline CSS, figures as base64 data URIs, no JavaScript,
no external URL of any kind, so the file can be mailed, archived and opened offline.

``render(report)`` turns a ``bnlab.report.build.Report`` into the page. Every piece of text that comes
from runs or experiments goes through ``esc`` (html.escape), so a claim with ``<`` or ``&`` in it
cannot break the page.
"""

from __future__ import annotations

import base64
import html
import inspect
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from bnlab.errors import BnlabError
from bnlab.train.config import config_diff, config_to_dict

__all__ = ["esc", "render", "verdict_label"]

_KEY_FIELDS = ("dataset", "model", "norm", "activation", "init", "init_std", "width", "widths", "depth",
               "loss", "loss_reduction", "steps", "batch_size", "lr", "lr_schedule", "momentum",
               "weight_decay", "eval_every", "eval_subset", "probe_schedule", "probe_points",
               "probe_batch_size", "dtype")

CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --undecided: #7d6608; --error: #8250df; --muted: #57606a;
        --line: #d0d7de; --bg2: #f6f8fa; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; font-size: 15px;
       line-height: 1.45; color: #1f2328; max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 28px; margin: 0 0 4px; } h2 { font-size: 22px; margin: 40px 0 6px; padding-top: 12px;
     border-top: 3px solid var(--line); } h3 { font-size: 17px; margin: 24px 0 8px; }
.muted, .generated { color: var(--muted); } .generated { margin: 0 0 16px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; width: 100%; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg2); font-weight: 600; } td.num { text-align: right; white-space: nowrap; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--bg2); border: 1px solid var(--line); padding: 8px 10px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-word; }
.badge { display: inline-block; min-width: 92px; text-align: center; padding: 1px 8px; border-radius: 10px;
         color: #fff; font-weight: 700; font-size: 12px; letter-spacing: .03em; }
.PASS { background: var(--pass); } .FAIL { background: var(--fail); }
.UNDECIDED { background: var(--undecided); } .ERROR { background: var(--error); }
.status-diverged { color: var(--fail); font-weight: 600; } .status-incomplete { color: var(--undecided);
  font-weight: 600; } .status-done { color: var(--pass); }
.counts span { margin-right: 14px; }
.note { border-left: 4px solid var(--undecided); background: #fff8c5; padding: 6px 10px; margin: 8px 0; }
.error { border-left: 4px solid var(--error); background: #fbefff; padding: 6px 10px; margin: 8px 0; }
.diverged { border-left: 4px solid var(--fail); background: #ffebe9; padding: 6px 10px; margin: 8px 0; }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; }
details { margin: 6px 0; } summary { cursor: pointer; color: #0969da; }
nav ul { margin: 4px 0; padding-left: 20px; } a { color: #0969da; text-decoration: none; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def verdict_label(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "ERROR"
    return {True: "PASS", False: "FAIL"}.get(row.get("passed"), "UNDECIDED")


def _badge(label: str) -> str:
    return f'<span class="badge {label}">{label}</span>'


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (float, np.floating)):
        return "nan" if value != value else f"{float(value):.4g}"
    return str(value)


def _fmt_ours(value: Any) -> str:
    """The experiment's measured value: text as given; numbers, {mean, std/min/max} and lists of
    per-seed numbers as mean ± spread."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "mean" in value:
        m = _num(value["mean"])
        if "std" in value:
            return f"{m} ± {_num(value['std'])} (mean ± std)"
        if "min" in value and "max" in value:
            return f"{m} (min {_num(value['min'])}, max {_num(value['max'])})"
        return m
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        arr = np.asarray(value, dtype=float)
        std = arr.std(ddof=1) if arr.size > 1 else 0.0
        return f"{_num(arr.mean())} ± {_num(std)} (mean ± std, n={arr.size})"
    return _num(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], raw: bool = False) -> str:
    """``rows`` cells are escaped unless ``raw`` (then the caller escaped them)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td>{c if raw else esc(c)}</td>" for c in row)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_table(rows: Sequence[dict[str, Any]]) -> str:
    """A list of dicts as a table: columns in the first row's key order, numbers formatted."""
    if not rows:
        return '<p class="muted">(empty)</p>'
    headers = list(rows[0])
    return _table(headers, ([format_cell(r.get(h)) for h in headers] for r in rows))


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_cell(v) for v in value)
    return str(value)


def _paragraphs(text: str) -> str:
    """Plain text with blank-line paragraphs and "- " / "* " bullet lines, escaped."""
    out: list[str] = []
    for block in inspect.cleandoc(text).split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        items: list[str] = []
        para: list[str] = []
        for ln in lines:
            s = ln.strip()
            if s.startswith(("- ", "* ")):
                items.append(s[2:])
            elif items and ln.startswith((" ", "\t")):
                items[-1] += " " + s
            else:
                if items:
                    out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
                    items = []
                para.append(s)
        if para:
            out.append(f"<p>{esc(' '.join(para))}</p>")
        if items:
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
    return "".join(out)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


# --- the page -----------------------------------------------------------------------------------------

def render(report: Any) -> str:
    rows = report.rows
    labels = [verdict_label(r) for r in rows]
    counts = {k: labels.count(k) for k in ("PASS", "FAIL", "UNDECIDED", "ERROR")}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>bnlab report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>bnlab report</h1>",
        f'<p class="generated">Generated <time>{esc(report.generated)}</time> from the runs in '
        f"<code>{esc(report.out_dir)}</code>. Read from stored runs only; nothing was trained to "
        "make this page.</p>",
        '<p class="counts">' + "".join(
            f"<span>{_badge(k)} {v}</span>" for k, v in counts.items() if v or k != "ERROR") + "</p>",
        _toc(report),
        "<h2 id=\"summary\">Verdicts</h2>",
        "<p class=\"muted\">Each row is one claim of the papers, checked on the stored runs: the paper's "
        "number, ours (mean ± spread over seeds, as the experiment states it), how many seeds it saw, "
        "and why it passed or not. UNDECIDED: the runs cannot decide it (too few seeds, unfinished "
        "runs, or a claim the scaled-down run cannot test).</p>",
        _summary_table(report),
    ]
    if report.missing:
        parts.append('<div class="note">Requested but without runs in this directory: '
                     + ", ".join(f"<code>{esc(m)}</code>" for m in report.missing)
                     + f". Run them with <code>bnlab run NAME --out {esc(report.out_dir)}</code>.</div>")
    for s in report.sections:
        parts.append(_section(s, report.out_dir))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _toc(report: Any) -> str:
    items = "".join(f'<li><a href="#{s.anchor}">{esc(s.title)}</a> <span class="muted">— '
                    f"{len(s.results.runs)} run{'s' if len(s.results.runs) != 1 else ''}</span></li>"
                    for s in report.sections)
    return f'<nav><strong>Experiments</strong><ul>{items}</ul></nav>'


def _summary_table(report: Any) -> str:
    rows = report.rows
    if not rows:
        return '<p class="muted">No verdict rows (no experiment here declares a verdict, or none finished).</p>'
    anchors = {(s.name, s.profile): s.anchor for s in report.sections}
    body = []
    for r in rows:
        link = f'<a href="#{anchors.get((r["experiment"], r["profile"]), "")}">{esc(r["experiment"])}</a>'
        prof = esc(r.get("profile", ""))
        body.append([link + (f'<br><span class="muted">{prof}</span>' if prof else ""),
                     esc(r.get("claim", "")), esc(r.get("paper", "")), esc(_fmt_ours(r.get("ours", ""))),
                     esc(_num(r.get("seeds"))), _badge(verdict_label(r)), esc(r.get("why", ""))])
    return _table(["experiment", "claim", "paper", "ours", "seeds", "result", "why"], body, raw=True)


def _section(s: Any, out_dir: Path) -> str:
    exp = s.experiment
    out = [f'<section id="{s.anchor}">', f"<h2>{esc(s.title)}</h2>"]
    if exp is not None:
        if getattr(exp, "description", ""):
            out.append(f"<p>{esc(exp.description)}</p>")
        if getattr(exp, "paper", ""):
            out.append(f"<p><strong>Paper:</strong> {esc(exp.paper)}</p>")
    n_done = sum(r.status == "done" for r in s.results.runs)
    out.append(f'<p class="muted">{len(s.results.runs)} runs: {n_done} done, {len(s.diverged)} diverged, '
               f"{len(s.incomplete)} incomplete.</p>")
    for note in s.notes:
        out.append(f'<div class="note">{esc(note)}</div>')
    if s.diverged:
        items = "".join(
            f"<li>variant <code>{esc(r.variant)}</code> (<code>{esc(r.config_hash[:8])}</code>) "
            f"seed {esc(r.seed)}: at step {esc(r.diverged_step)}, training loss "
            f"{esc(r.done_info.get('diverged_loss') or 'non-finite')}</li>"
            for r in sorted(s.diverged, key=lambda r: (r.variant, r.config_hash, r.seed)))
        out.append(f'<div class="diverged"><strong>Diverged runs</strong> (the loss became non-finite; '
                   "divergence is a result: the run stopped there and is recorded as such):"
                   f"<ul>{items}</ul></div>")
    if s.incomplete:
        items = "".join(f"<li>variant <code>{esc(r.variant)}</code> (<code>{esc(r.config_hash[:8])}</code>) "
                        f"seed {esc(r.seed)}: reached step {esc(_last_step(r))} of {esc(r.config.steps)}</li>"
                        for r in sorted(s.incomplete, key=lambda r: (r.variant, r.config_hash, r.seed)))
        out.append('<div class="note"><strong>Incomplete runs</strong> (no done marker: killed or still '
                   "running; <code>bnlab run</code> with the same arguments resumes them). They are not in "
                   f"the verdict or the figures:<ul>{items}</ul></div>")

    out.append("<h3>Verdict</h3>")
    if s.verdict_error is not None:
        out.append('<div class="error"><strong>The verdict function raised an error</strong>; the runs '
                   f"below are intact. {esc(s.verdict_error.strip().splitlines()[-1])}</div>"
                   f"<details><summary>traceback</summary><pre>{esc(s.verdict_error)}</pre></details>")
    elif s.rows:
        body = [[esc(r.get("claim", "")), esc(r.get("paper", "")), esc(_fmt_ours(r.get("ours", ""))),
                 esc(_num(r.get("seeds"))), _badge(verdict_label(r)), esc(r.get("why", ""))] for r in s.rows]
        out.append(_table(["claim", "paper", "ours", "seeds", "result", "why"], body, raw=True))
    else:
        out.append('<p class="muted">No verdict for these runs.</p>')

    for title, rows in s.tables.items():
        out.append(f"<h3>{esc(title)}</h3>")
        out.append(data_table(rows))

    out.append("<h3>Results over seeds</h3>")
    out.append(_results_table(s))

    out.append("<h3>Figures</h3>")
    out.append(_figures(s, out_dir))

    out.append("<h3>What is measured</h3>")
    out.append(_definitions(s))

    out.append("<h3>Settings</h3>")
    out.append(_settings(s))

    out.append("<h3>Deviations from the paper</h3>")
    out.append(_deviations(s))

    out.append("<h3>Runs</h3>")
    out.append(_runs_table(s, out_dir))

    out.append("<h3>Environment</h3>")
    out.append(_environment(s))

    if exp is not None:
        path, doc = _module_doc(exp)
        if doc:
            out.append(f"<details><summary>protocol and choices ({esc(path)} docstring)</summary>"
                       f"{_paragraphs(doc)}</details>")
    out.append("</section>")
    return "\n".join(out)


# --- pieces of a section ------------------------------------------------------------------------------

def _results_table(s: Any) -> str:
    body = []
    left_out = {id(r) for r in s.excluded}
    for (variant, h), runs in _config_groups(s).items():
        done = [r for r in runs if r.status == "done"]
        if any(id(r) in left_out for r in runs):
            used = "no (other config)"
        elif all(r.status == "incomplete" for r in runs):
            used = "no (unfinished)"
        else:
            used = "yes"
        cells = [esc(variant), f"<code>{esc(h[:8])}</code>", esc(len(done)),
                 esc(sum(r.status == "diverged" for r in runs)), esc(sum(r.status == "incomplete" for r in runs))]
        for key in ("acc", "loss"):
            vals = [(r.done_info.get("test") or {}).get(key) for r in done]
            vals = np.asarray([v for v in vals if v is not None], dtype=float)
            if vals.size == 0:
                cells.append("–")
            elif vals.size == 1:
                cells.append(f"{_num(vals[0])} (1 seed)")
            else:
                cells.append(f"{_num(vals.mean())} ± {_num(vals.std(ddof=1))} "
                             f'<span class="muted">[{_num(vals.min())}, {_num(vals.max())}]</span>')
        cells.append(esc(used))
        body.append(cells)
    return (_table(["variant", "config", "done", "diverged", "incomplete", "test accuracy", "test loss",
                    "in verdict"], body, raw=True)
            + '<p class="muted">Full test split at the end of each finished run: mean ± sample std over '
              "seeds, [min, max] in brackets. Diverged and incomplete runs have no final value.</p>")


def _figures(s: Any, out_dir: Path) -> str:
    out = []
    if s.plot_error is not None:
        out.append('<div class="error"><strong>The plot function raised an error</strong>. '
                   f"{esc(s.plot_error.strip().splitlines()[-1])}</div>"
                   f"<details><summary>traceback</summary><pre>{esc(s.plot_error)}</pre></details>")
    if not s.figures and s.plot_error is None:
        out.append('<p class="muted">No figures.</p>')
    for i, f in enumerate(s.figures, 1):
        rel = esc(_rel(f.path, out_dir))
        caption = esc(f.caption) if f.caption else esc(f.path.stem.replace("_", " "))
        if f.data is None:
            out.append(f"<p>Figure {i}: <code>{rel}</code> (not an image type the report inlines)</p>")
            continue
        uri = f"data:{f.mime};base64,{base64.b64encode(f.data).decode('ascii')}"
        out.append(f'<figure><img src="{uri}" alt="Figure {i}: {caption}">'
                   f"<figcaption><strong>Figure {i}.</strong> {caption} "
                   f'<span class="muted">(file: <code>{rel}</code>)</span></figcaption></figure>')
    return "\n".join(out)


def _same(values: list[Any], none_text: str, varies_text: str) -> str:
    """The one value all configs share, as text (``none_text`` for None, ``varies_text`` if they differ)."""
    if not values or any(v != values[0] for v in values):
        return varies_text
    return none_text if values[0] is None else str(values[0])


def _definitions(s: Any) -> str:
    exp = s.experiment
    cfgs = [r.config for r in s.results.runs]
    rows: list[tuple[str, str, str]] = []
    custom = getattr(exp, "definitions", None) if exp is not None else None
    for item in custom or ():
        q, d, c = (list(item) + ["", "", ""])[:3]
        rows.append((str(q), str(d), str(c)))
    pbs = _same([c.probe_batch_size for c in cfgs], "?", "probe_batch_size, see settings")
    for probe in getattr(exp, "probes", ()) if exp is not None else ():
        fn = getattr(probe.fn, "func", probe.fn)
        doc = inspect.getdoc(fn) or ""
        if not doc:
            mod = inspect.getmodule(fn)
            doc = inspect.cleandoc(mod.__doc__) if mod is not None and mod.__doc__ else "(no docstring)"
        calls = sorted({len(probe.steps(c)) for c in cfgs})
        calls_txt = "/".join(str(c) for c in calls) or "?"
        cost = (f"{probe.cost:g} forward+backward pass equivalents on the probe batch "
                f"({pbs} examples) per call; "
                f"{calls_txt} calls per run")
        rows.append((f"probe: {probe.name}", doc, cost))
    ev = _same([c.eval_subset for c in cfgs], "all", "eval_subset (see settings)")
    every = _same([c.eval_every for c in cfgs], "?", "eval_every (see settings)")
    log_every = _same([c.log_every for c in cfgs], "?", "log_every (see settings)")
    rows += [
        ("train loss / acc",
         "Loss (the config's loss and reduction) and accuracy of the training minibatch at step s, in "
         "training mode (BN normalizes with the minibatch's own statistics), from the forward pass of "
         f"the update at s, before that update; every {log_every} step(s).",
         "0 extra passes (the update's own forward pass)"),
        ("eval acc / loss",
         f"Accuracy and mean per-example loss on a fixed subset of {ev} "
         "test examples (the same for every seed: chosen with data_seed), model in eval mode (BN uses its "
         f"running statistics); every {every} steps and at the last step.",
         "1 forward pass over the subset per evaluation"),
        ("test acc / loss",
         "The same on the full test split, once, at the end of a finished run (the 'final' value in the "
         "verdicts and the results table).",
         "1 forward pass over the test split"),
    ]
    body = [[f"<strong>{esc(q)}</strong>", _paragraphs(d) if "\n" in d else esc(d), esc(c)] for q, d, c in rows]
    return _table(["quantity", "definition (paper's equation / figure)", "cost"], body, raw=True)


def _config_groups(s: Any) -> dict[tuple[str, str], list[Any]]:
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in s.results.runs:
        groups.setdefault((r.variant, r.config_hash), []).append(r)
    # The experiment's declared variant order (the paper's table order), unknown variants last.
    order = {v: i for i, v in enumerate(getattr(s.experiment, "variants", None) or {})}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0])))


def _seed_status(runs: list[Any]) -> str:
    parts = []
    for r in sorted(runs, key=lambda r: r.seed):
        if r.status == "done":
            parts.append(f"{r.seed}")
        elif r.status == "diverged":
            parts.append(f'<span class="status-diverged">{r.seed} (diverged @ {esc(r.diverged_step)})</span>')
        else:
            parts.append(f'<span class="status-incomplete">{r.seed} (incomplete)</span>')
    return ", ".join(parts)


def _settings(s: Any) -> str:
    groups = _config_groups(s)
    dicts = {k: config_to_dict(rs[0].config) for k, rs in groups.items()}
    keys = list(next(iter(dicts.values())).keys()) if dicts else []
    varying = [k for k in keys if len({json.dumps(d[k]) for d in dicts.values()}) > 1]
    headers = ["variant", "config", "seeds"] + varying
    body = []
    for (variant, h), rs in groups.items():
        d = dicts[(variant, h)]
        body.append([esc(variant), f"<code>{esc(h[:8])}</code>", _seed_status(rs)]
                    + [esc(_num(tuple(d[k]) if isinstance(d[k], list) else d[k])) for k in varying])
    out = [_table(headers, body, raw=True)]
    shared = [k for k in _KEY_FIELDS if k in keys and k not in varying]
    if shared and dicts:
        first = next(iter(dicts.values()))
        items = ", ".join(f"{k}={_num(first[k])}" for k in shared if first[k] is not None)
        out.append(f'<p class="muted">Shared by every run: <code>{esc(items)}</code>. '
                   + ("Columns after <em>seeds</em> are the fields that differ between the configs."
                      if varying else "All configs are identical.") + "</p>")
    for variant, h in groups:
        text = json.dumps(dicts[(variant, h)], indent=2)
        out.append(f"<details><summary>full config of <code>{esc(variant)}</code> "
                   f"(<code>{esc(h[:8])}</code>)</summary><pre>{esc(text)}</pre></details>")
    return "\n".join(out)


def _deviations(s: Any) -> str:
    exp = s.experiment
    items: list[str] = []
    if exp is not None and getattr(exp, "notes", ""):
        items.append("<strong>Documented choices and deviations (the experiment's notes):</strong>"
                     + _paragraphs(exp.notes))
    datasets: dict[tuple, list[Any]] = {}
    for r in s.results.runs:
        try:
            d = r.dataset
        except BnlabError:
            d = {}
        key = (d.get("requested"), d.get("used"), d.get("note") or "", d.get("source") or "")
        datasets.setdefault(key, []).append(r)
    for (requested, used, note, source), runs in datasets.items():
        who = _who(runs)
        if requested and used and requested != used:
            items.append(f"<strong>Dataset fallback</strong> ({who}): asked for <code>{esc(requested)}</code>, "
                         f"used <code>{esc(used)}</code>. {esc(note)}")
        elif note:
            items.append(f"<strong>Dataset</strong> ({who}): <code>{esc(used)}</code>. {esc(note)}")
        if source:
            items.append(f"Data source ({who}): {esc(source)}")
    for (variant, h), rs in _config_groups(s).items():
        dev = _config_deviation(exp, rs[0])
        if isinstance(dev, str):
            items.append(f"<code>{esc(variant)}</code> (<code>{esc(h[:8])}</code>): {esc(dev)}")
        elif dev:
            changes = ", ".join(f"{k}={_num(b)} (declared {_num(a)})" for k, (a, b) in dev.items())
            items.append(f"<strong>Overridden settings</strong> (<code>--set</code>) of "
                         f"<code>{esc(variant)}</code> (<code>{esc(h[:8])}</code>, {_who(rs)}): {esc(changes)}")
    if not items:
        return '<p class="muted">None recorded.</p>'
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _who(runs: list[Any]) -> str:
    if len(runs) > 4:
        return f"{len(runs)} runs"
    return esc(", ".join(f"{r.variant}/seed{r.seed}" for r in runs))


def _last_step(r: Any) -> Any:
    try:
        steps = [rec.get("step") for rec in r.metrics if isinstance(rec.get("step"), int)]
    except BnlabError as err:
        return f"unreadable ({err})"
    return max(steps) if steps else 0


def _runs_table(s: Any, out_dir: Path) -> str:
    body = []
    for r in sorted(s.results.runs, key=lambda r: (r.variant, r.config_hash, r.seed)):
        test = r.done_info.get("test") or {}
        if r.status == "done":
            status = '<span class="status-done">done</span>'
            steps = esc(r.done_info.get("steps", r.config.steps))
        elif r.status == "diverged":
            status = f'<span class="status-diverged">diverged at step {esc(r.diverged_step)}</span>'
            steps = esc(r.diverged_step)
        else:
            status = ('<span class="status-incomplete">incomplete</span> <span class="muted">(no done marker: '
                      "killed or still running; `bnlab run` resumes it)</span>")
            steps = f"{esc(_last_step(r))} of {esc(r.config.steps)}"
        secs = r.done_info.get("seconds_last_attempt")
        resumed = r.done_info.get("resumed_from")
        body.append([esc(r.variant), esc(r.seed), status, steps, esc(_num(test.get("acc"))),
                     esc(_num(test.get("loss"))),
                     esc(f"{secs:.1f}s" if isinstance(secs, (int, float)) else "–")
                     + (f' <span class="muted">(resumed at {esc(resumed)})</span>' if resumed else ""),
                     f"<code>{esc(_rel(r.run_dir, out_dir))}</code>"])
    return _table(["variant", "seed", "status", "steps", "test acc", "test loss", "time", "directory"],
                  body, raw=True)


def _environment(s: Any) -> str:
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
    body = [[esc(v) for v in key] + [esc(len(rs))] for key, rs in combos.items()]
    return _table(["python", "torch", "numpy", "bnlab", "threads (intra / inter-op)", "cpu cores", "machine",
                   "host", "git commit", "runs"], body, raw=True)


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
    try:
        declared = exp.config(r.variant, r.profile)
    except Exception as err:  # variant or profile no longer declared
        why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"cannot compare with the declared config ({why})"
    return config_diff(declared, r.config)
