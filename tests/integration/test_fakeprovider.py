"""The fake provider really misbehaves on the wire: checked with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.conftest import MakeFakeProvider
from tests.polling import eventually

CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def sse_data(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of a whole SSE body."""
    text = (await resp.read()).decode()
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_ok_json_and_what_was_received(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider("alpha")
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT, headers=bearer("k1")) as resp:
        assert resp.status == 200
        assert resp.headers["x-fake-provider"] == "alpha"
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-x"
    assert data["choices"][0]["message"]["content"] == "hello from alpha"
    assert data["usage"]["total_tokens"] > 0

    async with http.post(f"{fp.base_url}/messages", json=CHAT, headers={"x-api-key": "k2"}) as resp:
        anthropic = await resp.json()
    assert anthropic["type"] == "message"
    assert anthropic["content"][0]["text"] == "hello from alpha"

    first, second = fp.received
    assert (first.method, first.path, first.host) == ("POST", "/v1/chat/completions", f"127.0.0.1:{fp.port}")
    assert (first.key, first.model, first.stream) == ("k1", "gpt-x", False)
    assert first.body_json() == CHAT
    assert second.key == "k2"
    assert fp.keys_seen() == ["k1", "k2"]
    assert fp.count(path="/v1/messages") == 1


async def test_stream_ends_with_done(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider("alpha")
    fp.script(Behaviour.stream(4, content="abcdefgh"))
    async with http.post(f"{fp.base_url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        data = await sse_data(resp)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 4
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "abcdefgh"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert fp.received[0].stream


async def test_ok_streams_when_asked_and_malformed_chunk(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider("alpha")
    async with http.post(f"{fp.base_url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        data = await sse_data(resp)
    assert len(data) == 4 and data[-1] == "[DONE]"

    fp.script(Behaviour.stream(3, malformed_at=2, done=False))
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        data = await sse_data(resp)
    assert data[1] == "{not json"
    assert json.loads(data[2])["choices"][0]["finish_reason"] == "stop"
    assert "[DONE]" not in data


async def test_first_event_error(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider()
    error = {"message": "upstream rate limited", "code": 429}
    fp.script(Behaviour.stream(first_event_error=error))
    async with http.post(f"{fp.base_url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert await sse_data(resp) == [json.dumps({"error": error}, separators=(",", ":"))]


async def test_anthropic_stream(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider()
    async with http.post(f"{fp.base_url}/messages", json={**CHAT, "stream": True}) as resp:
        text = (await resp.read()).decode()
    events = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start"
    assert events[-1] == "message_stop"
    assert events.count("content_block_delta") == 3


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        (Behaviour.rate_limited(retry_after="7"), 429, "rate_limit_exceeded"),
        (Behaviour.revoked(), 401, "invalid_api_key"),
        (Behaviour.context_length(), 400, "context_length_exceeded"),
        (Behaviour.model_not_found(), 404, "model_not_found"),
        (Behaviour.billing(), 402, "insufficient_credits"),
    ],
)
async def test_error_statuses(
    fake_provider: MakeFakeProvider,
    http: aiohttp.ClientSession,
    behaviour: Behaviour,
    status: int,
    code: str,
) -> None:
    fp = await fake_provider(default=behaviour)
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == status
        body: dict[str, Any] = await resp.json()
        if status == 429:
            assert resp.headers["Retry-After"] == "7"
    assert body["error"]["code"] == code
    if status == 404:
        assert "gpt-x" in body["error"]["message"]


async def test_overloaded_and_custom_status(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider()
    fp.script(Behaviour.overloaded(), Behaviour.status(503, body="busy", headers={"x-a": "b"}))
    async with http.post(f"{fp.base_url}/messages", json=CHAT) as resp:
        assert resp.status == 529
        assert (await resp.json())["error"]["type"] == "overloaded_error"
    async with http.post(f"{fp.base_url}/messages", json=CHAT) as resp:
        assert (resp.status, await resp.text(), resp.headers["x-a"]) == (503, "busy", "b")


async def test_reset_is_a_connection_error(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider(default=Behaviour.reset())
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
            await resp.read()
    assert fp.count() == 1


async def test_cut_after_is_a_payload_error(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider(default=Behaviour.stream(5, cut_after=2))
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            async for line in resp.content:
                lines.append(line)
    assert sum(line.startswith(b"data: ") for line in lines) == 2


async def test_stall_sends_nothing_more(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider(default=Behaviour.stream(5, stall_after=2))
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        for _ in range(2):
            assert (await resp.content.readline()).startswith(b"data: ")
            assert await resp.content.readline() == b"\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 0.2)


async def test_slow_first_byte(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider(default=Behaviour.slow_first_byte(0.2))
    started = time.monotonic()
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.2


async def test_stop_is_prompt_with_silent_and_stalled_requests(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fp = FakeProvider("quiet", default=Behaviour.silence())
    await fp.start()
    fp.set(Behaviour.stream(3, stall_after=1), model="streamer")

    async def call(body: dict[str, Any]) -> bytes:
        async with http.post(f"{fp.base_url}/chat/completions", json=body) as resp:
            return await resp.read()

    calls = [asyncio.create_task(call(CHAT)), asyncio.create_task(call({**CHAT, "model": "streamer"}))]
    await fp.wait_for_requests(2, within=1)
    started = time.monotonic()
    await fp.stop()
    assert time.monotonic() - started < 0.5
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, aiohttp.ClientError)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_client_going_away_mid_stream_is_quiet(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fp = await fake_provider()
    fp.script(Behaviour.silence(), Behaviour.stream(50, interval=0.01))
    with pytest.raises(TimeoutError):
        async with http.post(
            f"{fp.base_url}/chat/completions", json=CHAT, timeout=aiohttp.ClientTimeout(total=0.1)
        ):
            pass
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        await resp.content.readline()
        resp.close()  # drop the connection mid-body
    # The server cancels a handler when it sees its connection go, in its own time: waited for,
    # not guessed with a sleep.
    await eventually(lambda: not fp._handlers, timeout=5)  # the silent and the abandoned ones
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert not fp._handlers
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_client_closing_during_a_stall_is_recorded_as_a_hangup_when_it_goes(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider(default=Behaviour.stream(5, stall_after=2))
    async with http.post(f"{fp.base_url}/chat/completions", json={**CHAT, "model": "m1"}) as resp:
        for _ in range(2):
            assert (await resp.content.readline()).startswith(b"data: ")
            assert await resp.content.readline() == b"\n"
        assert fp.hangups == []  # still held: the stall is not a hangup
        closed = time.monotonic()
        resp.close()
    await fp.wait_for_requests(1)
    [hangup] = await eventually(lambda: fp.hangups, timeout=1, interval=0.01)
    assert hangup.request is fp.received[0] and hangup.request.model == "m1"
    assert closed <= hangup.time < closed + 0.5


async def test_answers_sent_whole_and_requests_held_at_stop_are_not_hangups(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider(default=Behaviour.stream(3))
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        await resp.read()
    fp.set(Behaviour.silence())
    held = asyncio.create_task(http.post(f"{fp.base_url}/chat/completions", json=CHAT))
    await fp.wait_for_requests(2, within=1)
    await fp.stop()
    with pytest.raises(aiohttp.ClientError):
        await held
    assert fp.hangups == []  # the server went, not the client


async def test_wrong_key_is_rejected(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider("alpha", keys=["k1"])
    fp.script(Behaviour.server_error())
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT, headers=bearer("k2")) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT, headers=bearer("k1")) as resp:
        assert resp.status == 500  # the scripted answer was kept for a request with a known key
    assert fp.keys_seen() == ["k2", "k1"]


async def test_prefix_routing(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider("zhipu", prefix="/api/paas/v4/")
    assert fp.base_url == f"http://127.0.0.1:{fp.port}/api/paas/v4"
    async with http.post(f"{fp.base_url}/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    async with http.post(f"{fp.origin}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": {"message": "no such route"}}
    async with http.get(f"{fp.base_url}/models") as resp:
        assert (await resp.json())["data"][0]["id"] == "fake-model"
    assert [r.path for r in fp.received] == [
        "/api/paas/v4/chat/completions",
        "/v1/chat/completions",
        "/api/paas/v4/models",
    ]


async def test_script_then_rules_then_default(
    fake_provider: MakeFakeProvider, http: aiohttp.ClientSession
) -> None:
    fp = await fake_provider(default=Behaviour.server_error(502))
    fp.set(Behaviour.status(201), model="gpt-x")
    fp.set(Behaviour.status(202), key="k1")
    fp.set(Behaviour.status(203), key="k1", model="gpt-x")
    fp.script(Behaviour.rate_limited(), Behaviour.billing(), key="k2")

    async def status(key: str, model: str) -> int:
        async with http.post(
            f"{fp.base_url}/chat/completions", json={"model": model}, headers=bearer(key)
        ) as r:
            return r.status

    assert await status("k1", "gpt-x") == 203
    assert await status("k1", "other") == 202
    assert await status("k2", "gpt-x") == 429
    assert await status("k2", "other") == 402
    assert await status("k2", "gpt-x") == 201
    assert await status("k2", "other") == 502
    fp.reset_rules()
    assert await status("k1", "gpt-x") == 502
    assert fp.count(key="k2") == 4 and fp.count(model="gpt-x") == 4


async def test_restart_keeps_the_port(fake_provider: MakeFakeProvider, http: aiohttp.ClientSession) -> None:
    fp = await fake_provider()
    url = f"{fp.base_url}/chat/completions"
    await fp.stop()
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.post(url, json=CHAT)
    await fp.start()
    async with http.post(url, json=CHAT) as resp:
        assert resp.status == 200


def test_behaviour_validation_and_repr() -> None:
    with pytest.raises(ValueError):
        Behaviour.stream(3, cut_after=4)
    with pytest.raises(ValueError):
        Behaviour.stream(3, stall_after=1, cut_after=2)
    assert repr(Behaviour.stream(5, cut_after=2)) == "Behaviour.stream(chunks=5, cut_after=2)"
