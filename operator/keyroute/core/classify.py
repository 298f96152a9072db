"""Classify an upstream answer into the docs/errors.md vocabulary: what happened, and when it may be tried again.

A pure function of (status, headers, body, now): the sidecar calls it for every non-2xx answer and
for the first event of a stream; tests call it with tables.

The class decides what happens to a credential (cooled down, benched for billing, rejected until its
Secret changes) and to the chain, so the rules lean on machine codes first and wording second, and
wording is matched on the provider's code and message fields (or the text of a non-JSON body, HTML
reduced to its title), not on every string in the body. Provider bodies are
untrusted: only the first 64 KiB is read, anything unparsable falls back to plain-text rules, and
nothing here raises. Messages are cut to 200 characters after redacting anything key-like, because
providers echo (partial) keys and the message ends up in Events and logs (secrets hygiene (docs/README.md)).

Decisions where the spec is silent:

- 429 precedence: an aggregator's upstream signal → ``UpstreamRateLimited`` (``Overloaded`` if the
  upstream said overloaded). Only structured signals and the aggregators' own phrasing count:
  OpenRouter's ``error.metadata.provider_name`` (set only when an upstream provider answered) and its
  sentence "<model> is temporarily rate-limited upstream". The bare word "upstream" does not: plain
  providers and internal gateways use it for their own limits ("upstream request limit", "rate limited
  by upstream"), and reading those as an aggregator's would fall back without benching the key that
  is actually limited.
  then codes (``usage_limit_reached`` → ``UsageLimit``; ``insufficient_quota`` and other billing codes
  → ``Billing``; ``rate_limit_exceeded``/``resource_exhausted``/``rate_limit_error`` → ``RateLimited``;
  ``overloaded_error`` → ``Overloaded``); then wording (overloaded/capacity → ``Overloaded``; quota or
  usage-limit wording with a reset more than 15 minutes away → ``UsageLimit``; rate-limit wording →
  ``RateLimited``; credit/balance/billing wording → ``Billing``; quota wording → ``Billing`` only when
  the provider gave no reset, since a nearby reset says the quota refills); else ``RateLimited``.
  Rate-limit wording beats billing wording because ``Billing`` is never shortened and messages like
  OpenRouter's "Rate limit exceeded: free-models-per-day. Add 10 credits ..." mention credits in passing.
- ``Revoked`` on 401 also matches the wording variants of the listed codes ("invalid x-api-key",
  "Incorrect API key provided", "has been revoked"/"invalidated"): all say this key value will never
  work again. A 400 that says the API key is invalid (Google's ``API_KEY_INVALID``) is ``Revoked``
  too, and a 400 that says the credit balance is too low (Anthropic) is ``Billing``: returning either
  to the agent unchanged would fail every request while other keys could serve it.
- A 400 with the explicit code ``model_not_found`` is ``ModelNotFound``; a 400 that merely mentions a
  model stays ``ClientError``. A 5xx with an ``overloaded`` code is ``Overloaded`` like 503/529.
- 413 always sets ``context_length``. 408 and every other 4xx are ``ClientError`` as the table says;
  a status outside 4xx/5xx (an unexpected redirect) is a provider fault: ``ServerError``.
- z.ai/GLM numeric codes: ``1113`` (balance) → ``Billing``; ``1302``/``1303``/``1305`` → rate limit;
  ``1308`` (plan usage window) → ``UsageLimit``.
- ``code`` is the first string found among ``error.code``, ``error.type``, ``error.status`` (then the
  same at the top level, skipping Anthropic's envelope ``"type": "error"``); an integer code that is
  just the HTTP status (OpenRouter's ``429``) is not a code.
- Messages: the provider's message (OpenRouter's upstream ``raw`` text appended after the provider
  name); sk-/Bearer tokens and 32+ character runs containing a digit become ``[redacted]``.
- In-band stream errors: the inferred status goes into ``Classification.status`` (the stream itself
  was a 200); ``reset_at`` comes from the event body only, headers being the caller's to combine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from keyroute.core.classes import ErrorClass
from keyroute.core.resets import reset_from_body, reset_from_headers


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one failed attempt.

    ``reset_at`` is an absolute time (same clock as ``now``) given by the provider, if any: it always
    wins over configured cooldowns. ``context_length`` marks a ``ClientError`` that says the prompt is
    too long, which a chain with ``fallback.contextLength`` answers with a bigger-context entry.
    ``code`` is the provider's machine code (``rate_limit_exceeded``, ``invalid_api_key`` ...) when one
    was found; ``message`` is short and never contains request or key material.
    """

    error_class: ErrorClass
    status: int | None = None
    reset_at: float | None = None
    code: str | None = None
    context_length: bool = False
    message: str = ""


