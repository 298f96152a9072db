"""Operator start-up on the real API server with objects already there (issue 11): each chain is
rendered once in the first sync, and a restart over unchanged objects writes nothing.

The counts come from the operator's own metrics (``keyroute_operator_reconciles_total``: every
ProviderChain reconcile renders the chain; ``keyroute_operator_writes_total``: every status and config
write), and the restart is also checked from the outside: no object's ``resourceVersion`` moved.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import urllib.request

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.config import fingerprint
from keyroute.core.reports import Origin, event_body
from tests.polling import eventually
from tests.realapi.bursts import assert_written_before_events, create_burst, written_then_events
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane, free_port
from tests.realapi.objects import API, chain, cond, pool, row, secret
from tests.realapi.processes import KeyrouteProcess, Processes

POOLS = [f"pool-{i}" for i in range(4)]
CHAINS = {
    "chain-a": ["pool-0", "pool-1"],
    "chain-b": ["pool-1", "pool-2"],
    "chain-c": ["pool-2", "pool-3", "pool-0"],
}


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def start(procs: Processes, cp: ControlPlane, namespace: str, name: str) -> tuple[KeyrouteProcess, int]:
    port = free_port()
    args = ["operator", "-n", namespace, "--metrics-port", str(port), "--metrics-address", "127.0.0.1"]
    args += ["--health-port", "0", "--leader-elect=false"]
    # No periodic resync within the test: every reconcile counted is the start-up's.
    env = {"KEYROUTE_RESYNC_SECONDS": "3600"}
    return procs.start(*args, kubeconfig=cp.admin_token_kubeconfig, name=name, env=env), port


def reconciles(port: int, kind: str) -> float:
    return metric(port, "keyroute_operator_reconciles_total", kind=kind)


async def versions(api: Api, namespace: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in POOLS:
        obj = await api.get(API, "credentialpools", namespace, name)
        out[f"pool/{name}"] = obj["metadata"]["resourceVersion"] if obj else ""
    for name in CHAINS:
        obj = await api.get(API, "providerchains", namespace, name)
        out[f"chain/{name}"] = obj["metadata"]["resourceVersion"] if obj else ""
        config = await api.get("v1", "secrets", namespace, f"{name}-keyroute")
        out[f"config/{name}"] = config["metadata"]["resourceVersion"] if config else ""
    return out


async def test_each_chain_is_rendered_once_at_start_up_and_a_restart_writes_nothing(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    # Everything exists before the operator starts: its first sync sees all of it in the listings.
    objects = []
    for i, name in enumerate(POOLS):
        objects.append(secret(f"keys-{i}", k1=f"sk-test-STARTUP-{i}-1", k2=f"sk-test-STARTUP-{i}-2"))
        objects.append(pool(name, "openai", ("k1", f"keys-{i}", "k1"), ("k2", f"keys-{i}", "k2")))
    for name, pools in CHAINS.items():
        entries = [(p, "openai", f"https://{p}.invalid/v1", p) for p in pools]
        objects.append(chain(name, *entries))
    for obj in objects:
        await api.create(obj, namespace)

    first, port = start(keyroute_process, control_plane, namespace, "first")

    async def synced() -> bool:
        v = await versions(api, namespace)
        if not all(v.values()):
            return False
        for name in CHAINS:
            obj = await api.get(API, "providerchains", namespace, name)
            status = (obj or {}).get("status") or {}
            if status.get("observedGeneration") != obj["metadata"]["generation"]:  # type: ignore[index]
                return False
        return True

    await eventually(synced, timeout=30)
    # Counted just after each reconcile's last write returned: a status read above can be ahead.
    await eventually(lambda: reconciles(port, "CredentialPool") >= len(POOLS), timeout=10)
    await eventually(lambda: reconciles(port, "ProviderChain") >= len(CHAINS), timeout=10)
    rv = await versions(api, namespace)
    # A quiet second: a chain rendered again (a pool's or a Secret's listing fanning out) would show.
    await asyncio.sleep(1.0)
    assert reconciles(port, "ProviderChain") == len(CHAINS), first.output[-3000:]
    assert reconciles(port, "CredentialPool") == len(POOLS)
    assert metric(port, "keyroute_operator_leader") == 1  # without an election, it always leads
    await first.terminate()
    assert await versions(api, namespace) == rv

    second, port2 = start(keyroute_process, control_plane, namespace, "second")

    async def reconciled_all() -> bool:
        try:
            return reconciles(port2, "ProviderChain") >= len(CHAINS) and reconciles(
                port2, "CredentialPool"
            ) >= len(POOLS)
        except OSError:
            return False

    await eventually(reconciled_all, timeout=30)
    assert reconciles(port2, "ProviderChain") == len(CHAINS)
    assert metric(port2, "keyroute_operator_writes_total") == 0
    assert await versions(api, namespace) == rv  # nothing written, seen from the API server
    await second.terminate()


async def test_a_first_sync_writes_every_status_before_its_events(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    """Events are news about written state: in a burst (here a first start over 24 pools and 8
    chains) the operator holds them until the burst's statuses and configs are written, so that they
    do not take the API server's time from those writes (issue 11)."""
    pools, chains = await create_burst(api, namespace)
    op, port = start(keyroute_process, control_plane, namespace, "burst")
    got = await eventually(
        lambda: written_then_events(
            api,
            namespace,
            pools,
            chains,
            lambda: metric(port, "keyroute_operator_writes_total", what="event"),
        ),
        timeout=60,
    )
    state, events = got
    assert_written_before_events(state, events, op.output)
    await op.terminate()


