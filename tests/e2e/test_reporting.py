"""Reporting end to end: the real operator (kopf) on kmock, two real sidecars (pods ``pod-a`` and
``pod-b``) reporting through the same API, and fake providers on 127.0.0.1 misbehaving on cue.

What is asserted is what an SRE sees (pool and chain status, Events) and what the providers
received (which key, how often): a key one pod found rate-limited is not sent by the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyroute.core import crds
from keyroute.core.reports import REPORT_LABEL, Origin, parse_rfc3339
from keyroute.core.resources import CredentialState
from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.kube import SIDECAR_AGENT
from keyroute.kube import Kube as ApiClient
from keyroute.sidecar.app import Address, Sidecar
from keyroute.sidecar.sources import RenderedConfigFile
from tests.e2e.conftest import Kube, eventually
from tests.e2e.test_operator import API, HANDLERS, cond, config_of, get_chain, get_pool, pool, secret

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
        rendered = await eventually(lambda: kube.get("v1", "secrets", "default", f"{chain}-keyroute"), timeout=10)
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


async def call(session: aiohttp.ClientSession, sidecar: Sidecar, model: str = "gpt-4o") -> aiohttp.ClientResponse:
    async with session.post(
        f"{sidecar.base_url}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    ) as resp:
        await resp.read()
        return resp


def row(pool_obj: dict[str, Any] | None, name: str) -> dict[str, Any]:
    for r in ((pool_obj or {}).get("status") or {}).get("credentials") or []:
        if r["name"] == name:
            return r  # type: ignore[no-any-return]
    return {}


def assert_valid(obj: dict[str, Any]) -> None:
    assert crds.validate(obj["kind"], obj["status"], part="status") == [], obj["status"]


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


async def test_a_429_shows_in_status_and_the_other_pod_never_sends_that_key(
    kube, operator_runner, start_pod, fake_provider, caplog
):
    caplog.set_level(logging.DEBUG)
    openai = await fake_provider("openai", keys=[KEY1, KEY2])
    openai.set(Behaviour.rate_limited(retry_after=30), key=KEY1)
    objects = [
        secret("openai-keys", k1=KEY1, k2=KEY2),
        pool("openai", "openai", ("k1", "openai-keys", "k1"), ("k2", "openai-keys", "k2")),
        chain_of("agents", ("openai", "openai", openai)),
    ]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        b = await start_pod("pod-b")
        sent = time.time()
        resp = await call(session, a)
        answered = time.time()
        assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k2"
        assert openai.count(key=KEY1) == 1

        p = await eventually(
            lambda: _where(get_pool(kube, "openai"), lambda p: row(p, "k1").get("state") == "CoolingDown"),
            timeout=5,
        )
        k1 = row(p, "k1")
        assert (k1["reason"], k1["reportedBy"], k1["lastErrorCode"]) == ("RateLimited", "pod-a", 429)
        # Retry-After 30 s from when the 429 came, which is between sent and answered (a loaded
        # machine can put over a second between them); until is rounded up to a whole second.
        assert sent + 30 <= parse_rfc3339(k1["until"]) <= answered + 31
        assert k1["fingerprint"].startswith("sha256:")
        assert (p["status"]["available"], p["status"]["total"]) == (1, 2)
        assert cond(p, "Degraded")["reason"] == "RateLimited"
        assert_valid(p)

        # Pod B learns it from the pool's status (never from a Secret) and skips k1 altogether.
        await eventually(
            lambda: b.chain.pools["openai"].state("k1", time.time())[0] is CredentialState.COOLING_DOWN
        )
        for _ in range(5):
            resp = await call(session, b)
            assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k2"
        assert openai.count(key=KEY1) == 1  # still only pod A's one request
        assert b.seen == []  # it adopted the block; nothing happened to it that it could report

        # kubectl describe cpool openai: the Event, with pod, credential, class, until.
        events = await reports(kube, "openai")
        assert len(events) == 1
        ev = events[0]
        assert ev["reason"] == "CredentialCoolingDown" and ev["type"] == "Warning"
        assert ev["involvedObject"]["uid"] == p["metadata"]["uid"]
        assert ev["related"] == {"apiVersion": "v1", "kind": "Pod", "name": "pod-a", "namespace": "default"}
        for text in ("k1", "RateLimited", "pod-a", k1["until"]):
            assert text in ev["message"]
        # Pod B adopted the block, it did not report it again.
        assert all(e["metadata"]["annotations"]["keyroute.dev/pod"] == "pod-a" for e in events)
        # Both pods announced themselves on the chain.
        c = await eventually(lambda: _where(get_chain(kube, "agents"), lambda c: c["status"].get("sidecars") == 2))
        assert c["status"]["sidecarsOnFallback"] == 0 and cond(c, "FallbackActive")["reason"] == "PrimaryServing"
        assert_valid(c)
    for key in KEYS:
        assert key not in caplog.text
        assert key not in json.dumps(await kube.list("v1", "events", "default"))
        assert key not in json.dumps(await kube.list(API, "credentialpools", "default"))
        assert key not in json.dumps(await kube.list(API, "providerchains", "default"))


async def test_a_fallback_shows_on_the_chain_and_the_primary_restored_clears_it(
    kube, operator_runner, start_pod, fake_provider
):
    primary = await fake_provider("primary", keys=[KEY1])
    backup = await fake_provider("backup", keys=[BACKUP_KEY])
    primary.set(Behaviour.server_error(500))
    objects = [
        secret("primary-keys", k1=KEY1),
        secret("backup-keys", k=BACKUP_KEY),
        pool("primary", "primary", ("k1", "primary-keys", "k1")),
        pool("backup", "backup", ("b1", "backup-keys", "k")),
        chain_of("agents", ("primary", "primary", primary), ("backup", "backup", backup), restoreAfter="1s"),
    ]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        await start_pod("pod-b")
        resp = await call(session, a)
        assert resp.status == 200 and resp.headers["X-Keyroute-Provider"] == "backup"

        c = await eventually(
            lambda: _where(
                get_chain(kube, "agents"),
                lambda c: cond(c, "FallbackActive").get("status") == "True" and c["status"]["sidecars"] == 2,
            ),
            timeout=5,
        )
        st = c["status"]
        assert st["activeProvider"] == "backup"
        assert (st["sidecars"], st["sidecarsOnFallback"]) == (2, 1)
        assert {k: st["lastFallback"][k] for k in ("from", "to", "reason", "pod")} == {
            "from": "primary",
            "to": "backup",
            "reason": "ServerError",
            "pod": "pod-a",
        }
        assert cond(c, "FallbackActive")["reason"] == "ServerError"
        assert_valid(c)
        events = await reports(kube, "agents")
        fallback = [e for e in events if e["reason"] == "FallbackActivated"]
        assert len(fallback) == 1 and "primary → backup" in fallback[0]["message"]

        # The primary recovers; after restoreAfter the next request probes it and stays there.
        primary.reset_rules()
        await asyncio.sleep(1.1)
        resp = await call(session, a)
        assert resp.headers["X-Keyroute-Provider"] == "primary"
        c = await eventually(
            lambda: _where(get_chain(kube, "agents"), lambda c: cond(c, "FallbackActive").get("status") == "False"),
            timeout=5,
        )
        assert c["status"]["activeProvider"] == "primary"
        assert c["status"]["sidecarsOnFallback"] == 0
        assert cond(c, "FallbackActive")["reason"] == "PrimaryServing"
        assert c["status"]["lastFallback"]["to"] == "backup"  # history stays
        assert any(e["reason"] == "PrimaryRestored" for e in await reports(kube, "agents"))


async def test_states_flip_back_when_until_passes_without_any_further_report(
    kube, operator_runner, start_pod, fake_provider
):
    openai = await fake_provider("openai", keys=[KEY1, KEY2])
    openai.set(Behaviour.rate_limited(retry_after=2), key=KEY1)
    objects = [
        secret("openai-keys", k1=KEY1, k2=KEY2),
        pool("openai", "openai", ("k1", "openai-keys", "k1"), ("k2", "openai-keys", "k2")),
        chain_of("agents", ("openai", "openai", openai)),
    ]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        await call(session, a)
        p = await eventually(
            lambda: _where(get_pool(kube, "openai"), lambda p: row(p, "k1").get("state") == "CoolingDown")
        )
        until = parse_rfc3339(row(p, "k1")["until"])
        # The pod goes away: no "restored" report will come; the operator's own timer flips it.
        await a.stop(flush=0)
        p = await eventually(
            lambda: _where(get_pool(kube, "openai"), lambda p: row(p, "k1").get("state") == "Available"),
            timeout=6,
        )
        assert time.time() >= until
        assert "until" not in row(p, "k1") and p["status"]["available"] == 2
        assert cond(p, "Degraded")["status"] == "False"
        assert_valid(p)


async def test_reports_buffered_while_the_api_is_unreachable_are_delivered(
    kube, operator_runner, start_pod, fake_provider
):
    keys = [f"sk-test-REPORT-OUTAGE-KEY-{i:08d}" for i in range(4)]
    openai = await fake_provider("openai", keys=keys)
    for k in keys[:3]:
        openai.set(Behaviour.rate_limited(retry_after=60), key=k)
    objects = [
        *pool_of_keys(keys),
        chain_of("agents", ("openai", "openai", openai)),
    ]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        await eventually(lambda: _where(get_chain(kube, "agents"), lambda c: c["status"].get("sidecars") == 1))
        with kube.outage(unreachable=True):
            t0 = time.monotonic()
            # Requests are served meanwhile: the data path never waits for the reporter.
            for _ in range(3):
                resp = await call(session, a)
                assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k3"
            assert time.monotonic() - t0 < 2
            await eventually(lambda: a.reporter.pending == 3 and a.metrics.reports.labels("retried")._value.get() > 0)
            assert await reports(kube, "openai") == []
        # Back: every buffered report arrives, in order, and the status shows all three.
        p = await eventually(
            lambda: _where(get_pool(kube, "openai"), lambda p: p["status"].get("available") == 1), timeout=10
        )
        assert [row(p, f"k{i}")["state"] for i in range(4)] == ["CoolingDown"] * 3 + ["Available"]
        events = await reports(kube, "openai")
        assert sorted(e["metadata"]["annotations"]["keyroute.dev/credential"] for e in events) == ["k0", "k1", "k2"]
        assert a.metrics.reports.labels("dropped")._value.get() == 0


async def test_a_full_buffer_drops_the_oldest_and_says_how_many(kube, operator_runner, start_pod, fake_provider):
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
        await eventually(lambda: a.reporter.pending == 0 and a.metrics.reports.labels("sent")._value.get() >= 1)
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
        await asyncio.sleep(1.0)
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
