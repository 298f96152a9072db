"""keyroute's list-and-watch (``keyroute.kube.watch_forever``) against a stand-in API server on
loopback that records every request: the first listing is served from the API server's watch cache
(``resourceVersion=0``, as client-go's reflector lists first), every re-list after a break is a
consistent read (never older than what was already handled), and the watch starts from the
listing's version. The real API server runs the same code in tests/realapi; it cannot tell a test
which query a client sent, so the request pattern is checked here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from keyroute.kube import Connection, Kube, watch_forever

PATH = "/api/v1/namespaces/ns/secrets"


class StandIn:
    """Lists answer ``fail_lists`` times with 500, then one item at version ``10 + n``; each watch
    sends one MODIFIED event and ends its stream (as a server-side timeout does)."""

    def __init__(self, fail_lists: int = 0) -> None:
        self.lists: list[dict[str, str]] = []
        self.watches: list[dict[str, str]] = []
        self.fail_lists = fail_lists
        self.listing = asyncio.Event()  # set at every listing request

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        if query.get("watch") == "true":
            self.watches.append(query)
            resp = web.StreamResponse()
            await resp.prepare(request)
            event = {"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "99"}}}
            await resp.write(json.dumps(event).encode() + b"\n")
            return resp
        self.lists.append(query)
        self.listing.set()
        if len(self.lists) <= self.fail_lists:
            return web.json_response({"kind": "Status", "reason": "InternalError"}, status=500)
        version = str(10 + len(self.lists))
        return web.json_response(
            {
                "metadata": {"resourceVersion": version},
                "items": [{"metadata": {"name": "a", "resourceVersion": version}}],
            }
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[StandIn, Kube]]:
    stand_in = StandIn()
    app = web.Application()
    app.router.add_get(PATH, stand_in.handle)
    runner = web.AppRunner(app)
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


async def run_until(kube: Kube, stand_in: StandIn, lists: int) -> tuple[list[tuple[str, str]], int]:
    """Run ``watch_forever`` until the stand-in got ``lists`` listing requests: what it handed on
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
            while len(stand_in.lists) < lists:
                stand_in.listing.clear()
                await stand_in.listing.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return got, len(listed)


async def test_the_first_listing_comes_from_the_watch_cache_and_a_relist_is_consistent(
    served: tuple[StandIn, Kube],
) -> None:
    stand_in, kube = served
    got, listed = await run_until(kube, stand_in, lists=3)
    assert listed >= 2
    assert stand_in.lists[0] == {"resourceVersion": "0"}
    assert stand_in.lists[1] == {} and stand_in.lists[2] == {}  # re-lists after the stream ended
    # Each watch starts from its listing's version, with bookmarks, and ends server-side.
    assert stand_in.watches[0]["resourceVersion"] == "11"
    assert stand_in.watches[1]["resourceVersion"] == "12"
    assert all(w["allowWatchBookmarks"] == "true" and "timeoutSeconds" in w for w in stand_in.watches)
    assert got[:4] == [("LISTED", "11"), ("MODIFIED", "99"), ("LISTED", "12"), ("MODIFIED", "99")]


async def test_until_a_listing_succeeds_every_retry_reads_the_cache(served: tuple[StandIn, Kube]) -> None:
    stand_in, kube = served
    stand_in.fail_lists = 2  # the API server failing at the operator's start
    got, _ = await run_until(kube, stand_in, lists=4)
    assert [q.get("resourceVersion") for q in stand_in.lists[:4]] == ["0", "0", "0", None]
    assert got[0] == ("LISTED", "13")
