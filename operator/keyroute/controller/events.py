"""The operator's Events, posted in the background, behind the writes that matter.

Status and the rendered config Secrets are what sidecars, ``kubectl get`` and alerts read; an Event is
news about a change that is already written. So Events do not compete with those writes: they wait in
one bounded queue and a few senders post them (two API connections of the client's sixteen), as
client-go's event broadcaster does. At an operator's first start on a cluster of 1,000 pools, the
status of every pool and chain is written first and the 1,600 first-sync Events follow, instead of
the two being interleaved and every status waiting its turn behind Events.

A full queue drops the new Event, as client-go does (``DropIfChannelFull``), rather than holding a
reconcile or growing without bound: it is counted (``keyroute_operator_events_dropped_total``) and
logged once per overflow, with the number dropped when half the queue is free again. An Event that the API
server refuses is a log line, never a failed reconcile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("keyroute.operator")

Send = Callable[[str, dict[str, Any]], Awaitable[None]]

SENDERS = 2
# Room for the first sync of a few thousand objects (each Event kept is ~1 KB). client-go keeps 1,000.
CAPACITY = 5000


class EventLane:
    """A bounded queue of Events (``namespace``, body) and at most ``senders`` tasks posting them."""

    def __init__(
        self,
        send: Send,
        *,
        senders: int = SENDERS,
        capacity: int = CAPACITY,
        on_drop: Callable[[], None] | None = None,
    ):
        self._send = send
        self._senders = senders
        self._capacity = capacity
        self._on_drop = on_drop
        self._queue: collections.deque[tuple[str, dict[str, Any], str]] = collections.deque()
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
        self._queue.append((namespace, event, reason))
        if len(self._tasks) < self._senders:
            task = asyncio.create_task(self._run(), name="keyroute-events")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        while self._queue:
            namespace, event, reason = self._queue.popleft()
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

    async def drain(self) -> None:
        """Until every queued Event is posted (or failed); bound it with a timeout."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def cancel(self) -> None:
        """Drop what is queued and stop posting (leadership lost, shutdown)."""
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()
