"""Server-sent events as they pass through the sidecar: is the stream complete, and how it is ended
when it is not.

The sidecar never re-frames a stream (docs/sidecar.md): it forwards bytes as they come and watches them for
the markers of a complete answer, so that a stream cut, stalled or ended early gets a clear error
event instead of looking finished. What the upstream did send is never altered.
"""

from __future__ import annotations

import json
import re

from keyroute.core.classes import ErrorClass
from keyroute.core.usage import USAGE_KEY, USAGE_MAX, decode_usage_at

# A finish reason that is a string (``null`` means "not yet"), OpenAI and Anthropic spellings, the
# Anthropic and Responses API terminal events, and the ``[DONE]`` sentinel.
_COMPLETE = re.compile(
    rb'"(?:finish_reason|stop_reason)"\s*:\s*"'
    rb"|data:\s*\[DONE\]"
    rb"|event:\s*message_stop"
    rb'|"type"\s*:\s*"(?:message_stop|response\.completed|response\.incomplete|response\.failed)"'
)
_TAIL = 96  # enough to hold a marker split across two chunks
# The same test without running the alternation at every byte of every chunk (``re`` has no literal
# prefix to skip ahead with here): a finish or stop reason with a string value is found by its own
# pattern, which has one; the other markers only when their literal is there.
_REASON_STRING = re.compile(rb'_reason"\s*:\s*"')


_DONE_WINDOW = 64  # how far from the end ``[DONE]`` is looked for first, and how far back its "data:"


def _is_complete(data: bytes) -> bool:
    """What ``_COMPLETE.search(data)`` says, faster."""
    # OpenAI and every provider that copies its format end a stream with ``data: [DONE]``: looked for in
    # the last bytes first, so a complete stream costs two short searches rather than a scan of every
    # byte it sent (the reason search below, ~2.4 us or ~19k instructions a 3.5 KiB stream, valgrind).
    # ``rstrip()`` strips exactly ``\s``'s bytes. Anything else (no ``[DONE]`` near the end, or a
    # longer gap before it) goes the full way below: this only ever says True where the pattern would.
    i = data.rfind(b"[DONE]", len(data) - _DONE_WINDOW if len(data) > _DONE_WINDOW else 0)
    if i >= 0 and data[i - _DONE_WINDOW if i > _DONE_WINDOW else 0 : i].rstrip().endswith(b"data:"):
        return True
    # A reason that is a string, found by one search that skips ahead to its literal ``_reason"`` in
    # C; ``:null`` (every OpenAI chunk but the last) does not match. The name before it is then
    # checked where it is. (A find, a ``startswith`` and a compare per ``_reason"``, one an event,
    # cost ~1.3k instructions an event, under valgrind.)
    m = _REASON_STRING.search(data)
    while m is not None:
        i = m.start()
        if data[i - 7 : i] == b'"finish' or data[i - 5 : i] == b'"stop':
            return True
        m = _REASON_STRING.search(data, m.end())
    # The other markers only where their literal is; written out rather than looped over (every chunk).
    # ``partition`` rather than ``find``: the same search in C, but called without an argument tuple
    # to parse, and a chunk without the literal is not copied (~0.5k instructions a one-event chunk
    # instead of ~1.1k, valgrind). For bytes, ``in`` first tries its argument as an int: ~2.7k.
    if data.partition(b"[DONE]")[1] or data.partition(b"message_stop")[1] or data.partition(b"response.")[1]:
        return _COMPLETE.search(data) is not None
    return False


_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_LEN = len(USAGE_KEY)
_BATCH = 16 * 1024


