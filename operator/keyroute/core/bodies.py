"""What the sidecar reads from, and changes in, an agent's request body.

The body is forwarded byte for byte except the model alias (SPEC §4), so the rewrite replaces the
value of the top-level ``"model"`` member in place instead of re-serialising: whitespace, key order
and escapes stay as the agent sent them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class RequestBody:
    """A request body and what routing needs from it."""

    raw: bytes
    model: str = ""
    stream: bool = False
    parsed: dict[str, Any] | None = None
    _rewrites: dict[str, bytes] = field(default_factory=dict)

    def with_model(self, model: str) -> bytes:
        """The body with the top-level model replaced by ``model`` (the original bytes if unchanged).

        A body without a string ``model`` is never given one.
        """
        if model == self.model or self.parsed is None or not isinstance(self.parsed.get("model"), str):
            return self.raw
        cached = self._rewrites.get(model)
        if cached is None:
            cached = self._rewrites[model] = rewrite_model(self.raw, self.parsed, model)
        return cached


def inspect_body(raw: bytes, content_type: str) -> RequestBody:
    """Find the requested model and whether a stream was asked for. Non-JSON bodies pass untouched."""
    if not raw or ("json" not in content_type and raw.lstrip()[:1] != b"{"):
        return RequestBody(raw=raw)
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return RequestBody(raw=raw)
    if not isinstance(parsed, dict):
        return RequestBody(raw=raw)
    model = parsed.get("model")
    return RequestBody(
        raw=raw,
        model=model if isinstance(model, str) else "",
        stream=parsed.get("stream") is True,
        parsed=parsed,
    )


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
