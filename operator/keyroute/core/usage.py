"""Token usage as the provider reports it in an answer: how many tokens each credential spends.

Three vocabularies reach the sidecar and are folded into one set of kinds (:data:`KINDS`):

- OpenAI chat/completions: ``prompt_tokens``, ``completion_tokens``,
  ``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``; in a JSON
  answer, and in a stream's final chunk when the agent asked for ``stream_options.include_usage``
  (the sidecar never adds that option: the agent's request is forwarded as sent);
- OpenAI Responses: ``input_tokens``, ``output_tokens``, ``input_tokens_details.cached_tokens``,
  ``output_tokens_details.reasoning_tokens``;
- Anthropic: ``input_tokens``, ``output_tokens``, ``cache_read_input_tokens``,
  ``cache_creation_input_tokens``, in a JSON answer, or in a stream's ``message_start`` (input) and
  ``message_delta`` (output so far, cumulative) events.

Each kind is counted as the provider counts it: OpenAI's ``input`` includes its cached tokens, while
Anthropic's excludes cache reads and writes (``cached``, ``cache_write``).

Nothing here parses a whole answer: the ``"usage"`` member is found by a byte search and only the
small object after it is decoded. In a JSON answer it is a top-level member, near the end; in an SSE
stream it is in an event the sidecar already scans for completion markers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

INPUT, OUTPUT, CACHED, CACHE_WRITE, REASONING = "input", "output", "cached", "cache_write", "reasoning"
KINDS = (INPUT, OUTPUT, CACHED, CACHE_WRITE, REASONING)

USAGE_KEY = b'"usage"'
# A usage object is a few hundred bytes; anything that does not decode within this is not one.
USAGE_MAX = 2048
_DECODER = json.JSONDecoder()
_SPACE = b" \t\r\n"



# "No such member", told apart from a member whose value is null.
_ABSENT: Any = object()


def _is_object(value: Any) -> bool:
    # A decoded answer's objects are dicts: the ABC check only for other mappings handed in.
    return type(value) is dict or (value is not None and isinstance(value, Mapping))


def usage_counts(usage: Mapping[str, Any]) -> dict[str, int]:
    """The token counts of one usage object, by kind; kinds the provider did not report are absent.

    A count is a JSON integer ``>= 0`` (``type(n) is int``: a provider's true/false is no count). Where
    two vocabularies name the same kind, a member present in the first is used even if it is not a
    count (it is then absent from the result).
    """
    # Plain lookups and stores, each member looked up once, no helper calls: this runs once per answer
    # on the request path (a call costs more than the test it would hide).
    get = usage.get
    out: dict[str, int] = {}
    n = get("prompt_tokens", _ABSENT)
    if n is _ABSENT:
        n = get("input_tokens")
    if type(n) is int and n >= 0:
        out[INPUT] = n
    n = get("completion_tokens", _ABSENT)
    if n is _ABSENT:
        n = get("output_tokens")
    if type(n) is int and n >= 0:
        out[OUTPUT] = n
    details = get("prompt_tokens_details", _ABSENT)
    if details is _ABSENT:
        details = get("input_tokens_details", _ABSENT)
    if details is _ABSENT:
        n = get("cache_read_input_tokens")
    else:
        n = details.get("cached_tokens") if _is_object(details) else None
    if type(n) is int and n >= 0:
        out[CACHED] = n
    n = get("cache_creation_input_tokens")
    if type(n) is int and n >= 0:
        out[CACHE_WRITE] = n
    details = get("completion_tokens_details", _ABSENT)
    if details is _ABSENT:
        details = get("output_tokens_details")
    if _is_object(details):
        n = details.get("reasoning_tokens")
        if type(n) is int and n >= 0:
            out[REASONING] = n
    return out


def decode_usage_at(data: bytes, at: int) -> tuple[dict[str, int] | None, bool]:
    """Decode the usage object whose ``"usage"`` key starts at ``data[at]``.

    Returns ``(counts, truncated)``: ``counts`` is None when there is no usage object there (``null``,
    not an object, not JSON); ``truncated`` says the object may continue past the end of ``data``, so
    that a stream can try again once the next chunk has arrived.
    """
    i = at + len(USAGE_KEY)
    n = len(data)
    while i < n and data[i] in _SPACE:
        i += 1
    if i >= n:
        return None, True
    if data[i] != 0x3A:  # ":" -- a "usage" string that is not a member name
        return None, False
    i += 1
    while i < n and data[i] in _SPACE:
        i += 1
    if i >= n:
        return None, True
    if data[i] != 0x7B:  # "{" -- null (OpenAI streams send "usage":null in every chunk) or not a usage
        return None, False
    window = data[i : i + USAGE_MAX]
    try:
        obj, _ = _DECODER.raw_decode(window.decode("utf-8", "replace"))
    except ValueError:
        return None, len(window) < USAGE_MAX and i + len(window) >= n
    if not isinstance(obj, dict):
        return None, False
    return usage_counts(obj), False


def body_usage(payload: bytes) -> dict[str, int] | None:
    """The usage reported in a whole JSON answer, or None.

    The top-level ``usage`` member comes last or nearly so in every vocabulary above, so the search
    runs from the end; a few earlier hits are tried in case a later ``"usage"`` is not an object.
    """
    end = len(payload)
    for _ in range(3):
        at = payload.rfind(USAGE_KEY, 0, end)
        if at < 0:
            return None
        counts, _truncated = decode_usage_at(payload, at)
        if counts:
            return counts
        end = at
    return None
