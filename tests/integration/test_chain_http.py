"""Chain-level behaviour through real HTTP: exhaustion, restore with a probe, short waits, context
length, and per-model scope."""

from __future__ import annotations

import asyncio
import time

from keyroute.core.actions import ActionKind
from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def two(fake_provider, start_sidecar, *, primary_keys=("p1",), backup_keys=("b1",), **chain):
    primary: FakeProvider = await fake_provider("acme", keys=[key(k) for k in primary_keys])
    backup: FakeProvider = await fake_provider("backup", keys=[key(k) for k in backup_keys])
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys"),
            entry("backup", "backup", backup.base_url, "backup-keys"),
        ],
        [
            pool("acme-keys", "acme", *[cred(k, key(k), priority=i) for i, k in enumerate(primary_keys)]),
            pool("backup-keys", "backup", *[cred(k, key(k), priority=i) for i, k in enumerate(backup_keys)]),
        ],
        **chain,
    )
    return primary, backup, await start_sidecar(cfg)


async def ask(agent, sidecar, model="gpt-4o", **body):
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat(model, **body)) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_chain_exhausted_is_503_with_attempts_and_retry_after(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, primary_keys=("p1", "p2"))
    primary.set(Behaviour.rate_limited(retry_after=40))
    backup.set(Behaviour.server_error(500))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 503
        body = await resp.json()
        retry_after = int(resp.headers["Retry-After"])
    err = body["error"]
    assert err["type"] == "chain_exhausted"
    assert [(a["provider"], a.get("credential"), a["class"]) for a in err["attempts"]] == [
        ("acme", "p1", "RateLimited"),
        ("acme", "p2", "RateLimited"),
        ("backup", "b1", "ServerError"),
        ("backup", "b1", "ServerError"),
    ]
    # The backup (provider-level failure, no key cooled) could be tried again at once; the sole
    # backup key's retry was spent, so the soonest usable thing is "now" → Retry-After floor of 1 s.
    assert 1 <= retry_after <= 40
    assert any(a.kind is ActionKind.CHAIN_EXHAUSTED for a in sidecar.seen)


async def test_exhausted_retry_after_is_the_soonest_cooldown(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar)
    primary.set(Behaviour.rate_limited(retry_after=50))
    backup.set(Behaviour.rate_limited(retry_after=20))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 503
        assert 19 <= int(resp.headers["Retry-After"]) <= 21


async def test_restore_after_cooldown_with_a_probe(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, fallback={"restoreAfter": 0.3})
    primary.set(Behaviour.server_error(500))
    assert (await ask(agent, sidecar))[1]["X-Keyroute-Provider"] == "backup"
    calls = len(primary.received)  # 2: the attempt and its one retry
    # Within the restore wait the primary is not contacted.
    assert (await ask(agent, sidecar))[1]["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) == calls
    # After it, the next request probes the primary with a real call; it fails; a short outage waits
    # restoreAfter again (the waits grow only with the outage's length).
    await asyncio.sleep(0.35)
    assert (await ask(agent, sidecar))[1]["X-Keyroute-Provider"] == "backup"
    assert len(primary.received) > calls
    restore = sidecar.chain.models["gpt-4o"].restores["acme"]
    assert restore.wait == 0.3
    # The primary recovers: the next probe succeeds and traffic returns.
    primary.reset_rules()
    await asyncio.sleep(0.35)
    status, headers, _ = await ask(agent, sidecar)
    assert headers["X-Keyroute-Provider"] == "acme"
    assert "gpt-4o" not in sidecar.chain.models  # back on the primary, nothing waiting: forgotten
    kinds = [a.kind for a in sidecar.seen]
    assert ActionKind.FALLBACK_ACTIVATED in kinds and ActionKind.PRIMARY_RESTORED in kinds


async def test_short_retry_after_on_a_single_key_is_waited_out_on_that_key(
    fake_provider, start_sidecar, agent
):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, fallback={"maxWait": 2})
    primary.script(Behaviour.rate_limited(retry_after=0.5))
    t = time.monotonic()
    status, headers, _ = await ask(agent, sidecar)
    assert (
        status == 200
        and headers["X-Keyroute-Provider"] == "acme"
        and headers["X-Keyroute-Credential"] == "p1"
    )
    assert primary.keys_seen() == [key("p1"), key("p1")]
    gap = primary.received[1].time - primary.received[0].time
    assert 0.5 <= gap < 1.0  # honoured the reset, with a little jitter, not hammered
    assert len(backup.received) == 0 and time.monotonic() - t < 2