#: Only this much of a body is ever looked at: error bodies are small, a huge one is not worth parsing.
BODY_LIMIT = 64 * 1024
MESSAGE_LIMIT = 200
#: A reset further away than this turns quota wording into a ``UsageLimit`` rather than a rate limit.
FAR_RESET = 15 * 60.0
# Wording is matched on at most this much of each field; keeps the regexes cheap on hostile input.
_FIELD_LIMIT = 4096
# Redaction runs on this much before the final cut, so a key straddling the cut is redacted whole.
_REDACT_WINDOW = 2048
_MAX_CODE = 64

_USAGE_CODES = frozenset({"usage_limit_reached", "usage_limit_exceeded", "1308"})
_BILLING_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "billing_error",
        "insufficient_balance",
        "insufficient_credits",
        "insufficient_funds",
        "payment_required",
        "1113",
    }
)
_RATE_CODES = frozenset(
    {
        "rate_limit_exceeded",
        "rate_limit_error",
        "rate_limited",
        "resource_exhausted",
        "too_many_requests",
        "1302",
        "1303",
        "1305",
    }
)
_OVERLOADED_CODES = frozenset({"overloaded_error", "overloaded", "server_overloaded", "engine_overloaded"})
_MODEL_CODES = frozenset({"model_not_found", "model_not_available"})
_CONTEXT_CODES = frozenset({"context_length_exceeded", "context_window_exceeded", "request_too_large"})

# All wording patterns run on lower-cased text.
_REVOKED_WORDS = re.compile(
    r"token_revoked|token_invalidated|api_key_invalid"
    r"|invalid[ _-]?(?:x-)?api[ _-]?key|incorrect api key|api[ _-]?key (?:is )?(?:not valid|invalid|expired)"
    r"|\brevoked\b|\binvalidated\b"
)
# The 400 variant: only wording that is about the key itself.
_BAD_KEY_WORDS = re.compile(
    r"api_key_invalid|invalid[ _-]?(?:x-)?api[ _-]?key|incorrect api key"
    r"|api[ _-]?key (?:is )?(?:not valid|invalid)"
)
# Money wording says billing outright; quota wording only when no nearby reset says otherwise.
_MONEY_WORDS = re.compile(r"credit|\bbalance\b|billing|payment|insufficient[ _]funds|arrears|余额|欠费|充值")
_QUOTA_WORDS = re.compile(r"quota|额度")
_BILLING_STRONG_WORDS = re.compile(
    r"credit balance|insufficient[ _](?:funds|balance|credits?)|billing|payment required|余额不足|欠费"
)
_USAGE_WORDS = re.compile(r"usage[ _-]?limit|quota|per[ -]day|daily|weekly|monthly|使用上限|额度")
_RATE_WORDS = re.compile(r"rate[ _-]?limit|too many requests|requests per|tokens per|速率|频率|并发")
_OVERLOADED_WORDS = re.compile(r"overload|capacity|过载|繁忙")
# OpenRouter's sentence when a free or shared upstream model is limited ("... is temporarily
# rate-limited upstream. Please retry shortly ..."): specific enough to be an aggregator speaking.
_UPSTREAM_WORDS = re.compile(r"\btemporarily rate[ -]limited upstream\b")
_MODEL_WORDS = re.compile(r"\bmodels?\b")
_CONTEXT_WORDS = re.compile(
    r"context[ _-]?(?:length|window)|prompt is too long|too many (?:input )?tokens|request too large"
    r"|input (?:is )?too long|reduce the length"
)

_KEYLIKE = re.compile(
    # sk-..., sk-ant-..., sk-proj-... including the masked echoes ("sk-abc***xyz"); the lookbehind keeps
    # words like "task-runner" intact.
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_*.\-]{3,}"
    r"|(?i:bearer)\s+[A-Za-z0-9_*.~+/=\-]{8,}"
    r"|[A-Za-z0-9_*.+=\-]{32,}"
)
_WHITESPACE = re.compile(r"\s+")
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")

# In-band stream errors carry no status: Anthropic's error types and OpenAI's codes say which it would be.
_WORD_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "token_revoked": 401,
    "token_invalidated": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "model_not_found": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "resource_exhausted": 429,
    "usage_limit_reached": 429,
    "insufficient_quota": 429,
    "api_error": 500,
    "server_error": 500,
    "internal_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    "overloaded": 529,
    "unavailable": 503,
}


@dataclass(frozen=True, slots=True)
class _Found:
    """What one error body says, normalised."""

    codes: tuple[str, ...]  # machine codes/types/statuses, lower-cased, most specific first
    words: frozenset[str]  # the same, for set tests
    code: str | None
    int_code: int | None
    text: str  # lower-cased wording: codes, message, upstream raw text
    message: str  # for humans, not yet redacted
    provider_name: str | None
    obj: Any  # the parsed JSON, for body reset fields


