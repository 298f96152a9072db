"""The request path: one agent request in, attempts along the chain, one answer out.

The decisions come from :class:`keyroute.core.routing.Route`; this module only performs attempts and
moves bytes. Non-streaming answers are read whole (they are small, and a failure while reading is
still before the agent's first byte, so it may fail over). Streams are checked up to their first
event, then relayed chunk by chunk; from then on the answer is committed, and a cut, a stall or an
unfinished end is closed with an SSE error event (docs/sidecar.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import aiohttp
from aiohttp import web
from yarl import URL

from keyroute.core.actions import Action
from keyroute.core.bodies import inspect_body
from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification, classify, classify_stream_event
from keyroute.core.paths import PATH_RULE, safe_path
from keyroute.core.routing import Attempt, Exhausted, Route, Verdict, Wait
from keyroute.core.streams import StreamWatch, error_event, first_data_event, first_event_end
from keyroute.core.usage import body_usage
from keyroute.sidecar.metrics import Metrics
from keyroute.sidecar.upstream import (
    MAX_ERROR_BODY,
    attempt_headers,
    response_headers,
    transport_failure,
)

if TYPE_CHECKING:
    from keyroute.core.chains import Chain

log = logging.getLogger("keyroute.sidecar")

MAX_FIRST_EVENT = 64 * 1024
#: The largest request body the sidecar takes (the proxy app's ``client_max_size``): above what
#: providers accept (Anthropic 32 MB, OpenAI ~50 MB with images), so only a runaway body meets it.
MAX_REQUEST_BODY = 64 * 1024 * 1024
#: How often the agents of committed streams are looked at for having left (:meth:`_Deadlines.watch_agent`):
#: an agent that closes its connection while the upstream is silent is noticed within this, not at the
#: next chunk (which may be ``idle`` seconds away, with the provider generating and billing meanwhile).
AGENT_CHECK = 0.5
_perf = time.perf_counter
_clock = time.time
#: Why an :class:`_IdleTimer` expired (its ``expired``; ``""`` while it has not).
_DUE = "due"
_AGENT_GONE = "agent gone"


class _Retry(Exception):
    """Internal: the attempt failed and the route said to go on."""


class Proxy:
    """Serves ``/v1/*`` for one sidecar."""

    def __init__(
        self,
        chain: Callable[[], Chain],
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        emit: Callable[[list[Action]], None],
        *,
        count_tokens: bool = True,
        draining: Callable[[], bool] = lambda: False,
    ):
        self._chain = chain
        self._draining = draining
        self._count_tokens = count_tokens
        self._session = session
        self._metrics = metrics
        self._emit = emit
        self._timers: _Deadlines | None = None

    def _deadlines(self) -> _Deadlines:
        # Made on first use, in the loop that serves (tests run sidecars in several loops, one at a time).
        timers = self._timers
        if timers is None or timers.loop is not asyncio.get_running_loop():
            timers = self._timers = _Deadlines(asyncio.get_running_loop())
        return timers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = _perf()
        rel_url = request.rel_url
        raw_path = rel_url.raw_path
        checked = safe_path(raw_path)
        if checked is None:
            # Before routing: a dot-segment could carry an entry's key out of its base path.
            self._metrics.request(self._chain().name, "", "InvalidPath")
            log.warning(
                "request path refused", extra={"kr": {"method": request.method, "path": raw_path[:200]}}
            )
            return _json_error(400, "invalid_path", PATH_RULE, None)
        path = checked
        if path != "/v1" and not path.startswith("/v1/"):
            return _json_error(404, "not_found", "keyroute forwards /v1/* only", None)
        chain = self._chain()
        if not chain.entries:
            return _json_error(
                503, "no_providers", "no provider of the chain is usable (see the chain's status)", None
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            # aiohttp's own answer is text/plain: the agent's SDK reads its message from a JSON error.
            log.warning(
                "request body too large: refused",
                extra={"kr": {"chain": chain.name, "path": path[:200], "limit": MAX_REQUEST_BODY}},
            )
            return _json_error(
                413, "request_too_large", f"request bodies are limited to {MAX_REQUEST_BODY >> 20} MiB", None
            )
        # The media type from the raw header, kept per value: aiohttp's ``content_type`` parses the header
        # again for every request and copies its parameters.
        body = inspect_body(raw, _media_type(request.headers.get("Content-Type", "")))
        suffix = path[3:]
        if rel_url.raw_query_string:
            suffix += "?" + rel_url.raw_query_string
        route = Route(chain, body.model, _clock())
        waited = 0.0
        try:
            while True:
                now = _clock()
                step = route.next(now)
                if route.actions:
                    self._flush(route)
                if isinstance(step, Wait):
                    pause = max(0.0, step.until - _clock())
                    waited += pause
                    await asyncio.sleep(pause)
                    continue
                if isinstance(step, Exhausted):
                    self._metrics.request(chain.name, "", "ChainExhausted")
                    return _exhausted(route, step)
                try:
                    t0 = _perf()
                    response = await self._attempt(
                        request, route, step, body.with_model(step.model), suffix, now
                    )
                    waited += _perf() - t0
                    return response
                except _Retry:
                    waited += _perf() - t0
                    continue
                except _Final as final:
                    return final.response
        finally:
            route.abandon()
            if route.actions:
                self._flush(route)
            spent = _perf() - started - waited
            self._metrics.overhead.observe(spent if spent > 0.0 else 0.0)  # no max(): see _IdleTimer.due

    async def _attempt(
        self,
        request: web.Request,
        route: Route,
        attempt: Attempt,
        data: bytes,
        suffix: str,
        planned: float,
    ) -> web.StreamResponse:
        """One upstream attempt; ``planned``: the wall-clock time the route planned it at (microseconds
        ago), which bounds the attempt by the request deadline without reading the clock again."""
        url = _url(attempt.base_url + suffix)
        first_token = attempt.first_token
        upstream: aiohttp.ClientResponse | None = None
        latency: float | None = None
        payload = b""
        buf, start, end = b"", 0, -1
        phase = "first byte"
        sent = _perf()
        # One deadline per attempt until the answer is committed: the first byte, then the phase that
        # follows (error body, body, or the stream's first event). A phase change only moves the
        # timer's due time (see _IdleTimer): asyncio.timeout's reschedule, a cancelled handle and a new
        # one twice per request, was ~2% of the sidecar's samples at c=32. Every phase ends by the
        # request deadline too (a body or first event that comes late must not outlive it).
        timer = _IdleTimer(self._deadlines(), attempt.first_byte, route.deadline - planned)
        try:
            try:
                upstream = await self._session().request(
                    request.method,
                    url,
                    headers=attempt_headers(request.headers, attempt),
                    data=data or None,
                    allow_redirects=False,
                    # The entry's connect bound: the deadline itself is the timer around this.
                    timeout=_client_timeout(attempt.entry.connect),
                )
                latency = _perf() - sent
                status = upstream.status
                media = _media_type(upstream.headers.get("Content-Type", ""))
                if status >= 400:
                    phase = "error body"
                    timer.restart(attempt.idle)
                    payload = await _read_upto(upstream.content, MAX_ERROR_BODY)
                elif media == "text/event-stream":
                    # Nothing reaches the agent before the first event is in: until then the route may
                    # fail over. With firstToken set, keep-alives do not count and the wait has its own
                    # bound, from the response headers on.
                    phase = "first event"
                    timer.restart(first_token or attempt.first_byte)
                    content = upstream.content
                    while end < 0 and len(buf) < MAX_FIRST_EVENT:
                        chunk = await content.readany()
                        if not chunk:
                            break
                        buf += chunk
                        if first_token is None:
                            end = first_event_end(buf)
                        else:
                            start, end = first_data_event(buf)
                else:
                    phase = "body"
                    timer.restart(attempt.idle)
                    payload = await upstream.read()
            except asyncio.CancelledError:
                timer.cancelled()  # raises TimeoutError if the timer cancelled the task, else re-raises
                raise
            finally:
                timer.close()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if upstream is not None:
                upstream.release()
            if phase == "first event" and first_token is not None and isinstance(exc, TimeoutError):
                self._fail_transport(
                    route,
                    attempt,
                    Classification(
                        ErrorClass.TIMEOUT,
                        message=f"no first token within {first_token:g}s of the response headers (firstToken)",
                    ),
                    latency,
                )
            self._fail_transport(route, attempt, transport_failure(exc, phase), latency)
        assert latency is not None
        try:
            if status >= 400:
                verdict = classify(status, upstream.headers, payload, _clock())
                self._fail(route, attempt, verdict, latency)  # returns only if the agent gets it
                return web.Response(
                    status=status, body=payload, headers=response_headers(upstream.headers, attempt)
                )
            if phase == "first event":
                return await self._relay(request, route, attempt, upstream, latency, buf, start, end)
            chain_name = route.chain.name
            entry = attempt.entry.name
            cred = attempt.lease.credential.name  # not the property: a call per request
            route.report(attempt, None, _clock())
            self._metrics.served(chain_name, entry, cred, latency)
            if self._count_tokens and "json" in media:
                counts = body_usage(payload)
                if counts:
                    self._metrics.tokens_used(chain_name, entry, cred, attempt.model, counts)
            return web.Response(
                status=status, body=payload, headers=response_headers(upstream.headers, attempt)
            )
        finally:
            upstream.release()

    def _fail(self, route: Route, attempt: Attempt, verdict: Classification, latency: float | None) -> None:
        """Report a failed attempt. Raises :class:`_Retry` unless the agent is to get this answer."""
        cls = str(verdict.error_class)
        self._metrics.attempt(route.chain.name, attempt.entry.name, attempt.credential_name, cls, latency)
        decision = route.report(attempt, verdict, _clock())
        log.info(
            "upstream attempt failed",
            extra={
                "kr": {
                    "chain": route.chain.name,
                    "provider": attempt.entry.name,
                    "credential": attempt.credential_name,
                    "class": cls,
                    "status": verdict.status,
                    "model": route.model or None,
                    "then": "return" if decision is Verdict.RETURN else "continue",
                    "detail": verdict.message or None,
                }
            },
        )
        if decision is Verdict.CONTINUE:
            raise _Retry
        self._metrics.request(route.chain.name, attempt.entry.name, cls)

    def _fail_transport(
        self, route: Route, attempt: Attempt, verdict: Classification, latency: float | None
    ) -> NoReturn:
        """A failure with no upstream answer to hand over: go on, or answer 502 if the route stops here."""
        self._fail(route, attempt, verdict, latency)
        raise _Final(_json_error(502, "upstream_unreachable", verdict.message, verdict.error_class))

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        attempt: Attempt,
        upstream: aiohttp.ClientResponse,
        latency: float,
        buf: bytes,
        start: int,
        end: int,
    ) -> web.StreamResponse:
        """Commit a stream whose first event (``buf[start:end]``, if complete) is in, and relay it."""
        if not buf:
            self._fail_transport(
                route,
                attempt,
                Classification(ErrorClass.CONNECTION_ERROR, message="stream ended before any event"),
                latency,
            )
        inband = classify_stream_event(buf[start:end] if end > 0 else buf, _clock())
        if inband is not None:
            self._fail(route, attempt, inband, latency)  # the agent gets the stream as sent
        else:
            route.report(attempt, None, _clock())
            self._metrics.served(route.chain.name, attempt.entry.name, attempt.credential_name, latency)
        if route.actions:
            self._flush(route)
        out = web.StreamResponse(status=upstream.status, headers=response_headers(upstream.headers, attempt))
        try:
            await out.prepare(request)
        except ConnectionResetError:
            # The agent left while the stream was starting (aiohttp: "Cannot write to closing
            # transport"). Normal for a client: one line at debug, no traceback. aiohttp's own
            # attempt to finish the unprepared response meets the same closed transport and is quiet.
            log.debug(
                "agent went away before the stream started",
                extra={"kr": {"chain": route.chain.name, "provider": attempt.entry.name}},
            )
            return out
        watch = StreamWatch(usage=self._count_tokens)
        try:
            return await self._pipe(request, route, attempt, upstream.content, out, watch, buf)
        finally:
            # What the provider reported is what it bills, even if the stream broke or the agent left.
            if watch.usage:
                self._metrics.tokens_used(
                    route.chain.name, attempt.entry.name, attempt.credential_name, attempt.model, watch.usage
                )

    async def _pipe(
        self,
        request: web.Request,
        route: Route,
        attempt: Attempt,
        content: aiohttp.StreamReader,
        out: web.StreamResponse,
        watch: StreamWatch,
        buf: bytes,
    ) -> web.StreamResponse:
        """Relay the rest of a committed stream; end it with an error event if the upstream did not."""
        watch.feed(buf)
        await out.write(buf)
        ending: bytes | None = None
        reason = ""
        deadlines = self._deadlines()
        loop = deadlines.loop
        timer = _IdleTimer(deadlines, attempt.idle, route.deadline - _clock())
        # Once per stream, not per chunk: the shared timer looks at the agent's connection every
        # AGENT_CHECK seconds and ends the stream (as below) if it is gone.
        deadlines.watch_agent(timer, request)
        try:
            try:
                while True:
                    timer.last = loop.time()
                    chunk = await content.readany()
                    if not chunk:
                        break
                    watch.feed(chunk)
                    await out.write(chunk)
            except asyncio.CancelledError:
                # Raises TimeoutError if the stall or the agent's leaving cancelled the task, else re-raises.
                timer.cancelled()
                if self._draining():
                    await self._cut(out, attempt)
                raise
            finally:
                timer.close()
                deadlines.unwatch_agent(timer)
        except TimeoutError:
            if timer.expired == _AGENT_GONE:
                # The agent left while the upstream was silent: what a failed write to it does below,
                # only sooner. Returning releases the upstream response unread, which closes its
                # connection: the provider stops generating for nobody.
                return out
            why = "request deadline reached" if loop.time() >= timer.deadline else f"no data for {attempt.idle:g}s"
            reason = f"upstream stream stalled: {why}"
            ending = error_event(ErrorClass.TIMEOUT, reason, attempt.entry.name)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            if request.transport is None or request.transport.is_closing():
                return out  # the agent went away; nothing to tell it
            reason = f"upstream connection dropped mid-stream ({type(exc).__name__})"
            ending = error_event(ErrorClass.CONNECTION_ERROR, reason, attempt.entry.name)
        except (ConnectionResetError, ConnectionError):
            return out  # the agent went away
        else:
            if not watch.complete:
                reason = "upstream stream ended without a finish reason or [DONE]"
                ending = error_event(ErrorClass.CONNECTION_ERROR, reason, attempt.entry.name)
        if ending is not None:
            log.warning(
                "stream ended abnormally",
                extra={
                    "kr": {
                        "chain": route.chain.name,
                        "provider": attempt.entry.name,
                        "credential": attempt.credential_name,
                        "reason": reason,
                    }
                },
            )
            self._metrics.attempt(
                route.chain.name, attempt.entry.name, attempt.credential_name, "StreamBroken", None
            )
            try:
                await out.write(ending)
            except ConnectionError:
                return out
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        return out

    async def _cut(self, out: web.StreamResponse, attempt: Attempt) -> None:
        """The sidecar's shutdown grace ended with this stream still open: end it with an error
        event, so the agent's SDK raises a clear error instead of meeting a truncated body."""
        ending = error_event(
            ErrorClass.CONNECTION_ERROR,
            "sidecar shutting down: the stream was cut at the end of its grace period",
            attempt.entry.name,
        )
        # A few writes into the socket's buffer; bounded, in case the agent stopped reading.
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(0.2):
                await out.write(ending)
                await out.write_eof()

    def _flush(self, route: Route) -> None:
        actions, route.actions = route.actions, []
        self._emit(actions)


class _Deadlines:
    """One event-loop timer for every attempt and stream of a proxy in flight (their :class:`_IdleTimer`).

    A timer handle per attempt, made and cancelled around every request, was most of the per-attempt
    deadline's cost (uvloop: ~4 µs for a ``call_at`` and its ``cancel``). Here an attempt only joins a
    set; the one handle is due at the earliest due time it has seen and, when it fires, expires what is
    due and re-arms for the earliest of the rest. With the same bounds on every request, a later request's
    due time is later, so the handle is replaced only when a due time moves earlier than it.

    The same handle also looks, every :data:`AGENT_CHECK` seconds while a committed stream is open, at
    whether that stream's agent is still connected (:meth:`watch_agent`): aiohttp (3.14) tells a handler
    that its client left only when it next reads or writes, and a stream whose upstream is silent
    does neither.
    """

    __slots__ = ("_agents", "_armed", "_handle", "_timers", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._timers: set[_IdleTimer] = set()
        self._agents: dict[_IdleTimer, web.BaseRequest] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf  # when the handle fires

    def add(self, timer: _IdleTimer, when: float) -> None:
        """Watch ``timer``, due at ``when`` for now."""
        self._timers.add(timer)
        self.due(when)

    def watch_agent(self, timer: _IdleTimer, request: web.BaseRequest) -> None:
        """Expire ``timer`` (``expired`` is ``_AGENT_GONE``) once ``request``'s agent has closed its
        connection, looked at every :data:`AGENT_CHECK` seconds until :meth:`unwatch_agent`.

        Once per stream, nothing per chunk. The check is public aiohttp API, the one the relay already
        makes after a failed write: ``request.transport`` is None once aiohttp's protocol has seen the
        connection lost (``RequestHandler.connection_lost`` → ``force_close``), and closing once aiohttp
        closes it on the agent's EOF. aiohttp has no public callback for it: its private signal
        (``BaseRequest._cancel`` setting an exception on the request's body reader) reaches no waiter
        once the body has been read, and ``handler_cancellation`` would cancel every handler in every
        phase, which the attempt accounting and the shutdown grace do not allow.
        """
        self._agents[timer] = request
        self.due(timer.last + AGENT_CHECK)

    def unwatch_agent(self, timer: _IdleTimer) -> None:
        self._agents.pop(timer, None)

    def discard(self, timer: _IdleTimer) -> None:
        # The handle stays armed when the set empties: it fires once for nothing, where a cancel and a
        # new handle for every request at low concurrency would cost what this class saves.
        self._timers.discard(timer)

    def due(self, when: float) -> None:
        """Some timer is due at ``when``: fire no later than that."""
        if when < self._armed:
            if self._handle is not None:
                self._handle.cancel()
            self._armed = when
            self._handle = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        self._armed = math.inf
        now = self.loop.time()
        soonest = math.inf
        agents = self._agents
        if agents:
            for timer, request in list(agents.items()):
                transport = request.transport
                if transport is None or transport.is_closing():
                    del agents[timer]
                    if not timer.expired:  # else it stalled first: its own ending is under way
                        self._timers.discard(timer)
                        timer.expire(_AGENT_GONE)
            if agents:
                soonest = now + AGENT_CHECK
        for timer in list(self._timers):
            when = timer.due()
            if when <= now:
                self._timers.discard(timer)
                timer.expire(_DUE)
            elif when < soonest:
                soonest = when
        if soonest < math.inf:
            self.due(soonest)


class _IdleTimer:
    """One attempt's bound: ``idle`` seconds without progress, or the request deadline, whichever comes first
    (or, for a committed stream, the agent's leaving: :meth:`_Deadlines.watch_agent`).

    A stream moves many small chunks; rescheduling an event-loop timer for each (what ``asyncio.timeout``'s
    ``reschedule`` does: a cancel and a new handle) cost more than relaying the chunk. Here a chunk only
    records its time (``last``); the proxy's shared timer (:class:`_Deadlines`) expires this one only if
    ``last + idle`` (or the deadline) has passed when it looks, cancelling the task. As with
    ``asyncio.timeout``, the caller's ``CancelledError`` becomes ``TimeoutError`` only if this timer caused
    it (:meth:`cancelled`).
    """

    __slots__ = ("_cancelling", "_deadlines", "_seen", "_task", "deadline", "expired", "idle", "last")

    def __init__(self, deadlines: _Deadlines, idle: float, left: float):
        """Bound the current task by ``idle`` seconds without progress and by the request deadline,
        ``left`` seconds from now."""
        task = asyncio.current_task()
        assert task is not None
        self._deadlines = deadlines
        self._task = task
        self._cancelling = task.cancelling()
        self.idle = idle
        self.last = now = deadlines.loop.time()
        self.deadline = deadline = now + left
        self.expired = ""  # why it expired, once it has: _DUE or _AGENT_GONE
        self._seen = False
        # due(), written out here and in restart(): these run for every attempt, and a method call
        # costs more than the two lines.
        when = now + idle
        deadlines.add(self, when if when < deadline else deadline)

    def due(self) -> float:
        # A conditional expression, not min(): a builtin call costs ~4 times as much (valgrind).
        when = self.last + self.idle
        return when if when < self.deadline else self.deadline

    def restart(self, idle: float) -> None:
        """A new phase: ``idle`` seconds from now."""
        self.last = now = self._deadlines.loop.time()
        self.idle = idle
        when = now + idle  # due(), written out: see __init__
        self._deadlines.due(when if when < self.deadline else self.deadline)

    def expire(self, why: str) -> None:
        """Called by :class:`_Deadlines` once the due time has passed (``_DUE``) or the agent of a
        watched stream has gone (``_AGENT_GONE``)."""
        self.expired = why
        self._task.cancel()

    def cancelled(self) -> None:
        """Called on ``CancelledError``: raise ``TimeoutError`` if this timer was the cause (a stall, or
        the agent gone; and nobody else cancelled the task too); return (the caller re-raises) otherwise."""
        if self.expired and not self._seen:
            self._seen = True
            if self._task.uncancel() <= self._cancelling:
                raise TimeoutError

    def close(self) -> None:
        if not self.expired:
            self._deadlines.discard(self)
        elif not self._seen:
            # Fired, but the cancellation never surfaced as CancelledError (the awaited call ended
            # with another error or a result first): take back our cancel request, as
            # asyncio.timeout does, so it does not hit a later await of this task.
            self._seen = True
            self._task.uncancel()


async def _read_upto(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes. ``content.read(limit)`` alone returns what has arrived so far,
    which for a body of more than one socket read is its first part: the agent would get a cut error
    body (a gateway's 4xx echoing a long prompt, say)."""
    data = await content.read(limit)
    while data and len(data) < limit:
        more = await content.read(limit - len(data))
        if not more:
            break
        data += more
    return data


@functools.lru_cache(maxsize=1024)
def _media_type(content_type: str) -> str:
    """``type/subtype`` of a Content-Type value, lowercased. What aiohttp's ``content_type`` gives, without
    the copy of the parameters it makes for every response; kept per value (a provider sends a few)."""
    return content_type.partition(";")[0].strip().lower()


@functools.lru_cache(maxsize=1024)
def _url(target: str) -> URL:
    """The URL object of an attempt's target. An upstream sees the same few targets over and over:
    the parsed object (immutable) is kept rather than parsed again for every attempt (yarl parses in
    Python); bounded, least recently used first out, for targets with query strings."""
    return URL(target, encoded=True)


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float) -> aiohttp.ClientTimeout:
    # The first-byte and idle limits are enforced around the calls; aiohttp only bounds the connect.
    return aiohttp.ClientTimeout(total=None, sock_connect=connect)


class _Final(Exception):
    def __init__(self, response: web.Response):
        self.response = response


def _json_error(
    status: int, kind: str, message: str, cls: ErrorClass | None, **extra: object
) -> web.Response:
    err: dict[str, object] = {"type": kind, "message": message}
    if cls is not None:
        err["class"] = str(cls)
    err.update(extra)
    return web.json_response({"error": err}, status=status)


def _exhausted(route: Route, step: Exhausted) -> web.Response:
    response = _json_error(
        503,
        "chain_exhausted",
        f"every provider of chain {route.chain.name} failed or is cooling down",
        route.reason,
        chain=route.chain.name,
        model=route.model or None,
        attempts=[r.as_json() for r in route.records],
    )
    response.headers["Retry-After"] = str(max(1, math.ceil(step.retry_after)))
    return response
