"""The real keyroute operator (kopf) end to end against kmock: pool and chain lifecycles, a Secret
rotation re-rendering the config, mismatches and missing things becoming conditions, deletion, and
secrets hygiene. Every status the operator writes is validated against the generated CRD schema."""

from __future__ import annotations

import base64
import json
import time
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


async def test_pool_and_chain_lifecycle_with_secret_rotation(kube, operator_runner):
    await kube.create(secret("openai-keys", k1=KEY1, k2=KEY2))
    await kube.create(pool("openai", "openai", ("k1", "openai-keys", "k1"), ("k2", "openai-keys", "k2")))
    await kube.create(chain("agents", ("openai", "openai")))
    async with operator_runner(HANDLERS, namespaces=["default"]) as op:
        p = await eventually(lambda: _ready(kube, get_pool, "openai"), timeout=10)
        assert (p["status"]["available"], p["status"]["total"]) == (2, 2)
        assert [c["state"] for c in p["status"]["credentials"]] == ["Available", "Available"]
        assert_valid_status(p)

        c = await eventually(lambda: _ready(kube, get_chain, "agents"), timeout=10)
        assert_valid_status(c)
        # No finalizers: a broken operator must never block the deletion of a chain or a pool.
        assert not p["metadata"].get("finalizers") and not c["metadata"].get("finalizers")
        rendered = await kube.get("v1", "secrets", "default", "agents-keyroute")
        assert rendered is not None
        owner = rendered["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "ProviderChain",
            "agents",
            c["metadata"]["uid"],
        )
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "keyroute"
        cfg = config_of(rendered)
        assert [x["key"] for x in cfg["pools"][0]["credentials"]] == [KEY1, KEY2]
        assert c["status"]["config"] == {
            "name": "agents-keyroute",
            "hash": rendered["metadata"]["annotations"]["keyroute.dev/config-hash"],
        }

        # Rotate k1: the chain's config is re-rendered within seconds.
        t = time.monotonic()
        await kube.patch(
            "v1",
            "secrets",
            "default",
            "openai-keys",
            {"data": {"k1": base64.b64encode(ROTATED.encode()).decode()}},
        )

        async def rotated():
            s = await kube.get("v1", "secrets", "default", "agents-keyroute")
            return s if config_of(s)["pools"][0]["credentials"][0]["key"] == ROTATED else None

        await eventually(rotated, timeout=5)
        assert time.monotonic() - t < 5
        c2 = await eventually(lambda: _chain_hash_changed(kube, c["status"]["config"]["hash"]), timeout=5)
        assert_valid_status(c2)
        events = await kube.events("default")
        reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
        assert ("agents", "ConfigRendered") in reasons and ("openai", "CredentialsAvailable") in reasons
    assert op.exit_code == 0
    everything = (
        op.output
        + json.dumps(await kube.events("default"))
        + json.dumps([await get_pool(kube, "openai"), await get_chain(kube, "agents")])
    )
    for key in (KEY1, KEY2, ROTATED):
        assert key not in everything


async def test_missing_and_mismatched_things_become_conditions(kube, operator_runner):
    await kube.create(secret("keys", good=KEY1, blank="   "))
    await kube.create(
        pool(
            "openai",
            "openai",
            ("ok", "keys", "good"),
            ("nokey", "keys", "absent"),
            ("empty", "keys", "blank"),
            ("nosecret", "nowhere", "x"),
        )
    )
    await kube.create(pool("claude", "anthropic", ("c1", "keys", "good")))
    await kube.create(
        chain("mixed", ("openai", "openai"), ("misbound", "openai", "claude"), ("openrouter", "later"))
    )
    async with operator_runner(HANDLERS, namespaces=["default"]):
        p = await eventually(lambda: _has_status(kube, get_pool, "openai"), timeout=10)
        rows = {r["name"]: (r["state"], r.get("reason")) for r in p["status"]["credentials"]}
        assert rows == {
            "ok": ("Available", None),
            "nokey": ("Missing", "SecretKeyMissing"),
            "empty": ("Missing", "SecretKeyMissing"),
            "nosecret": ("Missing", "SecretNotFound"),
        }
        assert cond(p, "Ready")["status"] == "True" and cond(p, "Degraded")["status"] == "True"
        assert_valid_status(p)

        c = await eventually(lambda: _has_status(kube, get_chain, "mixed"), timeout=10)
        ready = cond(c, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "PoolProviderMismatch"
        assert "not found" in ready["message"]  # the missing pool is named too
        cfg = config_of(await kube.get("v1", "secrets", "default", "mixed-keyroute"))
        assert [e["name"] for e in cfg["entries"]] == ["openai"]  # the others are never routed
        assert_valid_status(c)

        # The missing pool appears: its entry joins the config (the mismatch remains).
        await kube.create(secret("or-keys", k=KEY2))
        await kube.create(pool("later", "openrouter", ("o1", "or-keys", "k")))

        async def joined():
            s = await kube.get("v1", "secrets", "default", "mixed-keyroute")
            return [e["name"] for e in config_of(s)["entries"]] == ["openai", "openrouter"]

        await eventually(joined, timeout=5)

        # Deleting a pool takes its entry out again.
        await kube.delete(API, "credentialpools", "default", "later")

        async def left():
            s = await kube.get("v1", "secrets", "default", "mixed-keyroute")
            return [e["name"] for e in config_of(s)["entries"]] == ["openai"]

        await eventually(left, timeout=5)
        c = await get_chain(kube, "mixed")
        assert "later not found" in cond(c, "Ready")["message"]


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
    # kmock does not validate like an API server would: the operator must still say what is wrong.
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
    """The reconcile functions as plain functions against the API emulator."""
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


async def _chain_hash_changed(kube, old_hash):
    obj = await get_chain(kube, "agents")
    return obj if obj["status"]["config"]["hash"] != old_hash else None
