"""The operator's Event lane (keyroute.controller.events): bounded, a few senders, never blocks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from keyroute.controller.events import CAPACITY, EventLane


class Sink:
    """A send() that records what it got and waits on a gate while the gate is closed."""

    def __init__(self, fail: set[str] | None = None):
        self.started: list[str] = []
        self.sent: list[tuple[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = fail or set()

    async def __call__(self, namespace: str, event: Mapping[str, Any]) -> None:
        self.started.append(event["name"])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if event["name"] in self.fail:
                raise RuntimeError(f"refused {event['name']}")
            self.sent.append((namespace, event["name"]))
        finally:
            self.in_flight -= 1


def ev(name: str) -> dict[str, Any]:
    return {"name": name}


async def test_posts_in_order_with_at_most_senders_at_once() -> None:
    sink = Sink()
    sink.gate.clear()
    lane = EventLane(sink, senders=2, capacity=100)
    for i in range(10):
        lane.post("ns", ev(f"e{i}"), "Ready")
    await asyncio.sleep(0)
    assert sink.in_flight == 2  # two senders, the rest queued
    assert len(lane) == 8
    sink.gate.set()
    await lane.drain()
    assert sink.started == [f"e{i}" for i in range(10)]  # taken in the order posted
    assert sorted(sink.sent) == sorted(("ns", f"e{i}") for i in range(10))
    assert sink.most_in_flight == 2
    assert len(lane) == 0


async def test_full_queue_drops_new_events_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    sink.gate.clear()
    dropped: list[int] = []
    lane = EventLane(sink, senders=1, capacity=4, on_drop=lambda: dropped.append(1))
    caplog.set_level(logging.WARNING, logger="keyroute.operator")
    for i in range(10):  # one in flight at once (it left the queue), four queued, five dropped
        lane.post("ns", ev(f"e{i}"), "Ready")
        await asyncio.sleep(0)
    assert len(dropped) == 5
    full = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1
    sink.gate.set()
    await lane.drain()
    assert [name for _, name in sink.sent] == ["e0", "e1", "e2", "e3", "e4"]  # the oldest kept
    over = [r for r in caplog.records if r.getMessage() == "Events were dropped: the queue was full"]
    assert len(over) == 1
    assert over[0].kr == {"dropped": 5}  # type: ignore[attr-defined]


async def test_a_refused_event_is_a_log_line_and_the_rest_go_on(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(fail={"e1"})
    lane = EventLane(sink, senders=1)
    caplog.set_level(logging.WARNING, logger="keyroute.operator")
    for i in range(3):
        lane.post("ns", ev(f"e{i}"), "CredentialRejected")
    await lane.drain()
    assert [name for _, name in sink.sent] == ["e0", "e2"]
    [line] = [r for r in caplog.records if r.getMessage() == "cannot post an Event"]
    assert line.kr == {"reason": "CredentialRejected", "error": "refused e1"}  # type: ignore[attr-defined]


async def test_cancel_drops_what_is_queued() -> None:
    sink = Sink()
    sink.gate.clear()
    lane = EventLane(sink, senders=1)
    for i in range(5):
        lane.post("ns", ev(f"e{i}"), "Ready")
    await asyncio.sleep(0)
    lane.cancel()
    sink.gate.set()
    await lane.drain()
    assert sink.sent == []  # the one in flight was cancelled, the queued ones dropped
    assert len(lane) == 0
    lane.post("ns", ev("later"), "Ready")  # a lane can be used again (a new term)
    await lane.drain()
    assert sink.sent == [("ns", "later")]


async def ticks(n: int = 5) -> None:
    """Let every ready task run (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_events_wait_while_the_owner_is_busy_then_go_in_order() -> None:
    sink = Sink()
    idle = asyncio.Event()  # clear: a burst of reconciles is under way
    lane = EventLane(sink, senders=2, idle=idle, max_hold=3600)
    for i in range(4):
        lane.post("ns", ev(f"e{i}"), "Ready")
    await ticks()
    assert sink.started == []  # held: the statuses of the burst go first
    assert len(lane) == 4
    idle.set()
    await lane.drain()
    assert sink.started == ["e0", "e1", "e2", "e3"]
    assert len(sink.sent) == 4


async def test_an_idle_owner_holds_nothing() -> None:
    sink = Sink()
    idle = asyncio.Event()
    idle.set()
    lane = EventLane(sink, idle=idle, max_hold=3600)
    lane.post("ns", ev("e0"), "Ready")
    await ticks()
    assert sink.sent == [("ns", "e0")]


async def test_an_event_is_held_no_longer_than_max_hold() -> None:
    sink = Sink()
    idle = asyncio.Event()  # busy, and stays busy
    lane = EventLane(sink, senders=1, idle=idle, max_hold=0.0)  # every Event has waited long enough
    lane.post("ns", ev("e0"), "Ready")
    lane.post("ns", ev("e1"), "Ready")
    await lane.drain()
    assert sink.sent == [("ns", "e0"), ("ns", "e1")]
    assert not idle.is_set()


async def test_cancel_while_held_drops_the_events_quietly() -> None:
    sink = Sink()
    idle = asyncio.Event()
    lane = EventLane(sink, idle=idle, max_hold=3600)
    lane.post("ns", ev("e0"), "Ready")
    await ticks()
    lane.cancel()
    await lane.drain()
    idle.set()
    await ticks()
    assert sink.started == []
    assert len(lane) == 0


async def test_the_default_lane_holds_a_first_sync_of_thousands_of_objects() -> None:
    """events.CAPACITY: at an operator's first start on 2,000 pools and 600 chains (bench/startup_bench.py's
    larger size) some 3,200 Events are posted while the burst holds them; every one is kept and sent
    once the burst ends. Past the capacity, new ones are dropped (client-go's DropIfChannelFull)."""
    sink = Sink()
    idle = asyncio.Event()  # the start-up burst is under way: everything is held
    dropped: list[int] = []
    lane = EventLane(sink, idle=idle, max_hold=3600, on_drop=lambda: dropped.append(1))
    for i in range(CAPACITY):
        lane.post("ns", ev(f"e{i}"), "Ready")
    await ticks()
    assert (len(lane), dropped, sink.started) == (CAPACITY, [], [])
    lane.post("ns", ev("one-too-many"), "Ready")
    assert len(dropped) == 1
    idle.set()
    await lane.drain()
    assert sink.started == [f"e{i}" for i in range(CAPACITY)] and len(sink.sent) == CAPACITY  # in order, all
    assert CAPACITY >= 3200