def classify(status: int, headers: Mapping[str, str], body: bytes, now: float) -> Classification:
    """Classify a non-2xx HTTP answer (never raises on provider input)."""
    found = _parse_body(body)
    reset_at = reset_from_headers(headers, now)
    if reset_at is None and found.obj is not None:
        reset_at = reset_from_body(found.obj, now)
    return _verdict(status, found, reset_at, now)


def classify_stream_event(event: bytes, now: float) -> Classification | None:
    """Classify the first SSE event of a 200 stream: a ``Classification`` if it is an in-band error.

    Normal data events, comments, ``[DONE]`` and anything unrecognisable return ``None``.
    """
    head = event[:BODY_LIMIT]
    # Every way to be an error below needs the word "error" in the event (the event's name, a member
    # name or a "type" value), written out or, in JSON, with \u escapes: with neither in the event,
    # nothing to decode. Nearly every stream's first event: the decode and the parse were ~14k
    # instructions a stream (valgrind).
    # (``find``, not ``in``: for bytes, ``in`` first tries its argument as an int, ~1.5k instructions.)
    if head.find(b"error") < 0 and head.find(b"\\u") < 0:
        return None
    name, data = _first_sse_event(head)
    obj = _loads(data) if data else None
    if isinstance(obj, dict) and obj.get("type") == "response.failed":
        # OpenAI Responses API: the error sits inside the failed response object.
        response = obj.get("response")
        obj = response if isinstance(response, dict) else obj
    is_error = name == "error" or (
        isinstance(obj, dict) and (bool(obj.get("error")) or obj.get("type") == "error")
    )
    if not is_error:
        return None
    found = _from_json(obj) if isinstance(obj, dict) else _from_text(data or "")
    status = found.int_code if found.int_code is not None and 400 <= found.int_code <= 599 else None
    if status is None:
        status = _status_from_words(found)
    reset_at = reset_from_body(found.obj, now) if found.obj is not None else None
    return _verdict(status, found, reset_at, now)


def _verdict(status: int, found: _Found, reset_at: float | None, now: float) -> Classification:
    cls, context = _decide(status, found, reset_at, now)
    return Classification(
        error_class=cls,
        status=status,
        reset_at=reset_at,
        code=found.code,
        context_length=context,
        message=_short(found.message),
    )


def _decide(status: int, f: _Found, reset_at: float | None, now: float) -> tuple[ErrorClass, bool]:
    w, t = f.words, f.text
    if status == 401:
        return (ErrorClass.REVOKED if _REVOKED_WORDS.search(t) else ErrorClass.AUTH_FAILED), False
    if status == 402:
        return ErrorClass.BILLING, False
    if status == 403:
        billing = w & _BILLING_CODES or _MONEY_WORDS.search(t) or _QUOTA_WORDS.search(t)
        return (ErrorClass.BILLING if billing else ErrorClass.AUTH_FAILED), False
    if status == 429:
        return _decide_429(f, reset_at, now), False
    if status == 404:
        named = w & _MODEL_CODES or _MODEL_WORDS.search(t)
        return (ErrorClass.MODEL_NOT_FOUND if named else ErrorClass.CLIENT_ERROR), False
    if 500 <= status <= 599:
        if status in (503, 529) or w & _OVERLOADED_CODES:
            return ErrorClass.OVERLOADED, False
        return ErrorClass.SERVER_ERROR, False
    if 400 <= status <= 499:
        if status == 400:
            if _BAD_KEY_WORDS.search(t):
                return ErrorClass.REVOKED, False
            if w & _BILLING_CODES or _BILLING_STRONG_WORDS.search(t):
                return ErrorClass.BILLING, False
            if w & _MODEL_CODES:
                return ErrorClass.MODEL_NOT_FOUND, False
        context = status == 413 or bool(w & _CONTEXT_CODES) or bool(_CONTEXT_WORDS.search(t))
        return ErrorClass.CLIENT_ERROR, context
    return ErrorClass.SERVER_ERROR, False


def _decide_429(f: _Found, reset_at: float | None, now: float) -> ErrorClass:
    w, t = f.words, f.text
    if f.provider_name or _UPSTREAM_WORDS.search(t):
        if w & _OVERLOADED_CODES or _OVERLOADED_WORDS.search(t):
            return ErrorClass.OVERLOADED
        return ErrorClass.UPSTREAM_RATE_LIMITED
    if w & _USAGE_CODES:
        return ErrorClass.USAGE_LIMIT
    if w & _BILLING_CODES:
        return ErrorClass.BILLING
    if w & _RATE_CODES:
        return ErrorClass.RATE_LIMITED
    if w & _OVERLOADED_CODES or _OVERLOADED_WORDS.search(t):
        return ErrorClass.OVERLOADED
    if reset_at is not None and reset_at - now > FAR_RESET and _USAGE_WORDS.search(t):
        return ErrorClass.USAGE_LIMIT
    if _RATE_WORDS.search(t):
        return ErrorClass.RATE_LIMITED
    if _MONEY_WORDS.search(t) or (reset_at is None and _QUOTA_WORDS.search(t)):
        return ErrorClass.BILLING
    return ErrorClass.RATE_LIMITED


