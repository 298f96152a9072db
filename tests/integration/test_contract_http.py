"""The sidecar's documented rules that no other test pinned, through real HTTP (docs/sidecar.md,
docs/errors.md, docs/metrics.md).

Each test drives a real sidecar in front of fake providers on 127.0.0.1 and checks both what the agent
got and what each provider received (keys, counts, timing), so that it fails if the rule breaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from keyroute.core.config import SidecarConfig
from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.sidecar.sources import RenderedConfigFile
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import assert_served_not_broken, chat
from tests.polling import eventually


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def two(
    fake_provider: Any,
    start_sidecar: Any,
    *,
    primary_keys: tuple[str, ...] = ("p1",),
    backup_keys: tuple[str, ...] = ("b1",),
    timeouts: dict[str, Any] | None = None,
    **chain: Any,
) -> tuple[FakeProvider, FakeProvider, Any]:
    """An ``acme`` primary and a ``backup`` fallback, each with its own pool, behind a started sidecar."""
    primary: FakeProvider = await fake_provider("acme", keys=[key(k) for k in primary_keys])
    backup: FakeProvider = await fake_provider("backup", keys=[key(k) for k in backup_keys])
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys", timeouts=timeouts or {}),
            entry("backup", "backup", backup.base_url, "backup-keys", timeouts=timeouts or {}),
        ],
        [
            pool("acme-keys", "acme", *[cred(k, key(k), priority=i) for i, k in enumerate(primary_keys)]),
            pool("backup-keys", "backup", *[cred(k, key(k), priority=i) for i, k in enumerate(backup_keys)]),
        ],
        **chain,
    )
    return primary, backup, await start_sidecar(cfg)


async def ask(agent: aiohttp.ClientSession, sidecar: Any, **body: Any) -> tuple[int, Any, bytes]:
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat(**body)) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.strip()]


def stream_error(body: bytes) -> dict[str, Any]:
    """The sidecar's closing ``event: error`` of a stream (fails if the stream does not end with one)."""
    last = sse_events(body)[-1]
    assert last.startswith(b"event: error\n"), last
    payload: dict[str, Any] = json.loads(last.split(b"data: ", 1)[1])
    return payload["error"]


# --- What it forwards, and what it changes --------------------------------------------------------


async def test_the_query_string_reaches_the_upstream_as_sent(fake_provider, start_sidecar, agent):
    primary, _, sidecar = await two(fake_provider, start_sidecar)
    target = sidecar.base_url + "/models?limit=2&after=a%20b&order=desc"
    async with agent.get(target) as resp:
        assert resp.status == 200
    [got] = primary.received
    assert (got.path, got.query) == ("/v1/models", "limit=2&after=a%20b&order=desc")
    assert got.key == key("p1")


@pytest.mark.parametrize("path", ["/other", "/", "/v1x/chat/completions", "/v2/chat/completions"])
async def test_a_path_outside_v1_is_the_sidecars_404_and_never_forwarded(
    fake_provider, start_sidecar, agent, path
):
    primary, backup, sidecar = await two(fake_provider, start_sidecar)
    origin = sidecar.base_url.removesuffix("/v1")
    async with agent.post(origin + path, json=chat()) as resp:
        assert resp.status == 404
        assert "X-Keyroute-Provider" not in resp.headers
        err = (await resp.json())["error"]
    assert err["type"] == "not_found" and "/v1/*" in err["message"]
    assert primary.received == [] and backup.received == []


