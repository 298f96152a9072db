"""The CRD models (docs/resources.md): defaults, and the mistakes a hand-written manifest must be stopped at."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from keyroute.core.classes import ErrorClass
from keyroute.core.config import describe_validation_error
from keyroute.core.resources import (
    ApiStyle,
    CredentialPool,
    ProviderChain,
    Secret,
    Strategy,
    parse_object,
)

FAKE_KEY = "sk-test-KEYROUTE-SECRET-0001"


def pool_doc(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider": "openai",
        "credentials": [{"name": "k1", "secretRef": {"name": "openai-keys", "key": "key-1"}}],
    }
    body.update(spec)
    return {
        "apiVersion": "keyroute.dev/v1alpha1",
        "kind": "CredentialPool",
        "metadata": {"name": "openai", "namespace": "team-a"},
        "spec": body,
    }


def entry(provider: str = "openai", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "provider": provider,
        "baseURL": f"https://{provider}.example/v1",
        "credentialPoolRef": {"name": provider},
    }
    out.update(extra)
    return out


def chain_doc(*entries: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"providers": list(entries) or [entry()]}
    body.update(spec)
    return {
        "apiVersion": "keyroute.dev/v1alpha1",
        "kind": "ProviderChain",
        "metadata": {"name": "agents"},
        "spec": body,
    }


def error_text(doc: dict[str, Any], model: type[CredentialPool] | type[ProviderChain]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(doc)
    return describe_validation_error(info.value, input_names=True)


# --- CredentialPool ---------------------------------------------------------------------------------


def test_pool_defaults() -> None:
    pool = CredentialPool.model_validate(pool_doc())
    assert pool.name == "openai"
    assert pool.namespace == "team-a"
    spec = pool.spec
    assert spec.strategy is Strategy.FILL_FIRST
    assert spec.share_cooldowns is True
    assert (spec.cooldowns.rate_limited, spec.cooldowns.billing) == ("60s", "1h")
    assert (spec.cooldowns.auth_failed, spec.cooldowns.max) == ("5m", "1h")
    cred = spec.credentials[0]
    assert (cred.secret_ref.name, cred.secret_ref.key) == ("openai-keys", "key-1")
    assert cred.priority is None
    assert cred.base_url is None


@pytest.mark.parametrize("strategy", ["FillFirst", "RoundRobin", "LeastUsed", "Random"])
def test_every_strategy_is_accepted(strategy: str) -> None:
    assert CredentialPool.model_validate(pool_doc(strategy=strategy)).spec.strategy == strategy


@pytest.mark.parametrize("strategy", ["Sticky", "fillfirst", "", "round_robin"])
def test_unknown_strategy_is_rejected(strategy: str) -> None:
    text = error_text(pool_doc(strategy=strategy), CredentialPool)
    assert "spec.strategy" in text
    assert "FillFirst" in text  # the message lists what is allowed


def test_duplicate_credential_names_are_rejected() -> None:
    creds = [
        {"name": "k1", "secretRef": {"name": "s", "key": "a"}},
        {"name": "k2", "secretRef": {"name": "s", "key": "b"}},
        {"name": "k1", "secretRef": {"name": "s", "key": "c"}},
    ]
    text = error_text(pool_doc(credentials=creds), CredentialPool)
    assert "duplicate credential names: k1" in text


def test_a_pool_needs_at_least_one_credential() -> None:
    assert "spec.credentials" in error_text(pool_doc(credentials=[]), CredentialPool)


def test_credential_base_url_is_validated_and_normalised() -> None:
    creds = [
        {"name": "k1", "secretRef": {"name": "s", "key": "a"}, "baseURL": "https://eu.openai.example/v1/"},
    ]
    pool = CredentialPool.model_validate(pool_doc(credentials=creds))
    assert pool.spec.credentials[0].base_url == "https://eu.openai.example/v1"


@pytest.mark.parametrize(
    "url", ["api.openai.com/v1", "ftp://api.openai.com", "https://", "https:// spaced.example", "http:/x"]
)
def test_bad_url_is_rejected(url: str) -> None:
    creds = [{"name": "k1", "secretRef": {"name": "s", "key": "a"}, "baseURL": url}]
    assert "spec.credentials.0.baseURL" in error_text(pool_doc(credentials=creds), CredentialPool)
    assert "spec.providers.0.baseURL" in error_text(chain_doc(entry(baseURL=url)), ProviderChain)


@pytest.mark.parametrize("value", ["60", "1 minute", "-5s", "5x", "1h 30m", ""])
def test_bad_duration_is_rejected(value: str) -> None:
    text = error_text(pool_doc(cooldowns={"rateLimited": value}), CredentialPool)
    assert "spec.cooldowns.rateLimited" in text
    text = error_text(chain_doc(fallback={"restoreAfter": value}), ProviderChain)
    assert "spec.fallback.restoreAfter" in text
    text = error_text(chain_doc(timeouts={"firstByte": value}), ProviderChain)
    assert "spec.timeouts.firstByte" in text


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (pool_doc(stratgy="RoundRobin"), "spec.stratgy"),
        (pool_doc(cooldowns={"ratelimited": "30s"}), "spec.cooldowns.ratelimited"),
        (
            pool_doc(credentials=[{"name": "k1", "secretRef": {"name": "s", "key": "a"}, "prio": 1}]),
            "spec.credentials.0.prio",
        ),
    ],
)
def test_unknown_pool_field_is_rejected(doc: dict[str, Any], where: str) -> None:
    text = error_text(doc, CredentialPool)
    assert where in text
    assert "Extra inputs are not permitted" in text


@pytest.mark.parametrize("name", ["Openai", "open_ai", "-openai", "openai-", "", "a" * 64])
def test_bad_names_are_rejected(name: str) -> None:
    creds = [{"name": name, "secretRef": {"name": "s", "key": "a"}}]
    assert "spec.credentials.0.name" in error_text(pool_doc(credentials=creds), CredentialPool)


def test_status_tolerates_fields_from_newer_versions() -> None:
    doc = pool_doc()
    doc["status"] = {"available": 1, "total": 1, "somethingNew": True, "credentials": []}
    pool = CredentialPool.model_validate(doc)
    assert pool.status is not None
    assert pool.status.available == 1


# --- ProviderChain ----------------------------------------------------------------------------------


def test_chain_defaults() -> None:
    chain = ProviderChain.model_validate(chain_doc())
    assert chain.namespace == "default"
    e = chain.spec.providers[0]
    assert e.name is None
    assert e.entry_name == "openai"
    assert e.api is ApiStyle.OPENAI
    assert e.models == {}
    assert e.timeouts is None
    fb = chain.spec.fallback
    assert (fb.restore_after, fb.max_wait, fb.triggers, fb.context_length) == ("60s", "5s", None, [])
    assert chain.spec.timeouts.connect is None  # resolved at render time


def test_chain_fields_parse() -> None:
    doc = chain_doc(
        entry("openai", baseURL="https://api.openai.com/v1/"),
        entry("anthropic", name="claude", api="anthropic", models={"gpt-4o": "claude-sonnet-4-5", "*": "x"}),
        fallback={"restoreAfter": "2m", "triggers": ["RateLimited", "Timeout"], "contextLength": ["claude"]},
    )
    chain = ProviderChain.model_validate(doc)
    primary, second = chain.spec.providers
    assert primary.base_url == "https://api.openai.com/v1"
    assert second.entry_name == "claude"
    assert second.api is ApiStyle.ANTHROPIC
    assert second.models["*"] == "x"
    assert chain.spec.fallback.triggers == [ErrorClass.RATE_LIMITED, ErrorClass.TIMEOUT]


def test_duplicate_entry_names_are_rejected() -> None:
    # Two entries of the same provider without names both default to the provider's name.
    text = error_text(chain_doc(entry("openai"), entry("openai")), ProviderChain)
    assert "duplicate provider entry names: openai" in text


def test_same_provider_twice_is_fine_with_distinct_names() -> None:
    doc = chain_doc(entry("openai"), entry("openai", name="openai-eu"))
    assert [p.entry_name for p in ProviderChain.model_validate(doc).spec.providers] == ["openai", "openai-eu"]


def test_explicit_name_colliding_with_a_default_name_is_rejected() -> None:
    text = error_text(chain_doc(entry("openai"), entry("openrouter", name="openai")), ProviderChain)
    assert "duplicate provider entry names: openai" in text


def test_context_length_must_name_known_entries() -> None:
    doc = chain_doc(entry("openai"), entry("anthropic"), fallback={"contextLength": ["anthropic", "gemini"]})
    text = error_text(doc, ProviderChain)
    assert "fallback.contextLength names unknown entries: gemini" in text


def test_context_length_uses_entry_names_not_providers() -> None:
    doc = chain_doc(entry("openai"), entry("anthropic", name="big"), fallback={"contextLength": ["big"]})
    assert ProviderChain.model_validate(doc).spec.fallback.context_length == ["big"]


def test_unknown_error_class_in_fallback_on_is_rejected() -> None:
    assert "spec.fallback.triggers.0" in error_text(
        chain_doc(fallback={"triggers": ["TooSlow"]}), ProviderChain
    )


def test_unknown_api_style_is_rejected() -> None:
    assert "spec.providers.0.api" in error_text(chain_doc(entry(api="gemini")), ProviderChain)


def test_a_chain_needs_a_provider() -> None:
    assert "spec.providers" in error_text(chain_doc(providers=[]), ProviderChain)


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"fallbacks": {}}, "spec.fallbacks"),
        ({"fallback": {"restore": "1m"}}, "spec.fallback.restore"),
        ({"timeouts": {"firstbyte": "1m"}}, "spec.timeouts.firstbyte"),
    ],
)
def test_unknown_chain_field_is_rejected(spec: dict[str, Any], where: str) -> None:
    assert where in error_text(chain_doc(**spec), ProviderChain)


def test_unknown_entry_field_is_rejected() -> None:
    text = error_text(chain_doc(entry(baseUrl="https://x.example")), ProviderChain)
    assert "spec.providers.0.baseUrl" in text


def test_missing_required_fields_are_named() -> None:
    doc = chain_doc({"provider": "openai"})
    text = error_text(doc, ProviderChain)
    assert "spec.providers.0.baseURL: Field required" in text
    assert "spec.providers.0.credentialPoolRef: Field required" in text


# --- Secret and parse_object ------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_secret_values_decode_data_and_prefer_string_data() -> None:
    secret = Secret.model_validate(
        {
            "metadata": {"name": "keys"},
            "data": {"a": _b64("from-data"), "b": _b64("b-from-data"), "bad": "not base64!"},
            "stringData": {"b": "b-from-stringData", "c": "plain"},
        }
    )
    assert secret.values() == {"a": "from-data", "b": "b-from-stringData", "c": "plain"}


def test_secret_repr_and_str_never_show_values() -> None:
    secret = Secret.model_validate(
        {"metadata": {"name": "keys"}, "data": {"a": _b64(FAKE_KEY)}, "stringData": {"b": FAKE_KEY}}
    )
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"s": secret})):
        assert FAKE_KEY not in text
        assert _b64(FAKE_KEY) not in text
        assert "keys=['a', 'b']" in text


def test_secret_pretty_printers_never_show_values() -> None:
    # Any: pydantic types these hooks on its Representation mixin, which mypy will not bind to Secret.
    secret: Any = Secret.model_validate({"metadata": {"name": "keys"}, "data": {"a": _b64(FAKE_KEY)}})
    shown = repr(list(secret.__rich_repr__())) + secret.__repr_str__(" ")
    assert _b64(FAKE_KEY) not in shown


def test_parse_object_dispatches_on_kind() -> None:
    assert isinstance(parse_object(pool_doc()), CredentialPool)
    assert isinstance(parse_object(chain_doc()), ProviderChain)
    assert isinstance(parse_object({"kind": "Secret", "metadata": {"name": "s"}}), Secret)
    assert parse_object({"kind": "Deployment", "metadata": {"name": "x"}}) is None
    assert parse_object({"metadata": {"name": "x"}}) is None


def test_object_metadata_keeps_unknown_fields() -> None:
    doc = chain_doc()
    doc["metadata"].update({"creationTimestamp": "2026-01-01T00:00:00Z", "managedFields": []})
    assert ProviderChain.model_validate(doc).name == "agents"