async def test_after_a_restart_a_benched_key_whose_event_expired_stays_benched_until_its_until(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    """docs/reporting.md: after a restart, "benched keys whose Events expired are kept from the
    status the operator wrote before", and the operator's own timer still flips them back at
    ``until``. The report is posted as a sidecar posts it; its expiry (the API server's event TTL,
    1 h) is a deletion here."""
    key1, key2 = "sk-test-RESTART-BENCHED-0001", "sk-test-RESTART-BENCHED-0002"
    await api.create(secret("keys", k1=key1, k2=key2), namespace)
    p = await api.create(pool("openai", "openai", ("k1", "keys", "k1"), ("k2", "keys", "k2")), namespace)
    first, _ = start(keyroute_process, control_plane, namespace, "first")

    async def state(want: str) -> dict | None:
        obj = await api.get(API, "credentialpools", namespace, "openai")
        return obj if row(obj, "k1").get("state") == want else None

    # The operator is up once it wrote the pool's first status (the pool itself exists already: the
    # test created it). Then the 15 s until below is not eaten by the process's start-up.
    began = time.monotonic()
    await eventually(lambda: _with_status(api, "openai", namespace), timeout=30)
    print(f"first operator up and reconciled in {time.monotonic() - began:.2f}s")
    until = time.time() + 15
    action = Action(
        kind=ActionKind.COOLED_DOWN,
        at=time.time(),
        namespace=namespace,
        object_name="openai",
        error_class=ErrorClass.RATE_LIMITED,
        credential="k1",
        fingerprint=fingerprint(key1),
        until=until,
        status=429,
    )
    report = event_body(action, Origin("pod-a", namespace), name="openai.report-1", uid=p["metadata"]["uid"])
    await api.create(report, namespace)
    benched = await eventually(lambda: state("CoolingDown"), timeout=10)
    assert benched["status"]["nextAvailableAt"] == row(benched, "k1")["until"]
    await first.terminate()
    await api.delete("v1", "events", namespace, "openai.report-1")  # expired, as after an hour

    second, port = start(keyroute_process, control_plane, namespace, "second")
    await eventually(lambda: _reconciled(port, 1), timeout=20)
    # A reconcile after the start-up's, with the pool read from the API: still benched.
    await api.patch("v1", "secrets", namespace, "keys", {"stringData": {"note": "not a key"}})
    await eventually(lambda: _reconciled(port, 2), timeout=10)
    kept = await api.get(API, "credentialpools", namespace, "openai")
    assert row(kept, "k1") == row(benched, "k1") and kept["status"]["available"] == 1, kept["status"]
    assert time.time() < until - 2, "too slow to tell a kept row from an expired one"
    # ... and at until the operator's own timer brings it back.
    back = await eventually(lambda: state("Available"), timeout=until - time.time() + 10)
    assert time.time() >= until - 1 and cond(back, "Degraded")["status"] == "False"
    await second.terminate()


async def _with_status(api: Api, name: str, namespace: str) -> dict | None:
    obj = await api.get(API, "credentialpools", namespace, name)
    return obj if (obj or {}).get("status") else None


def _reconciled(port: int, pools: int) -> bool:
    try:
        return reconciles(port, "CredentialPool") >= pools
    except OSError:  # not serving its metrics yet
        return False


async def test_the_periodic_resync_puts_back_what_no_watch_event_reports(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    """README: "every object is also resynced every 5 minutes (--resync-interval), whatever happens on
    the watches". A config Secret edited by hand starts no reconcile of its chain; the resync puts
    it back (2 s here)."""
    await api.create(secret("keys", k1="sk-test-RESYNC-0001"), namespace)
    await api.create(pool("openai", "openai", ("k1", "keys", "k1")), namespace)
    await api.create(chain("agents", ("openai", "openai", "https://openai.invalid/v1", "openai")), namespace)
    args = ["operator", "-n", namespace, "--metrics-port", "0", "--health-port", "0", "--leader-elect=false"]
    operator = keyroute_process.start(
        *args, "--resync-interval", "2s", kubeconfig=control_plane.admin_token_kubeconfig, name="resync"
    )
    rendered = await eventually(lambda: api.get("v1", "secrets", namespace, "agents-keyroute"), timeout=20)
    edited = base64.b64encode(b'{"edited": "by hand"}').decode()
    await api.patch("v1", "secrets", namespace, "agents-keyroute", {"data": {"config.json": edited}})

    async def put_back() -> bool:
        s = await api.get("v1", "secrets", namespace, "agents-keyroute")
        return bool(s and s["data"]["config.json"] == rendered["data"]["config.json"])

    await eventually(put_back, timeout=8, interval=0.1)
    await operator.terminate()
