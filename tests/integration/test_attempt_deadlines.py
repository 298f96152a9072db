"""The proxy's shared attempt timer (one event-loop handle for every attempt in flight): each attempt
still times out at its own due time, whatever the order the attempts started in."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from keyroute.sidecar.proxy import _AGENT_GONE, AGENT_CHECK, _Deadlines, _IdleTimer


async def _bounded(deadlines: _Deadlines, idle: float, work: float, restart: float | None = None) -> str:
    timer = _IdleTimer(deadlines, idle, float("inf"))  # no request deadline
    try:
        try:
            if restart is not None:
                await asyncio.sleep(restart)
                timer.restart(idle)
            await asyncio.sleep(work)
            return "done"
        except asyncio.CancelledError:
            timer.cancelled()
            raise
        finally:
            timer.close()
    except TimeoutError:
        return "timeout"


async def test_each_attempt_times_out_at_its_own_due_time() -> None:
    deadlines = _Deadlines(asyncio.get_running_loop())
    loop = asyncio.get_running_loop()
    began = loop.time()
    # A long bound first, then a short one that must move the shared handle earlier.
    slow = asyncio.create_task(_bounded(deadlines, 5.0, 1.0))
    stalled = asyncio.create_task(_bounded(deadlines, 0.05, 5.0))
    stalled_at = asyncio.create_task(_timed(stalled, loop))
    # Progress (a restart at 0.4 s) keeps an attempt alive past its first due time (0.6 s) until it
    # ends (0.8 s), before its new one (1.0 s). Margins of 0.2 s: a loaded machine delays wake-ups.
    kept = asyncio.create_task(_bounded(deadlines, 0.6, 0.4, restart=0.4))
    assert await slow == "done"
    result, at = await stalled_at
    assert result == "timeout"
    assert 0.04 <= at - began < 1.0  # its own bound, long before the slow attempt's 5 s
    assert await kept == "done"


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    deadlines = _Deadlines(asyncio.get_running_loop())
    task = asyncio.create_task(_bounded(deadlines, 5.0, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_watched_stream_ends_soon_after_its_agent_closes_the_connection() -> None:
    """What the relay relies on, on a real aiohttp server: once a client has closed its connection,
    ``request.transport`` is None (or closing) while the handler still runs, although the handler
    neither reads nor writes; the shared timer sees it within AGENT_CHECK and expires the watched
    timer as ``agent gone``. A client that stays connected through several checks is left alone.
    If aiohttp stops clearing the transport on connection loss, this fails."""
    deadlines = _Deadlines(asyncio.get_running_loop())
    ended: dict[str, tuple[str, float]] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        await out.write(b"data: 1\n\n")
        name = request.query["name"]
        timer = _IdleTimer(deadlines, 30.0, 60.0)
        deadlines.watch_agent(timer, request)
        try:
            try:
                await asyncio.sleep(float(request.query["silence"]))  # an upstream that sends nothing
                ended[name] = ("done", time.monotonic())
                await out.write(b"data: 2\n\n")
            except asyncio.CancelledError:
                timer.cancelled()
                raise
            finally:
                timer.close()
                deadlines.unwatch_agent(timer)
        except TimeoutError:
            ended[name] = (timer.expired, time.monotonic())
        return out

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)  # handler_cancellation off
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as client:
            stays = await client.get(f"http://127.0.0.1:{port}/?name=stays&silence={3 * AGENT_CHECK}")
            leaves = await client.get(f"http://127.0.0.1:{port}/?name=leaves&silence=30")
            assert await leaves.content.readuntil(b"\n\n") == b"data: 1\n\n"
            left = time.monotonic()
            leaves.close()
            assert await stays.read() == b"data: 1\n\ndata: 2\n\n"
            for _ in range(100):
                if "leaves" in ended:
                    break
                await asyncio.sleep(0.02)
        why, at = ended["leaves"]
        assert why == _AGENT_GONE and at - left < AGENT_CHECK + 0.5
        assert ended["stays"][0] == "done"
        assert not deadlines._agents
    finally:
        await runner.cleanup()


async def _timed(task: asyncio.Task[str], loop: asyncio.AbstractEventLoop) -> tuple[str, float]:
    result = await task
    return result, loop.time()
