"""One rule for printing measured numbers: the uncertainty decides how many digits are shown.

    fmt_pm(0.8728, 0.0009539)      -> "0.87280 ± 0.00095"
    fmt_pm(0.1, 1.7e-17)           -> "0.1 ± 0"
    fmt_ci(0.081, 0.052, 0.110)    -> "0.081 [0.052, 0.110]"
    fmt_value(0.87281234)          -> "0.8728"          (no spread known: 4 significant digits)
    fmt_values([0.80, 0.71, 0.9])  -> "0.80, 0.71, 0.90" (per-seed values at the precision their spread allows)

The rule: the spread (a standard deviation, a CI half-width, the range of per-seed values) is
shown with two significant digits and the value is rounded to the same decimal place; digits
beyond that are noise. A spread that is zero, or negligible next to the value (below 1e-9 of it,
i.e. floating-point round-off such as 1.7e-17), is printed as ``0`` and the value with at most
``SIG_WITHOUT_SPREAD`` significant digits, trailing zeros dropped. Very large or small magnitudes
(>= 1e6, < 1e-4 and not zero) use scientific notation. Non-finite numbers print as ``nan``/``inf``.

Pure Python (``math`` only) so that every layer (experiments, report, CLI) can use it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

SIG_SPREAD = 2  # significant digits of the spread
SIG_WITHOUT_SPREAD = 4  # significant digits of a value whose spread is unknown or negligible
_NEGLIGIBLE = 1e-9  # relative: a spread below |value| * this is round-off, shown as 0

__all__ = ["decimals_for", "fmt_ci", "fmt_pm", "fmt_value", "fmt_values"]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _nonfinite_text(x: Any) -> str | None:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x).lower()
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(xf):
        return "nan"
    if math.isinf(xf):
        return "inf" if xf > 0 else "-inf"
    return None


def decimals_for(spread: float) -> int | None:
    """Decimal places that show ``spread`` (> 0, finite) with ``SIG_SPREAD`` significant digits;
    negative means rounding to tens, hundreds, ...; None for a zero or non-finite spread."""
    if not _finite(spread) or spread <= 0:
        return None
    d = SIG_SPREAD - 1 - math.floor(math.log10(abs(spread)))
    if round(abs(spread), d) >= 10.0 ** (SIG_SPREAD - d):  # 0.000999 rounds to 0.0010, not 0.00100
        d -= 1
    return d


def _scientific(x: float) -> bool:
    return x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-4)


def fmt_value(x: Any, decimals: int | None = None) -> str:
    """``x`` rounded to ``decimals`` places (from ``decimals_for``), or to ``SIG_WITHOUT_SPREAD``
    significant digits (trailing zeros dropped) when ``decimals`` is None. Ints stay ints."""
    bad = _nonfinite_text(x)
    if bad is not None:
        return bad
    if isinstance(x, int) and decimals is None:
        return str(x)
    x = float(x)
    if decimals is None:
        if _scientific(x):
            mantissa, exp = f"{x:.{SIG_WITHOUT_SPREAD - 1}e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{exp[0]}{exp[1:].lstrip('0') or '0'}"
        if x == 0:
            return "0"
        places = max(0, SIG_WITHOUT_SPREAD - 1 - math.floor(math.log10(abs(x))))
        text = f"{x:.{places}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if decimals < 0:  # round to tens, hundreds, ...
        q = 10 ** (-decimals)
        return f"{round(x / q) * q:.0f}"
    if _scientific(x) and decimals > 8:  # tiny value with a tiny spread: keep the exponent form
        sig = max(1, decimals + math.floor(math.log10(abs(x))) + 1)
        return f"{x:.{sig - 1}e}".replace("e-0", "e-").replace("e+0", "e+")
    text = f"{x:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _negligible(value: float, spread: float) -> bool:
    return spread == 0 or (value != 0 and abs(spread) < abs(value) * _NEGLIGIBLE)


def fmt_pm(value: Any, spread: Any) -> str:
    """``value ± spread`` with the digits the spread allows (see the module docstring)."""
    bad = _nonfinite_text(value)
    if bad is not None:
        return bad
    if spread is None or not _finite(spread):
        return fmt_value(value) + ("" if spread is None else f" ± {_nonfinite_text(spread)}")
    value, spread = float(value), abs(float(spread))
    if _negligible(value, spread):
        return f"{fmt_value(value)} ± 0"
    d = decimals_for(spread)
    return f"{fmt_value(value, d)} ± {fmt_value(spread, d)}"


def fmt_ci(estimate: Any, lo: Any, hi: Any) -> str:
    """``estimate [lo, hi]``, all three at the precision of the interval's half-width."""
    if not (_finite(lo) and _finite(hi)):
        return fmt_value(estimate)
    half = abs(float(hi) - float(lo)) / 2
    ref = float(estimate) if _finite(estimate) else max(abs(float(lo)), abs(float(hi)))
    d = None if _negligible(ref, half) else decimals_for(half)
    est = fmt_value(estimate, d) if estimate is not None else None
    bounds = f"[{fmt_value(float(lo), d)}, {fmt_value(float(hi), d)}]"
    return f"{est} {bounds}" if est is not None else bounds


def fmt_values(values: Iterable[Any], decimals: int | None = None) -> str:
    """Several measurements of one quantity (e.g. per seed), comma-separated, at the precision of
    their spread (max - min) unless ``decimals`` is given."""
    vals = list(values)
    if decimals is None:
        decimals = values_decimals(vals)
    return ", ".join(fmt_value(v, decimals) for v in vals)


def values_decimals(values: Sequence[Any]) -> int | None:
    """The decimal places ``fmt_values`` uses: those of the range of the finite values."""
    finite = [float(v) for v in values if _finite(v)]
    if len(finite) < 2:
        return None
    spread = max(finite) - min(finite)
    ref = max(abs(v) for v in finite)
    if _negligible(ref, spread):
        return None
    return decimals_for(spread)
