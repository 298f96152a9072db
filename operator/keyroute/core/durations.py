"""Durations as users write them (``60s``, ``1h``, ``6m0s``, ``1.5s``, ``20ms``) and as providers send them.

One parser serves the CRDs (Go-style duration strings, the Kubernetes convention) and the
``x-ratelimit-reset-*`` headers, which use the same notation.
"""

from __future__ import annotations

import math
import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
# Anchored form used by the CRD schema too (kept in sync by a test).
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h|d))+$"
_FULL = re.compile(DURATION_PATTERN)


class DurationError(ValueError):
    """A string that is not a duration."""


def parse_duration(text: str | float | int) -> float:
    """Return seconds for ``text``; plain numbers are seconds.

    >>> parse_duration("6m0s")
    360.0
    """
    if isinstance(text, bool):
        raise DurationError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if text < 0 or not math.isfinite(text):
            raise DurationError(f"negative duration: {text!r}")
        return float(text)
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0 or not math.isfinite(value):
            raise DurationError(f"not a duration: {text!r}")
        return value
    if not _FULL.match(s):
        raise DurationError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h30m, 500ms)")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(s))


def format_duration(seconds: float) -> str:
    """Format seconds the way users write durations: ``90`` → ``1m30s``, ``0.5`` → ``500ms``.

    Rounded to the millisecond, the finest unit that matters for cooldowns and timeouts.
    """
    ms_total = round(seconds * 1000)
    if ms_total < 1000:
        return f"{ms_total}ms"
    whole, ms = divmod(ms_total, 1000)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s or ms or not out:
        out += f"{s}.{ms:03d}".rstrip("0").rstrip(".") + "s" if ms else f"{s}s"
    return out