async def test_reset_longer_than_max_wait_falls_back(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, fallback={"maxWait": 0.2})
    primary.script(Behaviour.rate_limited(retry_after=1))
    status, headers, _ = await ask(agent, sidecar)
    assert headers["X-Keyroute-Provider"] == "backup" and len(primary.received) == 1


async def test_context_length_fallback_to_a_bigger_context_entry(fake_provider, start_sidecar, agent):
    primary: FakeProvider = await fake_provider("acme", keys=[key("p1")])
    backup: FakeProvider = await fake_provider("backup", keys=[key("b1")])
    primary.set(Behaviour.context_length(), model="gpt-4o")
    # "big" is the same provider at a bigger-context model id, drawing on the same pool.
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys"),
            entry("backup", "backup", backup.base_url, "backup-keys"),
            entry("big", "acme", primary.base_url, "acme-keys", models={"*": "gpt-4o-long"}),
        ],
        [
            pool("acme-keys", "acme", cred("p1", key("p1"))),
            pool("backup-keys", "backup", cred("b1", key("b1"))),
        ],
        fallback={"contextLength": ["big"]},
    )
    sidecar = await start_sidecar(cfg)
    status, headers, _ = await ask(agent, sidecar)
    assert status == 200 and headers["X-Keyroute-Provider"] == "big"
    assert [r.model for r in primary.received] == ["gpt-4o", "gpt-4o-long"]
    assert len(backup.received) == 0  # a long prompt is not an outage: the backup is not used
    assert not sidecar.chain.on_fallback("gpt-4o")


async def test_context_length_without_bigger_entry_returns_the_400(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar)
    primary.set(Behaviour.context_length())
    status, _, body = await ask(agent, sidecar)
    assert status == 400 and b"context_length_exceeded" in body
    assert len(backup.received) == 0


