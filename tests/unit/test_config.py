"""The rendered sidecar config: round trip, content hash, rejection of bad configs, and key hygiene.

The sidecar loads this file on every change and must reject a corrupt or hand-edited config with a
message that names what is wrong but never a key value (docs/sidecar.md and secrets hygiene (docs/README.md)).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from keyroute.core.config import (
    CONFIG_VERSION,
    ConfigError,
    CredentialConfig,
    FallbackConfig,
    PoolConfig,
    SidecarConfig,
    describe_validation_error,
    fingerprint,
    parse_config,
)
from keyroute.core.render import render
from keyroute.core.resources import CredentialPool, ProviderChain, Secret

KEY_1 = "sk-test-KEYROUTE-SECRET-0001"
KEY_2 = "sk-test-KEYROUTE-SECRET-0002"
KEY_3 = "sk-or-test-KEYROUTE-SECRET-0003"


def config_dict(key_1: str = KEY_1, key_2: str = KEY_2, key_3: str = KEY_3) -> dict[str, Any]:
    """A valid config as the JSON object the operator writes: two entries, two pools."""
    return {
        "version": CONFIG_VERSION,
        "chain": {"name": "agents", "namespace": "default"},
        "entries": [
            {
                "name": "openai",
                "provider": "openai",
                "baseURL": "https://api.openai.example/v1",
                "pool": "openai",
            },
            {
                "name": "openrouter",
                "provider": "openrouter",
                "baseURL": "https://openrouter.example/api/v1",
                "pool": "openrouter",
                "models": {"gpt-4o": "openai/gpt-4o"},
            },
        ],
        "pools": [
            {
                "name": "openai",
                "provider": "openai",
                "credentials": [
                    {"name": "a1", "key": key_1, "fingerprint": fingerprint(key_1), "priority": 0},
                    {"name": "a2", "key": key_2, "fingerprint": fingerprint(key_2), "priority": 1},
                ],
            },
            {
                "name": "openrouter",
                "provider": "openrouter",
                "strategy": "RoundRobin",
                "credentials": [
                    {"name": "b1", "key": key_3, "fingerprint": fingerprint(key_3), "priority": 0}
                ],
            },
        ],
        "fallback": {"restoreAfter": 60, "maxWait": 5},
    }


def as_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc)


def rendered(key: str = KEY_1, models: dict[str, str] | None = None) -> SidecarConfig:
    chain = ProviderChain.model_validate(
        {
            "metadata": {"name": "agents"},
            "spec": {
                "providers": [
                    {
                        "provider": "openai",
                        "baseURL": "https://api.openai.example/v1",
                        "credentialPoolRef": {"name": "openai"},
                        "models": models or {},
                    }
                ]
            },
        }
    )
    pool = CredentialPool.model_validate(
        {
            "metadata": {"name": "openai"},
            "spec": {
                "provider": "openai",
                "credentials": [{"name": "a1", "secretRef": {"name": "s", "key": "k"}}],
            },
        }
    )
    secret = Secret.model_validate({"metadata": {"name": "s"}, "stringData": {"k": key}})
    return render(chain, {"openai": pool}, {"s": secret}).config


# --- round trip and hash ----------------------------------------------------------------------------


def test_parse_config_round_trips_to_json() -> None:
    cfg = parse_config(as_text(config_dict()))
    again = parse_config(cfg.to_json())
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    assert [e.name for e in again.entries] == ["openai", "openrouter"]
    assert again.pools[0].credentials[1].key == KEY_2


def test_rendered_config_round_trips() -> None:
    cfg = rendered()
    assert parse_config(cfg.to_json()) == cfg
    assert parse_config(cfg.to_json().encode()) == cfg  # the file is read as bytes


def test_to_json_is_canonical() -> None:
    text = rendered().to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=1)
    assert '"baseURL"' in text  # aliases, as the file is written
    assert KEY_1 in text  # the config carries keys inline: it only ever lives in a Secret


def test_content_hash_is_stable_for_equal_configs() -> None:
    assert rendered().content_hash() == rendered().content_hash()
    # Mapping order does not matter: the JSON is canonical.
    a = rendered(models={"gpt-4o": "x", "gpt-4o-mini": "y"})
    b = rendered(models={"gpt-4o-mini": "y", "gpt-4o": "x"})
    assert a.content_hash() == b.content_hash()
    assert len(a.content_hash()) == 16


def test_content_hash_changes_when_a_key_changes() -> None:
    assert rendered(KEY_1).content_hash() != rendered(KEY_2).content_hash()
    cfg1 = parse_config(as_text(config_dict()))
    cfg2 = parse_config(as_text(config_dict(key_3="sk-or-test-KEYROUTE-SECRET-0004")))
    assert cfg1.content_hash() != cfg2.content_hash()


def test_content_hash_changes_with_any_setting() -> None:
    base = config_dict()
    changed = config_dict()
    changed["pools"][0]["strategy"] = "LeastUsed"
    assert parse_config(as_text(base)).content_hash() != parse_config(as_text(changed)).content_hash()


def test_content_hash_does_not_contain_the_key() -> None:
    h = rendered().content_hash()
    assert KEY_1 not in h
    assert h not in rendered().to_json()


# --- rejection --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ('{"version": 1,', "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('"config"', "must be a JSON object"),
        ("null", "must be a JSON object"),
    ],
)
def test_malformed_config_is_rejected(text: str | bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(text)


def _broken(mutate: Any) -> dict[str, Any]:
    doc = config_dict()
    mutate(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (_broken(lambda d: d.update(version=2)), "unsupported config version 2"),
        (_broken(lambda d: d.update(version=0)), "unsupported config version 0"),
        (
            _broken(lambda d: d["entries"][1].update(pool="openai")),
            "entry openrouter \\(provider openrouter\\) names pool openai bound to provider openai",
        ),
        (_broken(lambda d: d["entries"][1].update(pool="gone")), "pool gone is not in the config"),
        (_broken(lambda d: d["pools"].append(d["pools"][0])), "duplicate pool names"),
        (_broken(lambda d: d["entries"].append(d["entries"][0])), "duplicate entry names"),
        (
            _broken(lambda d: d["pools"][0]["credentials"].append(d["pools"][0]["credentials"][0])),
            "duplicate credential names",
        ),
        (_broken(lambda d: d["fallback"].update(contextLength=["gemini"])), "contextLength"),
        (_broken(lambda d: d["pools"][0].update(credentials=[])), "pools.0.credentials"),
        (_broken(lambda d: d["pools"][0]["credentials"][0].update(key="")), "pools.0.credentials.0.key"),
        (_broken(lambda d: d["pools"][0].update(strategy="Sticky")), "pools.0.strategy"),
        (_broken(lambda d: d["entries"][0].update(timeouts={"connect": 0})), "entries.0.timeouts.connect"),
        (_broken(lambda d: d.update(requestTimeout=-1)), "requestTimeout"),
        (_broken(lambda d: d.update(extra=True)), "<key>: Extra inputs are not permitted"),
        (_broken(lambda d: d.pop("chain")), "chain: Field required"),
        # The same wording as the pydantic models this validator replaced (issue 13).
        (
            _broken(lambda d: d["pools"][0]["credentials"][0].update(priority="1")),
            "pools.0.credentials.0.priority: Input should be a valid integer, unable to parse string",
        ),
        (
            _broken(lambda d: d["entries"][0].update(timeouts={"idle": "30s"})),
            "entries.0.timeouts.idle: Input should be a valid number, unable to parse string as a number",
        ),
        (
            _broken(lambda d: d["pools"][0].update(shareCooldowns="yes")),
            "pools.0.shareCooldowns: Input should be a valid boolean, unable to interpret input",
        ),
        (
            _broken(lambda d: d["fallback"].update(restoreAfter=True)),
            "fallback.restoreAfter: Input should be a valid number",
        ),
        (
            _broken(lambda d: d["pools"][0].update(strategy="Sticky")),
            "pools.0.strategy: Input should be 'FillFirst', 'RoundRobin', 'LeastUsed' or 'Random'",
        ),
        (
            _broken(lambda d: d["fallback"].update(triggers=["Nope"])),
            "fallback.triggers.0: Input should be 'RateLimited', ",
        ),
        (_broken(lambda d: d["fallback"].update(maxAttempts=0)), "greater than or equal to 1"),
        (_broken(lambda d: d["entries"][0].pop("pool")), "entries.0.pool: Field required"),
        (_broken(lambda d: d.update(entries={})), "entries: Input should be a valid list"),
        (_broken(lambda d: d.update(chain=[])), "chain: Input should be a valid dictionary"),
        (_broken(lambda d: d["entries"][0].update(models={"m": 5})), "entries.0.models.<key>: Input should be"),
        (
            _broken(lambda d: d["pools"][0]["credentials"].append(d["pools"][0]["credentials"][0])),
            "pools.0: Value error, pool openai: duplicate credential names",
        ),
        (_broken(lambda d: d.update(version=2)), "\\(root\\): Value error, unsupported config version 2"),
    ],
)
def test_invalid_config_is_rejected(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(as_text(doc))


def test_every_invalid_place_is_named_in_one_error() -> None:
    doc = _broken(lambda d: d.update(requestTimeout=0))
    doc["pools"][1]["credentials"][0]["priority"] = None
    with pytest.raises(ConfigError) as info:
        parse_config(as_text(doc))
    assert str(info.value) == (
        "config is invalid: pools.1.credentials.0.priority: Input should be a valid integer; "
        "requestTimeout: Input should be greater than 0"
    )


def test_fields_are_read_by_their_json_names_or_their_own() -> None:
    by_alias = parse_config(as_text(_broken(lambda d: d["fallback"].update(maxAttempts=3))))
    by_name = parse_config(as_text(_broken(lambda d: d["fallback"].update(max_attempts=3))))
    assert by_alias == by_name
    assert by_name.fallback.max_attempts == 3


def test_whole_numbers_are_held_as_floats_however_the_config_was_made() -> None:
    cfg = parse_config(as_text(config_dict()))
    assert type(cfg.fallback.restore_after) is float
    built = SidecarConfig(
        chain=cfg.chain, entries=cfg.entries, pools=cfg.pools, fallback=FallbackConfig(max_wait=5)
    )
    assert type(built.fallback.max_wait) is float
    assert '"maxWait": 5.0' in built.to_json()


def test_the_content_hash_is_the_one_the_pydantic_models_gave() -> None:
    # Issue 13 replaced the config's pydantic models; the canonical JSON, and so the hash the
    # operator annotates each rendered Secret with, stayed byte for byte the same: an upgrade
    # rewrites no Secret and restarts no sidecar. (Computed with the models of commit 541db3d.)
    assert parse_config(as_text(config_dict())).content_hash() == "19aec9bdbee45a39"


def test_a_config_built_in_code_is_checked_too() -> None:
    cfg = parse_config(as_text(config_dict()))
    with pytest.raises(ValueError, match="duplicate entry names"):
        SidecarConfig(chain=cfg.chain, entries=[*cfg.entries, cfg.entries[0]], pools=cfg.pools)
    with pytest.raises(ValueError, match="duplicate credential names"):
        PoolConfig(name="p", provider="x", credentials=[cfg.pools[0].credentials[0]] * 2)


def test_the_sidecar_imports_no_pydantic() -> None:
    # Its idle memory (issue 13): pydantic and the resource models are ~11 MiB, and a sidecar
    # reading the operator's rendered config never needs them (local mode imports them on load).
    code = (
        "import sys, keyroute.cli, keyroute.sidecar.app, keyroute.sidecar.sources; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'kubernetes', 'kopf')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_config("{}")


# --- hygiene ----------------------------------------------------------------------------------------


def _leaks(err: BaseException) -> list[str]:
    shown = " ".join([str(err), repr(err), *map(str, err.args)])
    return [k for k in (KEY_1, KEY_2, KEY_3) if k in shown]


@pytest.mark.parametrize(
    "text",
    [
        # Keys in places that fail validation: the messages name the place, never the value.
        as_text(_broken(lambda d: d["pools"][0]["credentials"][0].update(priority=KEY_1))),
        as_text(_broken(lambda d: d["pools"][0].update(strategy=KEY_1))),
        as_text(_broken(lambda d: d["pools"][0]["credentials"][0].update(key=[KEY_1]))),
        as_text(_broken(lambda d: d["pools"][0]["credentials"][0].update(key={"value": KEY_1}))),
        as_text(_broken(lambda d: d["entries"][0].update(timeouts={"connect": KEY_1}))),
        as_text(_broken(lambda d: d["pools"][0].update(shareCooldowns=KEY_1))),
        as_text(_broken(lambda d: d.update(version=KEY_1))),
        # Valid keys in a config that is invalid for another reason.
        as_text(_broken(lambda d: d["entries"][1].update(pool="openai"))),
        as_text(_broken(lambda d: d.update(version=2))),
        as_text(_broken(lambda d: d["pools"][0]["credentials"].append(d["pools"][0]["credentials"][0]))),
        # Broken JSON right after a key.
        as_text(config_dict())[:-40],
        '{"pools": [{"credentials": [{"key": "' + KEY_1 + '" "name": "a1"}]}]}',
        '{"key": "' + KEY_1,
    ],
)
def test_config_errors_never_contain_a_key(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert _leaks(info.value) == []
    # Not chained either: pydantic's and json's own errors quote the input.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["entries"][0].update(models={KEY_1: 5}),
        lambda d: d["pools"][0]["credentials"][0].update({KEY_1: "x"}),
    ],
)
def test_config_errors_never_echo_a_key_written_as_a_map_key(mutate: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(as_text(_broken(mutate)))
    assert _leaks(info.value) == []


def test_describe_validation_error_drops_the_input() -> None:
    # The resources are still pydantic models; a Secret's data is key material.
    doc = {"metadata": {"name": "s"}, "stringData": {"k": [KEY_1]}}
    with pytest.raises(ValidationError) as info:
        Secret.model_validate(doc)
    assert KEY_1 in str(info.value)  # why describe_validation_error exists
    text = describe_validation_error(info.value)
    assert KEY_1 not in text
    assert "stringData.<key>" in text


def test_reprs_never_contain_a_key() -> None:
    cfg = parse_config(as_text(config_dict()))
    cred = cfg.pools[0].credentials[0]
    assert isinstance(cred, CredentialConfig)
    assert isinstance(cfg.pools[0], PoolConfig)
    shown = " ".join(
        [
            repr(cred),
            str(cred),
            repr(cfg.pools[0]),
            str(cfg.pools[0]),
            repr(cfg),
            str(cfg),
            f"{cfg!r}",
            repr(cfg.pools),
        ]
    )
    for key in (KEY_1, KEY_2, KEY_3):
        assert key not in shown
    assert "a1" in shown
    assert cred.fingerprint in shown


def test_fingerprint_is_short_stable_and_not_the_key() -> None:
    fp = fingerprint(KEY_1)
    assert fp == fingerprint(KEY_1)
    assert fp.startswith("sha256:")
    assert len(fp) == 19
    assert KEY_1 not in fp
    assert fp != fingerprint(KEY_1 + " ")
