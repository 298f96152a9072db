"""What the sidecar reads from, and changes in, an agent's request body.

The body is forwarded byte for byte except the model alias (docs/sidecar.md), so the rewrite replaces the
value of the top-level ``"model"`` member in place instead of re-serialising: whitespace, key order
and escapes stay as the agent sent them.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Strings as "unrolled loops" (runs of plain bytes between escapes): several times faster in ``re``
# than one alternation per byte.
_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')
# The usual body (the OpenAI and Anthropic SDKs, curl examples): the model is the first member, a plain
# string. One match of this finds it (checked before the general prefix scan below: ~1 µs less).
_FIRST_MODEL = re.compile(rb'\s*\{\s*"model"\s*:\s*"([^"\\]*)"')
_UNSET: Any = object()


class RequestBody:
    """A request body and what routing needs from it.

    Routing needs the top-level ``model`` only; where :func:`inspect_body` finds it without decoding,
    the body is decoded only if something asks for :attr:`parsed` or :attr:`stream`, and a new model
    is spliced in at the value's known place.
    """

    __slots__ = ("_parsed", "_rewrites", "_span", "model", "raw")

    # Positional parameters: inspect_body builds one for every request, and passing keywords to a
    # class costs twice as much as the construction itself (valgrind: 4.9k instructions with keywords).
    def __init__(
        self,
        raw: bytes,
        model: str = "",
        span: tuple[int, int] | None = None,
        parsed: dict[str, Any] | None = _UNSET,
    ) -> None:
        self.raw = raw
        self.model = model
        # Where the top-level model's string value lies in ``raw`` (between its quotes), if known.
        self._span = span
        self._parsed = parsed
        self._rewrites: dict[str, bytes] | None = None

    @property
    def parsed(self) -> dict[str, Any] | None:
        """The decoded body if it is a JSON object (decoded on first use)."""
        if self._parsed is _UNSET:
            self._parsed = _decode_object(self.raw)
        parsed: dict[str, Any] | None = self._parsed
        return parsed

    @property
    def stream(self) -> bool:
        """Whether the agent asked for a stream."""
        parsed = self.parsed
        return parsed is not None and parsed.get("stream") is True

    def with_model(self, model: str) -> bytes:
        """The body with the top-level model replaced by ``model`` (the original bytes if unchanged).

        A body without a string ``model`` is never given one.
        """
        if model == self.model:
            return self.raw
        if self._rewrites is None:
            self._rewrites = {}
        cached = self._rewrites.get(model)
        if cached is not None:
            return cached
        span = self._span
        if span is not None:
            # The value's exact place is known: splice, no decoding.
            cached = self.raw[: span[0]] + json.dumps(model).encode()[1:-1] + self.raw[span[1] :]
        else:
            parsed = self.parsed
            if parsed is None or not isinstance(parsed.get("model"), str):
                return self.raw
            cached = rewrite_model(self.raw, parsed, model)
        self._rewrites[model] = cached
        return cached


def inspect_body(raw: bytes, content_type: str) -> RequestBody:
    """Find the requested model. Non-JSON bodies pass untouched.

    The fast way, taken when it is certain: one ``"model": "<plain string>"`` in the body, preceded
    by the object's opening brace and no other bracket (a body that names its model first, whatever
    its size, is not decoded at all). Anything else (the model after ``messages``, several ``"model"``,
    escapes) is decoded whole by the C decoder: measured, a Python-level nesting scan of what precedes
    the model is slower than decoding it.
    """
    if not raw or ("json" not in content_type and raw.lstrip()[:1] != b"{"):
        return RequestBody(raw, "", None, None)
    first = _FIRST_MODEL.match(raw)
    if first is not None and raw.find(b'"model"', first.end()) < 0:
        return RequestBody(raw, first.group(1).decode("utf-8", "replace"), first.span(1))
    at = raw.find(b'"model"')
    if at < 0:
        return RequestBody(raw=raw)  # no model anywhere (whether it is JSON at all is decided if asked)
    if raw.find(b'"model"', at + 7) < 0:
        pre = raw[:at]
        # Only the opening brace before it: the member is at the top level (no string before it can
        # hide a bracket, and an escaped quote would end the prefix with a backslash).
        if (
            pre.count(b"{") == 1
            and b"[" not in pre
            and b"}" not in pre
            and b"]" not in pre
            and pre[-1:] != b"\\"
            and pre.lstrip()[:1] == b"{"
        ):
            m = _MODEL_MEMBER.match(raw, at)
            if m is not None and b"\\" not in m.group(1):
                return RequestBody(raw, m.group(1).decode("utf-8", "replace"), m.span(1))
    return _decoded(raw)


def _decode_object(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _decoded(raw: bytes) -> RequestBody:
    """The slow, exact way: decode the whole body."""
    parsed = _decode_object(raw)
    if parsed is None:
        return RequestBody(raw=raw, parsed=None)
    model = parsed.get("model")
    return RequestBody(raw=raw, model=model if isinstance(model, str) else "", parsed=parsed)


def rewrite_model(raw: bytes, parsed: dict[str, Any], model: str) -> bytes:
    """Replace the top-level ``model`` value in ``raw``; fall back to re-serialising if it cannot be found.

    A ``"model"`` key may also appear nested (tool schemas, message content); each candidate is checked
    by re-parsing, which is C speed, rather than by scanning the document in Python.
    """
    replacement = json.dumps(model).encode()
    expected = dict(parsed)
    expected["model"] = model
    for m in _MODEL_MEMBER.finditer(raw):
        candidate = raw[: m.start(1) - 1] + replacement + raw[m.end(1) + 1 :]
        try:
            if json.loads(candidate) == expected:
                return candidate
        except ValueError:
            continue
    return json.dumps(expected, ensure_ascii=False).encode()
