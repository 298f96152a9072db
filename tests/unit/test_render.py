"""``render(chain, pools, secrets)``: resources in, sidecar config out, with the binding rule (the invariant (docs/README.md) and docs/resources.md).

Objects are built from the same dict shapes a manifest holds, so each test reads like the YAML a user
would apply.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from keyroute.core.classes import ErrorClass
from keyroute.core.config import SidecarConfig, fingerprint, parse_config
from keyroute.core.render import (
    NO_USABLE_CREDENTIALS,
    POOL_NOT_FOUND,
    POOL_PROVIDER_MISMATCH,
    SECRET_KEY_MISSING,
    SECRET_NOT_FOUND,
    RenderResult,
    render,
)
from keyroute.core.resources import ApiStyle, CredentialPool, ProviderChain, Secret, Strategy

KEY_A1 = "sk-test-KEYROUTE-SECRET-0001"
KEY_A2 = "sk-test-KEYROUTE-SECRET-0002"
KEY_B1 = "sk-or-test-KEYROUTE-SECRET-0003"
ALL_KEYS = (KEY_A1, KEY_A2, KEY_B1)


# --- builders ---------------------------------------------------------------------------------------


def cred(name: str, secret: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "secretRef": {"name": secret, "key": key}, **extra}


def make_pool(
    name: str, provider: str, *creds: dict[str, Any], namespace: str = "default", **spec: Any
) -> CredentialPool:
    return CredentialPool.model_validate(
        {
            "kind": "CredentialPool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"provider": provider, "credentials": list(creds), **spec},
        }
    )


def make_entry(provider: str, pool: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "provider": provider,
        "baseURL": f"https://api.{provider}.example/v1",
        "credentialPoolRef": {"name": pool or provider},
        **extra,
    }


def make_chain(*entries: dict[str, Any], namespace: str = "default", **spec: Any) -> ProviderChain:
    return ProviderChain.model_validate(
        {
            "kind": "ProviderChain",
            "metadata": {"name": "agents", "namespace": namespace},
            "spec": {"providers": list(entries), **spec},
        }
    )


def make_secret(
    name: str,
    string_data: dict[str, str] | None = None,
    data: dict[str, str] | None = None,
    namespace: str = "default",
) -> Secret:
    return Secret.model_validate(
        {
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": string_data or {},
            "data": data or {},
        }
    )


def by_name(*objs: CredentialPool | Secret) -> dict[str, Any]:
    return {o.name: o for o in objs}


def openai_pool(**spec: Any) -> CredentialPool:
    return make_pool(
        "openai", "openai", cred("a1", "openai-keys", "k1"), cred("a2", "openai-keys", "k2"), **spec
    )


def openrouter_pool() -> CredentialPool:
    return make_pool("openrouter", "openrouter", cred("b1", "openrouter-keys", "k1"))


def all_secrets() -> dict[str, Any]:
    return by_name(
        make_secret("openai-keys", {"k1": KEY_A1, "k2": KEY_A2}),
        make_secret("openrouter-keys", {"k1": KEY_B1}),
    )


def two_provider_render(**chain_spec: Any) -> RenderResult:
    chain = make_chain(make_entry("openai"), make_entry("openrouter"), **chain_spec)
    return render(chain, by_name(openai_pool(), openrouter_pool()), all_secrets())


def reasons(result: RenderResult) -> list[tuple[str | None, str | None, str]]:
    return [(x.entry, x.credential, x.reason) for x in result.config.excluded]


def assert_bound(config: SidecarConfig) -> None:
    """The invariant (docs/README.md): every entry draws keys only from a pool of its own provider."""
    pools = {p.name: p for p in config.pools}
    for e in config.entries:
        assert pools[e.pool].provider == e.provider


# --- happy path -------------------------------------------------------------------------------------


def test_two_providers_render_with_their_pools() -> None:
    result = two_provider_render()
    cfg = result.config
    assert cfg.chain.name == "agents"
    assert cfg.chain.namespace == "default"
    assert [(e.name, e.provider, e.pool) for e in cfg.entries] == [
        ("openai", "openai", "openai"),
        ("openrouter", "openrouter", "openrouter"),
    ]
    assert cfg.entries[0].base_url == "https://api.openai.example/v1"
    assert cfg.entries[1].base_url == "https://api.openrouter.example/v1"
    pools = {p.name: p for p in cfg.pools}
    assert set(pools) == {"openai", "openrouter"}
    assert [(c.name, c.key) for c in pools["openai"].credentials] == [("a1", KEY_A1), ("a2", KEY_A2)]
    assert [(c.name, c.key) for c in pools["openrouter"].credentials] == [("b1", KEY_B1)]
    assert pools["openai"].provider == "openai"
    assert pools["openrouter"].provider == "openrouter"
    assert cfg.excluded == []
    assert result.excluded_entries == []
    assert_bound(cfg)


def test_entry_fields_are_carried_over() -> None:
    chain = make_chain(
        make_entry("openai"),
        make_entry(
            "anthropic", name="claude", api="anthropic", models={"gpt-4o": "claude-sonnet-4-5", "*": "c"}
        ),
    )
    pools = by_name(openai_pool(), make_pool("anthropic", "anthropic", cred("c1", "anthropic-keys", "k")))
    secrets = {**all_secrets(), **by_name(make_secret("anthropic-keys", {"k": "sk-ant-test"}))}
    cfg = render(chain, pools, secrets).config
    claude = cfg.entries[1]
    assert claude.name == "claude"
    assert claude.provider == "anthropic"
    assert claude.api is ApiStyle.ANTHROPIC
    assert claude.models == {"gpt-4o": "claude-sonnet-4-5", "*": "c"}
    assert cfg.entries[0].api is ApiStyle.OPENAI
    assert cfg.entries[0].models == {}


def test_pool_settings_are_resolved_to_seconds() -> None:
    pool = openai_pool(
        strategy="RoundRobin",
        cooldowns={"rateLimited": "30s", "billing": "2h", "authFailed": "1m30s", "max": "45m"},
        shareCooldowns=False,
    )
    cfg = render(make_chain(make_entry("openai")), by_name(pool), all_secrets()).config
    (p,) = cfg.pools
    assert p.strategy is Strategy.ROUND_ROBIN
    assert p.share_cooldowns is False
    assert (p.cooldowns.rate_limited, p.cooldowns.billing) == (30.0, 7200.0)
    assert (p.cooldowns.auth_failed, p.cooldowns.max) == (90.0, 2700.0)
    assert p.namespace == "default"


def test_pool_defaults_are_resolved_to_seconds() -> None:
    (p,) = render(make_chain(make_entry("openai")), by_name(openai_pool()), all_secrets()).config.pools
    assert p.strategy is Strategy.FILL_FIRST
    assert p.share_cooldowns is True
    assert (p.cooldowns.rate_limited, p.cooldowns.billing) == (60.0, 3600.0)
    assert (p.cooldowns.auth_failed, p.cooldowns.max) == (300.0, 3600.0)


def test_fallback_settings_are_resolved() -> None:
    cfg = two_provider_render(
        fallback={
            "restoreAfter": "2m",
            "maxWait": "1500ms",
            "triggers": ["RateLimited", "Timeout"],
            "contextLength": ["openrouter"],
            "maxAttempts": 4,
        }
    ).config
    fb = cfg.fallback
    assert (fb.restore_after, fb.max_wait, fb.max_attempts) == (120.0, 1.5, 4)
    assert fb.triggers == [ErrorClass.RATE_LIMITED, ErrorClass.TIMEOUT]
    assert fb.context_length == ["openrouter"]
    assert fb.restore_max == 90.0


def test_fallback_defaults() -> None:
    fb = two_provider_render().config.fallback
    assert (fb.restore_after, fb.max_wait, fb.triggers, fb.context_length) == (60.0, 5.0, None, [])


# --- priorities and credential overrides ------------------------------------------------------------


def _order(*creds: dict[str, Any]) -> list[tuple[str, int]]:
    pool = make_pool("openai", "openai", *creds)
    secret = make_secret("s", {"a": "ka", "b": "kb", "c": "kc"})
    (p,) = render(make_chain(make_entry("openai")), by_name(pool), by_name(secret)).config.pools
    return [(c.name, c.priority) for c in p.credentials]


def test_priority_defaults_to_list_order() -> None:
    assert _order(cred("c1", "s", "a"), cred("c2", "s", "b"), cred("c3", "s", "c")) == [
        ("c1", 0),
        ("c2", 1),
        ("c3", 2),
    ]


def test_explicit_priority_orders_credentials_lower_first() -> None:
    order = _order(
        cred("c1", "s", "a", priority=30),
        cred("c2", "s", "b", priority=10),
        cred("c3", "s", "c", priority=20),
    )
    assert order == [("c2", 10), ("c3", 20), ("c1", 30)]


def test_equal_priorities_keep_list_order() -> None:
    order = _order(
        cred("c1", "s", "a", priority=5), cred("c2", "s", "b", priority=1), cred("c3", "s", "c", priority=5)
    )
    assert order == [("c2", 1), ("c1", 5), ("c3", 5)]


def test_credential_base_url_override_stays_with_the_credential() -> None:
    pool = make_pool(
        "openai",
        "openai",
        cred("a1", "openai-keys", "k1", baseURL="https://eu.api.openai.example/v1/"),
        cred("a2", "openai-keys", "k2"),
    )
    cfg = render(make_chain(make_entry("openai")), by_name(pool), all_secrets()).config
    (p,) = cfg.pools
    assert [(c.name, c.base_url) for c in p.credentials] == [
        ("a1", "https://eu.api.openai.example/v1"),
        ("a2", None),
    ]
    # The entry keeps its own base URL; the override is per credential.
    assert cfg.entries[0].base_url == "https://api.openai.example/v1"


# --- timeouts ---------------------------------------------------------------------------------------


def test_timeouts_default_when_nothing_is_set() -> None:
    cfg = two_provider_render().config
    for e in cfg.entries:
        assert (e.timeouts.connect, e.timeouts.first_byte, e.timeouts.idle) == (5.0, 30.0, 30.0)
    assert cfg.request_timeout == 600.0


def test_timeouts_inherit_entry_then_chain_then_default() -> None:
    chain = make_chain(
        make_entry("openai", timeouts={"firstByte": "10s"}),
        make_entry("openrouter", timeouts={"connect": "2s", "idle": "1m"}),
        timeouts={"connect": "3s", "firstByte": "20s", "request": "5m"},
    )
    cfg = render(chain, by_name(openai_pool(), openrouter_pool()), all_secrets()).config
    primary, fallback = cfg.entries
    # connect: chain; firstByte: entry; idle: default.
    assert (primary.timeouts.connect, primary.timeouts.first_byte, primary.timeouts.idle) == (3.0, 10.0, 30.0)
    # connect and idle: entry; firstByte: chain.
    assert (fallback.timeouts.connect, fallback.timeouts.first_byte, fallback.timeouts.idle) == (
        2.0,
        20.0,
        60.0,
    )
    assert cfg.request_timeout == 300.0


def test_first_token_is_off_unless_set_and_inherits_entry_then_chain() -> None:
    assert all(e.timeouts.first_token is None for e in two_provider_render().config.entries)
    chain = make_chain(
        make_entry("openai"),
        make_entry("openrouter", timeouts={"firstToken": "0s"}),  # 0s: off for this entry only
        timeouts={"firstToken": "20s"},
    )
    cfg = render(chain, by_name(openai_pool(), openrouter_pool()), all_secrets()).config
    assert [e.timeouts.first_token for e in cfg.entries] == [20.0, None]
    chain = make_chain(make_entry("openai", timeouts={"firstToken": "1500ms"}), make_entry("openrouter"))
    cfg = render(chain, by_name(openai_pool(), openrouter_pool()), all_secrets()).config
    assert [e.timeouts.first_token for e in cfg.entries] == [1.5, None]


# --- the binding rule -------------------------------------------------------------------------------


def test_missing_pool_leaves_the_entry_out() -> None:
    chain = make_chain(make_entry("openai"), make_entry("openrouter"))
    result = render(chain, by_name(openai_pool()), all_secrets())
    assert [e.name for e in result.config.entries] == ["openai"]
    assert [(x.entry, x.pool, x.reason) for x in result.excluded_entries] == [
        ("openrouter", "openrouter", POOL_NOT_FOUND)
    ]
    assert [p.name for p in result.config.pools] == ["openai"]


def test_pool_in_another_namespace_is_not_found() -> None:
    elsewhere = make_pool("openrouter", "openrouter", cred("b1", "openrouter-keys", "k1"), namespace="other")
    chain = make_chain(make_entry("openai"), make_entry("openrouter"))
    result = render(chain, by_name(openai_pool(), elsewhere), all_secrets())
    assert [e.name for e in result.config.entries] == ["openai"]
    assert [x.reason for x in result.excluded_entries] == [POOL_NOT_FOUND]


def test_pool_bound_to_another_provider_leaves_the_entry_out() -> None:
    # The origin bug: the fallback named the primary's pool. It must never be routed with those keys.
    chain = make_chain(make_entry("openai"), make_entry("openrouter", pool="openai"))
    result = render(chain, by_name(openai_pool(), openrouter_pool()), all_secrets())
    cfg = result.config
    assert [e.name for e in cfg.entries] == ["openai"]
    (excluded,) = result.excluded_entries
    assert (excluded.entry, excluded.pool, excluded.reason) == (
        "openrouter",
        "openai",
        POOL_PROVIDER_MISMATCH,
    )
    assert "openrouter" in excluded.message
    assert "openai" in excluded.message
    assert [p.name for p in cfg.pools] == ["openai"]
    assert_bound(cfg)


def test_mismatched_pool_alone_is_not_in_the_config() -> None:
    chain = make_chain(make_entry("openai"), make_entry("openrouter", pool="openai-for-openrouter"))
    misbound = make_pool("openai-for-openrouter", "openai", cred("x", "openai-keys", "k1"))
    cfg = render(chain, by_name(openai_pool(), misbound), all_secrets()).config
    assert [p.name for p in cfg.pools] == ["openai"]


def test_pool_with_every_secret_missing_has_no_usable_credentials() -> None:
    chain = make_chain(make_entry("openai"), make_entry("openrouter"))
    secrets = by_name(make_secret("openrouter-keys", {"k1": KEY_B1}))
    result = render(chain, by_name(openai_pool(), openrouter_pool()), secrets)
    assert [e.name for e in result.config.entries] == ["openrouter"]
    assert [(x.entry, x.reason) for x in result.excluded_entries] == [("openai", NO_USABLE_CREDENTIALS)]
    # Each credential also says why it is missing.
    assert [(x.pool, x.credential, x.reason) for x in result.config.excluded if x.entry is None] == [
        ("openai", "a1", SECRET_NOT_FOUND),
        ("openai", "a2", SECRET_NOT_FOUND),
    ]
    assert [p.name for p in result.config.pools] == ["openrouter"]


def test_entries_sharing_a_pool_of_their_provider_share_one_pool() -> None:
    chain = make_chain(
        make_entry("openai", name="gpt-fast"),
        make_entry("openai", name="gpt-big", pool="openai", models={"*": "gpt-4.1"}),
    )
    result = render(chain, by_name(openai_pool()), all_secrets())
    cfg = result.config
    assert [(e.name, e.pool) for e in cfg.entries] == [("gpt-fast", "openai"), ("gpt-big", "openai")]
    assert [p.name for p in cfg.pools] == ["openai"]
    assert list(result.pools) == ["openai"]
    assert cfg.excluded == []


def test_sharing_a_pool_across_providers_keeps_only_the_pools_provider() -> None:
    chain = make_chain(
        make_entry("openai"), make_entry("openrouter", pool="openai"), make_entry("openai", name="again")
    )
    result = render(chain, by_name(openai_pool()), all_secrets())
    assert [e.name for e in result.config.entries] == ["openai", "again"]
    assert [(x.entry, x.reason) for x in result.excluded_entries] == [("openrouter", POOL_PROVIDER_MISMATCH)]


def test_context_length_drops_excluded_entries() -> None:
    chain = make_chain(
        make_entry("openai"),
        make_entry("openrouter"),
        make_entry("anthropic"),
        fallback={"contextLength": ["anthropic", "openrouter"]},
    )
    cfg = render(chain, by_name(openai_pool(), openrouter_pool()), all_secrets()).config
    assert cfg.fallback.context_length == ["openrouter"]


def test_every_entry_excluded_still_renders_a_valid_config() -> None:
    chain = make_chain(make_entry("openai"), make_entry("openrouter"))
    cfg = render(chain, {}, {}).config
    assert cfg.entries == []
    assert cfg.pools == []
    assert sorted(x.reason for x in cfg.excluded) == [POOL_NOT_FOUND, POOL_NOT_FOUND]
    assert parse_config(cfg.to_json()) == cfg


# --- per-credential resolution ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secrets", "reason"),
    [
        ({}, SECRET_NOT_FOUND),
        ({"k1": KEY_A1}, SECRET_KEY_MISSING),  # the Secret exists but lacks k2
        ({"k1": KEY_A1, "k2": ""}, SECRET_KEY_MISSING),
        ({"k1": KEY_A1, "k2": "   "}, SECRET_KEY_MISSING),
        ({"k1": KEY_A1, "k2": "\n\t \r\n"}, SECRET_KEY_MISSING),
    ],
)
def test_unusable_credential_is_excluded_and_the_rest_of_the_pool_stays(
    secrets: dict[str, str], reason: str
) -> None:
    pool = make_pool("openai", "openai", cred("a1", "keys-1", "k1"), cred("a2", "keys-2", "k2"))
    objs = by_name(make_secret("keys-1", {"k1": KEY_A1}))
    if secrets:
        objs["keys-2"] = make_secret("keys-2", secrets)
    result = render(make_chain(make_entry("openai")), by_name(pool), objs)
    cfg = result.config
    assert [e.name for e in cfg.entries] == ["openai"]
    assert [(c.name, c.key) for c in cfg.pools[0].credentials] == [("a1", KEY_A1)]
    assert reasons(result) == [(None, "a2", reason)]
    (x,) = cfg.excluded
    assert x.pool == "openai"
    assert all(k not in x.message for k in ALL_KEYS)
    assert result.pools["openai"].missing == [x]


def test_secret_in_another_namespace_is_not_found() -> None:
    pool = make_pool("openai", "openai", cred("a1", "openai-keys", "k1"))
    secret = make_secret("openai-keys", {"k1": KEY_A1}, namespace="other")
    result = render(make_chain(make_entry("openai")), by_name(pool), by_name(secret))
    assert result.config.entries == []
    assert reasons(result) == [("openai", None, NO_USABLE_CREDENTIALS), (None, "a1", SECRET_NOT_FOUND)]


def test_key_values_are_stripped_of_whitespace_and_newlines() -> None:
    # `echo key | base64` and block scalars leave a trailing newline; a Bearer header must not carry it.
    b64 = base64.b64encode(f"{KEY_A2}\n".encode()).decode()
    secret = make_secret("openai-keys", {"k1": f"  {KEY_A1}\r\n"}, data={"k2": b64})
    cfg = render(make_chain(make_entry("openai")), by_name(openai_pool()), by_name(secret)).config
    assert [c.key for c in cfg.pools[0].credentials] == [KEY_A1, KEY_A2]
    assert cfg.pools[0].credentials[0].fingerprint == fingerprint(KEY_A1)


def test_base64_data_is_decoded_and_string_data_wins() -> None:
    secret = make_secret(
        "openai-keys",
        {"k2": KEY_A2},
        data={"k1": base64.b64encode(KEY_A1.encode()).decode(), "k2": base64.b64encode(b"old").decode()},
    )
    cfg = render(make_chain(make_entry("openai")), by_name(openai_pool()), by_name(secret)).config
    assert [c.key for c in cfg.pools[0].credentials] == [KEY_A1, KEY_A2]


def test_invalid_base64_data_counts_as_a_missing_key() -> None:
    secret = make_secret("openai-keys", {"k1": KEY_A1}, data={"k2": KEY_A2})  # not base64: has '-'
    result = render(make_chain(make_entry("openai")), by_name(openai_pool()), by_name(secret))
    assert reasons(result) == [(None, "a2", SECRET_KEY_MISSING)]
    assert all(KEY_A2 not in x.message for x in result.config.excluded)


# --- fingerprints and hygiene -----------------------------------------------------------------------


def test_fingerprints_are_stable_distinct_and_not_the_key() -> None:
    first = two_provider_render().config
    second = two_provider_render().config
    fps = [c.fingerprint for p in first.pools for c in p.credentials]
    assert fps == [c.fingerprint for p in second.pools for c in p.credentials]
    assert len(set(fps)) == len(fps)
    for fp in fps:
        assert fp.startswith("sha256:")
        assert len(fp) == len("sha256:") + 12
        for key in ALL_KEYS:
            assert key not in fp
            assert key[-8:] not in fp
    assert fingerprint(KEY_A1) == fingerprint(KEY_A1)
    assert fingerprint(KEY_A1) != fingerprint(KEY_A2)


def test_render_is_deterministic() -> None:
    assert two_provider_render().config.to_json() == two_provider_render().config.to_json()


def test_no_key_in_reprs_or_exclusions() -> None:
    chain = make_chain(make_entry("openai"), make_entry("openrouter", pool="openai"))
    secret = make_secret("openai-keys", {"k1": KEY_A1, "k2": f" {KEY_A2} "})
    result = render(chain, by_name(openai_pool()), by_name(secret))
    shown = " ".join(
        [repr(result), str(result.config), repr(result.config)]
        + [repr(p) for p in result.config.pools]
        + [x.message for x in result.config.excluded]
    )
    for key in ALL_KEYS:
        assert key not in shown
    assert "a1" in shown  # credentials are identified by name
