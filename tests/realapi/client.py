"""A small async client for tests on the real API server: admin requests, no keyroute code.

Tests set things up and look at them with this (or with ``kubectl``, as a user would); the code
under test talks to the server with its own client and its own credentials::

    await api.create({"apiVersion": "keyroute.dev/v1alpha1", "kind": "CredentialPool", ...})
    await api.get("keyroute.dev/v1alpha1", "credentialpools", ns, "openai")   # dict | None
    await api.patch("v1", "secrets", ns, "keys", {"stringData": {"k": "v"}})  # merge patch
    await api.delete("keyroute.dev/v1alpha1", "providerchains", ns, "agents")
    await api.events(ns, involving="openai")                                   # oldest first
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp

Json = dict[str, Any]

KINDS = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Pod"): ("pods", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "Event"): ("events", True),
    ("keyroute.dev/v1alpha1", "CredentialPool"): ("credentialpools", True),
    ("keyroute.dev/v1alpha1", "ProviderChain"): ("providerchains", True),
    ("coordination.k8s.io/v1", "Lease"): ("leases", True),
}


class ApiStatusError(Exception):
    """A non-2xx answer (404 excepted where the helper returns ``None``); ``body`` is the ``Status``."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> {status}: {message}")
        self.status = status
        self.body = body


def api_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/...`` or ``/apis/group/version/...`` for a resource."""
    parts = ["/api/v1" if api_version == "v1" else f"/apis/{api_version}"]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


class Api:
    """Admin requests to the test API server over one aiohttp session."""

    def __init__(self, server: str, ssl_context: ssl.SSLContext) -> None:
        self.server = server
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(base_url=self.server, timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        """``(status, decoded body)``; raises :class:`ApiStatusError` on errors other than 404."""
        assert self._session is not None, "use Api as an async context manager"
        if body is not None:
            kwargs["json"] = body
        async with self._session.request(method, path, ssl=self._ssl, **kwargs) as response:
            text = await response.text()
            try:
                decoded: Any = await response.json(content_type=None) if text else None
            except ValueError:
                decoded = text
            if response.status >= 400 and response.status != 404:
                raise ApiStatusError(method, path, response.status, decoded)
            return response.status, decoded

    async def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> Json:
        """Create ``obj`` (in ``namespace`` unless its metadata names one)."""
        plural, namespaced = KINDS[(obj["apiVersion"], obj["kind"])]
        ns = (obj.get("metadata") or {}).get("namespace") or namespace if namespaced else None
        path = api_path(obj["apiVersion"], plural, ns)
        status, created = await self.request("POST", path, dict(obj))
        if status == 404:
            raise ApiStatusError("POST", path, status, created)
        return dict(created)

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Json | None:
        status, body = await self.request("GET", api_path(api_version, plural, namespace, name))
        return None if status == 404 else dict(body)

    async def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> Json:
        """Merge-patch the object (the server bumps ``generation`` on spec changes itself)."""
        path = api_path(api_version, plural, namespace, name, subresource)
        headers = {"Content-Type": "application/merge-patch+json"}
        status, body = await self.request("PATCH", path, dict(patch), headers=headers)
        if status == 404:
            raise ApiStatusError("PATCH", path, status, body)
        return dict(body)

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> Json | None:
        """Delete the object; its last state, or ``None`` if there was none."""
        status, body = await self.request("DELETE", api_path(api_version, plural, namespace, name))
        return None if status == 404 else dict(body)

    async def list(
        self, api_version: str, plural: str, namespace: str | None = None, **params: str
    ) -> list[Json]:
        status, body = await self.request("GET", api_path(api_version, plural, namespace), params=params)
        if status == 404:
            raise ApiStatusError("GET", api_path(api_version, plural, namespace), status, body)
        return list(body.get("items") or [])

    async def events(self, namespace: str, *, involving: str | None = None) -> list[Json]:
        """Core v1 Events of ``namespace``, oldest first; ``involving`` keeps one object's only."""
        items = await self.list("v1", "events", namespace)
        if involving is not None:
            items = [e for e in items if (e.get("involvedObject") or {}).get("name") == involving]
        return sorted(items, key=lambda e: (e["metadata"].get("creationTimestamp") or "", e["metadata"]["name"]))
