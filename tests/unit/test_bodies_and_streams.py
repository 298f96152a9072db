"""Request-body inspection and model rewrite; SSE completion markers and error events."""

from __future__ import annotations

import json
import random
import re

import pytest

from keyroute.core.bodies import inspect_body, rewrite_model
from keyroute.core.classes import ErrorClass
from keyroute.core.streams import StreamWatch, error_event, first_data_event, first_event_end


def test_inspect_finds_model_and_stream():
    b = inspect_body(b'{"model": "gpt-4o", "stream": true, "messages": []}', "application/json")
    assert (b.model, b.stream) == ("gpt-4o", True)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'{"model": 5}', b"\xff\xfe"])
def test_inspect_tolerates_anything(raw):
    b = inspect_body(raw, "application/json")
    assert b.model == "" and b.with_model("x") == raw


def test_rewrite_changes_only_the_top_level_model_bytes():
    raw = b'{"tools": [{"model": "gpt-4o"}],\n  "model" :  "gpt-4o", "x": "\\u00e9"}'
    b = inspect_body(raw, "application/json")
    out = b.with_model("openai/gpt-4o")
    assert out == raw.replace(b'"model" :  "gpt-4o"', b'"model" :  "openai/gpt-4o"')
    assert b.with_model("gpt-4o") is raw  # unchanged model: the very same bytes


def test_rewrite_falls_back_to_reserialising_when_the_member_cannot_be_found():
    parsed = {"model": "a\\b"}
    raw = json.dumps(parsed).encode()
    assert json.loads(rewrite_model(raw, parsed, "z")) == {"model": "z"}


@pytest.mark.parametrize(
    "chunks",
    [
        [b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'],
        [b"data: [DO", b"NE]\n\n"],  # a marker split across chunks
        [b"event: message_stop\ndata: {}\n\n"],
        [b'data: {"type":"response.completed"}\n\n'],
    ],
)
@pytest.mark.parametrize("batch", [1, 16 * 1024])
def test_stream_watch_sees_completion(chunks, batch):
    w = StreamWatch(batch=batch)
    for c in chunks:
        w.feed(c)
    assert w.complete


def test_stream_watch_ignores_a_null_finish_reason():
    w = StreamWatch()
    w.feed(b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n')
    assert not w.complete


def test_first_event_end_and_error_event():
    assert first_event_end(b"data: a\n\ndata: b\n\n") == 9
    assert first_event_end(b"data: a\r\n\r\n") == 11
    assert first_event_end(b"data: a\n") == -1
    ev = error_event(ErrorClass.TIMEOUT, "stalled", "acme")
    assert ev.startswith(b"event: error\ndata: ") and ev.endswith(b"\n\n")
    assert json.loads(ev.split(b"data: ", 1)[1])["error"] == {
        "type": "keyroute_stream_error",
        "class": "Timeout",
        "message": "stalled",
        "provider": "acme",
    }


def test_a_body_without_a_model_is_never_given_one():
    from keyroute.core.chains import Chain
    from tests.builders import config, cred, entry, pool

    e = Chain(
        config([entry("a", "a", "http://a.test/v1", "p", models={"*": "big"})], [pool("p", "a", cred("k"))])
    ).entries[0]
    assert e.upstream_model("") == ""
    raw = b'{"input": "text"}'
    assert inspect_body(raw, "application/json").with_model(e.upstream_model("")) is raw


@pytest.mark.parametrize(
    ("before", "event"),
    [
        (b"", b'data: {"choices": []}\n\n'),
        (b": keepalive\n\n", b"data: x\n\n"),
        (b": keepalive\r\n\r\n", b"data: x\r\n\r\n"),
        (b'event: ping\ndata: {"type": "ping"}\n\n', b"event: message_start\ndata: {}\n\n"),
        (b"", b"event: error\ndata: {}\n\n"),
        (b"id: 1\n\n", b"data: x\n\n"),  # an event without data is not an answer
    ],
)
def test_first_data_event_skips_comments_and_pings(before, event):
    assert first_data_event(before + event + b"data: next\n\n") == (len(before), len(before) + len(event))


@pytest.mark.parametrize(
    "buf",
    [
        b"",
        b": OPENROUTER PROCESSING\n\n",
        b": keepalive\n\n: keepalive\n\n",
        b"data: {}",  # not complete yet
        b'event: ping\ndata: {"type": "ping"}\n\n',
    ],
)
def test_no_data_event_yet(buf):
    assert first_data_event(buf) == (-1, -1)


def _first_data_event_by_regex(buf: bytes) -> tuple[int, int]:
    # The definition the fast paths must keep: events end at \r?\n\r?\n; an event answers if a line
    # starts with "data:" and it is not an "event: ping".
    start = 0
    for m in re.finditer(rb"\r?\n\r?\n", buf):
        event = buf[start : m.start()].replace(b"\r\n", b"\n")
        if re.search(rb"(?:^|\n)data:", event) and not re.search(
            rb"(?:^|\n)event:\s*ping\s*(?:\r?\n|$)", event
        ):
            return start, m.end()
        start = m.end()
    return -1, -1


def test_first_event_searches_agree_with_their_regular_expressions():
    # first_event_end and first_data_event find "\n\n" with bytes.find when the buffer has no CR; on
    # any mix of the pieces below they give what the regular expressions give.
    pieces = [b"data: x", b"data:", b"event: ping", b"event:ping ", b": keepalive", b"id: 1", b"\n", b"\n\n",
              b"\r\n", b"\r", b"xdata: y", b"ping", b" ", b"event: message_start"]  # fmt: skip
    rng = random.Random(13)
    for _ in range(5000):
        buf = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 10)))
        m = re.search(rb"\r?\n\r?\n", buf)
        assert first_event_end(buf) == (m.end() if m else -1), buf
        assert first_data_event(buf) == _first_data_event_by_regex(buf), buf


