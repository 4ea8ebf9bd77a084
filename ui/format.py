"""Numbers for people: thousands separators, percentages, durations and sizes."""

from __future__ import annotations

import math
from typing import Any


def count(value: Any) -> str:
    """12345 -> '12,345'; None or NaN -> '—'."""
    if _missing(value):
        return "—"
    return f"{int(round(float(value))):,}"


def number(value: Any, digits: int = 1) -> str:
    """1234.56 -> '1,234.6'."""
    if _missing(value):
        return "—"
    return f"{float(value):,.{digits}f}"


def percent(fraction: Any, digits: int = 1) -> str:
    """0.4237 -> '42.4 %'."""
    if _missing(fraction):
        return "—"
    return f"{100 * float(fraction):.{digits}f} %"


def duration(seconds: Any) -> str:
    """0.25 -> '250 ms', 42.3 -> '42.3 s', 95 -> '1 min 35 s', 7300 -> '2 h 1 min'."""
    if _missing(seconds):
        return "—"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60))} min"


def size(num_bytes: Any) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB', 3 * 2**30 -> '3.0 GiB'."""
    if _missing(num_bytes):
        return "—"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True
