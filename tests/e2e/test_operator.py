"""The real keyroute operator (kopf) against kmock, for what a real API server cannot do on cue.

Lifecycles, conditions, the config Secret, rotation and garbage collection run on the real API
server (``tests/realapi/test_operator.py``). Kept here: specs a real server refuses (kmock stores
anything, so the operator's own validation is reached), and the reconcile functions called in-process
to count their writes. The builders below are shared with ``test_reporting.py``."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from keyroute.core import crds
from tests.e2e.conftest import eventually

API = "keyroute.dev/v1alpha1"
KEY1 = "sk-test-E2E-SECRET-KEY-000000001"
KEY2 = "sk-test-E2E-SECRET-KEY-000000002"
ROTATED = "sk-test-E2E-SECRET-KEY-ROTATED-01"
HANDLERS = "keyroute.controller.standalone"


def secret(name: str, **values: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": values}


def pool(name: str, provider: str, *creds: tuple[str, str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "CredentialPool",
        "metadata": {"name": name},
        "spec": {
            "provider": provider,
            "credentials": [{"name": n, "secretRef": {"name": s, "key": k}} for n, s, k in creds],
            **spec,
        },
    }


def chain(name: str, *entries: tuple[str, ...], **spec: Any) -> dict[str, Any]:
    """Entries are (provider, pool) or (entry name, provider, pool)."""
    return {
        "apiVersion": API,
        "kind": "ProviderChain",
        "metadata": {"name": name},
        "spec": {
            "providers": [
                {
                    "name": e[0],
                    "provider": e[-2],
                    "baseURL": f"https://{e[-2]}.example/v1",
                    "credentialPoolRef": {"name": e[-1]},
                }
                if len(e) == 3
                else {
                    "provider": e[0],
                    "baseURL": f"https://{e[0]}.example/v1",
                    "credentialPoolRef": {"name": e[1]},
                }
                for e in entries
            ],
            **spec,
        },
    }


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c  # type: ignore[no-any-return]
    return {}


def config_of(secret_obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(secret_obj["data"]["config.json"]))  # type: ignore[no-any-return]


async def get_pool(kube, name):
    return await kube.get(API, "credentialpools", "default", name)


async def get_chain(kube, name):
    return await kube.get(API, "providerchains", "default", name)


def assert_valid_status(obj: dict[str, Any]) -> None:
    assert crds.validate(obj["kind"], obj["status"], part="status") == [], obj["status"]


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (pool("bad", "openai", ("k", "s", "k"), strategy="Fastest"), "spec.strategy"),
        (chain("bad", ("openai", "p"), ("openai", "p")), "duplicate provider entry names"),
        (
            {
                **chain("bad", ("openai", "p")),
                "spec": {
                    "providers": [
                        {
                            "provider": "openai",
                            "baseURL": "https://x.example/v1",
                            "credentialPoolRef": {"name": "p", "namespace": "elsewhere"},
                        }
                    ]
                },
            },
            "credentialPoolRef.namespace",
        ),
    ],
    ids=["unknown-strategy", "duplicate-entries", "pool-in-another-namespace"],
)
async def test_invalid_specs_get_a_condition_naming_the_field(kube, operator_runner, obj, field):
    """kmock on purpose: the real API server refuses these manifests (tests/realapi/test_manifests.py),
    so only an emulator that stores anything reaches the operator's own validation, which guards
    objects stored under an older, looser CRD."""
    await kube.create(secret("s", k=KEY1))
    await kube.create(pool("fine", "openai", ("k", "s", "k")))
    await kube.create(obj)
    getter = get_pool if obj["kind"] == "CredentialPool" else get_chain
    async with operator_runner(HANDLERS, namespaces=["default"]):
        bad = await eventually(lambda: _has_status(kube, getter, "bad"), timeout=10)
        ready = cond(bad, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec" and field in ready["message"]
        fine = await eventually(lambda: _ready(kube, get_pool, "fine"), timeout=10)
        assert fine["status"]["available"] == 1  # nothing else affected


async def test_reconciling_an_unchanged_object_writes_nothing(kube):
    """The reconcile functions as plain functions, writes counted in-process; kmock is only a store
    here (moving it to the real API server waits for keyroute.kube's kubeconfig rework)."""
    from keyroute.controller.metrics import OperatorMetrics
    from keyroute.controller.reconcile import Reconciler
    from keyroute.kube import Kube

    await kube.create(secret("s", k=KEY1))
    await kube.create(pool("p", "openai", ("k", "s", "k")))
    await kube.create(chain("c", ("openai", "p")))
    client = Kube.from_connection(kube.connection_info())
    posted: list[Any] = []
    metrics = OperatorMetrics()
    r = Reconciler(client, metrics, lambda body, note: posted.append(note))
    try:
        await r.pool("default", "p")
        await r.chain("default", "c")
        first = metrics.writes.labels("status")._value.get() + metrics.writes.labels("config")._value.get()
        assert first == 3  # pool status, chain status, config Secret
        assert posted
        posted.clear()
        for _ in range(3):
            await r.pool("default", "p")
            await r.chain("default", "c")
        again = metrics.writes.labels("status")._value.get() + metrics.writes.labels("config")._value.get()
        assert again == first and posted == []
        from prometheus_client import generate_latest

        text = generate_latest(metrics.registry).decode()
        assert 'keyroute_operator_reconciles_total{kind="CredentialPool",result="ok"} 4.0' in text
        assert 'keyroute_operator_reconciles_total{kind="ProviderChain",result="ok"} 4.0' in text
        assert 'keyroute_operator_pools{ready="True"} 1.0' in text
        assert 'keyroute_operator_credentials{state="Available"} 1.0' in text
        assert KEY1 not in text
    finally:
        await client.close()


async def _ready(kube, getter, name):
    obj = await getter(kube, name)
    return obj if cond(obj, "Ready").get("status") == "True" else None


async def _has_status(kube, getter, name):
    obj = await getter(kube, name)
    return obj if cond(obj, "Ready") else None


