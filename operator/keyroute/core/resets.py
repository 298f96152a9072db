"""Reset times: when a provider says a limited credential may be tried again (docs/errors.md).

A provider's own reset always beats a configured cooldown, so it is worth reading every dialect:
``Retry-After`` (seconds or HTTP date), OpenAI's ``retry-after-ms``, the ``x-ratelimit-reset-requests``
/ ``-tokens`` Go-style durations (``6m0s``, ``1.5s``, ``20ms``), Anthropic's ``anthropic-ratelimit-*-reset``
timestamps, the bare ``x-ratelimit-reset`` number, and reset fields inside JSON error bodies.

Everything here is a pure function of its input and ``now`` (wall-clock epoch seconds): the answer is an
absolute time on the same clock, or ``None``. Provider input is untrusted, so nothing here raises.

Decisions where the spec is silent:

- Several signals present: the **latest** one wins. Providers send a reset for each limit (requests,
  tokens, input, output) on every answer; waiting for the latest avoids a second 429 from the limit that
  resets last. Only Anthropic's four per-limit headers and the representative
  ``anthropic-ratelimit-unified-reset`` are read; the per-window ``unified-5h``/``unified-7d`` resets
  are not, because the 7-day window would bench a key for days after a 5-hour limit.
- Validity: a delta must be >= 0 (``Retry-After: 0`` means "now" and is honoured); an absolute time
  before ``now`` is stale or clock skew and is ignored, so the caller's configured cooldown applies
  rather than an instant retry of a key that just said 429. Anything more than 7 days ahead is absurd
  and ignored. NaN/inf, booleans and unparsable text are ignored.
- Bare numbers (``x-ratelimit-reset``, numeric ``anthropic-*`` values): below 1e9 a delta in seconds,
  below 1e11 epoch seconds, above that epoch milliseconds. A non-numeric ``x-ratelimit-reset`` is tried
  as a Go duration. Body ``resets_at`` is always absolute (epoch s, epoch ms, or an ISO 8601 string).
- Body shapes: the fields are looked for at the top level, under ``error``, under ``error.metadata``
  and under ``error.details`` (a dict, or a list of dicts as Google sends, whose ``RetryInfo`` carries a
  ``retryDelay`` duration, also honoured). OpenRouter repeats the upstream's rate-limit headers under
  ``error.metadata.headers``; those are read with the header rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from keyroute.core.durations import parse_duration

#: A reset further away than this is garbage (or a unit mistake), not a plan.
MAX_AHEAD = 7 * 86400.0

# Bare numbers: below this a delta in seconds (2001-09-09 as an epoch, far past any real delta) ...
_EPOCH_S_MIN = 1e9
# ... and above this epoch milliseconds (year 5138 in seconds, 1973 in milliseconds).
_EPOCH_MS_MIN = 1e11

_DURATION_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_ANTHROPIC_HEADERS = (
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
    "anthropic-ratelimit-unified-reset",
)
# Bounds the work on a hostile body; real ``details`` lists hold a handful of entries.
_MAX_DETAILS = 16


def reset_from_headers(headers: Mapping[str, str], now: float) -> float | None:
    """The latest reset time the response headers announce, absolute on ``now``'s clock, or ``None``.

    Header names are matched case-insensitively whatever the mapping type (a plain dict in tests, a
    ``CIMultiDictProxy`` from aiohttp).
    """
    return _from_header_items(headers.items(), now)


def reset_from_body(obj: Any, now: float) -> float | None:
    """The latest reset time a parsed JSON error body announces, or ``None`` (never raises)."""
    if isinstance(obj, list):
        obj = obj[0] if obj else None
    if not isinstance(obj, dict):
        return None
    found: list[float | None] = []
    containers: list[dict[Any, Any]] = [obj]
    err = obj.get("error")
    if isinstance(err, dict):
        containers.append(err)
        meta = err.get("metadata")
        if isinstance(meta, dict):
            containers.append(meta)
            hdrs = meta.get("headers")
            if isinstance(hdrs, dict):
                found.append(_from_header_items(hdrs.items(), now))
        details = err.get("details")
        if isinstance(details, dict):
            containers.append(details)
        elif isinstance(details, list):
            containers.extend(d for d in details[:_MAX_DETAILS] if isinstance(d, dict))
    for c in containers:
        if "resets_at" in c:
            found.append(_absolute(c["resets_at"], now))
        if "resets_in_seconds" in c:
            found.append(_delta(_number(c["resets_in_seconds"]), now))
        if "retry_after" in c:
            found.append(_delta_or_duration(c["retry_after"], now))
        if "retryDelay" in c:
            found.append(_delta_or_duration(c["retryDelay"], now))
    return _latest(found)


def _from_header_items(items: Iterable[tuple[object, object]], now: float) -> float | None:
    h: dict[str, str] = {}
    for k, v in items:
        text = _text(v)
        if isinstance(k, str) and text is not None:
            h[k.lower()] = text
    found: list[float | None] = []
    if "retry-after" in h:
        found.append(_retry_after(h["retry-after"], now))
    if "retry-after-ms" in h:
        ms = _number(h["retry-after-ms"])
        found.append(_delta(None if ms is None else ms / 1000.0, now))
    for name in _DURATION_HEADERS:
        if name in h:
            found.append(_delta(_duration(h[name]), now))
    for name in _ANTHROPIC_HEADERS:
        if name in h:
            value = h[name]
            at = _iso(value)
            found.append(_valid(at, now) if at is not None else _bare_number(value, now))
    if "x-ratelimit-reset" in h:
        value = h["x-ratelimit-reset"]
        found.append(
            _bare_number(value, now) if _number(value) is not None else _delta(_duration(value), now)
        )
    return _latest(found)


def _latest(found: list[float | None]) -> float | None:
    real = [t for t in found if t is not None]
    return max(real) if real else None


def _valid(at: float | None, now: float) -> float | None:
    if at is None or not math.isfinite(at) or at < now or at > now + MAX_AHEAD:
        return None
    return at


def _delta(seconds: float | None, now: float) -> float | None:
    if seconds is None or seconds < 0:
        return None
    return _valid(now + seconds, now)


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _number(value: object) -> float | None:
    """A finite number from a JSON number or numeric string; booleans are not numbers here."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, int | float | str):
        return None
    try:
        # JSON integers are unbounded: float() of a 400-digit one overflows.
        f = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _duration(value: str) -> float | None:
    try:
        return parse_duration(value)
    except ValueError:
        return None


