"""Small builders for rendered configs, shared by unit and integration tests."""

from __future__ import annotations

from typing import Any

from keyroute.core.config import SidecarConfig, fingerprint


def cred(name: str, key: str | None = None, **extra: Any) -> dict[str, Any]:
    key = key or f"sk-test-{name}-0123456789abcdef"
    return {
        "name": name,
        "key": key,
        "fingerprint": fingerprint(key),
        "priority": extra.pop("priority", 0),
        **extra,
    }


def pool(name: str, provider: str, *creds: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": provider, "credentials": list(creds), **extra}


def entry(name: str, provider: str, base_url: str, pool_name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": provider, "baseURL": base_url, "pool": pool_name, **extra}


def config(entries: list[dict[str, Any]], pools: list[dict[str, Any]], **extra: Any) -> SidecarConfig:
    data: dict[str, Any] = {
        "chain": {"name": "agents", "namespace": "default"},
        "entries": entries,
        "pools": pools,
    }
    data.update(extra)
    return SidecarConfig.parse(data)


def two_providers(
    primary_url: str = "http://primary.test/v1",
    fallback_url: str = "http://fallback.test/v1",
    *,
    primary_keys: int = 2,
    fallback_keys: int = 2,
    **extra: Any,
) -> SidecarConfig:
    """The seed shape: an `acme` primary and a `backup` fallback, each with its own pool."""
    return config(
        [
            entry("acme", "acme", primary_url, "acme-keys"),
            entry("backup", "backup", fallback_url, "backup-keys"),
        ],
        [
            pool("acme-keys", "acme", *[cred(f"acme-{i}", priority=i) for i in range(1, primary_keys + 1)]),
            pool(
                "backup-keys",
                "backup",
                *[cred(f"backup-{i}", priority=i) for i in range(1, fallback_keys + 1)],
            ),
        ],
        **extra,
    )