def test_completion_search_agrees_with_the_marker_pattern():
    # StreamWatch looks for a string reason with its own pattern and for the rare markers by their
    # literals; on any mix of the pieces below it says what the one pattern of every marker says.
    from keyroute.core.streams import _COMPLETE, _is_complete

    pieces = [b'"finish_reason"', b'"stop_reason"', b'_reason"', b'"xfinish_reason"', b":", b" : ", b"\n",
              b'"stop"', b"null", b'"', b"data: ", b"[DONE]", b"event: ", b"message_stop", b'"type"',
              b'"response.completed"', b'"response.failed"', b"response.", b"{", b"}", b"stop"]  # fmt: skip
    rng = random.Random(13)
    for _ in range(20000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))
        assert _is_complete(data) == (_COMPLETE.search(data) is not None), data


def test_the_done_shortcut_agrees_with_the_marker_pattern_on_long_streams():
    # A "[DONE]" in the last 64 bytes, after "data:" and whitespace within 64 bytes, answers without
    # the full search: on long data, with every whitespace byte of the pattern's \s and gaps around
    # the windows' edges, it says what the pattern says, and never more.
    from keyroute.core.streams import _COMPLETE, _is_complete

    filler = b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}]}\n\n' * 3
    pieces = [b"data:", b"data: ", b"[DONE]", b"[DONE", b"ta:", b" ", b"\t", b"\n", b"\r\n", b"\x0b", b"\x0c",
              b"\n\n", b"x", b"data: x", b" " * 30, b"\n" * 61, b"event: message_stop", b'"finish_reason":"']  # fmt: skip
    rng = random.Random(29)
    for _ in range(20000):
        data = filler[: rng.randrange(0, len(filler))] + b"".join(
            rng.choice(pieces) for _ in range(rng.randrange(0, 8))
        )
        assert _is_complete(data) == (_COMPLETE.search(data) is not None), data
    assert _is_complete(filler + b"data:" + b" " * 58 + b"[DONE]\n\n")  # the full search finds it
    assert not _is_complete(filler + b"data [DONE]\n\n")


@pytest.mark.parametrize("batch", [1, 16 * 1024])
def test_a_usage_key_is_not_joined_across_a_blank_line(batch):
    # '"us' before an event's end and 'age"' after it are not one "usage" key: StreamWatch keeps the
    # previous chunk's bytes for the seam only while chunks end mid-event.
    w = StreamWatch(batch=batch)
    for chunk in [b'data: {"us', b"x\n\n", b"ag", b'e": {"prompt_tokens": 5}}\n\n']:
        w.feed(chunk)
    assert w.usage == {}
    w = StreamWatch(batch=batch)
    for chunk in [b'data: {"x": 1, "us', b"ag", b'e": {"prompt_tokens": 5}}\n\n']:
        w.feed(chunk)
    assert w.usage == {"input": 5}


def test_stream_watch_batches_are_bounded_and_read_on_demand():
    # Chunks are searched in batches of at most `batch` bytes (references kept, not copies), and any
    # chunk still in a batch is searched when `complete` or `usage` is read.
    w = StreamWatch(batch=64)
    event = b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}]}\n\n'
    for _ in range(10):
        w.feed(event)
        assert w._size < 64
    w.feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n')
    assert w.usage == {"input": 3, "output": 4}
    assert not w.complete
    w.feed(b"data: [DONE]\n\n")
    assert w.complete
