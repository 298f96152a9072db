"""Objects stored before the CRDs refused their names (keyroute.core.names), on the real API server.

The current CRDs refuse such names when they are applied (``test_manifests.py``). An object with one
exists only if it was stored under an older CRD, so this module stores it that way: it applies the
CRDs without their root rules (what keyroute shipped before them), creates the objects, then puts the
current CRDs back, as an upgrade does. The reconciler is called as plain functions with keyroute's
own client (as admin), so that its writes, Events and log lines can be counted.

What the real API server does here, and a fake would not: once the CRD carries the rule, it refuses
every write to such an object, its status included (the root rule is evaluated on status writes, and
1.28 does not ratchet it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyroute.controller.metrics import OperatorMetrics
from keyroute.controller.reconcile import Reconciler
from keyroute.core import crds
from keyroute.core.names import CHAIN_NAME_MESSAGE
from keyroute.kube import Kube, from_kubeconfig
from tests.polling import eventually
from tests.realapi.client import Api, ApiStatusError, api_path
from tests.realapi.controlplane import ControlPlane
from tests.realapi.objects import API, chain, cond, pool, secret

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-REALAPI-NAMES-KEY-000001"
OPENAI = ("openai", "openai", "https://api.openai.com/v1", "openai")
DOTTED = "agents.v1"
LONG = "agents-" + "x" * 57  # 64 characters: one more than a label value
HUGE = ".".join(["b" * 49] * 5)  # 249 characters, dots: a valid DNS subdomain
BAD_CHAINS = (DOTTED, LONG, HUGE)
LONG_POOL = "p" * 64


def _writes(metrics: OperatorMetrics, what: str) -> float:
    return float(metrics.writes.labels(what)._value.get())


async def _refused(api: Api, obj: dict[str, Any], namespace: str) -> bool:
    """Whether the API server refuses to create ``obj`` now (a dry run: nothing is stored)."""
    path = api_path(API, "providerchains" if obj["kind"] == "ProviderChain" else "credentialpools", namespace)
    try:
        await api.request("POST", path, obj, params={"dryRun": "All"})
    except ApiStatusError as e:
        if e.status == 422:
            return True
        raise
    return False


@contextlib.asynccontextmanager
async def crds_before_the_name_rules(control_plane: ControlPlane, api: Api, namespace: str) -> AsyncIterator[None]:
    """The CRDs without their root rules while inside; the current ones back (and in force) after."""
    probe = chain("name-rule.probe", OPENAI)  # never stored: dry runs only
    old = []
    for kind in crds.KINDS:
        crd = crds.crd_for(kind)
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].pop("x-kubernetes-validations", None)
        old.append(crd)
    try:
        control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(old)
        )
        await eventually(lambda: _not(_refused(api, probe, namespace)), timeout=20, interval=0.1)
        yield
    finally:
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        await eventually(lambda: _refused(api, probe, namespace), timeout=20, interval=0.1)


async def _not(value: Any) -> bool:
    return not await value


def _named(events: list[dict[str, Any]], name: str, reason: str = "InvalidName") -> list[dict[str, Any]]:
    return [e for e in events if e["involvedObject"]["name"] == name and e["reason"] == reason]


def _told(caplog: pytest.LogCaptureFixture, name: str) -> int:
    """Warning log lines saying that ``name`` cannot work."""
    return sum(
        1
        for rec in caplog.records
        if rec.levelno == logging.WARNING and f"the name {name[:40]!r}" in rec.getMessage()
    )


async def test_objects_stored_before_the_name_rules_get_invalid_name_once_and_are_never_rendered(
    control_plane: ControlPlane, api: Api, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyroute.operator")
    late = "agents.v2"  # stored before the upgrade, first reconciled after it (no status yet)
    kube = Kube.from_connection(from_kubeconfig(control_plane.admin_kubeconfig))
    try:
        async with crds_before_the_name_rules(control_plane, api, namespace):
            control_plane.apply(
                [
                    secret("keys", k1=KEY),
                    pool("openai", "openai", ("k1", "keys", "k1")),
                    pool(LONG_POOL, "openai", ("k1", "keys", "k1")),
                    chain("agents", OPENAI),
                    *(chain(name, OPENAI) for name in (*BAD_CHAINS, late)),
                ],
                namespace=namespace,
            )
            # The operator upgraded, the CRDs not yet (helm never upgrades a chart's crds/).
            metrics = OperatorMetrics()
            r = Reconciler(kube, metrics)
            for _ in range(2):  # the second time, as a resync: nothing new to write or say
                for name in ("agents", *BAD_CHAINS):
                    await r.chain(namespace, name)
                await r.pool(namespace, LONG_POOL)
                await r.drain()
            # Only the good chain is rendered; no config Secret is attempted for the others.
            assert _writes(metrics, "config") == 1
            assert _writes(metrics, "status") == 1 + len(BAD_CHAINS) + 1
            assert await api.get("v1", "secrets", namespace, "agents-keyroute") is not None
            events = await api.events(namespace)
            for name, plural in [*((n, "providerchains") for n in BAD_CHAINS), (LONG_POOL, "credentialpools")]:
                assert await api.get("v1", "secrets", namespace, f"{name}-keyroute") is None
                obj = await api.get(API, plural, namespace, name)
                ready = cond(obj, "Ready")
                assert (ready["status"], ready["reason"]) == ("False", "InvalidName"), (name, ready)
                assert ready["message"].endswith("delete it and create it again under a valid name")
                # One Warning Event each.
                assert [e["type"] for e in _named(events, name)] == ["Warning"], name
                assert _told(caplog, name) == 1, name
            assert CHAIN_NAME_MESSAGE in cond(await api.get(API, "providerchains", namespace, DOTTED), "Ready")["message"]

        # The CRDs upgraded: the API server now refuses any write to these objects, status included.
        with pytest.raises(ApiStatusError) as caught:
            await api.patch(
                API, "providerchains", namespace, late, {"status": {"sidecars": 0}}, subresource="status"
            )
        assert caught.value.status == 422 and CHAIN_NAME_MESSAGE in str(caught.value)
        before = {e["metadata"]["uid"] for e in await api.events(namespace)}
        caplog.clear()
        metrics = OperatorMetrics()
        r = Reconciler(kube, metrics)  # a restarted operator (or a new leader)
        for _ in range(2):
            for name in (*BAD_CHAINS, late):
                await r.chain(namespace, name)  # never raises: nothing to retry
            await r.drain()
        events = await api.events(namespace)
        # The ones whose status already says so: nothing new. The late one: its status cannot be
        # written, so one Warning Event and one log line say it, once.
        assert [e["reason"] for e in events if e["metadata"]["uid"] not in before] == ["InvalidName"]
        assert [e["type"] for e in _named(events, late)] == ["Warning"]
        assert CHAIN_NAME_MESSAGE in _named(events, late)[0]["message"]
        assert [_told(caplog, n) for n in (*BAD_CHAINS, late)] == [0, 0, 0, 1]
        assert not (await api.get(API, "providerchains", namespace, late) or {}).get("status")
        assert _writes(metrics, "config") == 0 and _writes(metrics, "status") == 0
        assert [rec for rec in caplog.records if rec.levelno >= logging.ERROR] == []
        assert await api.get("v1", "secrets", namespace, f"{late}-keyroute") is None
    finally:
        await kube.close()
