"""The operator on the real API server, run as the chart's own ServiceAccount (cluster-wide values).

One ``keyroute operator`` process serves the whole module (each test works in a namespace of its own):
conditions, the rendered config Secret, a rotated key re-rendered, and the config Secret removed by
the real garbage collector when its chain is deleted. Every status the operator writes went through
the API server's own schema validation (status subresource), and a grant the chart lacks would be a
``forbidden`` in its log: each test checks there is none.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.config import fingerprint
from keyroute.core.reports import Origin, event_body
from tests.polling import eventually
from tests.realapi.chart import ChartRbac, forbidden_lines, run_operator
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane
from tests.realapi.objects import API, chain, cond, config_of, pool, row, secret
from tests.realapi.processes import KeyrouteProcess, Processes

KEY1 = "sk-test-REALAPI-OPERATOR-KEY-0001"
KEY2 = "sk-test-REALAPI-OPERATOR-KEY-0002"
ROTATED = "sk-test-REALAPI-OPERATOR-ROTATED1"
KEYS = (KEY1, KEY2, ROTATED)


@pytest.fixture(scope="module")
def operator(chart_rbac: ChartRbac, module_processes: Processes) -> Iterator[KeyrouteProcess]:
    # A first retry of 1 s instead of 5: the backoff test below sees three failures in 3 s.
    with run_operator(chart_rbac, module_processes, "--retry-delay", "1s") as process:
        yield process
    for key in KEYS:
        assert key not in process.output


def no_forbidden(operator: KeyrouteProcess, namespace: str) -> None:
    assert operator.running, operator.output[-3000:]
    assert forbidden_lines(operator.output, namespace) == []


def one_chain() -> list[dict[str, Any]]:
    """A key Secret, its pool and a chain ``agents`` of one entry: what a test about one chain needs."""
    return [
        secret("openai-keys", k1=KEY1),
        pool("openai", "openai", ("k1", "openai-keys", "k1")),
        chain("agents", ("openai", "openai", "https://api.openai.com/v1", "openai")),
    ]


async def ready(api: Api, plural: str, namespace: str, name: str) -> dict | None:
    obj = await api.get(API, plural, namespace, name)
    return obj if cond(obj, "Ready").get("status") == "True" else None


async def with_status(api: Api, plural: str, namespace: str, name: str) -> dict | None:
    obj = await api.get(API, plural, namespace, name)
    return obj if cond(obj, "Ready") else None


async def test_a_pool_and_its_chain_become_ready_and_the_config_secret_is_rendered(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    began = time.monotonic()
    control_plane.apply(
        [
            secret("openai-keys", k1=KEY1, k2=KEY2),
            pool("openai", "openai", ("k1", "openai-keys", "k1"), ("k2", "openai-keys", "k2")),
            chain("agents", ("openai", "openai", "https://api.openai.com/v1", "openai")),
        ],
        namespace=namespace,
    )
    p = await eventually(lambda: ready(api, "credentialpools", namespace, "openai"), timeout=20)
    pool_ready = time.monotonic() - began
    c = await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=20)
    chain_ready = time.monotonic() - began
    print(f"Ready after apply: pool {pool_ready:.2f}s, chain {chain_ready:.2f}s")
    assert (p["status"]["available"], p["status"]["total"]) == (2, 2)
    assert cond(c, "Ready")["reason"] == "AllProvidersRoutable"
    assert not p["metadata"].get("finalizers") and not c["metadata"].get("finalizers")

    rendered = await api.get("v1", "secrets", namespace, "agents-keyroute")
    assert rendered is not None
    owner = rendered["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ProviderChain", "agents", c["metadata"]["uid"])
    assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "keyroute"
    cfg = config_of(rendered)
    assert [x["key"] for x in cfg["pools"][0]["credentials"]] == [KEY1, KEY2]
    assert c["status"]["config"] == {
        "name": "agents-keyroute",
        "hash": rendered["metadata"]["annotations"]["keyroute.dev/config-hash"],
    }
    # What a user sees with kubectl: the printer columns of the generated CRDs.
    table = control_plane.kubectl("-n", namespace, "get", "cpool,pchain").stdout
    assert "openai" in table and "agents" in table and "True" in table
    events = await posted(api, namespace, ("agents", "ConfigRendered"), ("openai", "CredentialsAvailable"))
    everything = json.dumps([p, c, events])
    assert KEY1 not in everything and KEY2 not in everything
    no_forbidden(operator, namespace)


async def test_missing_and_mismatched_things_become_conditions(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    control_plane.apply(
        [
            secret("keys", good=KEY1, blank="   "),
            pool("openai", "openai", ("ok", "keys", "good"), ("nokey", "keys", "absent"),
                 ("empty", "keys", "blank"), ("nosecret", "nowhere", "x")),
            pool("claude", "anthropic", ("c1", "keys", "good")),
            chain(
                "mixed",
                ("openai", "openai", "https://api.openai.com/v1", "openai"),
                ("misbound", "openai", "https://gateway.example/v1", "claude"),
                ("openrouter", "openrouter", "https://openrouter.ai/api/v1", "later"),
            ),
        ],
        namespace=namespace,
    )  # fmt: skip
    p = await eventually(lambda: with_status(api, "credentialpools", namespace, "openai"), timeout=20)
    rows = {r["name"]: (r["state"], r.get("reason")) for r in p["status"]["credentials"]}
    assert rows == {
        "ok": ("Available", None),
        "nokey": ("Missing", "SecretKeyMissing"),
        "empty": ("Missing", "SecretKeyMissing"),
        "nosecret": ("Missing", "SecretNotFound"),
    }
    assert cond(p, "Ready")["status"] == "True" and cond(p, "Degraded")["status"] == "True"

    c = await eventually(lambda: with_status(api, "providerchains", namespace, "mixed"), timeout=20)
    chain_ready = cond(c, "Ready")
    assert chain_ready["status"] == "False" and chain_ready["reason"] == "PoolProviderMismatch"
    assert "later not found" in chain_ready["message"]  # the missing pool is named too
    cfg = config_of(await api.get("v1", "secrets", namespace, "mixed-keyroute"))
    assert [e["name"] for e in cfg["entries"]] == ["openai"]  # the others are never routed

    # The missing pool appears: its entry joins the config (the mismatch remains).
    control_plane.apply(
        [secret("or-keys", k=KEY2), pool("later", "openrouter", ("o1", "or-keys", "k"))], namespace=namespace
    )

    async def entries() -> list[str]:
        return [
            e["name"]
            for e in config_of(await api.get("v1", "secrets", namespace, "mixed-keyroute"))["entries"]
        ]

    await eventually(lambda: _equals(entries(), ["openai", "openrouter"]), timeout=10)
    no_forbidden(operator, namespace)


async def test_deleting_a_pool_takes_its_entry_out_of_the_config(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    control_plane.apply(
        [
            secret("keys", a=KEY1, b=KEY2),
            pool("openai", "openai", ("k1", "keys", "a")),
            pool("openrouter", "openrouter", ("o1", "keys", "b")),
            chain(
                "agents",
                ("openai", "openai", "https://api.openai.com/v1", "openai"),
                ("openrouter", "openrouter", "https://openrouter.ai/api/v1", "openrouter"),
            ),
        ],
        namespace=namespace,
    )
    await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=20)
    await api.delete(API, "credentialpools", namespace, "openrouter")

    async def left() -> bool:
        s = await api.get("v1", "secrets", namespace, "agents-keyroute")
        return [e["name"] for e in config_of(s)["entries"]] == ["openai"]

    await eventually(left, timeout=10)
    # The status is written after the config Secret: wait for it too.
    c = await eventually(
        lambda: _where(
            api.get(API, "providerchains", namespace, "agents"),
            lambda c: cond(c, "Ready").get("reason") == "PoolNotFound",
        ),
        timeout=10,
    )
    assert "openrouter not found" in cond(c, "Ready")["message"]
    no_forbidden(operator, namespace)


async def test_a_rotated_key_is_re_rendered_within_a_second(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    control_plane.apply(one_chain(), namespace=namespace)
    c = await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=20)
    old_hash = c["status"]["config"]["hash"]

    began = time.monotonic()
    await api.patch(
        "v1",
        "secrets",
        namespace,
        "openai-keys",
        {"data": {"k1": base64.b64encode(ROTATED.encode()).decode()}},
    )

    async def rotated() -> bool:
        s = await api.get("v1", "secrets", namespace, "agents-keyroute")
        return bool(config_of(s)["pools"][0]["credentials"][0]["key"] == ROTATED)

    await eventually(rotated, timeout=10, interval=0.02)
    took = time.monotonic() - began
    print(f"rotated key re-rendered in {took:.2f}s")
    assert took < 5  # the Secret watch, not the 5-minute resync
    c = await eventually(
        lambda: _where(
            api.get(API, "providerchains", namespace, "agents"),
            lambda c: c["status"]["config"]["hash"] != old_hash,
        ),
        timeout=10,
    )
    assert cond(c, "Ready")["status"] == "True"
    no_forbidden(operator, namespace)


async def test_deleting_the_chain_garbage_collects_its_config_secret(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    control_plane.apply(one_chain(), namespace=namespace)
    await eventually(lambda: api.get("v1", "secrets", namespace, "agents-keyroute"), timeout=20)
    # As a user does it; no finalizer holds the chain, the controller manager's garbage collector
    # removes what it owns.
    began = time.monotonic()
    control_plane.kubectl("-n", namespace, "delete", "pchain", "agents", "--wait=true", timeout=20)

    async def gone() -> bool:
        return await api.get("v1", "secrets", namespace, "agents-keyroute") is None

    await eventually(gone, timeout=20)
    print(f"config Secret collected {time.monotonic() - began:.2f}s after the chain was deleted")
    # The pool and the key Secret are the user's: untouched.
    assert await api.get(API, "credentialpools", namespace, "openai") is not None
    assert await api.get("v1", "secrets", namespace, "openai-keys") is not None
    no_forbidden(operator, namespace)


async def test_a_deleted_config_secret_is_rendered_again_within_seconds(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    # The operator knows its config Secrets from its Secret watch (it compares their hashes instead
    # of reading them): a deletion there renders the chain again, not the next periodic resync.
    control_plane.apply(one_chain(), namespace=namespace)
    first = await eventually(lambda: api.get("v1", "secrets", namespace, "agents-keyroute"), timeout=20)
    began = time.monotonic()
    await api.delete("v1", "secrets", namespace, "agents-keyroute")

    async def again() -> dict | None:
        s = await api.get("v1", "secrets", namespace, "agents-keyroute")
        return s if s is not None and s["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = await eventually(again, timeout=10, interval=0.05)
    took = time.monotonic() - began
    print(f"deleted config Secret rendered again in {took:.2f}s")
    assert took < 5  # the Secret watch, not the 5-minute resync
    assert config_of(second) == config_of(first)
    no_forbidden(operator, namespace)


async def test_a_config_secret_edited_by_hand_is_put_back_at_the_chains_next_reconcile(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    """README: a config Secret "edited by hand is put back at the next reconcile of its chain". A
    ``kubectl edit`` of its data leaves the hash annotation as it was: the operator trusted the
    annotation and never put the data back, and the sidecars kept reading the edit."""
    control_plane.apply(one_chain(), namespace=namespace)
    await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=20)
    first = await api.get("v1", "secrets", namespace, "agents-keyroute")
    edited = base64.b64encode(json.dumps({"edited": "by hand"}).encode()).decode()
    await api.patch("v1", "secrets", namespace, "agents-keyroute", {"data": {"config.json": edited}})
    # The chain's next reconcile: its key Secret changes, in a key nothing renders (the Secret watch
    # brings the edit above first: one stream, in order).
    unrelated = base64.b64encode(b"not a credential").decode()
    await api.patch("v1", "secrets", namespace, "openai-keys", {"data": {"note": unrelated}})

    async def put_back() -> bool:
        s = await api.get("v1", "secrets", namespace, "agents-keyroute")
        return bool(s is not None and config_of(s) == config_of(first))

    await eventually(put_back, timeout=10, interval=0.05)
    no_forbidden(operator, namespace)


async def test_a_deleted_key_secret_benches_its_keys_and_its_return_restores_them(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    """What kubectl shows when a pool's only Secret goes, and when it comes back (the Secret watch,
    not the resync): the key ``Missing`` (``SecretNotFound``), the pool not ready, the chain routing
    nothing (``NoRoutableProvider``) and its config without the entry; then all of it undone."""
    control_plane.apply(one_chain(), namespace=namespace)
    await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=20)
    await api.delete("v1", "secrets", namespace, "openai-keys")
    p = await eventually(
        lambda: _where(
            api.get(API, "credentialpools", namespace, "openai"),
            lambda p: cond(p, "Ready").get("status") == "False",
        ),
        timeout=10,
    )
    assert [(r["name"], r["state"], r.get("reason")) for r in p["status"]["credentials"]] == [
        ("k1", "Missing", "SecretNotFound")
    ]
    assert (p["status"]["available"], p["status"]["total"]) == (0, 1)
    assert cond(p, "Ready")["reason"] == "NoCredentialAvailable" and "k1" in cond(p, "Ready")["message"]
    assert (cond(p, "Degraded")["status"], cond(p, "Degraded")["reason"]) == ("True", "SecretNotFound")
    # Missing is not a benched key: no cooldown is running, nothing comes back by itself.
    assert cond(p, "Exhausted")["status"] == "False" and "nextAvailableAt" not in p["status"]
    c = await eventually(
        lambda: _where(
            api.get(API, "providerchains", namespace, "agents"),
            lambda c: cond(c, "Ready").get("status") == "False",
        ),
        timeout=10,
    )
    assert cond(c, "Ready")["reason"] == "NoRoutableProvider", cond(c, "Ready")
    assert "no credential with a usable key" in cond(c, "Ready")["message"]
    assert config_of(await api.get("v1", "secrets", namespace, "agents-keyroute"))["entries"] == []

    control_plane.apply([secret("openai-keys", k1=KEY1)], namespace=namespace)
    c = await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=10)
    p = await api.get(API, "credentialpools", namespace, "openai")
    assert row_state(p) == [("k1", "Available")] and cond(p, "Degraded")["reason"] == "AllCredentialsAvailable"
    cfg = config_of(await api.get("v1", "secrets", namespace, "agents-keyroute"))
    assert [x["key"] for x in cfg["pools"][0]["credentials"]] == [KEY1]
    await posted(api, namespace, ("openai", "SecretNotFound"), ("openai", "CredentialAvailable"))
    no_forbidden(operator, namespace)


def row_state(p: dict | None) -> list[tuple[str, str]]:
    return [(r["name"], r["state"]) for r in ((p or {}).get("status") or {}).get("credentials") or []]


async def test_a_failing_reconcile_is_tried_again_after_doubling_delays(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    """README: a failed reconcile is tried again after ``--retry-delay`` (1 s for this module's
    operator), then after twice as long at each further failure. A real failure the API server gives
    on cue: an immutable Secret of the user's that holds the config Secret's name, so that every
    write of the config is refused (422). Once it is deleted, which no watch tells the chain about
    (it is no config Secret and no credential Secret), the next retry renders the chain. The first
    retry used to be the last: a retry that failed too waited for the 5-minute resync."""
    control_plane.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "agents-keyroute"},
                "immutable": True,
                "stringData": {"config.json": "{}"},
            }
        ],
        namespace=namespace,
    )

    def failures() -> list[dict[str, Any]]:
        """The chain's failure lines, the first of each count in the streak (another event's
        reconcile failing while a retry is pending repeats the count)."""
        first: dict[int, dict[str, Any]] = {}
        for line in operator.output.splitlines():
            if not line.startswith("{"):
                continue
            fields = json.loads(line)
            if fields.get("msg", "").startswith("chain reconcile failed") and (
                fields.get("namespace"),
                fields.get("chain"),
            ) == (namespace, "agents"):
                first.setdefault(fields["failures"], fields)
        return [first[n] for n in sorted(first)]

    control_plane.apply(one_chain(), namespace=namespace)
    lines = await eventually(lambda: len(failures()) >= 3 and failures(), timeout=20)
    assert [(f["failures"], f["retry_in"]) for f in lines[:3]] == [(1, 1), (2, 2), (3, 4)]
    assert "immutable" in lines[0]["error"] or "422" in lines[0]["error"], lines[0]
    at = [datetime.fromisoformat(f["ts"].replace("Z", "+00:00")).timestamp() for f in lines[:3]]
    # Each retry waited at least its delay (less 0.1 s: the log's timestamps are to the millisecond).
    assert at[1] - at[0] >= 0.9 and at[2] - at[1] >= 1.9, at
    await api.delete("v1", "secrets", namespace, "agents-keyroute")
    began = time.monotonic()
    c = await eventually(lambda: ready(api, "providerchains", namespace, "agents"), timeout=15)
    print(f"rendered {time.monotonic() - began:.2f}s after the blocking Secret went")
    rendered = await api.get("v1", "secrets", namespace, "agents-keyroute")
    assert c["status"]["config"]["hash"] == rendered["metadata"]["annotations"]["keyroute.dev/config-hash"]


async def test_a_rejected_key_stays_rejected_until_its_secret_value_changes(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    """docs/resources.md: ``Rejected`` (revoked) holds "until its Secret value changes", with no
    ``until``; a rotated key starts healthy (its fingerprint differs). The report is posted as a
    sidecar posts it."""
    control_plane.apply(one_chain(), namespace=namespace)
    p = await eventually(lambda: ready(api, "credentialpools", namespace, "openai"), timeout=20)
    action = Action(
        kind=ActionKind.REJECTED,
        at=time.time(),
        namespace=namespace,
        object_name="openai",
        error_class=ErrorClass.REVOKED,
        credential="k1",
        fingerprint=fingerprint(KEY1),
        status=401,
    )
    uid = p["metadata"]["uid"]
    await api.create(event_body(action, Origin("pod-a", namespace), name="openai.rejected-1", uid=uid), namespace)
    p = await eventually(
        lambda: _where(
            api.get(API, "credentialpools", namespace, "openai"),
            lambda p: row(p, "k1").get("state") == "Rejected",
        ),
        timeout=10,
    )
    assert (row(p, "k1")["reason"], row(p, "k1")["lastErrorCode"]) == ("Revoked", 401)
    assert "until" not in row(p, "k1") and "nextAvailableAt" not in p["status"]
    assert (cond(p, "Ready")["reason"], cond(p, "Exhausted")["reason"]) == ("NoCredentialAvailable", "Revoked")

    await api.patch("v1", "secrets", namespace, "openai-keys", {"stringData": {"k1": ROTATED}})
    p = await eventually(
        lambda: _where(
            api.get(API, "credentialpools", namespace, "openai"),
            lambda p: row(p, "k1").get("state") == "Available",
        ),
        timeout=10,
    )
    assert row(p, "k1")["fingerprint"] == fingerprint(ROTATED) and cond(p, "Ready")["status"] == "True"
    no_forbidden(operator, namespace)


async def test_63_character_names_work_end_to_end(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    """The longest names the CRDs accept (keyroute.core.names): a chain's is a label value, 63
    characters at most; a pool's may have dots. The boundary of the rules, so that they refuse
    nothing that works."""
    chain_name = "agents-production-" + "x" * 45
    pool_name = "openai.eu-west-1." + "p" * 46
    assert len(chain_name) == len(pool_name) == 63
    control_plane.apply(
        [
            secret("openai-keys", k1=KEY1),
            pool(pool_name, "openai", ("k1", "openai-keys", "k1")),
            chain(chain_name, ("openai", "openai", "https://api.openai.com/v1", pool_name)),
        ],
        namespace=namespace,
    )
    c = await eventually(lambda: ready(api, "providerchains", namespace, chain_name), timeout=20)
    rendered = await api.get("v1", "secrets", namespace, f"{chain_name}-keyroute")
    assert rendered is not None
    assert rendered["metadata"]["labels"]["keyroute.dev/chain"] == chain_name
    assert c["status"]["config"]["name"] == f"{chain_name}-keyroute"
    assert [x["key"] for x in config_of(rendered)["pools"][0]["credentials"]] == [KEY1]
    await posted(api, namespace, (chain_name, "ConfigRendered"), (pool_name, "CredentialsAvailable"))
    no_forbidden(operator, namespace)


async def test_a_credential_secret_with_a_long_name_is_read(
    control_plane: ControlPlane, api: Api, namespace: str, operator: KeyrouteProcess
) -> None:
    """A Secret's name may be 253 characters (secretRef.name allows it): the operator read such a
    Secret as "unreadable" and called the key missing (SecretNotFound) although it was there."""
    long_secret = "openai-keys." + "s" * 241
    control_plane.apply(
        [secret(long_secret, k1=KEY1), pool("openai", "openai", ("k1", long_secret, "k1"))], namespace=namespace
    )
    p = await eventually(lambda: with_status(api, "credentialpools", namespace, "openai"), timeout=20)
    assert (cond(p, "Ready")["status"], p["status"]["available"]) == ("True", 1), p["status"]
    assert "unreadable Secret" not in operator.output
    no_forbidden(operator, namespace)


async def _equals(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return bool(await value == expected)


async def posted(api: Api, namespace: str, *wanted: tuple[str, str]) -> list[dict[str, Any]]:
    """The namespace's Events once every (object name, reason) in ``wanted`` is among them.

    The operator posts Events behind the status and config writes (controller/events.py: news about
    a change already written), so a status that reads Ready does not mean its Events are posted yet.
    """

    async def all_posted() -> list[dict[str, Any]]:
        events = await api.events(namespace)
        seen = {(e["involvedObject"]["name"], e["reason"]) for e in events}
        assert set(wanted) <= seen, f"not yet posted: {set(wanted) - seen}; posted: {seen}"
        return events

    # The lane may hold an Event up to 30 s (events.MAX_HOLD) while watch-started reconciles keep
    # coming, e.g. other tests' namespaces being torn down: a wait shorter than that could fail.
    return await eventually(all_posted, timeout=35)  # type: ignore[no-any-return]


async def _where(getter, ok):  # type: ignore[no-untyped-def]
    obj = await getter
    return obj if obj is not None and obj.get("status") and ok(obj) else None
