"""The proxy's shared attempt timer (one event-loop handle for every attempt in flight): each attempt
still times out at its own due time, whatever the order the attempts started in."""

from __future__ import annotations

import asyncio

import pytest

from keyroute.sidecar.proxy import _Deadlines, _IdleTimer


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


async def _timed(task: asyncio.Task[str], loop: asyncio.AbstractEventLoop) -> tuple[str, float]:
    result = await task
    return result, loop.time()
