"""The one place keyroute speaks HTTP to the Kubernetes API (besides kopf itself).

Building a request is pure (paths, bodies); sending it is :class:`Kube`, a thin aiohttp client that
authenticates with the same connection info kopf logged in with (service account in a cluster,
kubeconfig outside), so the operator and, later, the sidecar's reporter need no second client
library. Errors carry the status and the API's ``reason``, never a body that could hold a Secret.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp

CORE = ("", "v1")
KEYROUTE = ("keyroute.dev", "v1alpha1")


def path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None,
    name: str | None = None,
    sub: str | None = None,
) -> str:
    """``/api/v1/namespaces/ns/secrets/name`` or ``/apis/group/version/namespaces/ns/plural/name/status``."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    out = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{name}"
    if sub:
        out += f"/{sub}"
    return out


class ApiError(Exception):
    """A non-2xx answer. ``str()`` names the request and the API's reason only."""

    def __init__(self, method: str, url_path: str, status: int, reason: str):
        super().__init__(f"{method} {url_path}: {status} {reason}")
        self.status = status
        self.reason = reason


@dataclass
class Kube:
    """A minimal async Kubernetes API client."""

    server: str
    headers: dict[str, str]
    ssl_context: ssl.SSLContext | bool | None = None
    _session: aiohttp.ClientSession | None = None

    @classmethod
    def from_connection(cls, info: Any) -> Kube:
        """Build from kopf's ``ConnectionInfo`` (duck-typed: this module does not import kopf)."""
        headers: dict[str, str] = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            creds = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {creds}"
        ctx: ssl.SSLContext | bool | None = None
        if info.server.startswith("https"):
            if info.insecure:
                ctx = False
            else:
                ctx = ssl.create_default_context(cafile=_path(info.ca_path))
                if info.ca_data:
                    data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
                    if "BEGIN CERTIFICATE" not in data:
                        data = base64.b64decode(data).decode()
                    ctx.load_verify_locations(cadata=data)
                cert = _path(info.certificate_path)
                if cert:
                    ctx.load_cert_chain(cert, _path(info.private_key_path))
        return cls(server=info.server.rstrip("/"), headers=headers, ssl_context=ctx)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=30, sock_connect=5)
            )
        return self._session

    async def request(
        self, method: str, url_path: str, body: Any = None, *, content_type: str = "application/json"
    ) -> dict[str, Any]:
        """Send one request; raise :class:`ApiError` on a non-2xx answer."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self._client().request(
            method,
            self.server + url_path,
            data=data,
            headers=headers,
            ssl=self.ssl_context if self.ssl_context is not None else True,
        ) as resp:
            payload = await resp.read()
            if resp.status >= 400:
                reason = resp.reason or ""
                with contextlib.suppress(ValueError, AttributeError):
                    reason = str(json.loads(payload).get("reason") or reason)
                raise ApiError(method, url_path, resp.status, reason)
            if not payload:
                return {}
            result = json.loads(payload)
            return result if isinstance(result, dict) else {}

    async def get(self, url_path: str) -> dict[str, Any] | None:
        """The object at ``url_path``, or ``None`` if it does not exist."""
        try:
            return await self.request("GET", url_path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, url_path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", url_path, body)

    async def merge_patch(self, url_path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", url_path, body, content_type="application/merge-patch+json")

    async def delete(self, url_path: str) -> None:
        try:
            await self.request("DELETE", url_path)
        except ApiError as e:
            if e.status != 404:
                raise


def _path(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
