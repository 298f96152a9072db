"""The sidecar's reporter: recovery actions become Events on the CredentialPool or ProviderChain they
concern, without the data path ever waiting for the API server.

:meth:`Reporter.offer` is synchronous and O(1): it queues the action and returns. A background task
sends the queue (:class:`~keyroute.core.reports.ReportQueue`) through a token bucket: at most
``burst`` report writes at once, then ``rate`` per second (the README's per-pod budget). New
transitions go first; repeats (count patches of an Event the operator already folded) and the
presence heartbeat go after them and may not use the last ``reserve`` tokens, so a new cooldown never
waits for repeats, and ``reserve`` of them leave at once even during a storm of repeats. While the API server is
unreachable, the queue holds what happened: a repeat of a queued transition is merged into it
(``count``), and when the queue is full a report is dropped (a repeat first) and counted; the count
rides on the next Event that gets through, and on ``keyroute_reports_total{result="dropped"}``. A
report the API refuses for good (403: RBAC; 422: invalid) is logged and counted, never retried forever.
A 401 or 403 within :data:`SETTLING` seconds of the API server being unreachable is not taken as
final: a restarting API server serves requests before its RBAC and token caches are loaded, and
refuses everything until then (seen on a real kube-apiserver restart); such reports are retried.

The sidecar's own presence on its chain is a ``SidecarReporting`` Event refreshed periodically, from
which the operator counts reporting sidecars.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from keyroute.core.actions import Action
from keyroute.core.config import SidecarConfig
from keyroute.core.reports import (
    DEDUP_WINDOW,
    PRESENCE_INTERVAL,
    REPEAT_RESERVE,
    REPORT_BURST,
    REPORT_RATE,
    Origin,
    Pending,
    ReportQueue,
    TokenBucket,
    event_body,
    event_name,
    presence_body,
    presence_name,
    send_wait,
)
from keyroute.kube import CORE, ApiError, Kube, path
from keyroute.sidecar.metrics import Metrics

__all__ = ["Reporter", "TokenBucket"]

log = logging.getLogger("keyroute.sidecar.reporter")

# Statuses worth retrying: the API server is down, overloaded or throttling us.
_RETRY = frozenset({408, 429, 500, 502, 503, 504})
# Seconds after the API server was last unreachable during which a 401/403 is retried (see above).
SETTLING = 30.0


def refusal_is_final(status: int, now: float, unreachable_at: float | None) -> bool:
    """Whether an API error ``status`` drops the report (else it is requeued and retried)."""
    if status in _RETRY:
        return False
    just_back = unreachable_at is not None and now - unreachable_at < SETTLING
    return not (status in (401, 403) and just_back)


@dataclass(slots=True)
class _Sent:
    name: str
    count: int
    first_at: float
    at: float


class Reporter:
    """Sends one sidecar's reports. ``offer`` from anywhere on the loop; ``run`` as a task."""

    def __init__(
        self,
        kube: Kube,
        origin: Origin,
        config: Callable[[], SidecarConfig | None],
        metrics: Metrics,
        *,
        rate: float = REPORT_RATE,
        burst: int = REPORT_BURST,
        reserve: int = REPEAT_RESERVE,
        capacity: int = 1000,
        presence_interval: float = PRESENCE_INTERVAL,
        retry: tuple[float, float] = (0.5, 30.0),
        clock: Callable[[], float] = time.time,
    ):
        if not 0 <= reserve < burst:
            raise ValueError(f"reserve must be at least 0 and below burst ({burst}), got {reserve}")
        self.kube = kube
        self.origin = origin
        self.config = config
        self.metrics = metrics
        self.presence_interval = presence_interval
        self.retry = retry
        self.clock = clock
        self.bucket = TokenBucket(rate, burst)
        self.reserve = reserve
        self.queue = ReportQueue(capacity)
        self._sent: dict[tuple[str, ...], _Sent] = {}
        self._wake = asyncio.Event()
        self._failing = False
        self._unreachable_at: float | None = None  # when the API server last could not be reached
        self.delivered = asyncio.Event()  # set whenever the queue empties (tests, shutdown)

    # --- the data path's side ----------------------------------------------------------------------

    def offer(self, action: Action) -> None:
        """Queue ``action`` for reporting. Never blocks, never raises for a full queue."""
        self._counted(*self.queue.offer(action))

    def _offer_presence(self, at: float) -> None:
        self._counted(*self.queue.offer_presence(at))

    def _counted(self, merged: bool, dropped: int) -> None:
        if merged:
            self.metrics.reports.labels("merged").inc()
        if dropped:
            self.metrics.reports.labels("dropped").inc(dropped)
        self.metrics.reports_pending.set(len(self.queue))
        self.delivered.clear()
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self.queue)

    @property
    def dropped(self) -> int:
        """Reports dropped since the last Event that got through (that Event says how many)."""
        return self.queue.dropped

    # --- the sending task --------------------------------------------------------------------------

    async def run(self) -> None:
        """Send until cancelled: presence now and every ``presence_interval``, reports as they come."""
        next_presence = 0.0
        delay = self.retry[0]
        while True:
            now = self.clock()
            if now >= next_presence and self.config() is not None:
                self._offer_presence(now)
                next_presence = now + self.presence_interval
            wait = send_wait(self.queue, self.bucket, self.reserve)
            if wait is None:
                self.delivered.set()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, next_presence - now))
                continue
            if wait > 0:
                # A new transition offered meanwhile may go at once: wake on offers too.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                continue
            key, item = self.queue.pop()
            self.metrics.reports_pending.set(len(self.queue))
            try:
                await self._send(key, item)
            except asyncio.CancelledError:
                self._requeue(key, item)
                raise
            except ApiError as e:
                if not refusal_is_final(e.status, self.clock(), self._unreachable_at):
                    self._requeue(key, item)
                    await self._backoff(e, delay)
                    delay = min(delay * 2, self.retry[1])
                    continue
                self.metrics.reports.labels("rejected").inc()
                log.error(
                    "the API server refused a report; it is dropped",
                    extra={"kr": {"status": e.status, "reason": e.reason, "hint": _hint(e.status)}},
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                self._unreachable_at = self.clock()
                self._requeue(key, item)
                await self._backoff(e, delay)
                delay = min(delay * 2, self.retry[1])
                continue
            else:
                self.bucket.take()
                delay = self.retry[0]
                if self._failing:
                    self._failing = False
                    log.info("reporting to the API server again", extra={"kr": {"pending": self.pending}})

    def _requeue(self, key: tuple[str, ...], item: Pending) -> None:
        if not self.queue.requeue(key, item):
            self.metrics.reports.labels("dropped").inc()
        self.metrics.reports_pending.set(len(self.queue))

    async def _backoff(self, err: Exception, delay: float) -> None:
        self.metrics.reports.labels("retried").inc()
        if not self._failing:
            self._failing = True
            log.warning(
                "cannot report to the API server; buffering",
                extra={"kr": {"error": str(err) or type(err).__name__, "pending": self.pending}},
            )
        await asyncio.sleep(delay)

    async def _send(self, key: tuple[str, ...], item: Pending) -> None:
        config = self.config()
        if config is None:
            return
        now = self.clock()
        if len(self._sent) > 4 * self.queue.capacity:
            self._sent = {k: v for k, v in self._sent.items() if now - v.at < DEDUP_WINDOW}
        self.queue.prune(now)
        sent = self._sent.get(key)
        if sent is not None and now - sent.at >= DEDUP_WINDOW and item.action is not None:
            sent = None
        if item.action is None:
            body = presence_body(
                config.chain.name,
                config.chain.namespace,
                config.chain.uid,
                self.origin,
                at=now,
                config_hash=config.content_hash(),
                count=(sent.count if sent else 0) + 1,
            )
            name = presence_name(config.chain.name, self.origin)
            namespace = config.chain.namespace
            carried = 0
            first_at = sent.first_at if sent else now
            count = body["count"]
        else:
            action = item.action
            carried = self.queue.dropped
            namespace = action.namespace
            name = sent.name if sent else event_name(action.object_name, self.origin, key, action.at)
            first_at = sent.first_at if sent else item.first_at
            count = (sent.count if sent else 0) + item.count
            body = event_body(
                action,
                self.origin,
                name=name,
                uid=_uid(config, action),
                count=count,
                first_at=first_at,
                dropped=carried,
            )
        url = path(*CORE, "events", namespace, name)
        if sent is not None or item.action is None:
            try:
                await self.kube.merge_patch(url, _repeat_patch(body))
            except ApiError as e:
                if e.status != 404:
                    raise
                await self.kube.create(path(*CORE, "events", namespace), body)
        else:
            try:
                await self.kube.create(path(*CORE, "events", namespace), body)
            except ApiError as e:
                if e.status != 409:
                    raise
                await self.kube.merge_patch(url, _repeat_patch(body))
        self.metrics.reports.labels("sent" if sent is None else "merged").inc()
        if item.action is not None:
            self.queue.delivered(carried)
        self._sent[key] = _Sent(name=name, count=count, first_at=first_at, at=now)


def _repeat_patch(body: dict[str, object]) -> dict[str, object]:
    """What changes when an Event is repeated: count, times, message, annotations (``until``...)."""
    meta = body["metadata"]
    assert isinstance(meta, dict)
    return {
        "metadata": {"annotations": meta["annotations"]},
        "count": body["count"],
        "lastTimestamp": body["lastTimestamp"],
        "message": body["message"],
        "type": body["type"],
    }


def _uid(config: SidecarConfig, action: Action) -> str | None:
    if action.object_kind == "ProviderChain":
        return config.chain.uid
    return next((p.uid for p in config.pools if p.name == action.object_name), None)


def _hint(status: int) -> str:
    if status in (401, 403):
        return "the pod's ServiceAccount needs create and patch on events (see the README, RBAC)"
    return "the Event was invalid; please report this as a keyroute bug"
