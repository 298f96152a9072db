"""Reporting on the real API server: sidecar processes in front of fake providers, each reporting as
an agent's ServiceAccount bound to the chart's sidecar ClusterRole; one operator (the chart's
ServiceAccount) for the module folds their Events into status.

What is asserted is what an SRE sees (pool and chain status, Events) and what the providers received
(which key, how often): a key one pod found rate-limited is never sent by the other.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyroute.core.reports import REPORT_LABEL, parse_rfc3339
from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.polling import eventually
from tests.realapi.chart import ChartRbac, forbidden_lines, run_operator
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane
from tests.realapi.objects import API, cond, pool, row, secret
from tests.realapi.processes import KeyrouteProcess, Processes
from tests.realapi.sidecars import SidecarProcess, start_sidecar

KEY1 = "sk-test-REALAPI-REPORT-KEY-00001"
KEY2 = "sk-test-REALAPI-REPORT-KEY-00002"
BACKUP_KEY = "sk-test-REALAPI-REPORT-BACKUP-01"
KEYS = (KEY1, KEY2, BACKUP_KEY)


@pytest.fixture(scope="module")
def operator(chart_rbac: ChartRbac, module_processes: Processes) -> Iterator[KeyrouteProcess]:
    with run_operator(chart_rbac, module_processes) as process:
        yield process
    for key in KEYS:
        assert key not in process.output


@pytest.fixture
async def providers() -> AsyncIterator[list[FakeProvider]]:
    started: list[FakeProvider] = []
    yield started
    for fp in started:
        await fp.stop()


async def provider(started: list[FakeProvider], name: str, keys: list[str]) -> FakeProvider:
    fp = FakeProvider(name, keys=keys)
    await fp.start()
    started.append(fp)
    return fp


def chain_of(name: str, *entries: tuple[str, str, FakeProvider], **fallback: Any) -> dict[str, Any]:
    """(entry name, pool, fake provider) entries."""
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


def apply_two_key_chain(control_plane: ControlPlane, namespace: str, openai: FakeProvider) -> None:
    """The chain ``agents`` with one entry, ``openai``, whose pool holds KEY1 (k1) and KEY2 (k2)."""
    control_plane.apply(
        [
            secret("openai-keys", k1=KEY1, k2=KEY2),
            pool("openai", "openai", ("k1", "openai-keys", "k1"), ("k2", "openai-keys", "k2")),
            chain_of("agents", ("openai", "openai", openai)),
        ],
        namespace=namespace,
    )


async def call(session: aiohttp.ClientSession, sidecar: SidecarProcess) -> aiohttp.ClientResponse:
    async with session.post(
        f"{sidecar.base_url}/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer sk-agent-placeholder"},
    ) as resp:
        await resp.read()
        return resp


async def reports(api: Api, namespace: str, involving: str | None = None) -> list[dict[str, Any]]:
    events = await api.events(namespace, involving=involving)
    return [e for e in events if ((e.get("metadata") or {}).get("labels") or {}).get(REPORT_LABEL)]


async def where(getter: Any, ok: Any) -> Any:
    obj = await getter
    return obj if obj is not None and obj.get("status") and ok(obj) else None


async def test_a_429_reaches_pool_status_and_the_other_pod_never_sends_that_key(
    control_plane: ControlPlane,
    api: Api,
    namespace: str,
    chart_rbac: ChartRbac,
    operator: KeyrouteProcess,
    keyroute_process: Processes,
    providers: list[FakeProvider],
    tmp_path: Path,
) -> None:
    openai = await provider(providers, "openai", [KEY1, KEY2])
    openai.set(Behaviour.rate_limited(retry_after=30), key=KEY1)
    apply_two_key_chain(control_plane, namespace, openai)
    agent = chart_rbac.sidecar_kubeconfig(namespace)
    a = await start_sidecar(keyroute_process, api, namespace, "pod-a", kubeconfig=agent, folder=tmp_path)
    b = await start_sidecar(keyroute_process, api, namespace, "pod-b", kubeconfig=agent, folder=tmp_path)
    # Both announce themselves: the operator counts them on the chain.
    await eventually(
        lambda: where(
            api.get(API, "providerchains", namespace, "agents"), lambda c: c["status"].get("sidecars") == 2
        ),
        timeout=20,
    )

    async with aiohttp.ClientSession() as session:
        sent = time.time()
        began = time.monotonic()
        resp = await call(session, a)
        answered = time.time()
        assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k2"
        assert openai.count(key=KEY1) == 1

        p = await eventually(
            lambda: where(
                api.get(API, "credentialpools", namespace, "openai"),
                lambda p: row(p, "k1").get("state") == "CoolingDown",
            ),
            timeout=10,
            interval=0.02,
        )
        print(f"429 -> pool status in {time.monotonic() - began:.3f}s")
        k1 = row(p, "k1")
        assert (k1["reason"], k1["reportedBy"], k1["lastErrorCode"]) == ("RateLimited", "pod-a", 429)
        # Retry-After 30 s from when the 429 came, between sent and answered (a loaded machine can put
        # over a second between them); until is rounded up to a whole second.
        assert sent + 30 <= parse_rfc3339(k1["until"]) <= answered + 31
        assert (p["status"]["available"], p["status"]["total"]) == (1, 2)
        assert cond(p, "Degraded")["reason"] == "RateLimited"
        assert p["status"]["nextAvailableAt"] == k1["until"]  # the NEXT AVAILABLE column

        # Pod B learns it from the pool's status (its account may list pools, never read Secrets).
        await eventually(
            lambda: _positive(b.metric("keyroute_shared_cooldowns_applied_total", pool="openai")), timeout=10
        )
        for _ in range(5):
            resp = await call(session, b)
            assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k2"
        assert openai.count(key=KEY1) == 1  # still only pod A's one request

    # kubectl describe cpool openai: the Event, with pod, credential, class and until.
    events = await reports(api, namespace, "openai")
    assert [e["reason"] for e in events] == ["CredentialCoolingDown"]
    ev = events[0]
    assert ev["involvedObject"]["uid"] == p["metadata"]["uid"]
    assert ev["related"] == {"apiVersion": "v1", "kind": "Pod", "name": "pod-a", "namespace": namespace}
    for text in ("k1", "RateLimited", "pod-a", k1["until"]):
        assert text in ev["message"]
    # The README's step 2: the operator's own Event follows, the error class as its reason.
    await eventually(
        lambda: _has(
            api.events(namespace),
            lambda e: e["reason"] == "RateLimited"
            and e["type"] == "Warning"
            and e["source"].get("component") == "keyroute.dev/operator"
            and e["message"] == f"credential k1: CoolingDown until {k1['until']}",
        ),
        timeout=10,
    )
    described = control_plane.kubectl("-n", namespace, "describe", "cpool", "openai").stdout
    assert "CredentialCoolingDown" in described and "reported by pod pod-a" in described
    assert await a.metric("keyroute_reports_total", result="rejected") == 0
    everything = (
        json.dumps(await api.list("v1", "events", namespace))
        + json.dumps(p)
        + a.process.output
        + b.process.output
    )
    for key in KEYS:
        assert key not in everything
    assert operator.running and forbidden_lines(operator.output, namespace) == []


async def test_a_fallback_shows_on_the_chain_and_the_primary_restored_clears_it(
    control_plane: ControlPlane,
    api: Api,
    namespace: str,
    chart_rbac: ChartRbac,
    operator: KeyrouteProcess,
    keyroute_process: Processes,
    providers: list[FakeProvider],
    tmp_path: Path,
) -> None:
    primary = await provider(providers, "primary", [KEY1])
    backup = await provider(providers, "backup", [BACKUP_KEY])
    primary.set(Behaviour.server_error(500))
    control_plane.apply(
        [
            secret("primary-keys", k1=KEY1),
            secret("backup-keys", k=BACKUP_KEY),
            pool("primary", "primary", ("k1", "primary-keys", "k1")),
            pool("backup", "backup", ("b1", "backup-keys", "k")),
            chain_of(
                "agents", ("primary", "primary", primary), ("backup", "backup", backup), restoreAfter="1s"
            ),
        ],
        namespace=namespace,
    )
    agent = chart_rbac.sidecar_kubeconfig(namespace)
    a = await start_sidecar(keyroute_process, api, namespace, "pod-a", kubeconfig=agent, folder=tmp_path)
    async with aiohttp.ClientSession() as session:
        resp = await call(session, a)
        assert resp.status == 200 and resp.headers["X-Keyroute-Provider"] == "backup"
        c = await eventually(
            lambda: where(
                api.get(API, "providerchains", namespace, "agents"),
                lambda c: cond(c, "FallbackActive").get("status") == "True",
            ),
            timeout=10,
        )
        assert c["status"]["activeProvider"] == "backup"
        assert {k: c["status"]["lastFallback"][k] for k in ("from", "to", "reason", "pod")} == {
            "from": "primary", "to": "backup", "reason": "ServerError", "pod": "pod-a",
        }  # fmt: skip
        table = control_plane.kubectl("-n", namespace, "get", "pchain", "agents").stdout
        assert "backup" in table

        # The primary recovers; after restoreAfter the next request probes it and stays there.
        primary.reset_rules()
        await asyncio.sleep(1.1)
        resp = await call(session, a)
        assert resp.headers["X-Keyroute-Provider"] == "primary"
        c = await eventually(
            lambda: where(
                api.get(API, "providerchains", namespace, "agents"),
                lambda c: cond(c, "FallbackActive").get("status") == "False",
            ),
            timeout=10,
        )
        assert (
            c["status"]["activeProvider"] == "primary"
            and cond(c, "FallbackActive")["reason"] == "PrimaryServing"
        )
    reasons = [e["reason"] for e in await reports(api, namespace, "agents")]
    assert "FallbackActivated" in reasons and "PrimaryRestored" in reasons


async def test_a_cooldown_ends_by_the_operators_own_timer_when_the_pod_is_gone(
    control_plane: ControlPlane,
    api: Api,
    namespace: str,
    chart_rbac: ChartRbac,
    operator: KeyrouteProcess,
    keyroute_process: Processes,
    providers: list[FakeProvider],
    tmp_path: Path,
) -> None:
    openai = await provider(providers, "openai", [KEY1, KEY2])
    openai.set(Behaviour.rate_limited(retry_after=2), key=KEY1)
    apply_two_key_chain(control_plane, namespace, openai)
    agent = chart_rbac.sidecar_kubeconfig(namespace)
    a = await start_sidecar(keyroute_process, api, namespace, "pod-a", kubeconfig=agent, folder=tmp_path)
    async with aiohttp.ClientSession() as session:
        await call(session, a)
    p = await eventually(
        lambda: where(
            api.get(API, "credentialpools", namespace, "openai"),
            lambda p: row(p, "k1").get("state") == "CoolingDown",
        ),
        timeout=10,
    )
    until = parse_rfc3339(row(p, "k1")["until"])
    # The pod goes away: no "restored" report will come; the operator's own timer flips the row back.
    await a.process.terminate()
    p = await eventually(
        lambda: where(
            api.get(API, "credentialpools", namespace, "openai"),
            lambda p: row(p, "k1").get("state") == "Available",
        ),
        timeout=10,
    )
    assert time.time() >= until
    assert "until" not in row(p, "k1") and p["status"]["available"] == 2
    assert cond(p, "Degraded")["status"] == "False"
    assert "nextAvailableAt" not in p["status"]  # removed from the stored status, not left stale
    # ... and posts CredentialAvailable (docs/reporting.md), as the operator, not as a sidecar report.
    await eventually(
        lambda: _has(
            api.events(namespace),
            lambda e: e["reason"] == "CredentialAvailable"
            and e["involvedObject"]["name"] == "openai"
            and e["source"].get("component") == "keyroute.dev/operator"
            and "k1" in e["message"],
        ),
        timeout=10,
    )


async def test_an_unbound_agent_still_routes_and_its_reports_are_refused_not_retried(
    control_plane: ControlPlane,
    api: Api,
    namespace: str,
    chart_rbac: ChartRbac,
    operator: KeyrouteProcess,
    keyroute_process: Processes,
    providers: list[FakeProvider],
    tmp_path: Path,
) -> None:
    """The README's RBAC section: without the rolebinding the sidecar routes, and says why it cannot
    report (the API server's own 403, counted as rejected)."""
    openai = await provider(providers, "openai", [KEY1, KEY2])
    openai.set(Behaviour.rate_limited(retry_after=30), key=KEY1)
    apply_two_key_chain(control_plane, namespace, openai)
    unbound = chart_rbac.sidecar_kubeconfig(namespace, "lonely", bind=False)
    a = await start_sidecar(keyroute_process, api, namespace, "pod-a", kubeconfig=unbound, folder=tmp_path)
    async with aiohttp.ClientSession() as session:
        resp = await call(session, a)
        assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k2"
    await eventually(lambda: _positive(a.metric("keyroute_reports_total", result="rejected")), timeout=10)
    assert await a.metric("keyroute_reports_total", result="sent") == 0
    assert await reports(api, namespace) == []
    assert forbidden_lines(a.process.output)  # the refusal, logged


async def _positive(value: Any) -> bool:
    return bool(await value > 0)


async def _has(events, ok) -> bool:  # type: ignore[no-untyped-def]
    return any(ok(e) for e in await events)