class StreamWatch:
    """Feed it every chunk; it tells whether the stream has said it is complete, and the token usage
    reported so far (``usage``: kind -> tokens; later reports win, as providers send running totals).

    Chunks are looked at in batches of up to ``batch`` bytes, joined, when the batch is full or when
    ``complete`` or ``usage`` is read (the proxy reads them once the stream has ended, however it
    ended): the same searches over the same bytes, but each search has a fixed cost of ~0.5-1k
    instructions whatever its length, and a chunk is one or two events. One event a read
    (``bench/instructions.py --stream -c 4 --chunk-delay-ms 20``): 1,888k -> 1,770k instructions per
    20-event stream, the pass-through 1,641k. A batch holds references to its chunks, not copies: at
    most ``batch`` bytes plus one chunk per stream. Joined chunks are one chunk to the searches: a
    marker split between two of them is found however it is split; between two batches, as between
    two chunks before, a marker within ``_TAIL`` bytes of the seam and a usage key or object cut by it.
    """

    __slots__ = (
        "_batch", "_complete", "_limit", "_open", "_pending", "_prev", "_size", "_tail", "_track", "_usage",
    )  # fmt: skip

    def __init__(self, *, usage: bool = True, batch: int = _BATCH) -> None:
        self._track = usage
        self._limit = batch  # tests look at every chunk alone with 1
        self._complete = False
        self._usage: dict[str, int] = {}
        self._batch: list[bytes] = []
        self._size = 0  # bytes in the batch
        self._tail = b""
        self._prev = b""  # the previous chunk (a reference, not a copy): a "usage" key may straddle two
        self._pending = b""  # a usage object cut by the end of the previous chunk, from its key on
        self._open = False  # the previous chunk did not end with an event's blank line

    @property
    def complete(self) -> bool:
        """Whether the stream fed so far has said it is complete (a finish reason, ``[DONE]``, ...)."""
        if self._batch:
            self._flush()
        return self._complete

    @property
    def usage(self) -> dict[str, int]:
        """The token usage the stream fed so far reported, by kind."""
        if self._batch:
            self._flush()
        return self._usage

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the stream (looked at with its batch)."""
        self._batch.append(chunk)
        self._size += len(chunk)
        if self._size >= self._limit:
            self._flush()

    def _flush(self) -> None:
        batch = self._batch
        self._batch = []
        self._size = 0
        self._scan(batch[0] if len(batch) == 1 else b"".join(batch))

    def _scan(self, chunk: bytes) -> None:
        # A batch is looked at as one chunk, with the seams to the previous batch as before.
        # Whether the chunk ends with an event's blank line decides both seams below: one slice and
        # compares, where two ``endswith`` calls (argument parsing) were ~1k instructions a chunk.
        closed = chunk[-2:] == b"\n\n"
        if not self._complete:
            # Search the chunk itself, then only the seam with the previous one: no copy of the chunk.
            if _is_complete(chunk) or (self._tail and _is_complete(self._tail + chunk[:_TAIL])):
                self._complete = True
            elif closed:
                # The chunk ended with an event: no marker (each lies within one event's lines) can
                # straddle this seam, so the next chunk needs no seam search.
                self._tail = b""
            elif len(chunk) >= _TAIL:
                self._tail = chunk[-_TAIL:]
            else:
                self._tail = (self._tail + chunk)[-_TAIL:]
        # Usage comes after the finish reason in OpenAI streams, so this goes on past completion.
        # Per chunk: two searches in C; anything more only where "usage" is.
        if self._track:
            if self._pending:
                # A usage object cut by a chunk boundary: grow it until it decodes or is too long to be one.
                pending, self._pending = self._pending, b""
                self._take(pending + chunk[:USAGE_MAX], 0)
            elif self._open and self._prev:
                # Chunks nearly always end with an event's blank line; only when one did not can a
                # "usage" key straddle the seam. (A chunk that ends with a lone "\n" is looked at too:
                # the test below finds no key there.)
                prev = self._prev
                q = prev.rfind(b'"', max(0, len(prev) - len(USAGE_KEY) + 1))
                if q >= 0 and USAGE_KEY.startswith(prev[q:]):
                    self._take(prev[q:] + chunk[:USAGE_MAX], 0)
            at = chunk.find(USAGE_KEY)
            while at >= 0:
                # OpenAI streams asked for usage carry ``"usage":null`` in every chunk but the last: a
                # slice and a compare skip it, where the decode's call was ~0.5 us each (a 22-chunk
                # stream's watch went from ~38 to ~20 us).
                if chunk[at + _USAGE_LEN : at + _USAGE_LEN + 5] != b":null":
                    self._take(chunk, at)
                at = chunk.find(USAGE_KEY, at + _USAGE_LEN)
            if closed:
                # Nothing to keep: no key can straddle this seam (see above).
                self._open = False
            elif chunk:
                # Rare. The previous chunk's bytes count only if it was open too: after a blank line,
                # no quote before it can start a key that ends in this chunk.
                prev = self._prev if self._open else b""
                self._prev = chunk if len(chunk) >= _USAGE_LEN else (prev + chunk)[-_USAGE_LEN:]
                self._open = True

    def _take(self, data: bytes, at: int) -> None:
        counts, truncated = decode_usage_at(data, at)
        if counts:
            self._usage.update(counts)
        elif truncated:
            self._pending = data[at:]


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
    if buf.find(b"\r") >= 0:
        start = 0
        for m in _EVENT_END.finditer(buf):
            event = buf[start : m.start()].replace(b"\r\n", b"\n")
            if _DATA_LINE.search(event) and not _PING.search(event):
                return start, m.end()
            start = m.end()
        return -1, -1
    # No CR: events end at "\n\n", found with bytes.find (see first_event_end); each event's tests are
    # the regular expressions' own, written as searches for their literals.
    start = 0
    end = buf.find(b"\n\n")
    while end >= 0:
        event = buf[start:end]
        if (event.startswith(b"data:") or event.find(b"\ndata:") >= 0) and not (
            event.find(b"ping") >= 0 and _PING.search(event)
        ):
            return start, end + 2
        start = end + 2
        end = buf.find(b"\n\n", start)
    return -1, -1


def first_event_end(buf: bytes) -> int:
    """Index just past the first complete SSE event in ``buf``, or -1 if it is not complete yet."""
    if buf.find(b"\r") >= 0:  # find, not ``in``: ``in`` first tries the argument as an int (~1.5k more)
        m = _EVENT_END.search(buf)
        return m.end() if m else -1
    # Without a CR, ``\r?\n\r?\n`` is ``\n\n``: ``re`` has no literal to skip ahead with in the
    # pattern and tries it at every byte (~190 instructions a byte: ~34k for a 180-byte first event,
    # under valgrind), where ``find`` is a C scan.
    end = buf.find(b"\n\n")
    return -1 if end < 0 else end + 2


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