async def test_rate_limit_on_one_model_leaves_the_key_usable_for_another(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await two(fake_provider, start_sidecar, primary_keys=("p1", "p2"))
    primary.set(Behaviour.rate_limited(retry_after=30), model="gpt-4o")
    _, headers, _ = await ask(agent, sidecar, model="gpt-4o")
    assert headers["X-Keyroute-Provider"] == "backup"
    status, headers, _ = await ask(agent, sidecar, model="gpt-4o-mini")
    assert status == 200 and (headers["X-Keyroute-Provider"], headers["X-Keyroute-Credential"]) == (
        "acme",
        "p1",
    )
    assert not sidecar.chain.on_fallback("gpt-4o-mini") and sidecar.chain.on_fallback("gpt-4o")


async def test_model_alias_is_rewritten_and_nothing_else_changes(fake_provider, start_sidecar, agent):
    fp: FakeProvider = await fake_provider("router", keys=[key("r1")])
    cfg = config(
        [entry("router", "router", fp.base_url, "r", models={"gpt-4o": "openai/gpt-4o"})],
        [pool("r", "router", cred("r1", key("r1")))],
    )
    sidecar = await start_sidecar(cfg)
    raw = b'{ "model" : "gpt-4o",\n  "messages": [{"role": "user", "content": "say \\"model\\": \\"gpt-4o\\""}],\n "tools": [{"model": "gpt-4o"}] }'
    async with agent.post(
        sidecar.base_url + "/chat/completions?x=1", data=raw, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    got = fp.received[0]
    assert got.body == raw.replace(b'"gpt-4o",\n', b'"openai/gpt-4o",\n', 1)
    assert got.path == "/v1/chat/completions"


async def test_the_model_is_read_whatever_the_spelling_of_the_json_content_type(
    fake_provider, start_sidecar, agent
):
    # The media type is read from the raw header (not aiohttp's parsed content_type): case and
    # parameters must not matter, and a body that is not JSON, or is sent as another type, passes as is.
    fp: FakeProvider = await fake_provider("router", keys=[key("r1")])
    cfg = config(
        [entry("router", "router", fp.base_url, "r", models={"gpt-4o": "openai/gpt-4o"})],
        [pool("r", "router", cred("r1", key("r1")))],
    )
    sidecar = await start_sidecar(cfg)
    cases = [
        ("Application/JSON; charset=utf-8", b'{"model":"gpt-4o","n":1}', b'{"model":"openai/gpt-4o","n":1}'),
        ("application/vnd.api+json", b'{"model":"gpt-4o"}', b'{"model":"openai/gpt-4o"}'),
        ("text/plain", b' {"model":"gpt-4o"}', b' {"model":"openai/gpt-4o"}'),  # JSON by its first byte
        ("text/plain", b'model "gpt-4o"', b'model "gpt-4o"'),
        (None, b'{"model":"gpt-4o"}', b'{"model":"openai/gpt-4o"}'),
    ]
    for i, (ctype, raw, expected) in enumerate(cases):
        headers = {"Content-Type": ctype} if ctype else {}
        async with agent.post(sidecar.base_url + "/chat/completions", data=raw, headers=headers) as resp:
            assert resp.status == 200, ctype
        assert fp.received[i].body == expected, ctype


async def test_the_agents_headers_reach_each_attempt_without_its_credentials_or_encodings(
    fake_provider, start_sidecar, agent
):
    # Accept-Encoding: identity is the client session's default, not a header of each request: it
    # must still reach every attempt (the retry on the fallback too), whatever the agent asked for.
    primary, backup, sidecar = await two(fake_provider, start_sidecar)
    primary.script(Behaviour.server_error(), Behaviour.server_error())
    headers = {
        "Authorization": "Bearer agent-own-token",
        "X-Api-Key": "agent-own-key",
        "Accept-Encoding": "gzip, br",
        "X-Custom": "kept",
        "OpenAI-Organization": "org-1",
    }
    url = sidecar.base_url + "/chat/completions"
    async with agent.post(url, json=chat("gpt-4o"), headers=headers) as resp:
        assert resp.status == 200
    received = [*primary.received, *backup.received]
    assert [r.key for r in received] == [key("p1"), key("p1"), key("b1")]
    for r in received:
        assert r.headers["accept-encoding"] == "identity"
        assert r.headers["x-custom"] == "kept" and r.headers["openai-organization"] == "org-1"
        assert "x-api-key" not in r.headers and "agent-own-token" not in r.headers["authorization"]


async def test_other_v1_paths_pass_through(fake_provider, start_sidecar, agent):
    fp: FakeProvider = await fake_provider("acme", keys=[key("p1")])
    cfg = config([entry("acme", "acme", fp.base_url, "k")], [pool("k", "acme", cred("p1", key("p1")))])
    sidecar = await start_sidecar(cfg)
    for method, path, body in [
        ("GET", "/models", None),
        ("POST", "/embeddings", {"model": "e", "input": "x"}),
        ("POST", "/completions", {"model": "c", "prompt": "x"}),
        ("POST", "/responses", {"model": "r", "input": "x"}),
    ]:
        async with agent.request(method, sidecar.base_url + path, json=body) as resp:
            assert resp.status == 200, path
            assert resp.headers["X-Keyroute-Provider"] == "acme"
    assert [r.path for r in fp.received] == [
        "/v1/models",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/responses",
    ]
    assert {r.key for r in fp.received} == {key("p1")}
    async with agent.get(sidecar.base_url.removesuffix("/v1") + "/other") as resp:
        assert resp.status == 404
