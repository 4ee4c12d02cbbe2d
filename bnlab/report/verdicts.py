"""Verdict rows as the report and the CLI show them: one outcome per row, formatted numbers.

A verdict row (written by an experiment's ``verdict``; the schema is documented in
``bnlab.experiments``) carries ``outcome`` (PASS / FAIL / TIE / UNDECIDED), an estimate with a
confidence interval, the rule that decides it, per-seed values and, when the robustness grid ran,
the outcome per setting. Rows of older bnlab versions (claim, paper, ours, seeds, passed, why) are
read too: ``passed`` True/False/None becomes PASS/FAIL/UNDECIDED.

Smoke runs decide nothing: they check that the pipeline works (1 seed, a few steps, small data).
``apply_profile_policy`` turns every outcome of a smoke-profile row into UNDECIDED and keeps what
the rule computed in ``computed_outcome``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from bnlab.numfmt import fmt_ci, fmt_pm, fmt_value, values_decimals

OUTCOMES = ("PASS", "FAIL", "TIE", "UNDECIDED")
LABELS = (*OUTCOMES, "ERROR")
# Profiles whose runs check the pipeline only: their rows never decide a claim.
# The reason is one plain sentence, shown on every such row; PROFILE_NOTES says it once at the top.
UNDECIDING_PROFILES = {"smoke": "smoke run: checks the pipeline, decides nothing"}
PROFILE_NOTES = {"smoke": "Smoke runs check that the pipeline works (1 seed, a few steps, small data); they "
                          "decide no claim, so every outcome is UNDECIDED. Run --profile quick or paper for "
                          "verdicts."}

__all__ = ["LABELS", "OUTCOMES", "PROFILE_NOTES", "UNDECIDING_PROFILES", "apply_profile_policy", "ci_text", "counts",
           "estimate_text", "interval_text", "ours_text", "outcome_of", "per_seed_compact", "per_seed_table",
           "robustness_grid", "seeds_text", "short_reason"]


def outcome_of(row: dict[str, Any]) -> str:
    """PASS / FAIL / TIE / UNDECIDED, or ERROR for a verdict function that raised."""
    if row.get("error"):
        return "ERROR"
    outcome = str(row.get("outcome") or "").upper()
    if outcome in OUTCOMES:
        return outcome
    return {True: "PASS", False: "FAIL"}.get(row.get("passed"), "UNDECIDED")


def apply_profile_policy(rows: Iterable[dict[str, Any]], profile: str | None) -> list[dict[str, Any]]:
    """Copies of ``rows``; at a profile that decides nothing (smoke), each outcome becomes UNDECIDED
    with the reason in ``undecided_reason`` and the rule's own result in ``computed_outcome``."""
    out = []
    reason = UNDECIDING_PROFILES.get(profile or "")
    for r in rows:
        r = dict(r)
        if reason is not None and not r.get("error") and "computed_outcome" not in r:
            r["computed_outcome"] = outcome_of(r)
            r["outcome"], r["passed"], r["undecided_reason"] = "UNDECIDED", None, reason
        out.append(r)
    return out


def counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    labels = [outcome_of(r) for r in rows]
    return {k: labels.count(k) for k in LABELS}


def ci_text(row: dict[str, Any]) -> str:
    """"0.081 [0.052, 0.110] (95% CI)" (the estimate with its interval), else "none: <reason>" when
    the row has an estimate or a stated reason (never a bare estimate), else ""."""
    ci = row.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        level = row.get("ci_level")
        tag = f" ({level * 100:g}% CI)" if isinstance(level, (int, float)) else " (CI)"
        return fmt_ci(row.get("estimate"), ci[0], ci[1]) + tag
    if row.get("no_ci_reason"):
        return f"none: {row['no_ci_reason']}"
    if isinstance(row.get("estimate"), (int, float)):
        return "none: the verdict gives no interval for this estimate"
    return ""


def _ci_pair(row: dict[str, Any]) -> tuple[float, float] | None:
    ci = row.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def estimate_text(row: dict[str, Any]) -> str:
    """The estimate alone ("+0.081"), at the precision of its interval when there is one; "" without
    a numeric estimate."""
    est = row.get("estimate")
    if not isinstance(est, (int, float)) or isinstance(est, bool):
        return ""
    items = row.get("per_seed") if isinstance(row.get("per_seed"), list) else []
    if row.get("kind") == "seed_count" and items:  # a count of seeds, not an accuracy: say so
        yes = sum(it.get("outcome") is True for it in items if isinstance(it, dict))
        return f"{yes}/{len(items)} seeds"
    ci = _ci_pair(row)
    text = fmt_value(est) if ci is None else fmt_ci(est, *ci).split(" [", 1)[0]
    paired = any("diff" in it for it in row.get("per_seed") or [] if isinstance(it, dict))
    return "+" + text if paired and est > 0 else text  # a difference shows its sign, as per seed


def interval_text(row: dict[str, Any]) -> str:
    """The interval alone ("[0.052, 0.110]"), at the same precision as ``estimate_text``; "" without."""
    ci = _ci_pair(row)
    if ci is None:
        return ""
    text = fmt_ci(row.get("estimate"), *ci)
    return text[text.index("["):]


def short_reason(text: Any) -> str:
    """The first clause of a reason ("1 seed: no interval can be formed (needs >= 2)" -> "1 seed")."""
    text = str(text or "").strip()
    for sep in (": ", "; "):
        text = text.split(sep, 1)[0]
    return text


