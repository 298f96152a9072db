"""What the operator reacts to. Each handler is a few lines that start a reconcile.

All state lives in one :class:`Operator` (built from the CLI's arguments; :func:`register` binds
its lifecycle to a kopf registry), so a leadership change can drop it and a test can run two
operators in one process. kopf runs the lifecycle (login, start-up, cleanup); pools, chains and
Secrets come from keyroute's own list-and-watch streams (:meth:`Operator._watch_objects`), whose
handlers (:meth:`Operator.on_pool`, :meth:`~Operator.on_chain`, :meth:`~Operator.on_secret`) return
at once and start reconciles as tasks:

- a CredentialPool created or changed (a new ``metadata.generation``) → its status, then (coalesced,
  ~0.1 s later) every chain that uses it; listed at start-up → its status only (each chain is listed
  too, so it is rendered once);
- a CredentialPool deleted → every chain that used it (its entries become ``PoolNotFound``);
- a ProviderChain created, changed or listed → its config Secret and status;
- a Secret added, changed or deleted → the pools that reference it, then their chains (a rotated key
  reaches the sidecars within seconds); the initial listing of Secrets is skipped for the same reason;
- a chain's config Secret listed or changed → its hash noted (a render compares it, no GET); deleted
  → the chain rendered again;
- sidecar reports (Events labelled ``keyroute.dev/report=sidecar``, watched by an operator-level
  task with that label selector) → the status of the pool or chain they concern, each object's
  reconciles at least 0.55 s apart (from the end of one to the start of the next), and again when a
  reported ``until`` passes;
- one operator-level task resyncs every known pool and chain periodically, as a safety net for
  missed events. Not kopf timers: kopf puts a finalizer on every object that has a timer, and a
  finalizer is a way for a broken operator to block deletions.

No kopf resource handlers: kopf ran every event, the operator's own status writes coming back
included, through its per-object workers and handler machinery (a quarter of the operator's CPU at
start-up, issue 11), and nothing but the reconciler writes (no progress or "last handled"
annotations, no finalizers), so a standby replica, which runs the same watches to keep its caches
warm, writes nothing at all. Changes are told from status writes by the ``metadata.generation`` the
API server bumps on spec changes only. At start-up pools are listed first, then Secrets, then
chains, and reconciles start once the Secrets are listed: every input is in the cache by then.
While reconciles started by watch events are queued or running, the reconciler's Events wait
(:mod:`keyroute.controller.events`): in a burst, the statuses and configs go to the API server first.

**Leader election** (:mod:`keyroute.controller.election`): only the leader reconciles, folds
reports and writes. Every write of the reconciler goes through a :class:`FencedKube` that refuses
it unless this replica holds the Lease *now* (and in the same term the reconciler was built for).
Gaining the Lease builds a fresh reconciler (state rebuilt from the objects' status and the
report Events, not carried over) and resyncs every known object; losing it cancels everything the
reconciler scheduled, at once.

Which pools reference a Secret and which chains use a pool come from keyroute's own reference
indexes (:class:`RefIndex`), fed by the pool and chain handlers from the watch streams; no handler
lists the cluster. Not kopf indexes: with any kopf index, every kopf handler waits until every
indexed kind is fully listed, and on a real API server with 2,300 objects that barrier alone (each
waiting object's worker woken on every toggle) cost more than the whole sync (issue 11). Without the
barrier, a reference may name an object not listed yet; that is harmless, because each listed pool
and chain is reconciled after its own listing, and a cache miss is read from the API.

No finalizers: deleting a chain lets garbage
collection remove its config Secret (owner reference), and nothing else needs cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import kopf

from keyroute.controller import login as _login
from keyroute.controller.election import ElectionConfig, LeaderElector
from keyroute.controller.metrics import OperatorMetrics
from keyroute.controller.reconcile import ObjectCache, Reconciler
from keyroute.controller.settings import OperatorConfig
from keyroute.core.backoff import Backoff
from keyroute.core.objects import config_secret_chain, secret_hash
from keyroute.core.references import RefIndex, referenced
from keyroute.core.reports import REPORT_LABEL, REPORT_LABEL_VALUE
from keyroute.kube import CORE, Kube, path, watch_forever

GROUP, VERSION = "keyroute.dev", "v1alpha1"
POOLS = (GROUP, VERSION, "credentialpools")
CHAINS = (GROUP, VERSION, "providerchains")
# Reconciles started by events at once, at most: at start-up every listed object's handler starts
# one, and thousands in flight held their reads and half-built statuses in memory together while
# waiting for one of the client's connections (issue 11). The rest wait, holding their event only.
MAX_RECONCILES = 16
# At start-up each kind's first listing is awaited before the next kind is listed (pools, then
# Secrets, then chains: every reconcile then finds its inputs in the cache), at most this long: a
# kind that cannot be listed (RBAC, a missing CRD) must not keep the others from being watched.
LISTING_WAIT = 30.0
# Shutdown must end well within Kubernetes' 30 s grace period, and the whole operator within 5 s.
SHUTDOWN_TIMEOUT = 3.0
# Of which the Lease's release may take this much: a release that times out leaves the standby
# waiting for the Lease to expire (15 s by default), and one PUT can take over a second on a loaded
# node, whereas a second more of shutdown costs nothing.
RELEASE_TIMEOUT = 2.0

log = logging.getLogger("keyroute.operator")
_MISSING = object()


class NotLeader(Exception):
    """A write was attempted by a replica that does not hold the Lease (now)."""


class FencedKube(Kube):
    """keyroute's client whose writes (anything but GET and watches) need ``fence()`` to be true."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fence: Callable[[], bool] = lambda: True

    async def request(self, method: str, url_path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if method != "GET" and not self.fence():
            raise NotLeader(f"{method} {url_path}: not the leader")
        # The rest as given: Kube.request's options are its own, not restated here.
        return await super().request(method, url_path, *args, **kwargs)


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf's "essence" of an object, for on.create/on.update handlers and daemons: keyroute has
    neither, yet kopf deep-copied every object of every event to build one (a sixth of the operator's
    CPU at start-up, issue 11). An empty essence: nothing to copy, no diff, nothing stored."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return kopf.BodyEssence()

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


class Operator:
    """One operator's state: caches any replica keeps, and the leader's reconciler and tasks."""

    def __init__(self, config: OperatorConfig, metrics: OperatorMetrics | None = None):
        self.config = config
        self.metrics = metrics or OperatorMetrics()
        # Caches, kept warm by a standby too (they only say what exists).
        # Objects seen on the watch streams, for the resync: (namespace, name).
        self.known: dict[str, set[tuple[str, str]]] = {"pools": set(), "chains": set()}
        # Last seen generation per (kind, namespace, name): a new one is a spec change.
        self.generations: dict[tuple[str, str, str], Any] = {}
        # Secret → pools that reference it, pool → chains that use it (from the specs seen).
        self.pools_by_secret = RefIndex()
        self.chains_by_pool = RefIndex()
        # Pools and referenced Secrets as last seen, for the reconciles' reads.
        self.cache = ObjectCache()
        # Last seen resourceVersion of every Secret, to tell a re-listed changed Secret from an old one
        # (every one: at start-up a Secret may be listed before the pool that references it).
        self.secret_versions: dict[tuple[str, str], Any] = {}
        # Leader state: built on gaining leadership, dropped on losing it.
        self.elector: LeaderElector | None = None
        self._reconciler: Reconciler | None = None
        self._term = 0
        self._leader_tasks: list[asyncio.Task[None]] = []
        # A failed reconcile is tried again later, whatever started it (kopf's own retries would need
        # its progress annotations: writes), after a delay that doubles while it keeps failing.
        self._retries: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self.backoff: Backoff[tuple[str, str, str]] = Backoff(self.config.retry_delay, self.config.resync)
        self._tasks: list[asyncio.Task[None]] = []
        self.reconciles = asyncio.Semaphore(MAX_RECONCILES)
        # Reconciles started by watch events, waiting for a slot or running (cancelled at shutdown).
        self._event_tasks: set[asyncio.Task[None]] = set()
        # Set while there is none: the reconciler's Events wait for it (statuses first in a burst).
        self.event_tasks_idle = asyncio.Event()
        self.event_tasks_idle.set()
        # Set once pools and Secrets were listed (each namespace): the reconciles of listed objects
        # wait for it, so that they read every credential Secret from the cache, none from the API.
        self.inputs_listed = asyncio.Event()
        # Config Secrets seen in the current listing of each watched scope (to drop the vanished ones).
        self._listing: dict[str | None, set[tuple[str, str]]] = {}

    # --- leadership ----------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Whether this replica may reconcile and write now."""
        if self.config.election is None:
            return True
        return self.elector is not None and self.elector.is_leader()

    def reconciler(self) -> Reconciler:
        """The leader's reconciler (raises :class:`NotLeader` on a standby)."""
        if not self.is_leader():
            raise NotLeader("not the leader")
        r = self._reconciler
        if r is None:
            if self.config.election is not None:
                raise NotLeader("leadership is being set up")
            if not _login.CURRENT:
                raise kopf.TemporaryError("not logged in yet", delay=1)
            r = self._reconciler = self._new_reconciler()
        return r

    def _new_reconciler(self) -> Reconciler:
        self._term += 1
        term = self._term
        kube = _login.client(FencedKube)
        kube.fence = lambda: self._term == term and self.is_leader()
        return Reconciler(
            kube,
            self.metrics,
            cache=self.cache,
            events_idle=self.event_tasks_idle,
            retry=self.retry_later,
            reconciled=self.reconciled,
        )

    def _started_leading(self) -> None:
        """The Lease is ours: fresh state, then reconcile everything known (the standby's cache)."""
        self.metrics.leader.set(1)
        self._reconciler = self._new_reconciler()
        self._reconcile_known()
        self._leader_tasks = [
            asyncio.create_task(self._resync_forever(), name="keyroute-resync"),
            asyncio.create_task(self._watch_reports(), name="keyroute-reports"),
        ]

    def _reconcile_known(self) -> None:
        """Reconcile every pool and chain seen so far, as the handlers reconcile a listing: as tasks,
        at most :data:`MAX_RECONCILES` at once, their Events held until the burst is written.

        Called when this replica starts leading, in the same step as it became the leader: the
        objects listed before are these, the ones listed from now on are the handlers' (they
        reconcile only on the leader), so each is reconciled once. One at a time instead, a leader
        taking over 1,000 pools spent 15 to 18 s where the handlers' concurrency takes ~10 s."""
        for ns, name in sorted(self.known["pools"]):
            self._reconcile("pool", ns, name, functools.partial(_pool_changed, self, ns, name, False))
        for ns, name in sorted(self.known["chains"]):
            self._reconcile("chain", ns, name, functools.partial(_chain_changed, self, ns, name))

    def _stopped_leading(self) -> None:
        """The Lease is lost or given up: stop everything the leader does, now (synchronously)."""
        self.metrics.leader.set(0)
        self.metrics.forget_objects()
        self._term += 1  # closes the old reconciler's fence even if this replica leads again
        for task in self._leader_tasks:
            task.cancel()
        self._leader_tasks = []
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        self.backoff.clear()
        r, self._reconciler = self._reconciler, None
        if r is not None:
            r.cancel()
            self._spawn(_close(r.kube), "keyroute-close")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            # A dead election loop stops renewing: the fence closes by itself, but say why.
            log.error(
                "operator task failed",
                extra={"kr": {"task": task.get_name(), "error": repr(task.exception())}},
            )

    def start(self) -> None:
        """Start the watches and the election (or, without one, lead at once). Called by kopf's startup."""
        self._spawn(self._watch_objects(), "keyroute-watch")
        if self.config.election is None:
            self.metrics.leader.set(1)
            self._leader_tasks = [
                asyncio.create_task(self._resync_forever(), name="keyroute-resync"),
                asyncio.create_task(self._watch_reports(), name="keyroute-reports"),
            ]
            return
        self._spawn(self._elect(self.config.election), "keyroute-election")

    async def _elect(self, config: ElectionConfig) -> None:
        await _logged_in()
        self.elector = LeaderElector(
            _login.kube(), config, self._started_leading, self._stopped_leading
        )
        await self.elector.run()

    async def shutdown(self) -> None:
        """Release the Lease and stop every task, within :data:`SHUTDOWN_TIMEOUT`; never raises
        (a failure here would make kopf retry the cleanup for a minute while SIGTERM waits)."""
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await self._shutdown()
        except Exception as e:  # shutting down anyway: say what did not stop cleanly
            log.warning("unclean shutdown", extra={"kr": {"error": str(e) or type(e).__name__}})
        for task in [*self._tasks, *self._leader_tasks, *self._event_tasks]:
            task.cancel()

    async def _shutdown(self) -> None:
        elector = self.elector
        if elector is not None:
            await elector.release(within=RELEASE_TIMEOUT)
        r = self._reconciler
        if r is not None and self.config.election is None:
            # Without an election, let the reconciles in flight finish (bounded by the timeout).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_TIMEOUT / 2):
                    await r.drain()
        for task in self._event_tasks:  # reconciles not started yet (or not finished in time)
            task.cancel()
        leader_tasks = [*self._leader_tasks, *self._event_tasks]
        self._stopped_leading()
        for task in [*self._tasks]:
            if task.get_name() != "keyroute-close":
                task.cancel()
        results = await asyncio.gather(*leader_tasks, *self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):  # a background task had died: report it, do not re-raise
                log.warning("a background task had failed", extra={"kr": {"error": str(result)}})
        if elector is not None:
            await _close(elector.kube)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """An object was deleted: drop what the leader's reconciler holds about it, and its retry."""
        self.reconciled(kind, namespace, name)
        if self._reconciler is not None:
            self._reconciler.forget(kind, namespace, name)

    def retry_later(self, kind: str, namespace: str, name: str, error: Exception | None = None) -> float:
        """Reconcile ``kind`` (``pool`` or ``chain``) again later; return in how many seconds.

        ``error``: why its reconcile failed, logged here (every path's failures alike), and the wait
        is the object's :class:`Backoff`, doubling per consecutive failure. Without one (not logged
        in yet), the first delay. A retry already pending stands: a failure before it fires (another
        event's reconcile) is the same streak, not a longer one.
        """
        key = (kind, namespace, name)
        if isinstance(error, NotLeader):  # deposed mid-reconcile: the next leader reconciles it
            log.debug("not the leader: reconcile dropped", extra={"kr": {"kind": kind, "namespace": namespace, "name": name}})
            return 0.0
        loop = asyncio.get_running_loop()
        pending = self._retries.get(key)
        if pending is not None:
            delay = max(0.0, pending.when() - loop.time())
        else:
            delay = self.backoff.failed(key) if error is not None else self.backoff.first

            def fire() -> None:
                self._retries.pop(key, None)
                if self.is_leader() and self._reconciler is not None:
                    self._reconciler.schedule(kind, namespace, name)

            self._retries[key] = loop.call_later(delay, fire)
        if error is not None:
            failures = self.backoff.failures(key)
            log.error(
                f"{kind} reconcile failed; retrying in {delay:.3g}s",
                extra={
                    "kr": {
                        "namespace": namespace,
                        kind: name,
                        "error": str(error) or type(error).__name__,
                        "failures": failures,
                        "retry_in": round(delay, 3),
                    }
                },
                # The traceback once per streak: the same failure's again every retry says nothing new.
                exc_info=error if failures == 1 and pending is None else None,
            )
        return delay

    def reconciled(self, kind: str, namespace: str, name: str) -> None:
        """``kind`` reconciled: its next failure is retried after the first delay again, and a retry
        still pending from an earlier failure is moot."""
        key = (kind, namespace, name)
        self.backoff.succeeded(key)
        pending = self._retries.pop(key, None)
        if pending is not None:
            pending.cancel()

    # --- leader tasks --------------------------------------------------------------------------

    async def _resync_forever(self) -> None:
        """Every ``resync`` seconds, reconcile every known pool and chain, one at a time (the net
        under missed events: it mostly reads the cache and writes nothing)."""
        while True:
            await asyncio.sleep(self.config.resync)
            r = self.reconciler()
            r.book.prune(r.clock())
            for kind, known, fn in (("pool", "pools", r.pool), ("chain", "chains", r.chain)):
                for namespace, name in sorted(self.known[known]):
                    try:
                        await fn(namespace, name)
                    except NotLeader:
                        return
                    except Exception as e:  # one broken object must not stop the resync of the others
                        self.retry_later(kind, namespace, name, e)
                    else:
                        self.reconciled(kind, namespace, name)

    async def _watch_reports(self) -> None:
        """Sidecar reports are Events labelled ``keyroute.dev/report=sidecar``; the label selector keeps
        every other Event of the cluster off this watch. Not a kopf handler: kopf would watch every Event
        of the cluster and filter them in the operator."""
        await _logged_in()
        r = self.reconciler()
        params = {"labelSelector": f"{REPORT_LABEL}={REPORT_LABEL_VALUE}"}

        def handle(kind: str, event: dict[str, Any]) -> None:
            if kind != "DELETED":  # an Event expiring says nothing about the credential
                r.report(event)

        scopes: list[str | None] = [*self.config.namespaces] or [None]  # None: every namespace
        await asyncio.gather(
            *(
                watch_forever(r.kube, path(*CORE, "events", ns), handle, params=params, what="sidecar reports")
                for ns in scopes
            )
        )

    # --- the watch streams (every replica: a standby keeps its caches warm) ---------------------

    async def _watch_objects(self) -> None:
        """List and watch CredentialPools, then Secrets, then ProviderChains, each kind's first listing
        done before the next starts, and hand every object to :meth:`on_pool`, :meth:`on_secret`,
        :meth:`on_chain`. keyroute's own list-and-watch, not kopf's handlers: kopf ran every event,
        the operator's own status writes coming back included, through its per-object workers,
        cause detection and handler invocation, a quarter of the operator's CPU at start-up (issue
        11); these handlers are plain functions that return at once, and reconciles run as tasks."""
        await _logged_in()
        kube = _login.kube()
        scopes: list[str | None] = [*self.config.namespaces] or [None]  # None: every namespace
        streams: list[asyncio.Task[None]] = []
        try:
            for kind, (group, version, plural) in (("pools", POOLS), ("secrets", (*CORE, "secrets")), ("chains", CHAINS)):
                listed: list[asyncio.Event] = []
                for scope in scopes:
                    done = asyncio.Event()
                    listed.append(done)
                    handle: Callable[[str, dict[str, Any]], None] = self.on_pool if kind == "pools" else self.on_chain
                    on_listed: Callable[[], None] = done.set
                    if kind == "secrets":
                        handle = functools.partial(self.on_secret, scope=scope)
                        on_listed = functools.partial(self._secrets_listed, scope, done)
                    streams.append(
                        asyncio.create_task(
                            watch_forever(kube, path(group, version, plural, scope), handle, what=kind, on_listed=on_listed),
                            name=f"keyroute-watch-{kind}",
                        )
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LISTING_WAIT):
                        await asyncio.gather(*(done.wait() for done in listed))
                if kind == "secrets":
                    # Every config Secret is known now (not after a timeout: then they are read).
                    self.cache.configs_listed = all(done.is_set() for done in listed)
                    # Even after a timeout: the reconciles then read what is missing from the API.
                    self.inputs_listed.set()
            await asyncio.gather(*streams)
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            await _close(kube)

    def _secrets_listed(self, scope: str | None, done: asyncio.Event) -> None:
        """A listing of Secrets ended: config Secrets it did not bring are gone (deleted while the
        watch was down); from now on the cache's word on config Secrets is complete (``done``)."""
        seen = self._listing.pop(scope, set())
        self.cache.configs_gone(lambda ns, name: (scope is None or ns == scope) and (ns, name) not in seen)
        done.set()

    def _reconcile(self, kind: str, namespace: str, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` (a reconcile for a watch event) as a task: after the inputs' first listing,
        at most :data:`MAX_RECONCILES` at once. The watch stream never waits for a reconcile."""

        async def run() -> None:
            if not self.inputs_listed.is_set():
                await self.inputs_listed.wait()
            await _guarded(self, kind, namespace, name, work())

        task = asyncio.create_task(run(), name=f"keyroute-{kind}-event")
        self._event_tasks.add(task)
        self.event_tasks_idle.clear()
        task.add_done_callback(self._event_task_done)

    def _event_task_done(self, task: asyncio.Task[None]) -> None:
        self._event_tasks.discard(task)
        if not self._event_tasks:
            self.event_tasks_idle.set()

    def on_pool(self, type: str, body: dict[str, Any]) -> None:
        """A CredentialPool listed (``LISTED``), added, changed or deleted."""
        meta = _meta(body)
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if type == "DELETED":
            self.known["pools"].discard((ns, name))
            self.generations.pop(("pool", ns, name), None)
            self.pools_by_secret.drop(ns, name)
            self.cache.drop("pool", ns, name)
            if self.is_leader():
                self._reconcile("pool", ns, name, lambda: _pool_deleted(self, ns, name))
            return
        self.known["pools"].add((ns, name))
        self.pools_by_secret.set(ns, name, referenced(body.get("spec"), "credentials", "secretRef"))
        self.cache.put("pool", body)
        if not self.seen("pool", ns, name, meta) or not self.is_leader():
            return  # unchanged (its own status write coming back, mostly), or a standby
        # A listing (start-up, re-list): the pool only; its chains are listed and rendered on their own.
        fan_out = type != "LISTED"
        self._reconcile("pool", ns, name, lambda: _pool_changed(self, ns, name, fan_out, body))

    def on_chain(self, type: str, body: dict[str, Any]) -> None:
        """A ProviderChain listed, added, changed or deleted."""
        meta = _meta(body)
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if type == "DELETED":
            self.known["chains"].discard((ns, name))
            self.chains_by_pool.drop(ns, name)
            self.generations.pop(("chain", ns, name), None)
            self.forget("chain", ns, name)
            return
        self.known["chains"].add((ns, name))
        self.chains_by_pool.set(ns, name, referenced(body.get("spec"), "providers", "credentialPoolRef"))
        if self.seen("chain", ns, name, meta) and self.is_leader():
            self._reconcile("chain", ns, name, lambda: _chain_changed(self, ns, name, body))

    def on_secret(self, type: str, body: dict[str, Any], scope: str | None = None) -> None:
        """A Secret listed, added, changed or deleted: a credential Secret reconciles the pools that
        reference it (then their chains); a config Secret is noted (its hash), and re-rendered if deleted."""
        meta = _meta(body)
        ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        if type == "DELETED":
            previous = self.secret_versions.pop((ns, name), None)
            version = None
        else:
            version = meta.get("resourceVersion")
            previous = self.secret_versions.get((ns, name))
            self.secret_versions[(ns, name)] = version
        chain = config_secret_chain(meta)
        if chain is not None:
            self._config_secret(type, body, ns, name, chain, scope)
            return
        pools = self.pools_by_secret.referrers(ns, name)
        if type == "DELETED" or not pools:
            self.cache.drop("secret", ns, name)
        else:
            self.cache.put("secret", body)
        if not pools:
            return  # not a credential Secret (most Secrets of a cluster), or its pools not listed yet
        if type == "LISTED" and (previous is None or previous == version):
            # A listing: at start-up pools and chains reconcile on their own listing; after a broken
            # watch, the re-listing brings every Secret again, and only one that changed needs a reconcile.
            return
        if not self.is_leader():
            return
        for pool in pools:
            self._reconcile("pool", ns, pool, lambda pool=pool: _pool_changed(self, ns, pool, True))  # type: ignore[misc]

    def _config_secret(self, type: str, body: dict[str, Any], ns: str, name: str, chain: str, scope: str | None) -> None:
        """A chain's rendered config Secret: its hash is kept (a reconcile compares it instead of
        reading the Secret); one deleted by someone is rendered again."""
        if type == "DELETED":
            self.cache.config_seen(ns, name, None)
            if (ns, chain) in self.known["chains"] and self.is_leader():
                with contextlib.suppress(NotLeader, kopf.TemporaryError):
                    self.reconciler().schedule_chain(ns, chain)
            return
        self.cache.config_seen(ns, name, secret_hash(body) or "")
        if type == "LISTED":
            self._listing.setdefault(scope, set()).add((ns, name))

    # --- what the handlers do ------------------------------------------------------------------

    def seen(self, kind: str, namespace: str, name: str, meta: Any) -> bool:
        """Record an object's generation; whether it is new or its spec changed since last seen."""
        key = (kind, namespace, name)
        generation = (meta or {}).get("generation")
        previous = self.generations.get(key, _MISSING)
        self.generations[key] = generation
        return previous is _MISSING or previous != generation or generation is None


async def _logged_in() -> None:
    # kopf logs in as a separate activity; this only waits for it once, at start-up.
    while not _login.CURRENT:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def _close(kube: Kube) -> None:
    with contextlib.suppress(Exception):
        await kube.close()


def _meta(body: dict[str, Any]) -> dict[str, Any]:
    """An object's metadata, its ``managedFields`` dropped in place on entry: nothing here reads
    them, and they are often the larger part of a small object. The object stays in memory while
    its reconcile waits for a free slot (thousands of them at start-up)."""
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        return {}
    meta.pop("managedFields", None)
    return meta


async def _guarded(op: Operator, kind: str, namespace: str, name: str, work: Coroutine[Any, Any, None]) -> None:
    """Run an event's reconcile, at most :data:`MAX_RECONCILES` at once: a standby's or a deposed
    leader's attempt ends quietly; a failure is logged and tried again soon."""
    try:
        async with op.reconciles:
            await work
    except NotLeader:
        log.debug("not the leader: reconcile skipped", extra={"kr": {"kind": kind, "namespace": namespace, "name": name}})
    except asyncio.CancelledError:
        raise
    except kopf.TemporaryError:  # not logged in yet
        op.retry_later(kind, namespace, name)
    except Exception as e:
        op.retry_later(kind, namespace, name, e)
    else:
        op.reconciled(kind, namespace, name)


async def operate(op: Operator, registry: kopf.OperatorRegistry, **kopf_options: Any) -> None:
    """Run kopf with ``op``'s handlers (registered with ``start_on_startup=False``); the election
    and the background tasks start once every start-up handler succeeded. Started from a start-up
    handler instead, they would outlive a failed start-up, and kopf waits 5 s for such "hung" tasks
    before it exits."""
    ready = asyncio.Event()

    async def start_when_ready() -> None:
        await ready.wait()
        op.start()

    # Created before kopf starts: kopf leaves the tasks that existed before it alone.
    starter = asyncio.create_task(start_when_ready(), name="keyroute-starter")
    try:
        await kopf.operator(registry=registry, ready_flag=ready, **kopf_options)
    finally:
        starter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starter


def register(op: Operator, registry: kopf.OperatorRegistry, *, start_on_startup: bool = True) -> None:
    """Register the operator's handlers, bound to ``op``, on ``registry``. ``start_on_startup``:
    start the election and background tasks from kopf's start-up (``kopf run -m``); :func:`operate`
    starts them itself.

    Each has an explicit id: kopf names handlers by qualified name otherwise (``register.<locals>...``)
    and passes an index to handlers under its id."""

    @kopf.on.startup(registry=registry, id="configure")
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # kopf's own log lines are not Events; ours are explicit
        settings.persistence.diffbase_storage = _NoDiffBase()
        if start_on_startup:
            op.start()

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return _login.login(**kwargs)

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(**_: Any) -> None:
        await op.shutdown()


async def _pool_changed(op: Operator, ns: str, name: str, fan_out: bool, body: Any = None) -> None:
    r = op.reconciler()
    await r.pool(ns, name, body)
    if fan_out:
        for chain in op.chains_by_pool.referrers(ns, name):
            r.schedule_chain(ns, chain)


async def _pool_deleted(op: Operator, ns: str, name: str) -> None:
    r = op.reconciler()
    r.forget("pool", ns, name)
    op.metrics.pool_gone((ns, name))
    for chain in op.chains_by_pool.referrers(ns, name):
        r.schedule_chain(ns, chain)


async def _chain_changed(op: Operator, ns: str, name: str, body: Any = None) -> None:
    await op.reconciler().chain(ns, name, body)
