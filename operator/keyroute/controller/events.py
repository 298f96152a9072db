"""The operator's Events, posted in the background, behind the writes that matter.

Status and the rendered config Secrets are what sidecars, ``kubectl get`` and alerts read; an Event is
news about a change that is already written. So Events do not compete with those writes: they wait in
one bounded queue and a few senders post them (two API connections of the client's sixteen), as
client-go's event broadcaster does. At an operator's first start on a cluster of 1,000 pools, the
status of every pool and chain is written first and the 1,600 first-sync Events follow, instead of
the two being interleaved and every status waiting its turn behind Events.

While the operator has reconciles queued or running for a burst of watch events (its start-up
listing, a mass change), the lane holds its Events back (``idle``, an :class:`asyncio.Event` the
owner sets when no such reconcile is left), for at most ``max_hold`` seconds per Event: an Event
costs the API server a fifth of a status patch (~1 ms of CPU against ~5 ms, measured), so at a first
start over 1,000 pools the 1,600 Events are some 1.6 s of its CPU that the statuses need. Outside
bursts nothing is held: a change's Event follows its status within milliseconds.

A full queue drops the new Event, as client-go does (``DropIfChannelFull``), rather than holding a
reconcile or growing without bound: it is counted (``keyroute_operator_events_dropped_total``) and
logged once per overflow, with the number dropped when half the queue is free again. An Event that the API
server refuses is a log line, never a failed reconcile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("keyroute.operator")

Send = Callable[[str, dict[str, Any]], Awaitable[None]]

SENDERS = 2
# Room for the first sync of a few thousand objects (each Event kept is ~1 KB). client-go keeps 1,000.
CAPACITY = 5000
# Longest an Event waits for a burst of reconciles to end: news delayed, never lost to a long burst.
MAX_HOLD = 30.0


class EventLane:
    """A bounded queue of Events (``namespace``, body) and at most ``senders`` tasks posting them."""

    def __init__(
        self,
        send: Send,
        *,
        senders: int = SENDERS,
        capacity: int = CAPACITY,
        on_drop: Callable[[], None] | None = None,
        idle: asyncio.Event | None = None,
        max_hold: float = MAX_HOLD,
    ):
        self._send = send
        self._senders = senders
        self._capacity = capacity
        self._on_drop = on_drop
        self._idle = idle  # None: never hold
        self._max_hold = max_hold
        # (namespace, Event, reason, loop time queued)
        self._queue: collections.deque[tuple[str, dict[str, Any], str, float]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropped = 0  # in the current overflow

    def __len__(self) -> int:
        return len(self._queue)

    def post(self, namespace: str, event: dict[str, Any], reason: str) -> None:
        """Queue ``event`` for ``namespace``; never waits. Needs a running event loop."""
        if len(self._queue) >= self._capacity:
            if not self._dropped:
                log.warning(
                    "Event queue full: new Events are dropped until it has room",
                    extra={"kr": {"capacity": self._capacity, "reason": reason}},
                )
            self._dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        self._queue.append((namespace, event, reason, asyncio.get_running_loop().time()))
        if len(self._tasks) < self._senders:
            task = asyncio.create_task(self._run(), name="keyroute-events")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while self._queue:
            if await self._held():
                continue  # the queue may have been emptied meanwhile
            namespace, event, reason, _ = self._queue.popleft()
            if self._dropped and len(self._queue) <= self._capacity // 2:
                # The overflow is over once half the queue is free again (not at the first free
                # slot, which a steady stream of new Events would fill at once: one line per Event).
                log.warning(
                    "Events were dropped: the queue was full", extra={"kr": {"dropped": self._dropped}}
                )
                self._dropped = 0
            try:
                await self._send(namespace, event)
            except Exception as e:  # an Event is worth a log line, never a failed reconcile
                log.warning("cannot post an Event", extra={"kr": {"reason": reason, "error": str(e)}})

    async def _held(self) -> bool:
        """Wait while the owner is busy, until the oldest queued Event has waited ``max_hold``;
        whether it waited."""
        idle = self._idle
        if idle is None or idle.is_set():
            return False
        loop = asyncio.get_running_loop()
        wait = self._queue[0][3] + self._max_hold - loop.time()
        if wait <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await idle.wait()
        return True

    async def drain(self) -> None:
        """Until every queued Event is posted (or failed); bound it with a timeout."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def cancel(self) -> None:
        """Drop what is queued and stop posting (leadership lost, shutdown)."""
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()
