"""What the sidecar reads from, and changes in, an agent's request body.

The body is forwarded byte for byte except the model alias (SPEC §4), so the rewrite replaces the
value of the top-level ``"model"`` member in place instead of re-serialising: whitespace, key order
and escapes stay as the agent sent them.
"""

from __future__ import annotations

import json
import re
from typing import Any

_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_UNSET: Any = object()


class RequestBody:
    """A request body and what routing needs from it.

    Routing needs the top-level ``model`` only. It is found without decoding the body (a byte search
    for ``"model": "..."`` plus a nesting check of what precedes it, both in C); the whole body is
    decoded only if that is ambiguous, or if something asks for :attr:`parsed` or :attr:`stream`.
    """

    __slots__ = ("_parsed", "_rewrites", "_span", "model", "raw")

    def __init__(
        self,
        raw: bytes,
        model: str = "",
        *,
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

    A ``"model": "<string>"`` member at nesting depth 1 of a body that is an object is the model (the
    last one, as a JSON decoder would take it). Strings are skipped when counting the depth, so a
    ``{`` in a prompt does not count; an escaped value or any doubt (a quote preceded by a backslash,
    a non-string ``model`` after it) falls back to decoding the whole body.
    """
    if not raw or ("json" not in content_type and raw.lstrip()[:1] != b"{"):
        return RequestBody(raw=raw, parsed=None)
    found: re.Match[bytes] | None = None
    pos = 0  # how far the prefix has been scanned
    depth = 0
    matches = 0
    for m in _MODEL_MEMBER.finditer(raw):
        matches += 1
        start = m.start()
        if start and raw[start - 1] == 0x5C:  # a backslash: part of some string, not a key
            return _decoded(raw)
        # Depth at ``start``: brackets outside strings, counted from where the last match ended.
        outside = _STRING.sub(b"", raw[pos:start])
        depth += outside.count(b"{") + outside.count(b"[") - outside.count(b"}") - outside.count(b"]")
        pos = m.end()
        if depth == 1:
            found = m
    if raw.count(b'"model"') != matches:
        return _decoded(raw)  # a "model" that is not a string member (a number, a value): decide exactly
    if found is None:
        return RequestBody(raw=raw)
    if raw.lstrip()[:1] != b"{" or b"\\" in found.group(1):
        return _decoded(raw)  # not an object, or an escaped value
    return RequestBody(raw=raw, model=found.group(1).decode("utf-8", "replace"), span=found.span(1))


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
