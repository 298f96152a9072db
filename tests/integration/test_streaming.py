"""Streams through the sidecar: failover until the agent's first byte, then an honest ending.

After the first byte the answer is committed: a cut, a stall or an end with neither a finish reason
nor ``[DONE]`` must end with an SSE error event, never a truncated stream that looks complete; what
the upstream did send (a malformed chunk inside a complete answer, a finished answer without
``[DONE]``) is passed on as sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp

from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import assert_served_not_broken, chat
from tests.polling import eventually


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def setup(fake_provider, start_sidecar, **timeouts):
    primary: FakeProvider = await fake_provider("acme", keys=[key("p1"), key("p2")])
    backup: FakeProvider = await fake_provider("backup", keys=[key("b1")])
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys", timeouts=timeouts),
            entry("backup", "backup", backup.base_url, "backup-keys", timeouts=timeouts),
        ],
        [
            pool("acme-keys", "acme", cred("p1", key("p1")), cred("p2", key("p2"), priority=1)),
            pool("backup-keys", "backup", cred("b1", key("b1"))),
        ],
    )
    return primary, backup, await start_sidecar(cfg)


async def stream(agent, sidecar) -> tuple[int, dict[str, str], bytes]:
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat(stream=True)) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.strip()]


def last_is_error(body: bytes, cls: str) -> dict:
    last = events(body)[-1]
    assert last.startswith(b"event: error\n"), last
    payload = json.loads(last.split(b"data: ", 1)[1])
    assert payload["error"]["class"] == cls
    return payload


async def test_complete_stream_passes_through_byte_for_byte(fake_provider, start_sidecar, agent):
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(5))
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Keyroute-Provider"] == "acme"
    assert body.endswith(b"data: [DONE]\n\n")
    assert len(events(body)) == 6 and b"keyroute_stream_error" not in body


async def test_chunks_are_relayed_as_they_come_not_buffered(fake_provider, start_sidecar, agent):
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(4, interval=0.25))
    t = time.monotonic()
    arrivals = []
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat(stream=True)) as resp:
        async for _ in resp.content.iter_any():
            arrivals.append(time.monotonic() - t)
    assert arrivals[0] < 0.2  # the first chunk did not wait for the rest
    assert arrivals[-1] >= 0.7


async def test_error_status_before_first_byte_fails_over(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.server_error(503))
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert body.endswith(b"data: [DONE]\n\n")


async def test_inband_error_as_first_event_fails_over(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(
        Behaviour.stream(first_event_error={"error": {"code": 429, "message": "Rate limit exceeded"}}),
        key=key("p1"),
    )
    primary.set(
        Behaviour.stream(first_event_error={"error": {"code": 502, "message": "upstream died"}}),
        key=key("p2"),
    )
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert b"upstream died" not in body and body.endswith(b"data: [DONE]\n\n")
    assert primary.keys_seen() == [key("p1"), key("p2")]


async def test_cut_after_first_byte_ends_with_an_error_event(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(5, cut_after=2))
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "acme"
    assert len(events(body)) == 3  # two chunks, then the error event
    last_is_error(body, "ConnectionError")
    assert len(backup.received) == 0  # committed: no failover after the first byte


async def test_stall_after_first_byte_ends_with_an_error_event_after_idle(
    fake_provider, start_sidecar, agent
):
    primary, _, sidecar = await setup(fake_provider, start_sidecar, idle=0.3)
    primary.set(Behaviour.stream(5, stall_after=2))
    t = time.monotonic()
    status, _, body = await stream(agent, sidecar)
    elapsed = time.monotonic() - t
    assert status == 200
    assert "stalled" in last_is_error(body, "Timeout")["error"]["message"]
    assert 0.3 <= elapsed < 2


async def test_a_stream_that_keeps_trickling_outlives_idle(fake_provider, start_sidecar, agent):
    """The idle bound restarts with every chunk: events 0.1 s apart for ~0.8 s under a 0.3 s idle bound
    arrive whole (the stall timer re-arms itself from the last chunk instead of firing at 0.3 s)."""
    primary, _, sidecar = await setup(fake_provider, start_sidecar, idle=0.3)
    primary.set(Behaviour.stream(8, interval=0.1))
    t = time.monotonic()
    status, _, body = await stream(agent, sidecar)
    assert status == 200 and time.monotonic() - t >= 0.6
    assert b"event: error" not in body and body.rstrip().endswith(b"data: [DONE]")


async def test_unfinished_end_gets_an_error_event(fake_provider, start_sidecar, agent, caplog):
    caplog.set_level(logging.WARNING, logger="keyroute")
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(3, finish=False, done=False))
    _, _, body = await stream(agent, sidecar)
    last_is_error(body, "ConnectionError")
    # The log line says why, for whoever reads it without the agent's answer at hand.
    [record] = [r for r in caplog.records if r.getMessage() == "stream ended abnormally"]
    assert record.kr["reason"] == "upstream stream ended without a finish reason or [DONE]"  # type: ignore[attr-defined]


async def test_finished_answer_without_done_passes_as_sent(fake_provider, start_sidecar, agent):
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(3, done=False))
    _, _, body = await stream(agent, sidecar)
    assert b"keyroute_stream_error" not in body
    assert b'"finish_reason":"stop"' in body.replace(b" ", b"")


async def test_long_streams_are_judged_as_short_ones(fake_provider, start_sidecar, agent):
    # The sidecar looks at a stream's chunks in batches of 16 KiB: a stream several batches long is
    # judged on all of it, the finish reason in the last batch, an unfinished one as unfinished.
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(600, done=False))
    _, _, body = await stream(agent, sidecar)
    assert len(body) > 4 * 16 * 1024
    assert b"keyroute_stream_error" not in body and len(events(body)) == 600
    primary.set(Behaviour.stream(600, finish=False, done=False))
    _, _, body = await stream(agent, sidecar)
    last_is_error(body, "ConnectionError")
    assert len(events(body)) == 601


async def test_malformed_chunk_inside_a_complete_answer_passes_as_sent(fake_provider, start_sidecar, agent):
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(4, malformed_at=2))
    _, _, body = await stream(agent, sidecar)
    assert b"data: {not json" in body
    assert body.endswith(b"data: [DONE]\n\n") and b"keyroute_stream_error" not in body


async def test_silent_stream_fails_over_within_first_byte(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, firstByte=0.3)
    primary.set(Behaviour.silence())
    t = time.monotonic()
    status, headers, _ = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) == 1 and time.monotonic() - t < 1.5


async def test_anthropic_style_stream_and_key_header(fake_provider, start_sidecar, agent):
    fp: FakeProvider = await fake_provider("claude", keys=[key("c1")])
    cfg = config(
        [entry("claude", "claude", fp.base_url, "c", api="anthropic")],
        [pool("c", "claude", cred("c1", key("c1")))],
    )
    sidecar = await start_sidecar(cfg)
    async with agent.post(
        sidecar.base_url + "/messages",
        json={
            "model": "claude-x",
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={"x-api-key": "agent-placeholder"},
    ) as resp:
        body = await resp.read()
    assert resp.status == 200 and b"message_stop" in body and b"keyroute_stream_error" not in body
    rec = fp.received[0]
    assert rec.key == key("c1")
    assert rec.headers.get("x-api-key") == key("c1") and "authorization" not in rec.headers
    assert rec.headers.get("anthropic-version")


# --- timeouts.firstToken: headers at once, the first token late ------------------------------------


async def test_first_token_past_the_bound_fails_over_before_anything_reaches_the_agent(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, firstToken=0.3)
    primary.set(Behaviour.stream(3, first_event_delay=3.0))
    t = time.monotonic()
    status, headers, body = await stream(agent, sidecar)
    elapsed = time.monotonic() - t
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert b"chatcmpl-backup" in body and b"chatcmpl-acme" not in body
    assert len(primary.received) == 1  # a Timeout: a silent route is never retried
    assert 0.3 <= elapsed < 2.9  # the first token would have come at 3 s
    restore = sidecar.chain.models["gpt-4o"].restores["acme"]
    assert str(restore.reason) == "Timeout"


async def test_keepalive_comments_are_not_a_first_token(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, firstToken=0.3)
    primary.set(Behaviour.stream(3, first_event_delay=3.0, keepalive=0.05))
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert b"keepalive" not in body  # the comments held back with the failed attempt


async def test_first_token_within_the_bound_is_served_with_its_keepalives(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, firstToken=2.0)
    primary.set(Behaviour.stream(3, first_event_delay=0.3, keepalive=0.05))
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "acme"
    assert body.startswith(b": keepalive\n\n") and body.rstrip().endswith(b"data: [DONE]")
    assert len(backup.received) == 0


async def test_first_token_is_off_by_default_so_a_thinking_model_is_waited_for(
    fake_provider, start_sidecar, agent
):
    """Without firstToken, a first event 1 s after the headers is passed through (firstByte bounds it)."""
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(3, first_event_delay=1.0))
    status, headers, body = await stream(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "acme"
    assert b"chatcmpl-acme" in body and len(backup.received) == 0


async def test_first_token_does_not_apply_to_answers_that_are_not_streamed(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, firstToken=0.2)
    primary.set(Behaviour.ok(delay=0.5))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200 and resp.headers["X-Keyroute-Provider"] == "acme"


async def test_an_agent_leaving_while_the_stream_starts_is_one_debug_line_and_served(
    fake_provider, start_sidecar, caplog
):
    """The agent closes its connection while the sidecar waits for the first event: when it comes, the
    answer cannot start. That is a client leaving, not a server error: one debug line, no traceback,
    nothing at error level (aiohttp used to log "Error handling request" with a traceback)."""
    import asyncio
    import logging

    from tests.polling import eventually

    caplog.set_level(logging.DEBUG, logger="keyroute")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    primary, _, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(3, first_event_delay=0.3))
    body = json.dumps(chat(stream=True)).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await eventually(lambda: len(primary.received) == 1)  # the attempt is waiting for its first event
    writer.close()
    await writer.wait_closed()
    gone = "agent went away before the stream started"
    await eventually(lambda: any(r.getMessage() == gone for r in caplog.records))
    await eventually(lambda: sidecar.in_flight == 0)  # the handler returned: what it logs is logged
    await asyncio.sleep(0.05)  # and what aiohttp logs as it finishes the response
    left = [r for r in caplog.records if r.getMessage() == gone]
    assert len(left) == 1 and left[0].levelno == logging.DEBUG and left[0].exc_info is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not [r for r in caplog.records if r.exc_info]
    # The upstream did answer: the attempt and the request count as served, and nothing is retried.
    served = {"chain": "agents", "provider": "acme", "credential": "p1", "class": "OK"}
    registry = sidecar.metrics.registry
    await eventually(lambda: registry.get_sample_value("keyroute_upstream_attempts_total", served) == 1)
    request = {"chain": "agents", "provider": "acme", "class": "OK"}
    assert registry.get_sample_value("keyroute_requests_total", request) == 1
    assert len(primary.received) == 1


# --- the agent leaving a committed stream ------------------------------------------------------------


async def read_events(resp: aiohttp.ClientResponse, n: int) -> bytes:
    """Read until ``n`` whole events are in."""
    body = b""
    while len(events(body)) < n or not body.endswith(b"\n\n"):
        chunk = await resp.content.readany()
        assert chunk, body
        body += chunk
    return body


def accounting(sidecar) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every counter, count and gauge of the sidecar's registry (not durations, not creation times)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for metric in sidecar.metrics.registry.collect()
        for s in metric.samples
        if not s.name.endswith(("_created", "_sum", "_bucket"))
    }


async def leave_after_two_events(sidecar) -> float:
    """An agent that reads two events of a stream and closes its connection; when it closed."""
    async with aiohttp.ClientSession() as client:
        resp = await client.post(sidecar.base_url + "/chat/completions", json=chat(stream=True))
        assert resp.status == 200
        assert len(events(await read_events(resp, 2))) == 2
        left = time.monotonic()
        resp.close()
    return left


async def test_an_agent_leaving_during_an_upstream_silence_closes_the_upstream_at_once(
    fake_provider, start_sidecar, caplog
):
    """Two events reach the agent, which closes its connection while the upstream is silent (a model
    reasoning mid-answer) under a 30 s idle bound: the sidecar closes the upstream request within
    about a second, not when idle passes, and counts it as an agent that leaves while chunks flow
    (a failed write tells the sidecar then): served, not StreamBroken, nothing at warning level,
    no traceback, no key in the logs."""
    caplog.set_level(logging.DEBUG, logger="keyroute")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    # For comparison: the agent leaves while chunks flow (every 50 ms), so a write finds it gone.
    flowing, _, reference = await setup(fake_provider, start_sidecar, idle=30)
    flowing.set(Behaviour.stream(60, interval=0.05))
    await leave_after_two_events(reference)
    await eventually(lambda: flowing.hangups)
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, idle=30)
    primary.set(Behaviour.stream(5, stall_after=2))  # two events, then silence
    left = await leave_after_two_events(sidecar)
    assert sidecar.in_flight == 1  # the sidecar (same event loop) has not run since the agent left
    [hangup] = await eventually(lambda: primary.hangups, timeout=3.0)
    assert hangup.time - left < 1.5  # AGENT_CHECK (0.5 s) and scheduling, not idle (30 s)
    await eventually(lambda: sidecar.in_flight == 0)  # the handler returned: what it logs is logged
    await asyncio.sleep(0.05)  # and what aiohttp logs as it finishes the response
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not [r for r in caplog.records if r.exc_info]
    for record in caplog.records:
        text = record.getMessage() + repr(getattr(record, "kr", ""))
        assert "sk-test-" not in text, record
    assert_served_not_broken(sidecar)
    request = {"chain": "agents", "provider": "acme", "class": "OK"}
    assert sidecar.metrics.registry.get_sample_value("keyroute_requests_total", request) == 1
    assert sidecar.seen == [] and len(primary.received) == 1 and backup.received == []
    # The same accounting, series by series, as the agent that left while chunks flowed.
    assert accounting(sidecar) == accounting(reference)


async def test_an_agent_that_stays_through_silences_longer_than_the_check_gets_the_whole_stream(
    fake_provider, start_sidecar, agent
):
    """The check for a departed agent ends only streams whose agent is gone: silences of twice its
    period (1.1 s between events) with the agent connected reach the end as sent."""
    primary, _, sidecar = await setup(fake_provider, start_sidecar, idle=30)
    primary.set(Behaviour.stream(2, interval=1.1))
    status, _, body = await stream(agent, sidecar)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert len(events(body)) == 3 and b"keyroute_stream_error" not in body
    assert primary.hangups == []
    assert_served_not_broken(sidecar)
