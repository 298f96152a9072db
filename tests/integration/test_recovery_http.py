"""Every row of the docs/errors.md table through real HTTP: what the provider said, what the pool did, who
answered the agent, and what each provider received."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from keyroute.core.resources import CredentialState
from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat

FAST = {"requestTimeout": 10}


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def setup(fake_provider, start_sidecar, *, primary_keys=("p1", "p2"), backup_keys=("b1",), **chain):
    primary: FakeProvider = await fake_provider("acme", keys=[key(k) for k in primary_keys])
    backup: FakeProvider = await fake_provider("backup", keys=[key(k) for k in backup_keys])
    timeouts = chain.pop("timeouts", {})
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys", timeouts=timeouts),
            entry("backup", "backup", backup.base_url, "backup-keys", timeouts=timeouts),
        ],
        [
            pool(
                "acme-keys",
                "acme",
                *[cred(k, key(k), priority=i) for i, k in enumerate(primary_keys)],
                cooldowns=chain.pop("cooldowns", {}),
            ),
            pool("backup-keys", "backup", *[cred(k, key(k), priority=i) for i, k in enumerate(backup_keys)]),
        ],
        **{**FAST, **chain},
    )
    sidecar = await start_sidecar(cfg)
    return primary, backup, sidecar


async def ask(agent, sidecar, **body):
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat(**body)) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def state(sidecar, pool_name, cred_name):
    return sidecar.chain.pools[pool_name].state(cred_name, time.time())


# behaviour on p1 → (state of p1, who serves, calls to the primary)
ROWS = [
    ("RateLimited", Behaviour.rate_limited(), CredentialState.COOLING_DOWN, ("acme", "p2"), 2),
    (
        "RateLimited-code",
        Behaviour.status(429, body={"error": {"code": "resource_exhausted", "message": "slow down"}}),
        CredentialState.COOLING_DOWN,
        ("acme", "p2"),
        2,
    ),
    (
        "UsageLimit",
        Behaviour.status(
            429,
            body={
                "error": {
                    "type": "usage_limit_reached",
                    "message": "usage limit reached",
                    "resets_in_seconds": 7200,
                }
            },
        ),
        CredentialState.COOLING_DOWN,
        ("acme", "p2"),
        2,
    ),
    ("Billing-402", Behaviour.billing(), CredentialState.EXHAUSTED, ("acme", "p2"), 2),
    (
        "Billing-403",
        Behaviour.status(403, body={"error": {"message": "Your credit balance is too low"}}),
        CredentialState.EXHAUSTED,
        ("acme", "p2"),
        2,
    ),
    ("AuthFailed", Behaviour.auth_failed(), CredentialState.COOLING_DOWN, ("acme", "p2"), 2),
    (
        "AuthFailed-403",
        Behaviour.status(403, body={"error": {"message": "forbidden"}}),
        CredentialState.COOLING_DOWN,
        ("acme", "p2"),
        2,
    ),
    ("Revoked", Behaviour.revoked(), CredentialState.REJECTED, ("acme", "p2"), 2),
]


@pytest.mark.parametrize(
    ("label", "behaviour", "p1_state", "served", "primary_calls"), ROWS, ids=[r[0] for r in ROWS]
)
async def test_credential_rows(
    fake_provider, start_sidecar, agent, label, behaviour, p1_state, served, primary_calls
):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(behaviour, key=key("p1"))
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200
    assert (headers["X-Keyroute-Provider"], headers["X-Keyroute-Credential"]) == served
    assert state(sidecar, "acme-keys", "p1")[0] is p1_state
    assert state(sidecar, "acme-keys", "p2")[0] is CredentialState.AVAILABLE
    assert len(primary.received) == primary_calls and len(backup.received) == 0
    # The cooled key is not sent again.
    await ask(agent, sidecar)
    assert primary.count(key=key("p1")) == 1


async def test_overloaded_tries_the_next_key_once_then_falls_back(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, primary_keys=("p1", "p2", "p3"))
    primary.set(Behaviour.overloaded())
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert primary.keys_seen() == [key("p1"), key("p2")]
    assert all(state(sidecar, "acme-keys", k)[0] is CredentialState.AVAILABLE for k in ("p1", "p2", "p3"))


@pytest.mark.parametrize("status_code", [500, 502, 504])
async def test_server_error_retries_once_then_falls_back(fake_provider, start_sidecar, agent, status_code):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.server_error(status_code))
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert primary.keys_seen() == [key("p1"), key("p2")]


async def test_server_error_then_success_on_retry_stays_on_primary(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.script(Behaviour.server_error(502))
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "acme"
    assert len(primary.received) == 2 and len(backup.received) == 0


async def test_connection_reset_retries_once_then_falls_back(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, primary_keys=("p1",))
    primary.set(Behaviour.reset())
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert primary.keys_seen() == [key("p1"), key("p1")]


async def test_connection_refused_falls_back(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    await primary.stop()
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"


async def test_silent_upstream_one_attempt_then_fallback_within_first_byte(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, timeouts={"firstByte": 0.4})
    primary.set(Behaviour.silence())
    t = time.monotonic()
    status, headers, _ = await ask(agent, sidecar)
    elapsed = time.monotonic() - t
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) == 1  # never retry a silent route
    assert 0.4 <= elapsed < 1.5


async def test_slow_first_byte_within_the_timeout_is_served(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, timeouts={"firstByte": 1.0})
    primary.set(Behaviour.slow_first_byte(0.3))
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "acme"
    assert len(backup.received) == 0


async def test_model_not_found_falls_back(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.model_not_found())
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) == 1


async def test_upstream_rate_limited_falls_back_without_touching_the_key(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(
        Behaviour.status(
            429,
            body={
                "error": {
                    "code": 429,
                    "message": "Provider returned error",
                    "metadata": {
                        "raw": "openai/gpt-4o is temporarily rate-limited upstream",
                        "provider_name": "OpenAI",
                    },
                }
            },
        )
    )
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) == 1  # at once: not the pool's next key first
    assert state(sidecar, "acme-keys", "p1")[0] is CredentialState.AVAILABLE


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "Upstream request limit exceeded", "code": "rate_limit_exceeded"}},
        "Too many requests: upstream rate limit reached",
        {"error": {"message": "rate limited by upstream, slow down"}},
    ],
    ids=["json-code", "plain-text", "json-wording"],
)
async def test_a_provider_saying_upstream_is_its_own_rate_limit(fake_provider, start_sidecar, agent, body):
    """Only an aggregator's structured signal means "the upstream model is limited": a provider or
    gateway that says "upstream" in its own 429 benches the key that was sent and rotates."""
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.status(429, body=body), key=key("p1"))
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and (headers["X-Keyroute-Provider"], headers["X-Keyroute-Credential"]) == (
        "acme",
        "p2",
    )
    assert state(sidecar, "acme-keys", "p1")[0] is CredentialState.COOLING_DOWN
    assert len(backup.received) == 0


@pytest.mark.parametrize(
    "behaviour",
    [Behaviour.status(400, body={"error": {"message": "bad param"}}), Behaviour.status(404, body="not here")],
)
async def test_client_errors_reach_the_agent_unchanged(fake_provider, start_sidecar, agent, behaviour):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(behaviour)
    status, headers, body = await ask(agent, sidecar)
    assert status == behaviour.status_code
    assert body == behaviour.body
    assert (headers["X-Keyroute-Provider"], headers["X-Keyroute-Credential"]) == ("acme", "p1")
    assert len(primary.received) == 1 and len(backup.received) == 0


async def test_retry_after_seconds_sets_the_cooldown(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.script(Behaviour.rate_limited(retry_after=40), key=key("p1"))
    t = time.time()
    await ask(agent, sidecar)
    until = state(sidecar, "acme-keys", "p1")[1].until
    assert t + 39 <= until <= time.time() + 41


async def test_retry_after_http_date_sets_the_cooldown(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    when = time.time() + 120
    primary.script(
        Behaviour.rate_limited(headers={"Retry-After": email.utils.formatdate(when, usegmt=True)}),
        key=key("p1"),
    )
    await ask(agent, sidecar)
    assert abs(state(sidecar, "acme-keys", "p1")[1].until - when) <= 1.5


async def test_x_ratelimit_reset_duration_headers(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.script(
        Behaviour.rate_limited(
            headers={"x-ratelimit-reset-requests": "1.5s", "x-ratelimit-reset-tokens": "6m0s"}
        ),
        key=key("p1"),
    )
    t = time.time()
    await ask(agent, sidecar)
    until = state(sidecar, "acme-keys", "p1")[1].until
    assert t + 359 <= until <= time.time() + 361


async def test_body_reset_field(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.script(
        Behaviour.status(
            429, body={"error": {"type": "rate_limit_exceeded", "message": "slow", "resets_in_seconds": 90}}
        ),
        key=key("p1"),
    )
    t = time.time()
    await ask(agent, sidecar)
    assert t + 89 <= state(sidecar, "acme-keys", "p1")[1].until <= time.time() + 91


async def test_sole_key_cap(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar, primary_keys=("p1",))
    primary.script(Behaviour.rate_limited(retry_after=3600))
    t = time.time()
    status, headers, _ = await ask(agent, sidecar)
    assert headers["X-Keyroute-Provider"] == "backup"
    assert state(sidecar, "acme-keys", "p1")[1].until <= t + 61


async def test_revoked_until_the_secret_value_changes(fake_provider, start_sidecar, agent, tmp_path):
    from keyroute.sidecar.sources import RenderedConfigFile

    primary: FakeProvider = await fake_provider("acme", keys=[key("p1"), "sk-test-p1-ROTATED-0000000000000"])
    primary.set(Behaviour.revoked(), key=key("p1"))

    def write(p1_key: str) -> None:
        cfg = config(
            [entry("acme", "acme", primary.base_url, "acme-keys")],
            [pool("acme-keys", "acme", cred("p1", p1_key), cred("p2", key("p2"), priority=1))],
        )
        (tmp_path / "config.json").write_text(cfg.to_json())

    write(key("p1"))
    sidecar = await start_sidecar(RenderedConfigFile(tmp_path))
    status, headers, _ = await ask(agent, sidecar)
    # p2 is not accepted by this provider either, so the chain is exhausted; p1 is rejected.
    assert state(sidecar, "acme-keys", "p1")[0] is CredentialState.REJECTED
    write("sk-test-p1-ROTATED-0000000000000")
    for _ in range(100):
        await asyncio.sleep(0.05)
        if sidecar.chain.pools["acme-keys"].credentials[0].key.endswith("ROTATED-0000000000000"):
            break
    assert state(sidecar, "acme-keys", "p1")[0] is CredentialState.AVAILABLE
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Credential"] == "p1"
    assert primary.keys_seen()[-1] == "sk-test-p1-ROTATED-0000000000000"