def _iso(value: str) -> float | None:
    """An RFC 3339 / ISO 8601 timestamp as epoch seconds; a timestamp without zone is UTC."""
    s = value.strip()
    # Every ISO timestamp starts with a four-digit year; this keeps bare numbers out of fromisoformat,
    # which reads e.g. "20250101" as a date.
    if len(s) < 10 or s[4] != "-":
        return None
    try:
        dt = datetime.fromisoformat(s)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        # Year 1 with a positive offset lands before datetime.min.
        return dt.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _retry_after(value: str, now: float) -> float | None:
    seconds = _number(value)
    if seconds is not None:
        return _delta(seconds, now)
    try:
        dt = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return _valid(dt.timestamp(), now)
    except (OverflowError, OSError, ValueError):
        return None


def _bare_number(value: str, now: float) -> float | None:
    n = _number(value)
    if n is None or n < 0:
        return None
    if n < _EPOCH_S_MIN:
        return _delta(n, now)
    return _valid(_epoch(n), now)


def _epoch(n: float) -> float:
    return n / 1000.0 if n >= _EPOCH_MS_MIN else n


def _absolute(value: object, now: float) -> float | None:
    n = _number(value)
    if n is not None:
        return _valid(_epoch(n), now)
    if isinstance(value, str):
        return _valid(_iso(value), now)
    return None


def _delta_or_duration(value: object, now: float) -> float | None:
    n = _number(value)
    if n is not None:
        return _delta(n, now)
    if isinstance(value, str):
        return _delta(_duration(value), now)
    return None