async def test_anthropic_version_is_added_unless_the_agent_sent_one(fake_provider, start_sidecar, agent):
    fp: FakeProvider = await fake_provider("claude", keys=[key("c1")])
    cfg = config(
        [entry("claude", "claude", fp.base_url, "c", api="anthropic")],
        [pool("c", "claude", cred("c1", key("c1")))],
    )
    sidecar = await start_sidecar(cfg)
    body = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({"x-api-key": "agent-own-key"}, {"anthropic-version": "2099-01-01"}):
        async with agent.post(sidecar.base_url + "/messages", json=body, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "c1"
    added, kept = fp.received
    assert added.headers["anthropic-version"] == "2023-06-01"
    assert kept.headers["anthropic-version"] == "2099-01-01"  # the agent's own, not overwritten
    for got in (added, kept):
        # The agent's Authorization (the fixture's) and x-api-key never reach the provider.
        assert got.headers["x-api-key"] == key("c1") and "authorization" not in got.headers


async def test_the_upstreams_headers_reach_the_agent_but_cannot_rename_who_answered(
    fake_provider, start_sidecar, agent
):
    primary, _, sidecar = await two(fake_provider, start_sidecar)
    primary.set(
        Behaviour.ok(
            headers={
                "x-request-id": "req-123",
                "X-Keyroute-Provider": "spoofed",
                "X-Keyroute-Credential": "spoofed-key",
            }
        )
    )
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "req-123"
        assert resp.headers.getall("X-Keyroute-Provider") == ["acme"]
        assert resp.headers.getall("X-Keyroute-Credential") == ["p1"]


async def test_a_body_over_64_mib_is_refused_by_the_sidecar_and_never_forwarded(
    fake_provider, start_sidecar, agent
):
    primary, _, sidecar = await two(fake_provider, start_sidecar)
    big = b'{"model": "gpt-4o", "input": "' + b"x" * (64 * 1024 * 1024) + b'"}'
    async with agent.post(
        sidecar.base_url + "/embeddings", data=big, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413
        err = (await resp.json())["error"]
    assert err["type"] == "request_too_large" and "64 MiB" in err["message"]
    assert primary.received == []


async def test_a_client_error_body_reaches_the_agent_whole(fake_provider, start_sidecar, agent):
    """A ClientError is "returned to the agent unchanged": a 4xx body of several socket reads (a gateway's validation
    error echoing a long prompt) arrives whole, not cut after its first read."""
    primary, backup, sidecar = await two(fake_provider, start_sidecar)
    echo = {"detail": [{"type": "value_error", "msg": "invalid", "input": "y" * 600_000}]}
    primary.set(Behaviour.status(422, body=echo))
    status, headers, raw = await ask(agent, sidecar)
    assert status == 422 and json.loads(raw) == echo
    assert headers["X-Keyroute-Provider"] == "acme"
    assert len(primary.received) == 1 and backup.received == []


# --- One request: the chain, the budget, the deadline -------------------------------------------


async def test_chain_exhausted_carries_every_documented_field(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, primary_keys=("p1", "p2"))
    primary.set(Behaviour.rate_limited(retry_after=30))
    backup.set(Behaviour.server_error(502))
    status, headers, raw = await ask(agent, sidecar, model="gpt-4o")
    assert status == 503 and headers["Content-Type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert err["type"] == "chain_exhausted"
    assert err["class"] == "ServerError"  # why the last entry was left
    assert (err["chain"], err["model"]) == ("agents", "gpt-4o")
    assert err["message"] == "every provider of chain agents failed or is cooling down"
    assert [(a["provider"], a["class"], a["credential"], a["status"]) for a in err["attempts"]] == [
        ("acme", "RateLimited", "p1", 429),
        ("acme", "RateLimited", "p2", 429),
        ("backup", "ServerError", "b1", 502),
        ("backup", "ServerError", "b1", 502),
    ]
    # The backup is usable again at once (a provider-level failure benches no key): the floor of 1 s.
    assert headers["Retry-After"] == "1"
    # What each provider received: both primary keys once, the backup's key twice (one retry).
    assert primary.keys_seen() == [key("p1"), key("p2")] and backup.keys_seen() == [key("b1")] * 2
    assert (
        sidecar.metrics.registry.get_sample_value(
            "keyroute_requests_total", {"chain": "agents", "provider": "", "class": "ChainExhausted"}
        )
        == 1
    )


async def test_max_attempts_bounds_the_upstream_calls_of_one_request(fake_provider, start_sidecar, agent):
    keys = ("p1", "p2", "p3", "p4", "p5")
    primary, backup, sidecar = await two(
        fake_provider, start_sidecar, primary_keys=keys, fallback={"maxAttempts": 3}
    )
    primary.set(Behaviour.rate_limited(retry_after=60))
    status, _, raw = await ask(agent, sidecar)
    assert status == 503
    assert len(json.loads(raw)["error"]["attempts"]) == 3
    assert primary.keys_seen() == [key("p1"), key("p2"), key("p3")] and backup.received == []


async def test_entries_waiting_for_their_restore_time_are_a_last_resort(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, fallback={"restoreAfter": 60})
    primary.set(Behaviour.server_error(500))
    assert (await ask(agent, sidecar))[1]["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) == 2
    # Within its restore wait the primary is tried only when everything before it failed.
    primary.reset_rules()
    backup.set(Behaviour.server_error(500))
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "acme"
    assert len(backup.received) == 1 + 2 and len(primary.received) == 3
    assert not sidecar.chain.on_fallback("gpt-4o")


async def test_an_entry_that_went_silent_is_not_a_last_resort(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(
        fake_provider, start_sidecar, fallback={"restoreAfter": 60}, timeouts={"firstByte": 0.3}
    )
    primary.set(Behaviour.silence())
    assert (await ask(agent, sidecar))[1]["X-Keyroute-Provider"] == "backup"
    primary.reset_rules()  # it would answer now, but it is not asked before its restore time
    backup.set(Behaviour.server_error(500))
    status, headers, raw = await ask(agent, sidecar)
    assert status == 503 and json.loads(raw)["error"]["type"] == "chain_exhausted"
    assert len(primary.received) == 1 and len(backup.received) == 1 + 2


@pytest.fixture
async def late_provider() -> AsyncIterator[str]:
    """A provider whose answer comes late in two ways: ``/v1/json`` sends its headers at once and its
    JSON body 3 s later; ``/v1/stream`` sends its headers after 0.9 s and its first event 3 s later."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        sse = request.path.endswith("/stream")
        if sse:
            await asyncio.sleep(0.9)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream" if sse else "application/json"}
        )
        await resp.prepare(request)  # the status line and headers go now
        await asyncio.sleep(3)
        await resp.write(b'data: {"choices": [{"finish_reason": "stop"}]}\n\n' if sse else b"{}")
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.25)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


@pytest.mark.parametrize("path", ["/json", "/stream"])
async def test_the_request_deadline_bounds_the_whole_answer(start_sidecar, agent, late_provider, path):
    """``timeouts.request`` is the deadline of the whole call. A JSON answer whose headers came at once
    but whose body has not by the deadline, or a stream whose headers came just before it, is not
    waited for past it (``idle`` and ``firstByte`` are 30 s here)."""
    cfg = config(
        [entry("slow", "slow", late_provider, "k")],
        [pool("k", "slow", cred("k1", key("k1")))],
        requestTimeout=1.0,
    )
    sidecar = await start_sidecar(cfg)
    t = time.monotonic()
    async with agent.post(sidecar.base_url + path, json=chat()) as resp:
        status, raw = resp.status, await resp.read()
    elapsed = time.monotonic() - t
    assert status == 503, raw
    err = json.loads(raw)["error"]
    assert err["type"] == "chain_exhausted" and [a["class"] for a in err["attempts"]] == ["Timeout"]
    assert 1.0 <= elapsed < 1.6


# --- Transport failures with no answer to hand over ---------------------------------------------


async def test_refused_everywhere_is_chain_exhausted(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar)
    await primary.stop()
    await backup.stop()
    status, headers, raw = await ask(agent, sidecar)
    err = json.loads(raw)["error"]
    assert status == 503 and err["type"] == "chain_exhausted" and int(headers["Retry-After"]) >= 1
    assert [(a["provider"], a["class"]) for a in err["attempts"]] == [
        ("acme", "ConnectionError"),
        ("acme", "ConnectionError"),
        ("backup", "ConnectionError"),
        ("backup", "ConnectionError"),
    ]


@pytest.mark.parametrize("failure", ["refused", "silent"])
async def test_a_transport_failure_that_may_not_leave_its_entry_is_a_502(
    fake_provider, start_sidecar, agent, failure
):
    primary, backup, sidecar = await two(
        fake_provider, start_sidecar, fallback={"triggers": ["ServerError"]}, timeouts={"firstByte": 0.3}
    )
    if failure == "refused":
        await primary.stop()
    else:
        primary.set(Behaviour.silence())
    status, headers, raw = await ask(agent, sidecar)
    err = json.loads(raw)["error"]
    assert status == 502 and err["type"] == "upstream_unreachable"
    if failure == "refused":
        assert err["class"] == "ConnectionError"  # retried once on the same provider first
    else:
        assert err["class"] == "Timeout" and len(primary.received) == 1  # a silent route: never retried
    assert backup.received == []


# --- fallback.triggers ----------------------------------------------------------------------------


async def test_a_key_class_not_in_triggers_hands_the_last_keys_answer_to_the_agent(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await two(
        fake_provider,
        start_sidecar,
        primary_keys=("p1", "p2"),
        fallback={"triggers": ["ServerError", "Timeout"]},
    )
    limited = {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}
    primary.set(Behaviour.rate_limited(retry_after=30, body=limited))
    status, headers, raw = await ask(agent, sidecar)
    # Every key of the entry was tried (rotation does not leave it); the last answer is the agent's.
    assert status == 429 and json.loads(raw) == limited
    assert (headers["X-Keyroute-Provider"], headers["X-Keyroute-Credential"]) == ("acme", "p2")
    assert primary.keys_seen() == [key("p1"), key("p2")] and backup.received == []
    # The next request finds both keys benched for that class: it does not leave the entry either.
    status, headers, raw = await ask(agent, sidecar)
    err = json.loads(raw)["error"]
    assert status == 503 and err["type"] == "chain_exhausted" and err["class"] == "RateLimited"
    assert 29 <= int(headers["Retry-After"]) <= 31  # when a key of that entry is back
    assert len(primary.received) == 2 and backup.received == []
    assert not sidecar.chain.on_fallback("gpt-4o")


async def test_a_short_reset_is_still_waited_out_when_its_class_is_not_a_trigger(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await two(
        fake_provider, start_sidecar, fallback={"triggers": ["ServerError"], "maxWait": 2}
    )
    primary.script(Behaviour.rate_limited(retry_after=0.4), Behaviour.rate_limited(retry_after=0.4))
    status, headers, _ = await ask(agent, sidecar)
    # Waited once on the only key, then that key's second 429 is the agent's answer.
    assert status == 429 and headers["X-Keyroute-Credential"] == "p1"
    assert primary.keys_seen() == [key("p1"), key("p1")] and backup.received == []
    assert 0.4 <= primary.received[1].time - primary.received[0].time < 0.9


# --- Streams --------------------------------------------------------------------------------------


async def stream_setup(fake_provider, start_sidecar, **timeouts: Any):
    return await two(fake_provider, start_sidecar, primary_keys=("p1", "p2"), timeouts=timeouts)


async def test_silence_after_the_headers_past_first_byte_fails_over(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await stream_setup(fake_provider, start_sidecar, firstByte=0.4)
    primary.set(Behaviour.stream(3, first_event_delay=5.0))  # headers at once, then nothing
    t = time.monotonic()
    status, headers, body = await ask(agent, sidecar, stream=True)
    elapsed = time.monotonic() - t
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert b"chatcmpl-backup" in body and b"chatcmpl-acme" not in body
    assert len(primary.received) == 1  # a Timeout: the silent route is not retried with p2
    assert 0.4 <= elapsed < 2.0


async def test_a_broken_stream_names_its_provider_and_counts_as_stream_broken(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await stream_setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(5, cut_after=2))
    status, _, body = await ask(agent, sidecar, stream=True)
    assert status == 200
    err = stream_error(body)
    assert err["type"] == "keyroute_stream_error" and err["class"] == "ConnectionError"
    assert err["provider"] == "acme" and err["message"]
    attempts = {"chain": "agents", "provider": "acme", "credential": "p1"}
    registry = sidecar.metrics.registry
    assert registry.get_sample_value("keyroute_upstream_attempts_total", {**attempts, "class": "OK"}) == 1
    assert (
        registry.get_sample_value("keyroute_upstream_attempts_total", {**attempts, "class": "StreamBroken"})
        == 1
    )
    assert len(primary.received) == 1 and backup.received == []


async def test_a_stream_past_the_request_deadline_ends_with_an_error_event(
    fake_provider, start_sidecar, agent
):
    primary, _, sidecar = await two(fake_provider, start_sidecar, requestTimeout=0.8)
    primary.set(Behaviour.stream(40, interval=0.05))  # 2 s of steady chunks: never idle
    t = time.monotonic()
    status, _, body = await ask(agent, sidecar, stream=True)
    elapsed = time.monotonic() - t
    assert status == 200
    err = stream_error(body)
    assert err["class"] == "Timeout" and "request deadline reached" in err["message"]
    assert 0.8 <= elapsed < 1.6
    assert 3 <= len(sse_events(body)) - 1 < 40


RESPONSES = {"model": "gpt-4o", "input": "hi", "stream": True}
MESSAGES = {
    "model": "claude-x",
    "max_tokens": 5,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    ("path", "body"), [("/responses", RESPONSES), ("/messages", MESSAGES)], ids=["responses", "anthropic"]
)
async def test_other_dialects_end_by_their_own_markers(fake_provider, start_sidecar, agent, path, body):
    """``response.completed`` (no ``[DONE]`` in the Responses API) and ``message_stop`` end a stream;
    the same stream without its finish is flagged."""
    primary, _, sidecar = await stream_setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(3))
    async with agent.post(sidecar.base_url + path, json=body) as resp:
        complete = await resp.read()
    assert b"keyroute_stream_error" not in complete and b"[DONE]" not in complete
    primary.set(Behaviour.stream(3, finish=False, done=False))
    async with agent.post(sidecar.base_url + path, json=body) as resp:
        cut = await resp.read()
    assert stream_error(cut)["class"] == "ConnectionError"


async def test_an_agent_leaving_mid_stream_is_quiet_and_lets_go_of_the_upstream(
    fake_provider, start_sidecar, caplog
):
    caplog.set_level(logging.DEBUG, logger="keyroute")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    primary, _, sidecar = await stream_setup(fake_provider, start_sidecar)
    primary.set(Behaviour.stream(60, interval=0.05))  # 3 s if read to the end
    t = time.monotonic()
    async with (
        aiohttp.ClientSession() as client,
        client.post(sidecar.base_url + "/chat/completions", json=chat(stream=True)) as resp,
    ):
        assert resp.status == 200
        await resp.content.readany()  # the first chunk, then the agent goes away
    await eventually(lambda: primary.answering == 0, timeout=1.5)
    assert time.monotonic() - t < 1.5  # the provider was not read to the end (3 s)
    await eventually(lambda: sidecar.in_flight == 0)  # the handler returned: what it logs is logged
    await asyncio.sleep(0.05)  # and what aiohttp logs as it finishes the response
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not [r for r in caplog.records if r.exc_info]
    assert_served_not_broken(sidecar)


# --- Config and reloads ---------------------------------------------------------------------------


def atomic_write(directory: Path, cfg: SidecarConfig, n: int) -> None:
    """What the kubelet does to a Secret volume: a new timestamped directory, then ``..data``
    swapped to it by a rename; ``config.json`` is a symlink through ``..data``."""
    version = directory / f"..2026_12_07_00_00_0{n}.{n:04d}"
    version.mkdir()
    (version / "config.json").write_text(cfg.to_json())
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")
    link = directory / "config.json"
    if not link.is_symlink():
        link.symlink_to("..data/config.json")


async def test_a_secret_volume_update_by_symlink_swap_is_applied(
    fake_provider, start_sidecar, agent, tmp_path
):
    fp: FakeProvider = await fake_provider("acme", keys=[key("old"), key("new")])

    def cfg(value: str) -> SidecarConfig:
        return config([entry("acme", "acme", fp.base_url, "k")], [pool("k", "acme", cred("k1", value))])

    atomic_write(tmp_path, cfg(key("old")), 1)
    sidecar = await start_sidecar(RenderedConfigFile(tmp_path))
    assert (await ask(agent, sidecar))[0] == 200
    atomic_write(tmp_path, cfg(key("new")), 2)
    await eventually(lambda: sidecar.chain.pools["k"].credentials[0].key == key("new"))
    assert (await ask(agent, sidecar))[0] == 200
    assert fp.keys_seen() == [key("old"), key("new")]
    applied = sidecar.metrics.registry.get_sample_value(
        "keyroute_config_reloads_total", {"result": "applied"}
    )
    assert applied == 1


# --- Metrics and logs -----------------------------------------------------------------------------


async def test_a_fallback_is_counted_and_shown_per_model(fake_provider, start_sidecar, agent):
    primary, _, sidecar = await two(fake_provider, start_sidecar)
    primary.set(Behaviour.server_error(500))
    assert (await ask(agent, sidecar, model="gpt-4o"))[1]["X-Keyroute-Provider"] == "backup"
    assert (await ask(agent, sidecar, model="gpt-4o"))[1]["X-Keyroute-Provider"] == "backup"
    async with agent.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
        text = await resp.text()
    moved = (
        'keyroute_fallback_activations_total{chain="agents",class="ServerError",'
        'from_provider="acme",to_provider="backup"} 1.0'
    )
    assert moved in text  # one activation, not one per request served on the fallback
    assert 'keyroute_fallback_active{chain="agents",model="gpt-4o"} 1.0' in text
    assert 'keyroute_requests_total{chain="agents",class="OK",provider="backup"} 2.0' in text
    assert (
        'keyroute_upstream_attempts_total{chain="agents",class="ServerError",credential="p1",provider="acme"} 2.0'
        in text
    )


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


async def test_action_log_lines_carry_the_fields_an_sre_filters_on(
    fake_provider, start_sidecar, agent, caplog
):
    caplog.set_level(logging.INFO, logger="keyroute")
    primary, _, sidecar = await two(fake_provider, start_sidecar, primary_keys=("p1", "p2"))
    primary.script(Behaviour.rate_limited(retry_after=30), key=key("p1"))
    assert (await ask(agent, sidecar))[1]["X-Keyroute-Credential"] == "p2"
    [line] = [r for r in caplog.records if r.getMessage() == "credential cooling down"]
    fields = line.kr  # type: ignore[attr-defined]
    assert fields["class"] == "RateLimited" and fields["pool"] == "acme-keys"
    assert fields["credential"] == "p1" and fields["fingerprint"].startswith("sha256:")
    assert fields["model"] == "gpt-4o" and RFC3339.match(fields["until"]), fields
    [attempt] = [r for r in caplog.records if r.getMessage() == "upstream attempt failed"]
    assert attempt.kr["class"] == "RateLimited" and attempt.kr["status"] == 429  # type: ignore[attr-defined]
