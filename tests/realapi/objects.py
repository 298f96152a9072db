"""Manifests and status readers for the realapi tests (what a user would ``kubectl apply`` and read)."""

from __future__ import annotations

import base64
import json
from typing import Any

API = "keyroute.dev/v1alpha1"


def secret(name: str, **values: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": values}


def pool(name: str, provider: str, *creds: tuple[str, str, str], **spec: Any) -> dict[str, Any]:
    """Credentials are (credential name, Secret name, Secret key)."""
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


def chain(name: str, *entries: tuple[str, str, str, str], **spec: Any) -> dict[str, Any]:
    """Entries are (entry name, provider, base URL, pool name)."""
    return {
        "apiVersion": API,
        "kind": "ProviderChain",
        "metadata": {"name": name},
        "spec": {
            "providers": [
                {"name": n, "provider": p, "baseURL": url, "credentialPoolRef": {"name": pl}}
                for n, p, url, pl in entries
            ],
            **spec,
        },
    }


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition ``type_`` of ``obj``'s status, or ``{}``."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c  # type: ignore[no-any-return]
    return {}


def row(pool_obj: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """The ``status.credentials`` row of credential ``name``, or ``{}``."""
    for r in ((pool_obj or {}).get("status") or {}).get("credentials") or []:
        if r["name"] == name:
            return r  # type: ignore[no-any-return]
    return {}


def config_of(secret_obj: dict[str, Any] | None) -> dict[str, Any]:
    """The sidecar config a rendered ``<chain>-keyroute`` Secret holds."""
    assert secret_obj is not None, "no config Secret"
    return json.loads(base64.b64decode(secret_obj["data"]["config.json"]))  # type: ignore[no-any-return]
