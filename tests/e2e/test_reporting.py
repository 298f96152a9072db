"""Reporting against kmock, for what a real API server cannot do on cue: the real operator (kopf),
real sidecars (in-process) and fake providers on 127.0.0.1.

A 429 reaching status, another pod adopting the cooldown, fallback and restore, and reports buffered
through an outage run on the real API server (``tests/realapi/test_reporting.py``,
``test_outage.py``). Kept here: an outage switched on and off instantly while a sidecar's buffer fills
(a real API server takes seconds to restart), and the count of status writes per second, which
needs kmock's record of every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyroute.core.reports import REPORT_LABEL, Origin
from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.kube import SIDECAR_AGENT
from keyroute.kube import Kube as ApiClient
from keyroute.sidecar.app import Address, Sidecar
from keyroute.sidecar.sources import RenderedConfigFile
from tests.e2e.conftest import Kube, eventually
from tests.e2e.test_operator import API, HANDLERS, config_of, get_pool, pool, secret

pytestmark = pytest.mark.e2e

KEY1 = "sk-test-REPORT-E2E-KEY-0000000001"
KEY2 = "sk-test-REPORT-E2E-KEY-0000000002"
BACKUP_KEY = "sk-test-REPORT-E2E-BACKUP-000003"
KEYS = (KEY1, KEY2, BACKUP_KEY)

StartPod = Callable[..., Awaitable[Sidecar]]


def chain_of(name: str, *entries: tuple[str, str, FakeProvider], **fallback: Any) -> dict[str, Any]:
    """(entry name, pool, provider) entries pointing at fake providers."""
    return {
        "apiVersion": API,
        "kind": "ProviderChain",
        "metadata": {"name": name},
        "spec": {
            "providers": [
                {"name": n, "provider": n, "baseURL": fp.base_url, "credentialPoolRef": {"name": p}}
                for n, p, fp in entries
            ],
            "fallback": {"maxWait": "0s", **fallback},
        },
    }


def pool_of_keys(keys: list[str]) -> list[dict[str, Any]]:
    """A Secret ``openai-keys`` holding ``keys`` as k0, k1, ... and the pool ``openai`` of them, in order."""
    names = [f"k{i}" for i in range(len(keys))]
    return [
        secret("openai-keys", **dict(zip(names, keys, strict=True))),
        pool("openai", "openai", *((n, "openai-keys", n) for n in names)),
    ]


@pytest.fixture
async def start_pod(kube: Kube, tmp_path: Path) -> AsyncIterator[StartPod]:
    """``await start_pod("pod-a", chain="agents", **reporter options)``: a sidecar on the operator's
    rendered config, reporting to kmock as that pod."""
    started: list[Sidecar] = []

    async def start(pod: str, *, chain: str = "agents", **reporter: Any) -> Sidecar:
        rendered = await eventually(
            lambda: kube.get("v1", "secrets", "default", f"{chain}-keyroute"), timeout=10
        )
        path = tmp_path / pod / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config_of(rendered)))
        sidecar = Sidecar(
            RenderedConfigFile(path),
            listen=Address("127.0.0.1", 0),
            admin_listen=None,
            tick_interval=0.05,
            reload_interval=0.2,
        )
        reporter.setdefault("retry", (0.05, 0.2))
        sidecar.enable_reporting(
            ApiClient.from_connection(kube.connection_info(), user_agent=SIDECAR_AGENT),
            Origin(pod, "default"),
            **reporter,
        )
        if sidecar.fleet is not None:
            sidecar.fleet.interval = 0.05
        sidecar.seen = []  # type: ignore[attr-defined]  # every action it emitted
        sidecar.listeners.append(sidecar.seen.append)  # type: ignore[attr-defined]
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for s in started:
        await s.stop(flush=0)


async def call(
    session: aiohttp.ClientSession, sidecar: Sidecar, model: str = "gpt-4o"
) -> aiohttp.ClientResponse:
    async with session.post(
        f"{sidecar.base_url}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    ) as resp:
        await resp.read()
        return resp


async def reports(kube: Kube, involving: str | None = None) -> list[dict[str, Any]]:
    events = await kube.events(involving=involving)
    return [e for e in events if ((e.get("metadata") or {}).get("labels") or {}).get(REPORT_LABEL)]


def status_writes(kube: Kube, plural: str) -> list[Any]:
    return [
        r
        for r in kube.requests()
        if r.resource is not None
        and r.resource.plural == plural
        and str(r.method.value).upper() == "PATCH"
        and r.subresource == "status"
    ]


@contextlib.asynccontextmanager
async def agents(kube: Kube, operator_runner: Any, objects: list[dict[str, Any]]) -> AsyncIterator[Any]:
    for obj in objects:
        await kube.create(obj)
    async with operator_runner(HANDLERS, namespaces=["default"]) as op:
        await watching_reports(kube)
        yield op
    for key in KEYS:
        assert key not in op.log + op.output


async def test_a_full_buffer_drops_the_oldest_and_says_how_many(
    kube, operator_runner, start_pod, fake_provider
):
    """kmock: the outage starts and ends at once, so exactly the four reports made meanwhile queue."""
    keys = [f"sk-test-REPORT-DROP-KEY-{i:08d}" for i in range(5)]
    openai = await fake_provider("openai", keys=keys)
    for k in keys[:4]:
        openai.set(Behaviour.rate_limited(retry_after=60), key=k)
    objects = [
        *pool_of_keys(keys),
        chain_of("agents", ("openai", "openai", openai)),
    ]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a", capacity=2)
        await eventually(
            lambda: a.reporter.pending == 0 and a.metrics.reports.labels("sent")._value.get() >= 1
        )
        with kube.outage(unreachable=True):
            for _ in range(4):
                await call(session, a)
            await eventually(lambda: a.reporter.pending == 2)
        events = await eventually(lambda: _nonempty(reports(kube, "openai")), timeout=10)
        # Not pending == 0: the last report is off the queue while it is being sent.
        await eventually(lambda: a.reporter.delivered.is_set())
        events = await reports(kube, "openai")
        # k0 and k1 were dropped (the two oldest); the next Event through says so.
        assert sorted(e["metadata"]["annotations"]["keyroute.dev/credential"] for e in events) == ["k2", "k3"]
        assert sum(int(e["metadata"]["annotations"].get("keyroute.dev/dropped", 0)) for e in events) == 2
        assert any("2 earlier reports were dropped" in e["message"] for e in events)
        assert a.metrics.reports.labels("dropped")._value.get() == 2


async def test_a_burst_of_1000_rate_limits_yields_few_events_and_bounded_status_writes(
    kube, operator_runner, start_pod, fake_provider
):
    """kmock: the status writes are counted from its record of every request."""
    keys = [f"sk-test-REPORT-FLOOD-KEY-{i:08d}" for i in range(3)]
    openai = await fake_provider("openai", keys=keys, default=Behaviour.rate_limited(retry_after=1))
    objects = [
        *pool_of_keys(keys),
        chain_of("agents", ("openai", "openai", openai)),
    ]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        b = await start_pod("pod-b")
        await eventually(lambda: _where(get_pool(kube, "openai"), lambda p: p.get("status")))
        writes_before = len(status_writes(kube, "credentialpools"))
        t0 = time.monotonic()
        sem = asyncio.Semaphore(50)

        async def one(i: int) -> int:
            async with sem:
                return (await call(session, a if i % 2 else b)).status

        statuses = await asyncio.gather(*(one(i) for i in range(1000)))
        elapsed = time.monotonic() - t0
        assert set(statuses) <= {429, 503}, set(statuses)
        await eventually(lambda: a.reporter.pending == 0 and b.reporter.pending == 0, timeout=20)
        # The burst's last cooldowns (Retry-After 1 s) end after it, and each sidecar's tick then
        # emits and reports their restores: a fixed second after pending == 0 could count one as a
        # transition while its report was still being sent. Wait until none can come any more.
        await eventually(lambda: settled(a) and settled(b), timeout=10)
        window = time.monotonic() - t0
        writes = len(status_writes(kube, "credentialpools")) - writes_before
        # ≤ 2 status writes per second per pool (the operator's min interval), plus the trailing one.
        assert writes <= 2 * window + 2, (writes, window)
        events = await reports(kube)
        transitions = len(a.seen) + len(b.seen)
        assert len(events) < transitions, (len(events), transitions)
        # One Event per distinct transition and pod: repeats went into count, not new Events.
        assert len(events) <= 2 * (3 * 2 * (elapsed + 2) + 4)
        counted = sum(e.get("count", 1) for e in events if e["reason"] != "SidecarReporting")
        assert counted == transitions, (counted, transitions)


def settled(sidecar: Sidecar) -> bool:
    """No key of the sidecar's chain is blocked (no restore is left to report) and every report it
    made is delivered (``delivered``: the queue empty with nothing in flight)."""
    blocked = any(
        p.health[c.name].blocks for p in sidecar.chain.pools.values() for c in p.credentials
    )
    return not blocked and sidecar.reporter is not None and sidecar.reporter.delivered.is_set()


async def watching_reports(kube: Kube) -> None:
    """Wait until the operator watches report Events. kmock ignores resourceVersion, so an Event
    created between the operator's list and its watch would be missed (an API server replays it)."""

    def watching() -> bool:
        return any(
            r.resource is not None and r.resource.plural == "events" and str(r.action.value) == "WATCH"
            for r in kube.requests()
        )

    await eventually(watching, timeout=10)


async def _where(getter: Awaitable[dict[str, Any] | None], ok: Callable[[dict[str, Any]], Any]) -> Any:
    obj = await getter
    return obj if obj is not None and obj.get("status") is not None and ok(obj) else None


async def _nonempty(getter: Awaitable[list[Any]]) -> list[Any] | None:
    items = await getter
    return items or None
