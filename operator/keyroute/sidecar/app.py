"""One running sidecar: the proxy and admin servers, the upstream session, live config reload, and the
timer that moves time-driven state (cooldowns ending).

A reload builds a new :class:`~keyroute.core.chains.Chain` from the new config, handing it the old
one so that unchanged credentials (same name, same key value) keep their state and a changed key value
starts healthy. Requests in flight finish on the chain they started with. A config that fails to load
is logged and counted; the last good one stays in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keyroute.core.actions import Action
from keyroute.core.chains import Chain
from keyroute.core.config import ConfigError, SidecarConfig
from keyroute.logs import REDACTOR
from keyroute.sidecar.metrics import Metrics
from keyroute.sidecar.proxy import MAX_REQUEST_BODY, Proxy
from keyroute.sidecar.sources import ConfigSource, signature
from keyroute.sidecar.upstream import SESSION_HEADERS

if TYPE_CHECKING:
    # Reporting (the API client, the reporter, the fleet's cooldowns) is imported when it is
    # enabled: a sidecar that only logs its actions does not carry it (idle memory, issue 13).
    from keyroute.core.reports import Origin
    from keyroute.kube import Kube
    from keyroute.sidecar.fleet import FleetCooldowns
    from keyroute.sidecar.reporter import Reporter

log = logging.getLogger("keyroute.sidecar")

ActionListener = Callable[[Action], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port))


class Sidecar:
    """A sidecar instance. ``await start()``, then serve; ``await stop()`` to shut down."""

    def __init__(
        self,
        source: ConfigSource,
        *,
        listen: Address = Address("127.0.0.1", 8411),
        admin_listen: Address | None = Address("0.0.0.0", 8412),
        reload_interval: float = 1.0,
        tick_interval: float = 1.0,
        rng: random.Random | None = None,
        count_tokens: bool = True,
    ):
        self.source = source
        self.listen = listen
        self.admin_listen = admin_listen
        self.reload_interval = reload_interval
        self.tick_interval = tick_interval
        self.count_tokens = count_tokens
        self.metrics = Metrics()
        self.listeners: list[ActionListener] = []
        self._rng = rng or random.Random()
        self._chain: Chain | None = None
        self._config: SidecarConfig | None = None
        self._signature: object = None
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.port: int | None = None
        self.admin_port: int | None = None
        self.reporter: Reporter | None = None
        self.fleet: FleetCooldowns | None = None
        self._kube: Kube | None = None
        self._proxy_runner: web.AppRunner | None = None
        # Requests being handled (their tasks): a shutdown waits for them, then cuts what is left.
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._idle: asyncio.Event | None = None
        self.draining = False

    def enable_reporting(
        self, kube: Kube, origin: Origin, *, share_cooldowns: bool = True, **reporter: Any
    ) -> Reporter:
        """Report recovery actions as Events through ``kube`` and (``share_cooldowns``) honour the
        cooldowns other pods reported. Call before :meth:`start`; :meth:`stop` closes ``kube``."""
        from keyroute.sidecar.fleet import FleetCooldowns
        from keyroute.sidecar.reporter import Reporter

        self._kube = kube
        self.reporter = Reporter(kube, origin, lambda: self._config, self.metrics, **reporter)
        self.listeners.append(self.reporter.offer)
        if share_cooldowns:
            self.fleet = FleetCooldowns(kube, origin, lambda: self._chain, self.metrics)
        return self.reporter

    # --- state -----------------------------------------------------------------------------------

    @property
    def chain(self) -> Chain:
        if self._chain is None:
            raise RuntimeError("sidecar has no config yet")
        return self._chain

    @property
    def config(self) -> SidecarConfig | None:
        return self._config

    def emit(self, actions: list[Action]) -> None:
        """Log, count and hand on every recovery action."""
        for action in actions:
            self.metrics.action(action)
            level = logging.INFO if action.kind.name in {"RESTORED", "PRIMARY_RESTORED"} else logging.WARNING
            log.log(
                level, _ACTION_TEXT.get(str(action.kind), str(action.kind)), extra={"kr": action.fields()}
            )
            for listener in self.listeners:
                try:
                    listener(action)
                except Exception:
                    log.exception("action listener failed")

    def apply(self, config: SidecarConfig) -> None:
        """Put ``config`` in service, carrying state over from the current chain."""
        previous = self._chain
        self._chain = Chain(config, rng=self._rng, previous=previous)
        self._config = config
        REDACTOR.set_keys(c.key for p in config.pools for c in p.credentials)
        log.info(
            "config loaded",
            extra={
                "kr": {
                    "chain": config.chain.name,
                    "namespace": config.chain.namespace,
                    "entries": [e.name for e in config.entries],
                    "excluded": [f"{x.entry or x.credential}:{x.reason}" for x in config.excluded],
                    "hash": config.content_hash(),
                    "source": self.source.describe(),
                }
            },
        )

    def reload(self) -> bool:
        """Load the source again; keep the current config if the new one is invalid. True if applied."""
        try:
            config = self.source.load()
        except (ConfigError, ValueError) as e:
            self.metrics.config_reloads.labels("rejected").inc()
            log.error(
                "config rejected; keeping the last good one",
                extra={"kr": {"source": self.source.describe(), "error": str(e)}},
            )
            return False
        if self._config is not None and config.content_hash() == self._config.content_hash():
            return False
        self.apply(config)
        self.metrics.config_reloads.labels("applied").inc()
        return True

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the config (failing loudly if there is none yet), then serve."""
        self._signature = signature(self.source.files())
        self.apply(self.source.load())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            headers=SESSION_HEADERS,
        )
        proxy = Proxy(
            lambda: self.chain,
            self._get_session,
            self.metrics,
            self.emit,
            count_tokens=self.count_tokens,
            draining=lambda: self.draining,
        )
        app = web.Application(client_max_size=MAX_REQUEST_BODY)
        app.router.add_route("*", "/{tail:.*}", self._tracked(proxy.handle))
        self.port = await self._serve(app, self.listen)
        self._proxy_runner = self._runners[-1]
        if self.admin_listen is not None:
            admin = web.Application()
            admin.router.add_get("/metrics", self._metrics_handler)
            admin.router.add_get("/healthz", self._healthz)
            admin.router.add_get("/readyz", self._readyz)
            self.admin_port = await self._serve(admin, self.admin_listen)
        self._tasks.append(asyncio.create_task(self._watch(), name="keyroute-reload"))
        self._tasks.append(asyncio.create_task(self._tick(), name="keyroute-tick"))
        if self.reporter is not None:
            self._tasks.append(asyncio.create_task(self.reporter.run(), name="keyroute-reporter"))
        if self.fleet is not None:
            self._tasks.append(asyncio.create_task(self.fleet.run(), name="keyroute-fleet"))
        log.info(
            "sidecar listening",
            extra={"kr": {"listen": f"{self.listen.host}:{self.port}", "admin": self.admin_port}},
        )

    async def shutdown(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """The SIGTERM path: stop taking requests, give in-flight requests and open streams up to
        ``grace`` seconds to finish, give buffered reports what is left of it, then :meth:`stop`.

        New connections are refused at once (the listening socket is closed); idle keep-alive
        connections are closed, busy ones after their answer. What still runs when the grace is
        over (or ``hurry`` is set: a second signal) is cut. The whole takes ``grace`` plus the
        teardown of what is left (milliseconds).
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + max(0.0, grace)
        self.draining = True
        runner = self._proxy_runner
        if runner is not None:
            for site in list(runner.sites):
                await site.stop()
            # As aiohttp's own cleanup does: requests accepted before the listener closed get to
            # start, so they count as in flight instead of being closed unanswered.
            await asyncio.sleep(0)
            if runner.server is not None:
                runner.server.pre_shutdown()
        log.info(
            "shutting down: no new requests; waiting for those in flight",
            extra={"kr": {"in_flight": len(self._in_flight), "grace": grace}},
        )
        if self._in_flight:
            self._idle = asyncio.Event()
            waits = [asyncio.ensure_future(self._idle.wait())]
            if hurry is not None:
                waits.append(asyncio.ensure_future(hurry.wait()))
            try:
                await asyncio.wait(
                    waits, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for w in waits:
                    w.cancel()
        cut = list(self._in_flight)
        for task in cut:
            task.cancel()
        if cut:
            log.warning(
                "grace period over: requests still in flight were cut",
                extra={"kr": {"cut": len(cut), "grace": grace}},
            )
        flush = 0.0 if hurry is not None and hurry.is_set() else max(0.0, deadline - loop.time())
        await self.stop(flush=flush)
        log.info("sidecar stopped", extra={"kr": {"seconds": round(loop.time() - began, 3), "cut": len(cut)}})

    async def stop(self, flush: float = 2.0) -> None:
        """Stop serving; give buffered reports up to ``flush`` seconds to get out first."""
        # Not ``reporter.pending``: that excludes the report being sent right now (popped from the
        # queue, its request hanging on an unreachable API server); ``delivered`` is set only once
        # the queue is empty with nothing in flight.
        if self.reporter is not None and not self.reporter.delivered.is_set() and flush > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reporter.delivered.wait(), timeout=flush)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.reporter is not None and self.reporter.pending:
            log.warning(
                "exiting with reports not delivered: the operator will not see them",
                extra={"kr": {"lost": self.reporter.pending}},
            )
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._kube is not None:
            await self._kube.close()

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def in_flight(self) -> int:
        """Agent requests whose handler has not returned yet (a stream counts until it has ended)."""
        return len(self._in_flight)

    @property
    def base_url(self) -> str:
        """What an agent uses as ``OPENAI_BASE_URL``."""
        return f"http://{self.listen.host}:{self.port}/v1"

    # --- internals -------------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("sidecar is not started")
        return self._session

    def _tracked(self, handler: Handler) -> Handler:
        """``handler``, with its requests known to :meth:`shutdown` (a set add and discard each)."""
        in_flight = self._in_flight

        async def handle(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            in_flight.add(task)
            try:
                return await handler(request)
            finally:
                in_flight.discard(task)
                if not in_flight and self._idle is not None:
                    self._idle.set()

        return handle

    async def _serve(self, app: web.Application, addr: Address) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, addr.host, addr.port, backlog=1024, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else addr.port

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                sig = signature(self.source.files())
            except Exception as e:  # a manifest dir that vanished, say: keep serving
                log.error("cannot list config files", extra={"kr": {"error": type(e).__name__}})
                continue
            if sig != self._signature:
                self._signature = sig
                self.reload()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            now = time.time()
            chain = self._chain
            if chain is None:
                continue
            self.emit(chain.expire(now))
            self.metrics.refresh_state(chain, now)

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        if self._chain is not None:
            self.metrics.refresh_state(self._chain, time.time())
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "not ready", "reason": "shutting down"}, status=503)
        chain = self._chain
        if chain is None or not chain.entries:
            return web.json_response(
                {"status": "not ready", "reason": "no usable provider in the config"}, status=503
            )
        return web.json_response(
            {"status": "ready", "chain": chain.name, "entries": [e.name for e in chain.entries]}
        )


_ACTION_TEXT = {
    "CredentialCoolingDown": "credential cooling down",
    "CredentialExhausted": "credential exhausted (billing)",
    "CredentialRejected": "credential rejected until its Secret value changes",
    "CredentialRestored": "credential available again",
    "FallbackActivated": "traffic moved to a fallback provider",
    "PrimaryRestored": "traffic back on the primary provider",
    "ChainExhausted": "every provider of the chain failed",
}
