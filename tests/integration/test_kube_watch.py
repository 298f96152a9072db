"""keyroute's list-and-watch (``keyroute.kube.watch_forever``) against a stand-in API server on
loopback that records every request and plays a script of watch streams. What client-go's reflector
does, and so should keyroute's: the first listing is served from the API server's watch cache
(``resourceVersion=0``); a watch that ends or breaks is resumed from the last version seen (a change
or a bookmark) without listing again; only the API server's refusal (410: the version left its
history) starts over, with a consistent listing. The real API server runs the same code in
tests/realapi (its outage test included); it cannot tell a test which query a client sent, nor end
a stream on cue, so the request pattern is checked here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from keyroute.kube import Connection, Kube, watch_forever

PATH = "/api/v1/namespaces/ns/secrets"


def change(kind: str, version: str) -> dict[str, Any]:
    return {"type": kind, "object": {"metadata": {"name": "a", "resourceVersion": version}}}


class StandIn:
    """Lists answer ``fail_lists`` times with 500, then one object at version ``10 + n`` (n: the
    listing's number). Each watch plays the next script: events, then ``end`` (the stream ends, as
    at the server's timeout) or ``break`` (the connection drops); without a script it stays open."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []  # ("list" | "watch", query)
        self.fail_lists = 0
        self.scripts: list[tuple[list[dict[str, Any]], str]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        watching = query.get("watch") == "true"
        self.requests.append(("watch" if watching else "list", query))
        self.arrived.set()
        if not watching:
            if sum(1 for k, _ in self.requests if k == "list") <= self.fail_lists:
                return web.json_response({"kind": "Status", "reason": "InternalError"}, status=500)
            version = str(10 + sum(1 for k, _ in self.requests if k == "list"))
            return web.json_response(
                {
                    "metadata": {"resourceVersion": version},
                    "items": [{"metadata": {"name": "a", "resourceVersion": version}}],
                }
            )
        resp = web.StreamResponse()
        await resp.prepare(request)
        if not self.scripts:
            await asyncio.Event().wait()  # open until the client goes
        events, then = self.scripts.pop(0)
        for event in events:
            await resp.write(json.dumps(event).encode() + b"\n")
        if then == "break":
            assert request.transport is not None
            request.transport.abort()
        return resp

    def lists(self) -> list[dict[str, str]]:
        return [q for k, q in self.requests if k == "list"]

    def watched_from(self) -> list[str | None]:
        return [q.get("resourceVersion") for k, q in self.requests if k == "watch"]


@pytest.fixture
async def served() -> AsyncIterator[tuple[StandIn, Kube]]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_get(PATH, stand_in.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    kube = Kube.from_connection(Connection(server=f"http://127.0.0.1:{port}", token="t"))
    try:
        yield stand_in, kube
    finally:
        await kube.close()
        await runner.cleanup()


async def run_until(kube: Kube, stand_in: StandIn, requests: int) -> tuple[list[tuple[str, str]], int]:
    """Run ``watch_forever`` until the stand-in got ``requests`` requests: what it handed on
    (type, resourceVersion) and how many listings it reported done."""
    got: list[tuple[str, str]] = []
    listed: list[int] = []
    task = asyncio.create_task(
        watch_forever(
            kube,
            PATH,
            lambda kind, obj: got.append((kind, obj["metadata"]["resourceVersion"])),
            backoff=(0.001, 0.002),
            on_listed=lambda: listed.append(1),
        )
    )
    try:
        async with asyncio.timeout(10):
            while len(stand_in.requests) < requests:
                stand_in.arrived.clear()
                await stand_in.arrived.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return got, len(listed)


async def test_first_listing_from_the_cache_then_an_ended_watch_is_resumed_without_a_listing(
    served: tuple[StandIn, Kube],
) -> None:
    stand_in, kube = served
    stand_in.scripts = [
        ([change("MODIFIED", "20")], "end"),
        ([{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "30"}}}], "end"),
        ([change("DELETED", "31")], "end"),
    ]
    got, listed = await run_until(kube, stand_in, requests=5)
    assert stand_in.lists() == [{"resourceVersion": "0"}]  # one listing, from the watch cache
    assert stand_in.watched_from() == ["11", "20", "30", "31"]  # each from the last version seen
    assert got == [("LISTED", "11"), ("MODIFIED", "20"), ("DELETED", "31")]  # the bookmark kept back
    assert listed == 1
    watch = next(q for k, q in stand_in.requests if k == "watch")
    assert watch["allowWatchBookmarks"] == "true" and "timeoutSeconds" in watch


async def test_a_broken_connection_resumes_and_an_expired_version_lists_again_consistently(
    served: tuple[StandIn, Kube],
) -> None:
    stand_in, kube = served
    expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    stand_in.scripts = [([change("MODIFIED", "20")], "break"), ([expired], "end")]
    got, listed = await run_until(kube, stand_in, requests=5)
    assert [k for k, _ in stand_in.requests] == ["list", "watch", "watch", "list", "watch"]
    assert stand_in.lists() == [{"resourceVersion": "0"}, {}]  # the re-list is a consistent read
    assert stand_in.watched_from() == ["11", "20", "12"]
    assert got == [("LISTED", "11"), ("MODIFIED", "20"), ("LISTED", "12")]
    assert listed == 2


async def test_until_a_listing_succeeds_every_retry_reads_the_cache(served: tuple[StandIn, Kube]) -> None:
    stand_in, kube = served
    stand_in.fail_lists = 2  # the API server failing at the operator's start
    got, listed = await run_until(kube, stand_in, requests=4)
    assert [q.get("resourceVersion") for q in stand_in.lists()] == ["0", "0", "0"]
    assert stand_in.watched_from() == ["13"]
    assert got == [("LISTED", "13")] and listed == 1
