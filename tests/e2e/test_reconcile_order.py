"""How the Reconciler folds requests into one scheduled reconcile, with the order of events pinned.

The two races of issue 9 (a second pod's presence report never counted in ``status.sidecars``, a
deleted pool's entry left in the rendered config) were one ordering bug: a request folded into a
pending reconcile was dropped when another reconcile had started between the first request and it.
Here the scheduled task's wait is a gate the test opens, so the interleaving is the same on every
run, whatever the machine's load. The reconciles run against kmock (any API server would do: nothing
here needs a fault on cue; the real-API tier can take these over as they are).
"""

from __future__ import annotations

import asyncio
from typing import Any

from keyroute.controller.metrics import OperatorMetrics
from keyroute.controller.reconcile import Reconciler
from keyroute.core.reports import Origin, presence_body
from keyroute.kube import Kube
from tests.e2e.test_operator import API, KEY1, KEY2, chain, config_of, pool, secret


class Gate:
    """A ``sleep`` for the Reconciler that returns only when the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0

    async def __call__(self, _seconds: float) -> None:
        self.waiting += 1
        await self.opened.wait()


def presence(chain_name: str, pod: str, at: float) -> dict[str, Any]:
    return presence_body(
        chain_name, "default", None, Origin(pod=pod, namespace="default"), at=at, config_hash="h"
    )


async def test_a_report_folded_after_another_reconcile_started_is_not_lost(kube):
    await kube.create(secret("s", k=KEY1))
    await kube.create(pool("p", "openai", ("k", "s", "k")))
    await kube.create(chain("c", ("openai", "p")))
    client = Kube.from_connection(kube.connection_info())
    gate = Gate()
    # The clock only says the reports are fresh; the order of events is the test's.
    r = Reconciler(client, OperatorMetrics(), lambda body, note: None, clock=lambda: 1002.0, sleep=gate)
    try:
        r.report(presence("c", "pod-a", 1000.0))  # schedules a reconcile; it waits at the gate
        await asyncio.sleep(0)
        assert gate.waiting == 1
        # Meanwhile a reconcile starts on its own (kopf's resume handler, the resync): it sees pod-a.
        await r.chain("default", "c")
        assert (await kube.get(API, "providerchains", "default", "c"))["status"]["sidecars"] == 1
        # pod-b's report arrives after that reconcile read the book: folded into the waiting one.
        r.report(presence("c", "pod-b", 1001.0))
        assert gate.waiting == 1  # folded, not scheduled again
        gate.opened.set()
        await r.drain()
        assert (await kube.get(API, "providerchains", "default", "c"))["status"]["sidecars"] == 2
    finally:
        await client.close()


async def test_a_pool_deleted_after_another_reconcile_started_leaves_the_config(kube):
    await kube.create(secret("s", k=KEY1))
    await kube.create(secret("t", k=KEY2))
    await kube.create(pool("p", "openai", ("k", "s", "k")))
    await kube.create(pool("later", "openrouter", ("o", "t", "k")))
    await kube.create(chain("c", ("openai", "openai", "p"), ("openrouter", "openrouter", "later")))
    client = Kube.from_connection(kube.connection_info())
    gate = Gate()
    r = Reconciler(client, OperatorMetrics(), lambda body, note: None, sleep=gate)

    async def entries() -> list[str]:
        return [
            e["name"] for e in config_of(await kube.get("v1", "secrets", "default", "c-keyroute"))["entries"]
        ]

    try:
        r.schedule_chain("default", "c")  # a pool changed: the chain waits at the gate
        await r.chain("default", "c")  # the resync reconciles the chain meanwhile
        assert await entries() == ["openai", "openrouter"]
        await kube.delete(API, "credentialpools", "default", "later")
        r.schedule_chain("default", "c")  # what the pool's DELETED event does: folded
        gate.opened.set()
        await r.drain()
        assert await entries() == ["openai"]
    finally:
        await client.close()


async def test_status_writes_of_one_object_are_spaced_from_the_previous_reconcile_s_end(kube):
    """Two reconciles of one pool back to back (a watch event's and a scheduled one's, say) write
    status no closer than ``min_interval``: the second waits, counted from the first one's end."""
    await kube.create(secret("s", k=KEY1))
    await kube.create(pool("p", "openai", ("k", "s", "k")))
    client = Kube.from_connection(kube.connection_info())
    r = Reconciler(client, OperatorMetrics(), lambda body, note: None, min_interval=0.3)

    def writes() -> int:
        return sum(
            1
            for q in kube.requests()
            if q.resource is not None and q.resource.plural == "credentialpools" and q.subresource == "status"
        )

    try:
        await r.pool("default", "p")
        first_ended = asyncio.get_running_loop().time()
        assert writes() == 1
        await kube.delete("v1", "secrets", "default", "s")  # the key goes Missing: a new status
        await r.pool("default", "p")
        assert asyncio.get_running_loop().time() - first_ended >= 0.3
        assert writes() == 2
        states = [
            c["state"]
            for c in (await kube.get(API, "credentialpools", "default", "p"))["status"]["credentials"]
        ]
        assert states == ["Missing"]
    finally:
        await client.close()
