"""kopf handlers: what the operator reacts to. Each one is a line or two that calls the reconciler.

- a CredentialPool created or changed → its status, then (coalesced, ~0.1 s later) every chain that
  uses it; resumed at start-up → its status only (each chain resumes itself, so it is rendered once);
- a CredentialPool deleted → every chain that used it (its entries become ``PoolNotFound``);
- a ProviderChain created, changed or resumed → its config Secret and status;
- a Secret added, changed or deleted → the pools that reference it, then their chains (a rotated key
  reaches the sidecars within seconds); the initial listing of Secrets is skipped for the same reason;
- sidecar reports (Events labelled ``keyroute.dev/report=sidecar``, watched by an operator-level
  task with that label selector) → the status of the pool or chain they concern, at most one
  reconcile per object every 0.5 s, and again when a reported ``until`` passes;
- one operator-level task resyncs every known pool and chain periodically, as a safety net for
  missed events. Not kopf timers: kopf puts a finalizer on every object that has a timer, and a
  finalizer is a way for a broken operator to block deletions.

Which pools reference a Secret and which chains use a pool come from kopf indexes, kept in memory
from the watch streams; no handler lists the cluster. No finalizers: deleting a chain lets garbage
collection remove its config Secret (owner reference), and nothing else needs cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import kopf

from keyroute.controller import login as _login
from keyroute.controller.metrics import shared as shared_metrics
from keyroute.controller.reconcile import Reconciler
from keyroute.core.reports import REPORT_LABEL, REPORT_LABEL_VALUE
from keyroute.kube import CORE, path, watch_forever

GROUP, VERSION = "keyroute.dev", "v1alpha1"
POOLS = (GROUP, VERSION, "credentialpools")
CHAINS = (GROUP, VERSION, "providerchains")
RESYNC = float(os.environ.get("KEYROUTE_RESYNC_SECONDS", "300"))
# The namespaces the operator serves (comma-separated; empty: all), for the report watch.
NAMESPACES = [n for n in os.environ.get("KEYROUTE_NAMESPACES", "").split(",") if n]

# Shared across handlers (kopf's memo is shallow-copied per object, so state lives here).
STATE: dict[str, Any] = {"metrics": shared_metrics()}
# Objects seen on the watch streams, for the periodic resync: (namespace, name).
KNOWN: dict[str, set[tuple[str, str]]] = {"pools": set(), "chains": set()}
# Last seen resourceVersion of credential Secrets, to tell a re-listed changed Secret from an old one.
SECRET_VERSIONS: dict[tuple[str, str], Any] = {}
log = logging.getLogger("keyroute.operator")


def reconciler() -> Reconciler:
    r = STATE.get("reconciler")
    if r is None:
        if not _login.CURRENT:
            raise kopf.TemporaryError("not logged in yet", delay=1)
        r = STATE["reconciler"] = Reconciler(_login.kube(), STATE["metrics"])
    assert isinstance(r, Reconciler)
    return r


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="keyroute.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="keyroute.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # kopf's own log lines are not Events; ours are explicit


async def _resync_forever() -> None:
    while True:
        await asyncio.sleep(RESYNC)
        r = reconciler()
        r.book.prune(r.clock())
        for kind, fn in (("pools", r.pool), ("chains", r.chain)):
            for namespace, name in sorted(KNOWN[kind]):
                try:
                    await fn(namespace, name)
                except Exception as e:  # one broken object must not stop the resync of the others
                    log.error(
                        "resync failed",
                        extra={"kr": {"kind": kind, "namespace": namespace, "name": name, "error": str(e)}},
                    )


async def _watch_reports() -> None:
    """Sidecar reports are Events labelled ``keyroute.dev/report=sidecar``; the label selector keeps
    every other Event of the cluster off this watch. Not a kopf handler: kopf would watch every Event
    of the cluster and filter them in the operator."""
    # kopf logs in as a separate activity; this only waits for it once, at start-up.
    while not _login.CURRENT:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    r = reconciler()
    params = {"labelSelector": f"{REPORT_LABEL}={REPORT_LABEL_VALUE}"}

    def handle(kind: str, event: dict[str, Any]) -> None:
        if kind != "DELETED":  # an Event expiring says nothing about the credential
            r.report(event)

    scopes: list[str | None] = [*NAMESPACES] or [None]  # None: every namespace
    await asyncio.gather(
        *(
            watch_forever(r.kube, path(*CORE, "events", ns), handle, params=params, what="sidecar reports")
            for ns in scopes
        )
    )


@kopf.on.startup()
async def start_resync(**_: Any) -> None:
    STATE["resync"] = asyncio.create_task(_resync_forever(), name="keyroute-resync")
    STATE["reports"] = asyncio.create_task(_watch_reports(), name="keyroute-reports")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return _login.login(**kwargs)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    for name in ("resync", "reports"):
        task = STATE.pop(name, None)
        if isinstance(task, asyncio.Task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    r = STATE.pop("reconciler", None)
    if isinstance(r, Reconciler):
        await r.drain()
        await r.kube.close()


# --- indexes ------------------------------------------------------------------------------------


@kopf.index(*POOLS)
def pools_by_secret(
    name: str, namespace: str | None, spec: Any, **_: Any
) -> dict[tuple[str | None, str], str]:
    """(namespace, Secret name) → names of the pools that reference it."""
    out: dict[tuple[str | None, str], str] = {}
    for cred in spec.get("credentials") or []:
        ref = cred.get("secretRef") if isinstance(cred, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            out[(namespace, ref["name"])] = name
    return out


@kopf.index(*CHAINS)
def chains_by_pool(
    name: str, namespace: str | None, spec: Any, **_: Any
) -> dict[tuple[str | None, str], str]:
    """(namespace, pool name) → names of the chains that use it."""
    out: dict[tuple[str | None, str], str] = {}
    for entry in spec.get("providers") or []:
        ref = entry.get("credentialPoolRef") if isinstance(entry, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("name"), str):
            out[(namespace, ref["name"])] = name
    return out


def _chains_of(namespace: str, pool: str, chains_by_pool: kopf.Index[Any, Any]) -> list[str]:
    return sorted(set(chains_by_pool.get((namespace, pool), [])))


# --- pools --------------------------------------------------------------------------------------


@kopf.on.resume(*POOLS)
async def pool_resumed(name: str, namespace: str | None, **_: Any) -> None:
    # Chains resume on their own: fanning out here would render each chain once per pool at start-up.
    await reconciler().pool(namespace or "default", name)


@kopf.on.create(*POOLS)
@kopf.on.update(*POOLS)
async def pool_changed(name: str, namespace: str | None, **kwargs: Any) -> None:
    ns = namespace or "default"
    r = reconciler()
    await r.pool(ns, name)
    for chain in _chains_of(ns, name, kwargs["chains_by_pool"]):
        r.schedule_chain(ns, chain)


@kopf.on.event(*POOLS)
async def pool_event(type: str, name: str, namespace: str | None, **kwargs: Any) -> None:
    ns = namespace or "default"
    if type != "DELETED":
        KNOWN["pools"].add((ns, name))
        return
    KNOWN["pools"].discard((ns, name))
    r = reconciler()
    r.forget("pool", ns, name)
    r.metrics.pool_gone((ns, name))
    for chain in _chains_of(ns, name, kwargs["chains_by_pool"]):
        r.schedule_chain(ns, chain)


# --- chains -------------------------------------------------------------------------------------


@kopf.on.resume(*CHAINS)
@kopf.on.create(*CHAINS)
@kopf.on.update(*CHAINS)
async def chain_changed(name: str, namespace: str | None, **_: Any) -> None:
    await reconciler().chain(namespace or "default", name)


@kopf.on.event(*CHAINS)
async def chain_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
    key = (namespace or "default", name)
    if type == "DELETED":
        KNOWN["chains"].discard(key)
        r = reconciler()
        r.forget("chain", *key)
        r.metrics.chain_gone(key)
    else:
        KNOWN["chains"].add(key)


# --- secrets ------------------------------------------------------------------------------------


@kopf.on.event("", "v1", "secrets")
async def secret_event(type: str | None, name: str, namespace: str | None, **kwargs: Any) -> None:
    ns = namespace or "default"
    pools = sorted(set(kwargs["pools_by_secret"].get((ns, name), [])))
    if not pools:
        return  # not a credential Secret (most Secrets of a cluster)
    version = (kwargs.get("meta") or {}).get("resourceVersion")
    previous = SECRET_VERSIONS.get((ns, name))
    SECRET_VERSIONS[(ns, name)] = version
    if type is None and (previous is None or previous == version):
        # A listing: at start-up pools and chains reconcile on their own resume; after a broken
        # watch, kopf re-lists too, and only a Secret that changed meanwhile needs a reconcile.
        return
    r = reconciler()
    chains: set[str] = set()
    for pool in pools:
        await r.pool(ns, pool)
        chains.update(_chains_of(ns, pool, kwargs["chains_by_pool"]))
    for chain in sorted(chains):
        r.schedule_chain(ns, chain)
