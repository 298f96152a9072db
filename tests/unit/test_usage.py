"""Token usage read from answers: the three vocabularies, JSON bodies and SSE streams cut anywhere."""

from __future__ import annotations

import json

import pytest

from keyroute.core.streams import StreamWatch
from keyroute.core.usage import body_usage, decode_usage_at, usage_counts

OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 12},
    },
    "system_fingerprint": "fp_1",
}
ANTHROPIC = {
    "id": "msg_1",
    "type": "message",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 25,
        "output_tokens": 7,
        "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 40,
    },
}
RESPONSES = {
    "id": "resp_1",
    "object": "response",
    "output": [],
    "usage": {
        "input_tokens": 9,
        "output_tokens": 4,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 13,
    },
}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (OPENAI_CHAT, {"input": 120, "output": 30, "cached": 100, "reasoning": 12}),
        (ANTHROPIC, {"input": 25, "output": 7, "cached": 300, "cache_write": 40}),
        (RESPONSES, {"input": 9, "output": 4, "cached": 0, "reasoning": 2}),
        ({"data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}, {"input": 8}),  # embeddings
    ],
)
def test_body_usage_reads_each_vocabulary(answer, expected):
    assert body_usage(json.dumps(answer).encode()) == expected
    assert body_usage(json.dumps(answer, indent=2).encode()) == expected  # whitespace anywhere


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"choices": []}',
        b'{"usage": null}',
        b'{"usage": "lots"}',
        b'{"usage": {"prompt_tokens": "12"}}',  # not a count
        b'{"usage": {"prompt_tokens": true}}',
        b'{"usage": {"prompt_tokens": -3}}',
        b'{"usage": {"prompt_tokens": 5',  # truncated
        b'{"usage": {"prompt_tokens": x}}',  # no value where one must be (the scanner's StopIteration)
        b'{"usage": {"prompt_tokens": [1, }}',
        b'{"usage": {]}',
        b'{"content": "say \\"usage\\": {\\"prompt_tokens\\": 5}"}',  # the word inside a string
    ],
)
def test_body_usage_finds_nothing_where_there_is_no_usage(raw):
    assert not body_usage(raw)


def test_body_usage_prefers_the_top_level_member_at_the_end():
    # A tool's output may carry its own "usage" member earlier in the answer.
    answer = {
        "choices": [{"message": {"tool": {"usage": {"prompt_tokens": 1}}}}],
        "usage": {"prompt_tokens": 50},
    }
    assert body_usage(json.dumps(answer).encode()) == {"input": 50}


def test_usage_counts_ignores_totals_and_unknown_fields():
    assert usage_counts({"total_tokens": 9, "foo": 1}) == {}


def _sse(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


OPENAI_STREAM = (
    _sse({"choices": [{"delta": {"content": "hel"}, "finish_reason": None}], "usage": None})
    + _sse({"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}], "usage": None})
    + _sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}})
    + b"data: [DONE]\n\n"
)
# As OpenAI sends it: no spaces, so every chunk's ``"usage":null`` takes StreamWatch's short cut.
OPENAI_STREAM_COMPACT = OPENAI_STREAM.replace(b'": ', b'":').replace(b", ", b",")
ANTHROPIC_STREAM = (
    _sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
        "message_start",
    )
    + _sse({"type": "content_block_delta", "delta": {"text": "hi"}}, "content_block_delta")
    + _sse(
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
        "message_delta",
    )
    + _sse({"type": "message_stop"}, "message_stop")
)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (OPENAI_STREAM, {"input": 11, "output": 2}),
        (OPENAI_STREAM_COMPACT, {"input": 11, "output": 2}),
        # message_start's output_tokens is a placeholder; message_delta's running total wins.
        (ANTHROPIC_STREAM, {"input": 25, "output": 15}),
    ],
)
@pytest.mark.parametrize("size", [1, 3, 7, 16, 64, 100_000])
@pytest.mark.parametrize("batch", [1, 100, 16 * 1024])  # every chunk alone, a few joined, all joined
def test_stream_watch_reads_usage_whatever_the_chunking(stream, expected, size, batch):
    w = StreamWatch(batch=batch)
    for i in range(0, len(stream), size):
        w.feed(stream[i : i + size])
    assert w.complete
    assert w.usage == expected


def test_stream_watch_without_usage_tracking_reads_none():
    w = StreamWatch(usage=False)
    w.feed(OPENAI_STREAM)
    assert w.complete and w.usage == {}


def test_stream_without_include_usage_reports_nothing():
    w = StreamWatch()
    w.feed(_sse({"choices": [{"delta": {}, "finish_reason": "stop"}]}) + b"data: [DONE]\n\n")
    assert w.complete and w.usage == {}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'"usage":{"input_tokens":3}', ({"input": 3}, False)),
        (b'"usage" :\n {"input_tokens":3}', ({"input": 3}, False)),
        (b'"usage":{"input_tokens":', (None, True)),  # the rest may be in the next chunk
        (b'"usage":{"input_tokens":x}', (None, True)),  # a failure within what is there: maybe cut
        (b'"usage":{"input_tokens":x}' + b" " * 4096, (None, False)),  # failed within USAGE_MAX bytes
        (b'"usage":null', (None, False)),
        (b'"usage"', (None, True)),
        (b'"usage":', (None, True)),
        (b'"usage" is a word', (None, False)),
    ],
)
def test_decode_usage_at_tells_a_cut_object_from_one_that_is_not(data, expected):
    assert decode_usage_at(data, 0) == expected