def per_seed_compact(row: dict[str, Any]) -> list[str]:
    """One short entry per declared seed, in seed order: the paired difference (at the precision of
    their spread), "yes"/"no" for per-seed outcomes, or the run status when there is no value; for
    rows whose seeds carry several arms and neither (a decided rule), "k runs"."""
    items = row.get("per_seed")
    if not isinstance(items, list) or not items:
        return []
    if any(it.get("diff") is not None for it in items) or any("diff" in it for it in items):
        diffs = [it.get("diff") for it in items]
        d = values_decimals([v for v in diffs if isinstance(v, (int, float))])
        out = []
        for it, v in zip(items, diffs):
            if isinstance(v, (int, float)):
                out.append(fmt_value(v, d) if v < 0 else "+" + fmt_value(v, d))
            else:
                bad = [st for st in (it.get("status") or {}).values() if st not in ("done", None)]
                out.append(bad[0] if bad else "–")
        return out
    if row.get("kind") == "decided":
        return [f"{len(it.get('status') or it.get('values') or {})} runs" for it in items]
    if any("outcome" in it for it in items):
        return [{True: "yes", False: "no"}.get(it.get("outcome"), "–") for it in items]
    return [f"{len(it.get('status') or it.get('values') or {})} runs" for it in items]


def seeds_text(row: dict[str, Any]) -> str:
    """"5 seeds (1 diverged, 1 collapsed)"; older rows: their ``seeds`` count."""
    n = row.get("n_seeds", row.get("seeds"))
    if n is None and isinstance(row.get("per_seed"), list):
        n = len(row["per_seed"])
    if n is None:
        return "–"
    text = f"{n} seed{'s' if n != 1 else ''}" if isinstance(n, int) else str(n)
    extra = [f"{row[k]} {k[2:]}" for k in ("n_diverged", "n_collapsed") if row.get(k)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _cell(value: Any, decimals: int | None) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt_value(value, decimals)
    return fmt_value(value) if value is None else str(value)


def per_seed_table(row: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """(headers, rows) of the per-seed values: seed, one column per measured arm, the paired
    difference, each arm's run status; every column at the precision of its own spread."""
    items = row.get("per_seed")
    if not isinstance(items, list) or not items:
        return None
    keys: list[str] = []
    for it in items:
        for k in (it.get("values") or {}):
            if k not in keys:
                keys.append(k)
    has_diff = any(it.get("diff") is not None for it in items)
    cols = {k: [(it.get("values") or {}).get(k) for it in items] for k in keys}
    dec = {k: values_decimals([v for v in vals if isinstance(v, (int, float))]) for k, vals in cols.items()}
    diffs = [it.get("diff") for it in items]
    ddec = values_decimals([v for v in diffs if isinstance(v, (int, float))])
    headers = ["seed", *keys] + (["difference"] if has_diff else []) + ["status"]
    body = []
    for it in items:
        status = it.get("status")
        if isinstance(status, dict):
            status_text = ", ".join(f"{k}: {v}" for k, v in status.items())
        else:
            status_text = "" if status is None else str(status)
        body.append([str(it.get("seed", "?")), *[_cell((it.get("values") or {}).get(k), dec[k]) for k in keys]]
                    + ([_cell(it.get("diff"), ddec)] if has_diff else []) + [status_text])
    return headers, body


def robustness_grid(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Claims x settings, for the rows that carry ``robustness``: (settings in first-seen order,
    one entry per claim: {"claim_id", "claim", "label", "cells": {setting: {"outcome", "text"}}})."""
    settings: list[str] = []
    claims = []
    for r in rows:
        rob = r.get("robustness")
        if not isinstance(rob, dict) or not rob.get("settings"):
            continue
        cells = {}
        for s in rob["settings"]:
            name = str(s.get("setting", "?"))
            if name not in settings:
                settings.append(name)
            ci = s.get("ci")
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
                text = fmt_ci(s.get("estimate"), ci[0], ci[1])
            elif isinstance(s.get("estimate"), (int, float)):
                text = fmt_value(s["estimate"])
            else:
                text = ""
            if s.get("n_seeds") is not None:
                text += f" (n={s['n_seeds']})"
            cells[name] = {"outcome": outcome_of(s), "text": text.strip()}
        label = rob.get("label") or (f"holds in {rob['holds']}/{rob['of']}" if "holds" in rob and "of" in rob else "")
        claims.append({"row": r, "label": label, "cells": cells})
    if not claims:
        return None
    return settings, claims


def ours_text(value: Any) -> str:
    """The experiment's measured value: text as given; numbers, {mean, std/min/max} and lists of
    per-seed numbers as mean ± sample std (ddof=1) with the digits the spread allows."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "mean" in value:
        if "std" in value:
            return f"{fmt_pm(value['mean'], value['std'])} (mean ± std)"
        if "min" in value and "max" in value:
            d = values_decimals([value["min"], value["max"]])
            return f"{fmt_value(value['mean'], d)} (min {fmt_value(value['min'], d)}, max {fmt_value(value['max'], d)})"
        return fmt_value(value["mean"])
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        vals = [float(v) for v in value]
        mean = sum(vals) / len(vals)
        if len(vals) == 1:
            return f"{fmt_value(mean)} (1 seed)"
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        return f"{fmt_pm(mean, std)} (mean ± std, n={len(vals)})"
    return fmt_value(value) if value is None or isinstance(value, (int, float)) else str(value)