def _status_from_words(f: _Found) -> int:
    for word in f.codes:
        status = _WORD_STATUS.get(word)
        if status is not None:
            return status
    if f.words & _RATE_CODES or _RATE_WORDS.search(f.text):
        return 429
    if f.words & _OVERLOADED_CODES or _OVERLOADED_WORDS.search(f.text):
        return 529
    return 500


def _parse_body(body: bytes) -> _Found:
    text = bytes(body[:BODY_LIMIT]).decode("utf-8", "replace")
    obj = _loads(text)
    if isinstance(obj, list):
        obj = obj[0] if obj else None
    if isinstance(obj, dict):
        return _from_json(obj)
    return _from_text(text)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        # ValueError covers truncated and non-JSON bodies; RecursionError a body of 64 KiB of "[".
        return None


def _from_json(obj: dict[Any, Any]) -> _Found:
    err_field = obj.get("error")
    err: dict[Any, Any] = err_field if isinstance(err_field, dict) else {}
    codes: list[str] = []
    int_code: int | None = None
    for src in (err, obj):
        for key in ("code", "type", "status"):
            value = src.get(key)
            if isinstance(value, str) and value and not (src is obj and key == "type" and value == "error"):
                codes.append(value[:_MAX_CODE])
            elif key == "code" and isinstance(value, int) and not isinstance(value, bool):
                if 100 <= value <= 599:
                    int_code = value if int_code is None else int_code
                else:
                    codes.append(str(value)[:_MAX_CODE])
    details = err.get("details")
    for d in details[:16] if isinstance(details, list) else ():
        reason = d.get("reason") if isinstance(d, dict) else None
        if isinstance(reason, str):
            codes.append(reason[:_MAX_CODE])

    message = _first_str(
        (err.get("message"), obj.get("message"), err_field, obj.get("detail"), obj.get("error_message"))
    )
    raw = ""
    provider_name: str | None = None
    meta = err.get("metadata")
    if isinstance(meta, dict):
        raw_field = meta.get("raw")
        if isinstance(raw_field, str):
            raw = raw_field
        elif isinstance(raw_field, dict | list):
            raw = json.dumps(raw_field, ensure_ascii=False)[:_FIELD_LIMIT]
        name = meta.get("provider_name")
        provider_name = name if isinstance(name, str) and name else None

    human = "; ".join(p for p in (message, f"{provider_name}: {raw}" if provider_name and raw else raw) if p)
    text = " | ".join([*codes, message[:_FIELD_LIMIT], raw[:_FIELD_LIMIT]]).lower()
    lowered = tuple(c.lower() for c in codes)
    return _Found(
        codes=lowered,
        words=frozenset(lowered),
        code=codes[0] if codes else None,
        int_code=int_code,
        text=text,
        message=human,
        provider_name=provider_name,
        obj=obj,
    )


def _from_text(text: str) -> _Found:
    head = text[:_FIELD_LIMIT]
    if head.lstrip().startswith("<"):
        m = _HTML_TITLE.search(head)
        head = m.group(1) if m else _HTML_TAG.sub(" ", head)
    head = _WHITESPACE.sub(" ", head).strip()
    return _Found(
        codes=(),
        words=frozenset(),
        code=None,
        int_code=None,
        text=head.lower(),
        message=head,
        provider_name=None,
        obj=None,
    )


def _first_str(values: Iterable[object]) -> str:
    for v in values:
        if isinstance(v, str) and v.strip():
            return v
    return ""


def _short(message: str) -> str:
    flat = _WHITESPACE.sub(" ", message[:_REDACT_WINDOW]).strip()
    redacted = _KEYLIKE.sub(_redact, flat)
    if len(redacted) <= MESSAGE_LIMIT:
        return redacted
    return redacted[: MESSAGE_LIMIT - 1] + "…"


def _redact(m: re.Match[str]) -> str:
    s = m.group(0)
    # A long run without a digit is a word chain ("free-models-per-day-..."), not a key.
    if s[:3] == "sk-" or s[:6].lower() == "bearer" or any(c.isdigit() for c in s):
        return "[redacted]"
    return s


def _first_sse_event(raw: bytes) -> tuple[str | None, str | None]:
    """The event name and data of the first SSE event that has a field; comments are skipped."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    name: str | None = None
    data: list[str] = []
    for line in text.split("\n"):
        if not line:
            if name is not None or data:
                break
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return name, ("\n".join(data) if data else None)
