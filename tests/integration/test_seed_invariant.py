"""The invariant (docs/README.md) from the outside: a credential is only used for, and only blamed by, its own provider.

The project's origin bug: a fallback provider's 429s rotated the primary's pool and swapped the
primary's base URL back in, so fallback calls went to the wrong host and healthy primary keys were
benched. Each test here watches what every fake provider actually received.
"""

from __future__ import annotations

import asyncio
import copy

from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


def blocks(sidecar, pool_name: str) -> dict:
    return {n: copy.deepcopy(h.blocks) for n, h in sidecar.chain.pools[pool_name].health.items()}


async def test_fallback_429s_rotate_only_the_fallback_pool_and_hit_only_its_host(
    fake_provider, start_sidecar, agent
):
    primary: FakeProvider = await fake_provider(
        "acme", keys=[key("p1"), key("p2")], default=Behaviour.server_error(500)
    )
    backup: FakeProvider = await fake_provider(
        "backup", prefix="/api/v1", keys=[key("b1"), key("b2"), key("b3")]
    )
    backup.set(Behaviour.rate_limited(), key=key("b1"))
    backup.set(Behaviour.rate_limited(), key=key("b2"))
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys"),
            entry("backup", "backup", backup.base_url, "backup-keys"),
        ],
        [
            pool("acme-keys", "acme", cred("p1", key("p1")), cred("p2", key("p2"), priority=1)),
            pool(
                "backup-keys",
                "backup",
                cred("b1", key("b1")),
                cred("b2", key("b2"), priority=1),
                cred("b3", key("b3"), priority=2),
            ),
        ],
    )
    sidecar = await start_sidecar(cfg)
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
        assert resp.headers["X-Keyroute-Provider"] == "backup"
        assert resp.headers["X-Keyroute-Credential"] == "b3"
        assert "hello from backup" in (await resp.json())["choices"][0]["message"]["content"]

    # The primary saw only its own keys (server error retried once on the other key), on its own path.
    assert primary.keys_seen() == [key("p1"), key("p2")]
    # The fallback saw only its keys, in rotation order, on its own host and prefix.
    assert backup.keys_seen() == [key("b1"), key("b2"), key("b3")]
    assert {r.path for r in backup.received} == {"/api/v1/chat/completions"}
    assert {r.host for r in backup.received} == {f"127.0.0.1:{backup.port}"}
    assert {r.host for r in primary.received} == {f"127.0.0.1:{primary.port}"}
    # The fallback's 429s cooled the fallback's keys; the primary's pool carries no rate limit.
    assert set(sidecar.chain.pools["backup-keys"].health["b1"].blocks) == {"gpt-4o"}
    assert all(not h.blocks for h in sidecar.chain.pools["acme-keys"].health.values())

    # While the primary waits for its restore time, the fallback serves directly, still on b3.
    before = blocks(sidecar, "acme-keys")
    primary_calls = len(primary.received)
    for _ in range(3):
        async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
            assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "b3"
    assert len(primary.received) == primary_calls
    assert blocks(sidecar, "acme-keys") == before
    assert backup.count(key=key("b1")) == 1 and backup.count(key=key("b2")) == 1


async def test_same_provider_fallback_keeps_the_pool_state(fake_provider, start_sidecar, agent):
    fp: FakeProvider = await fake_provider("acme", keys=[key("a1"), key("a2")])
    fp.set(Behaviour.rate_limited(retry_after=30), key=key("a1"), model="big-model")
    fp.set(Behaviour.model_not_found(), key=key("a2"), model="big-model")
    cfg = config(
        [
            entry("acme-big", "acme", fp.base_url, "acme-keys", models={"*": "big-model"}),
            entry("acme-small", "acme", fp.base_url, "acme-keys", models={"*": "small-model"}),
        ],
        [pool("acme-keys", "acme", cred("a1", key("a1")), cred("a2", key("a2"), priority=1))],
    )
    sidecar = await start_sidecar(cfg)
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
        assert resp.headers["X-Keyroute-Provider"] == "acme-small"
        assert resp.headers["X-Keyroute-Credential"] == "a1"
    # a1 said 429 for big-model; a2 then said "no such model" (not a credential failure), so the
    # same-provider entry took over. Its pool is the same object with the same state: a1's
    # cooldown is scoped to big-model, so a1 serves small-model.
    assert [(r.key, r.model) for r in fp.received] == [
        (key("a1"), "big-model"),
        (key("a2"), "big-model"),
        (key("a1"), "small-model"),
    ]
    assert "big-model" in sidecar.chain.pools["acme-keys"].health["a1"].blocks


async def test_under_concurrency_recovery_acts_on_the_credential_actually_sent(
    fake_provider, start_sidecar, agent
):
    names = ["k1", "k2", "k3", "k4"]
    fp: FakeProvider = await fake_provider(
        "acme", keys=[key(n) for n in names], default=Behaviour.ok(delay=0.02)
    )
    fp.set(Behaviour.rate_limited(retry_after=30), key=key("k2"))
    cfg = config(
        [entry("acme", "acme", fp.base_url, "acme-keys")],
        [
            pool(
                "acme-keys",
                "acme",
                *[cred(n, key(n), priority=i) for i, n in enumerate(names)],
                strategy="RoundRobin",
            )
        ],
    )
    sidecar = await start_sidecar(cfg)

    async def one() -> tuple[int, str]:
        async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Keyroute-Credential", "")

    results = await asyncio.gather(*(one() for _ in range(40)))
    assert all(status == 200 for status, _ in results)
    assert "k2" not in {c for _, c in results}
    health = sidecar.chain.pools["acme-keys"].health
    assert set(health["k2"].blocks) == {"gpt-4o"}
    assert all(not health[n].blocks for n in ("k1", "k3", "k4"))
    # Only requests already on their way when k2's 429 arrived used it; afterwards it was skipped.
    assert fp.count(key=key("k2")) <= 10
    assert health["k2"].strikes["gpt-4o"] == 1
