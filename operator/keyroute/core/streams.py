"""Server-sent events as they pass through the sidecar: is the stream complete, and how it is ended
when it is not.

The sidecar never re-frames a stream (SPEC §4): it forwards bytes as they come and watches them for
the markers of a complete answer, so that a stream cut, stalled or ended early gets a clear error
event instead of looking finished. What the upstream did send is never altered.
"""

from __future__ import annotations

import json
import re

from keyroute.core.classes import ErrorClass

# A finish reason that is a string (``null`` means "not yet"), OpenAI and Anthropic spellings, the
# Anthropic and Responses API terminal events, and the ``[DONE]`` sentinel.
_COMPLETE = re.compile(
    rb'"(?:finish_reason|stop_reason)"\s*:\s*"'
    rb"|data:\s*\[DONE\]"
    rb"|event:\s*message_stop"
    rb'|"type"\s*:\s*"(?:message_stop|response\.completed|response\.incomplete|response\.failed)"'
)
_TAIL = 96  # enough to hold a marker split across two chunks
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class StreamWatch:
    """Feed it every chunk; it tells whether the stream has said it is complete."""

    __slots__ = ("_tail", "complete")

    def __init__(self) -> None:
        self.complete = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.complete:
            return
        # Search the chunk itself, then only the seam with the previous one: no copy of the chunk.
        if _COMPLETE.search(chunk) or (self._tail and _COMPLETE.search(self._tail + chunk[:_TAIL])):
            self.complete = True
        elif len(chunk) >= _TAIL:
            self._tail = chunk[-_TAIL:]
        else:
            self._tail = (self._tail + chunk)[-_TAIL:]


_DATA_LINE = re.compile(rb"(?:^|\n)data:")
_PING = re.compile(rb"(?:^|\n)event:\s*ping\s*(?:\r?\n|$)")


def first_data_event(buf: bytes) -> tuple[int, int]:
    """``(start, end)`` of the first complete SSE event in ``buf`` that carries data; ``(-1, -1)`` if
    there is none yet.

    What ``timeouts.firstToken`` waits for. Comment-only events (``: OPENROUTER PROCESSING``, keep-alives)
    and Anthropic's ``ping`` events say the upstream is alive, not that it has answered, so they do not
    count. Any other event with a ``data:`` field does, including a role-only first chunk or Anthropic's
    ``message_start``: recognising "a token" in every dialect is not worth parsing JSON per event.
    """
    start = 0
    for m in _EVENT_END.finditer(buf):
        event = buf[start : m.start()].replace(b"\r\n", b"\n")
        if _DATA_LINE.search(event) and not _PING.search(event):
            return start, m.end()
        start = m.end()
    return -1, -1


def first_event_end(buf: bytes) -> int:
    """Index just past the first complete SSE event in ``buf``, or -1 if it is not complete yet."""
    m = _EVENT_END.search(buf)
    return m.end() if m else -1


def error_event(cls: ErrorClass, message: str, provider: str) -> bytes:
    """The SSE event that ends a stream the upstream did not finish.

    ``event: error`` with an ``error`` object is what the OpenAI and Anthropic SDKs raise on.
    """
    payload = {
        "error": {
            "type": "keyroute_stream_error",
            "class": str(cls),
            "message": message,
            "provider": provider,
        }
    }
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
