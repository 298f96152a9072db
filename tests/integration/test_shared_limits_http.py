"""Keys that share one rate limit (``rateLimitScope: Pool``, issue 11 item 2) through real HTTP.

OpenAI and Anthropic meter an organization's keys together: after a 429 with a short reset, trying
the organization's next key only buys another 429. With ``Pool`` scope the sidecar waits the reset out
on the same route (once) and falls back when it is long; with ``Credential`` scope (the default) it
rotates at once, as before.
"""

from __future__ import annotations

import time

from keyroute.core.actions import ActionKind
from keyroute.core.resources import CredentialState, RateLimitScope
from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def setup(fake_provider, start_sidecar, scope: str | None, max_wait: float = 2.0):
    primary: FakeProvider = await fake_provider("acme", keys=[key("p1"), key("p2")])
    backup: FakeProvider = await fake_provider("backup", keys=[key("b1")])
    extra = {"rateLimitScope": scope} if scope else {}
    sidecar = await start_sidecar(
        config(
            [
                entry("acme", "acme", primary.base_url, "acme-keys"),
                entry("backup", "backup", backup.base_url, "backup-keys"),
            ],
            [
                pool("acme-keys", "acme", cred("p1", key("p1")), cred("p2", key("p2"), priority=1), **extra),
                pool("backup-keys", "backup", cred("b1", key("b1"))),
            ],
            fallback={"maxWait": max_wait},
            requestTimeout=10,
        )
    )
    return primary, backup, sidecar


async def ask(agent, sidecar):
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        await resp.read()
        return resp.status, resp.headers["X-Keyroute-Provider"], resp.headers["X-Keyroute-Credential"]


def state(sidecar, name):
    return sidecar.chain.pools["acme-keys"].state(name, time.time())[0]


async def test_pool_scope_waits_out_a_short_reset_on_the_same_key(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, "Pool")
    primary.script(Behaviour.rate_limited(retry_after=0.5), key=key("p1"))
    t = time.monotonic()
    assert await ask(agent, sidecar) == (200, "acme", "p1")
    assert 0.5 <= time.monotonic() - t < 2.0
    assert primary.keys_seen() == [key("p1"), key("p1")]  # p2 was never spent on the same budget
    assert len(backup.received) == 0
    cooled = [a for a in sidecar.seen if a.kind is ActionKind.COOLED_DOWN]
    assert [(a.credential, a.scope) for a in cooled] == [("p1", RateLimitScope.POOL)]


async def test_pool_scope_retries_once_then_falls_back(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, "Pool")
    primary.set(Behaviour.rate_limited(retry_after=0.3))
    assert await ask(agent, sidecar) == (200, "backup", "b1")
    assert primary.keys_seen() == [key("p1"), key("p1")]


async def test_pool_scope_falls_back_at_once_on_a_long_reset(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, "Pool")
    primary.set(Behaviour.rate_limited(retry_after=30))
    t = time.monotonic()
    assert await ask(agent, sidecar) == (200, "backup", "b1")
    assert time.monotonic() - t < 5.0  # no wait: 30 s is past maxWait
    assert primary.keys_seen() == [key("p1")]
    assert state(sidecar, "p1") is state(sidecar, "p2") is CredentialState.COOLING_DOWN
    # The metrics say the pool's scope acted.
    async with agent.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
        text = await resp.text()
    assert 'kind="CredentialCoolingDown",scope="Pool"' in text


async def test_credential_scope_is_the_default_and_rotates_at_once(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, None)
    primary.script(Behaviour.rate_limited(retry_after=2), key=key("p1"))
    assert await ask(agent, sidecar) == (200, "acme", "p2")
    assert state(sidecar, "p1") is CredentialState.COOLING_DOWN
    assert state(sidecar, "p2") is CredentialState.AVAILABLE
    cooled = [a for a in sidecar.seen if a.kind is ActionKind.COOLED_DOWN]
    assert [(a.credential, a.scope) for a in cooled] == [("p1", None)]
