"""Reconcile one CredentialPool or ProviderChain: read what it depends on, call the pure core, write
only what changed.

Called by the kopf handlers for the object's own changes and for changes of what it depends on (a
Secret, a pool). Per object, reconciles are serialised, so the operator stays the single, ordered
writer of status and of the rendered config Secret. An unchanged object costs reads only: the status
and the config Secret are compared before they are written.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from keyroute.controller.events import EventLane
from keyroute.controller.metrics import OperatorMetrics
from keyroute.core.actions import rfc3339
from keyroute.core.config import describe_validation_error
from keyroute.core.names import INVALID_NAME, chain_name_problem, pool_name_problem
from keyroute.core.objects import Note, config_secret, note_event, secret_hash, transitions
from keyroute.core.render import render, resolve_pool
from keyroute.core.reports import ReportBook, ReportError, is_report, parse_report
from keyroute.core.resources import CredentialPool, ProviderChain, Secret
from keyroute.core.status import chain_status, config_secret_name, invalid_status, pool_status
from keyroute.kube import CORE, KEYROUTE, ApiError, Kube, path

log = logging.getLogger("keyroute.operator")

PostEvent = Callable[[Mapping[str, Any], Note], None]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class ObjectCache:
    """The CredentialPools and credential Secrets as the watch streams last brought them, for the
    reads of a reconcile (a chain reads 2-3 pools and their Secrets; a pool its Secrets): the
    informer cache of controller-runtime, reduced to what keyroute reads. Kept by the handlers
    (every replica); ``managedFields`` and ``status`` are not kept. A miss (a Secret listed before
    the pool that references it, at start-up) is read from the API server and kept, unless an event
    brought the object meanwhile (events win: they are never older than what a GET returned before
    them). Only Secrets some pool references are kept."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        # The rendered config Secrets' hashes by (namespace, name) ("" for a Secret without one), from
        # the Secret watch. Trusted once the Secrets were listed (``configs_listed``): a reconcile then
        # compares the hash instead of reading the Secret, and creates a Secret it has no entry for.
        self.configs: dict[tuple[str, str], str] = {}
        self.configs_listed = False

    def config_seen(self, namespace: str, name: str, config_hash: str | None) -> None:
        """A config Secret's hash as last seen or written (None: it is gone)."""
        if config_hash is None:
            self.configs.pop((namespace, name), None)
        else:
            self.configs[(namespace, name)] = config_hash

    def configs_gone(self, gone: Callable[[str, str], bool]) -> None:
        """Forget the config Secrets for which ``gone(namespace, name)`` says so (not re-listed)."""
        for key in [k for k in self.configs if gone(*k)]:
            del self.configs[key]

    def put(self, kind: str, body: Mapping[str, Any]) -> None:
        """Keep ``body`` (a pool or Secret from a watch event)."""
        meta = body.get("metadata") or {}
        key = (kind, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        self._objects[key] = _slim(body)

    def drop(self, kind: str, namespace: str, name: str) -> None:
        self._objects.pop((kind, namespace, name), None)

    async def read(self, kube: Kube, kind: str, url: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The kept object, or a GET of ``url`` (kept if no event brought it meanwhile)."""
        key = (kind, namespace, name)
        body = self._objects.get(key)
        if body is not None:
            return body
        body = await kube.get(url)
        if body is not None:
            body = self._objects.setdefault(key, _slim(body))
        return body


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return {**{k: v for k, v in body.items() if k != "status"}, "metadata": meta}


class Reconciler:
    """Holds the API client, the metrics and the per-object locks."""

    def __init__(
        self,
        kube: Kube,
        metrics: OperatorMetrics,
        post: PostEvent | None = None,
        clock: Clock = time.time,
        coalesce: float = 0.1,
        # Slightly over 0.5 s: starts 0.5 s apart could put three writes in one sliding second.
        min_interval: float = 0.55,
        sleep: Sleep = asyncio.sleep,
        cache: ObjectCache | None = None,
        events_idle: asyncio.Event | None = None,
        retry: Callable[[str, str, str, Exception], float] | None = None,
        reconciled: Callable[[str, str, str], None] | None = None,
    ):
        self.kube = kube
        # Called with (kind, namespace, name, error) when a scheduled reconcile fails: the operator logs
        # it and tries it again later, as it does an event-started one (else a retry that failed
        # waited for the resync); ``reconciled`` when one succeeds (its backoff ends).
        self.retry = retry
        self.reconciled = reconciled
        # Reads of pools and Secrets for renders; without one (tests), every read is a GET.
        self.cache = cache
        self.metrics = metrics
        # Events are posted through keyroute's own client, not kopf.event(): kopf's poster exists only
        # inside kopf's handler context, and reports and expiry timers change status outside it.
        self.post = post or self._post_event
        self._event_seq = itertools.count()
        # ``events_idle``: set while no burst of reconciles is under way (the Events wait for it).
        self.events = EventLane(self._send_event, on_drop=metrics.events_dropped.inc, idle=events_idle)
        self.clock = clock
        self.coalesce = coalesce
        self.min_interval = min_interval
        self._sleep = sleep  # a parameter so that tests can order a scheduled reconcile's wake-up
        self.book = ReportBook()
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started: dict[tuple[str, str, str], float] = {}  # monotonic start of the last reconcile
        self._ended: dict[tuple[str, str, str], float] = {}  # and its end
        # Ordering, not timing, decides whether a scheduled reconcile is moot: one counter ticks for
        # every request (``schedule``, folded ones included) and every reconcile start.
        self._seq = itertools.count(1)
        self._requested: dict[tuple[str, str, str], int] = {}  # the latest request, folded or not
        self._began: dict[tuple[str, str, str], int] = {}  # the latest reconcile start
        self._timers: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self._seeded: set[tuple[str, str, str]] = set()
        # Objects whose name cannot work and whose status the API server refuses (the CRD's name
        # rule): told once, by an Event and a log line, then left alone until deleted.
        self._unwritable: set[tuple[str, str, str]] = set()

    def schedule_chain(self, namespace: str, name: str) -> None:
        """Reconcile a chain soon, once, however many of its pools and Secrets changed meanwhile."""
        self.schedule("chain", namespace, name)

    def schedule(self, kind: str, namespace: str, name: str) -> None:
        """Reconcile a pool or chain soon, once, however many of its inputs changed meanwhile.

        A chain depends on several pools and Secrets; when they change together (a resync, an
        operator start, a rotation touching several keys) one render covers them all, and a
        reconcile that already started after the change makes this one moot. A burst of sidecar
        reports is folded the same way, and reconciles of one object start at least
        ``min_interval`` apart: that bounds its status writes (docs/reporting.md asks for a bounded number).
        The key leaves the pending set before the reconcile starts, so a change during it schedules
        another.

        A reconcile is moot only if one *started after the latest request folded into it*, not
        merely after the first: a request that arrives while the key is pending is folded into the
        waiting task, and a reconcile that started in between (a kopf handler's, another scheduled
        task's that waited for the lock) read its inputs before that request. Comparing with the
        first request's time dropped such a request until the next resync (issue 9: a second pod's
        presence report never counted, a deleted pool's entry left in the config).
        """
        key = (kind, namespace, name)
        self._requested[key] = next(self._seq)
        if key in self._pending:
            return
        self._pending.add(key)
        since = time.monotonic()
        wait = max(self.coalesce, self._started.get(key, float("-inf")) + self.min_interval - since)
        fn = self.chain if kind == "chain" else self.pool

        async def run() -> None:
            await self._sleep(wait)
            self._pending.discard(key)
            if self._began.get(key, 0) > self._requested[key]:
                return  # a reconcile started after every request this task stood for: it saw them
            try:
                await fn(namespace, name)
            except Exception as e:
                if self.retry is not None:
                    self.retry(kind, namespace, name, e)
                else:
                    log.error(
                        f"{kind} reconcile failed",
                        extra={"kr": {"namespace": namespace, kind: name, "error": str(e) or type(e).__name__}},
                        exc_info=True,
                    )
            else:
                if self.reconciled is not None:
                    self.reconciled(kind, namespace, name)

        task = asyncio.create_task(run(), name=f"keyroute-{kind}-{namespace}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def report(self, event: Mapping[str, Any]) -> None:
        """Fold one sidecar report Event into the book and schedule the status it changes."""
        if not is_report(event):
            return  # the operator's own Events, or anybody's: a real API server filters by label
        try:
            namespace, name, rep = parse_report(event)
        except ReportError as e:
            self.metrics.reports.labels("invalid").inc()
            meta = event.get("metadata") or {}
            log.warning(
                "unreadable sidecar report ignored",
                extra={"kr": {"event": meta.get("name"), "namespace": meta.get("namespace"), "error": str(e)}},
            )
            return
        kind = self.book.add(namespace, name, rep)
        self.metrics.reports.labels("folded" if kind else "unchanged").inc()
        if kind is not None:
            self.schedule(kind, namespace, name)

    def _post_event(self, body: Mapping[str, Any], note: Note) -> None:
        # Named and stamped now, when the change happened, however long the Event waits in the lane.
        now = self.clock()
        meta = body.get("metadata") or {}
        name = f"{meta.get('name')}.{int(now * 1000):x}{next(self._event_seq) % 4096:03x}"
        self.events.post(meta.get("namespace") or "", note_event(body, note, now=rfc3339(now), name=name), note.reason)

    async def _send_event(self, namespace: str, event: dict[str, Any]) -> None:
        await self.kube.create(path(*CORE, "events", namespace), event, read=False)
        self.metrics.writes.labels("event").inc()

    def _arm(self, kind: str, namespace: str, name: str) -> None:
        """Wake up when the object's reported state ends by itself (``until``, a silent pod)."""
        when = self.book.deadline(kind, namespace, name, self.clock())
        key = (kind, namespace, name)
        timer = self._timers.get(key)
        if when is None:
            if timer is not None:
                timer.cancel()
                del self._timers[key]
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, when - self.clock()) + 0.05
        if timer is not None and not timer.cancelled() and abs(timer.when() - at) < 0.01:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(at, self.schedule, kind, namespace, name)

    async def drain(self) -> None:
        """Wait for scheduled reconciles (tests, shutdown); pending expiry timers are dropped."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.events.drain()

    def cancel(self) -> None:
        """Stop at once: scheduled reconciles, Events queued or being posted and expiry timers (leadership lost)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        self.events.cancel()

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object was deleted: drop its reports and timers."""
        self.book.forget(kind, namespace, name)
        self._ended.pop((kind, namespace, name), None)
        self._unwritable.discard((kind, namespace, name))
        timer = self._timers.pop((kind, namespace, name), None)
        if timer is not None:
            timer.cancel()

    def _lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        key = (kind, namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    # --- reads -----------------------------------------------------------------------------------

    async def _read(self, kind: str, url: str, namespace: str, name: str) -> dict[str, Any] | None:
        if self.cache is None:
            return await self.kube.get(url)
        return await self.cache.read(self.kube, kind, url, namespace, name)

    async def _secrets(self, namespace: str, names: Iterable[str]) -> dict[str, Secret]:
        out: dict[str, Secret] = {}
        for name in sorted(set(names)):
            body = await self._read("secret", path(*CORE, "secrets", namespace, name), namespace, name)
            if body is None:
                continue
            try:
                out[name] = Secret.model_validate(body)
            except ValidationError:
                log.warning("unreadable Secret", extra={"kr": {"namespace": namespace, "secret": name}})
        return out

    # --- pools -----------------------------------------------------------------------------------

    async def pool(self, namespace: str, name: str, body: Mapping[str, Any] | None = None) -> None:
        """Reconcile one CredentialPool's status. ``body``: the pool as its watch event just brought
        it (the handler's own event), which spares a GET; otherwise it is read from the API."""
        await self._one("pool", "CredentialPool", namespace, name, body, self._pool)

    async def _one(
        self,
        kind: str,
        metric_kind: str,
        namespace: str,
        name: str,
        body: Mapping[str, Any] | None,
        work: Callable[[str, str, Mapping[str, Any] | None], Coroutine[Any, Any, None]],
    ) -> None:
        """One reconcile of one object: serialised per object, spaced from the previous one,
        measured, and followed by the timer for whatever it reported ending by itself."""
        key = (kind, namespace, name)
        async with self._lock(*key):
            await self._spaced(key)
            body = self._fresh(key, body)
            self._begin(key)
            try:
                await self._measured(metric_kind, work(namespace, name, body))
            finally:
                self._ended[key] = time.monotonic()
        self._arm(*key)

    def _fresh(self, key: tuple[str, str, str], body: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """An event's body is used only for the object's first reconcile by this reconciler (in
        practice: the start-up listing). Once this reconciler has written the object, an event
        being handled may predate that write, and its old status would make the same status (and
        its Events) be written twice: read it from the API then."""
        return body if key not in self._began else None

    async def _spaced(self, key: tuple[str, str, str]) -> None:
        """Under the object's lock: wait until ``min_interval`` after its previous reconcile ended.

        Scheduled reconciles are spaced from each other's starts already; this also spaces a
        reconcile started by a watch event (a spec or Secret change) from a scheduled one, and
        measures from the end, so that a slow write followed by a quick one cannot land two status
        writes closer than ``min_interval`` (three in one second were seen under load)."""
        wait = self._ended.get(key, float("-inf")) + self.min_interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _begin(self, key: tuple[str, str, str]) -> None:
        """Mark a reconcile's start, under the object's lock and before it reads anything."""
        self._started[key] = time.monotonic()
        self._began[key] = next(self._seq)

    async def _measured(self, kind: str, work: Coroutine[Any, Any, None]) -> None:
        started = time.perf_counter()
        try:
            await work
        except Exception:
            self.metrics.reconciles.labels(kind, "error").inc()
            raise
        else:
            self.metrics.reconciles.labels(kind, "ok").inc()
        finally:
            self.metrics.duration.labels(kind).observe(time.perf_counter() - started)

    async def _pool(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        url = path(*KEYROUTE, "credentialpools", namespace, name)
        if body is None:
            body = await self.kube.get(url)
        if body is None:
            self.metrics.pool_gone((namespace, name))
            return
        old = body.get("status") or {}
        now = self.clock()
        problem = pool_name_problem(name)
        if problem is not None:
            await self._write_invalid_name(("pool", namespace, name), url, body, problem, now, "CredentialPool")
            self.metrics.pool_seen((namespace, name), "False", {})
            return
        try:
            pool = CredentialPool.model_validate(body)
        except ValidationError as e:
            await self._write_invalid(url, body, e, now, "CredentialPool")
            self.metrics.pool_seen((namespace, name), "False", {})
            return
        secrets = await self._secrets(namespace, (c.secret_ref.name for c in pool.spec.credentials))
        if ("pool", namespace, name) not in self._seeded:
            # After a restart, what the operator wrote before survives the Events that expired.
            self._seeded.add(("pool", namespace, name))
            self.book.seed_pool(namespace, name, old, now)
        reported = self.book.pool_reports(namespace, name, now)
        new = pool_status(pool, resolve_pool(pool, secrets), old=old, now=now, reported=reported)
        await self._write_status(url, body, old, new, "CredentialPool")
        ready = next((c["status"] for c in new["conditions"] if c["type"] == "Ready"), "Unknown")
        self.metrics.pool_seen(
            (namespace, name),
            ready,
            Counter(c["state"] for c in new["credentials"]),
            {c["name"]: c["state"] for c in new["credentials"]},
        )

    # --- chains ----------------------------------------------------------------------------------

    async def chain(self, namespace: str, name: str, body: Mapping[str, Any] | None = None) -> None:
        """Render one ProviderChain's sidecar config Secret and write its status (``body`` as for
        :meth:`pool`)."""
        await self._one("chain", "ProviderChain", namespace, name, body, self._chain)

    async def _chain(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        url = path(*KEYROUTE, "providerchains", namespace, name)
        if body is None:
            body = await self.kube.get(url)
        if body is None:
            self.metrics.chain_gone((namespace, name))
            return  # deleted: its config Secret goes with it (owner reference)
        old = body.get("status") or {}
        now = self.clock()
        problem = chain_name_problem(name)
        if problem is not None:
            # Before anything is read or rendered: the webhook refuses every pod that names this
            # chain, and over 63 characters the name cannot even be its config Secret's label value.
            await self._write_invalid_name(("chain", namespace, name), url, body, problem, now, "ProviderChain")
            return
        try:
            chain = ProviderChain.model_validate(body)
        except ValidationError as e:
            await self._write_invalid(url, body, e, now, "ProviderChain")
            return
        pools: dict[str, CredentialPool] = {}
        for ref in sorted({p.credential_pool_ref.name for p in chain.spec.providers}):
            pool_body = await self._read("pool", path(*KEYROUTE, "credentialpools", namespace, ref), namespace, ref)
            if pool_body is None:
                continue
            try:
                pools[ref] = CredentialPool.model_validate(pool_body)
            except ValidationError:
                continue  # reported on the pool itself (InvalidSpec); here it cannot be routed
        secrets = await self._secrets(
            namespace, (c.secret_ref.name for p in pools.values() for c in p.spec.credentials)
        )
        result = render(chain, pools, secrets)
        config_hash = await self._write_config(chain, result.config)
        if ("chain", namespace, name) not in self._seeded:
            self._seeded.add(("chain", namespace, name))
            self.book.seed_chain(namespace, name, old)
        summary = self.book.chain_summary(namespace, name, now)
        new = chain_status(chain, result, old=old, now=now, summary=summary, config_hash=config_hash)
        await self._write_status(url, body, old, new, "ProviderChain")
        fallback = next((c for c in new["conditions"] if c["type"] == "FallbackActive"), None)
        self.metrics.chain_seen(
            (namespace, name),
            fallback is not None and fallback["status"] == "True",
            int(new.get("sidecars") or 0),
        )

    async def _write_config(self, chain: ProviderChain, config: Any) -> str | None:
        """Create or update the chain's config Secret unless it holds ``config`` already; the
        config's hash."""
        name = config_secret_name(chain.name)
        url = path(*CORE, "secrets", chain.namespace, name)
        cache = self.cache
        wanted = config_secret(chain, config)
        wanted_hash = secret_hash(wanted)
        exists: bool
        current_hash: str | None
        if cache is not None and cache.configs_listed:
            # The Secret watch's word: no GET (a stale "missing" ends in a 409 and a GET below).
            known = cache.configs.get((chain.namespace, name))
            exists, current_hash = known is not None, known
        else:
            current = await self.kube.get(url)
            exists, current_hash = current is not None, secret_hash(current)
        if not exists:
            try:
                await self.kube.create(path(*CORE, "secrets", chain.namespace), wanted, read=False)
            except ApiError as e:
                if e.status != 409:
                    raise
                current_hash = secret_hash(await self.kube.get(url))
            else:
                if cache is not None:
                    cache.config_seen(chain.namespace, name, wanted_hash)
                self.metrics.writes.labels("config").inc()
                log.info(
                    "config rendered",
                    extra={
                        "kr": {
                            "chain": chain.name,
                            "namespace": chain.namespace,
                            "hash": wanted_hash,
                        }
                    },
                )
                return wanted_hash
        if current_hash == wanted_hash:
            return wanted_hash
        await self.kube.merge_patch(
            url,
            {
                "metadata": {
                    "annotations": wanted["metadata"]["annotations"],
                    "labels": wanted["metadata"]["labels"],
                },
                "data": wanted["data"],
            },
            read=False,
        )
        if cache is not None:
            cache.config_seen(chain.namespace, name, wanted_hash)
        self.metrics.writes.labels("config").inc()
        log.info(
            "config rendered",
            extra={"kr": {"chain": chain.name, "namespace": chain.namespace, "hash": wanted_hash}},
        )
        return wanted_hash

    async def _write_invalid(
        self, url: str, body: Mapping[str, Any], err: ValidationError, now: float, kind: str
    ) -> None:
        """A spec that does not validate (a real API server would mostly have refused it): say which field."""
        old = body.get("status") or {}
        meta = body.get("metadata") or {}
        message = describe_validation_error(err, input_names=True)
        new = invalid_status(old, message, now=now, generation=meta.get("generation"))
        await self._write_status(url, body, old, new, kind)

    async def _write_invalid_name(
        self,
        key: tuple[str, str, str],
        url: str,
        body: Mapping[str, Any],
        message: str,
        now: float,
        kind: str,
    ) -> None:
        """An object whose name cannot work (keyroute.core.names): ``Ready=False``, ``InvalidName``,
        and nothing else is done for it. Names cannot change, so this is final: no retry.

        Once the CRD carries the name rule, the API server refuses every write to such an object,
        its status included (a rule at the schema root is evaluated on status writes too, and
        Kubernetes 1.28 does not ratchet it): then the Event and one log line are all there is,
        and later reconciles of the object do nothing."""
        if key in self._unwritable:
            return
        old = body.get("status") or {}
        meta = body.get("metadata") or {}
        new = invalid_status(old, message, now=now, generation=meta.get("generation"), reason=INVALID_NAME)
        try:
            await self._write_status(url, body, old, new, kind)
        except ApiError as e:
            if e.status != 422:
                raise  # the API server's trouble, not the name's: retried as any failed reconcile
            self._unwritable.add(key)
            self.post(body, Note("Warning", INVALID_NAME, f"Ready=False: {message}"))
            log.warning(
                message,
                extra={
                    "kr": {
                        "kind": kind,
                        "name": meta.get("name"),
                        "namespace": meta.get("namespace"),
                        "reason": INVALID_NAME,
                        "status": f"not written: {e}",
                    }
                },
            )

    async def _write_status(
        self, url: str, body: Mapping[str, Any], old: Mapping[str, Any], new: dict[str, Any], kind: str
    ) -> None:
        if _same(old, new):
            return
        # Merge patch: keys present in the old status but gone from the new one are removed.
        patch = {**{k: None for k in old if k not in new}, **new}
        await self.kube.merge_patch(url + "/status", {"status": patch}, read=False)
        self.metrics.writes.labels("status").inc()
        meta = body.get("metadata") or {}
        for note in transitions(old, new):
            self.post(body, note)
            log.log(
                logging.WARNING if note.type == "Warning" else logging.INFO,
                note.message,
                extra={
                    "kr": {
                        "kind": kind,
                        "name": meta.get("name"),
                        "namespace": meta.get("namespace"),
                        "reason": note.reason,
                    }
                },
            )


def _same(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return {k: v for k, v in old.items() if v is not None} == {k: v for k, v in new.items() if v is not None}
