"""The one place keyroute speaks HTTP to the Kubernetes API (besides kopf itself).

Building a request is pure (paths, bodies); sending it is :class:`Kube`, a thin aiohttp client that
authenticates with the same connection info kopf logged in with (service account in a cluster,
kubeconfig outside), so the operator and, later, the sidecar's reporter need no second client
library. Errors carry the status and the API's ``reason``, never a body that could hold a Secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yaml

from keyroute import __version__

log = logging.getLogger("keyroute.kube")

CORE = ("", "v1")
OPERATOR_AGENT = f"keyroute-operator/{__version__}"
SIDECAR_AGENT = f"keyroute-sidecar/{__version__}"
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
    headers: dict[str, str] = field(repr=False)  # Authorization
    ssl_context: ssl.SSLContext | bool | None = None
    # A projected ServiceAccount token is rotated by the kubelet: re-read it rather than keep it.
    token_file: str | None = None
    _session: aiohttp.ClientSession | None = None
    _token_read: float = field(default=0.0, repr=False)

    @classmethod
    def from_connection(cls, info: Any, *, user_agent: str = OPERATOR_AGENT) -> Kube:
        """Build from kopf's ``ConnectionInfo`` or a :class:`Connection` (duck-typed: no kopf import).
        ``user_agent`` tells the operator's requests from the sidecars' in audit logs (and in the
        RBAC test, which derives each role's verbs from what it really sent)."""
        headers: dict[str, str] = {"User-Agent": user_agent}
        token_file = getattr(info, "token_file", None)  # if set, _refresh_token sets Authorization
        if token_file is None and info.token:
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
                elif getattr(info, "certificate_data", None):
                    _load_cert_data(ctx, info.certificate_data, info.private_key_data)
        return cls(server=info.server.rstrip("/"), headers=headers, ssl_context=ctx, token_file=token_file)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _refresh_token(self) -> None:
        fresh = self._token_read and time.monotonic() - self._token_read < 60
        if not self.token_file or fresh:
            return
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as e:
            log.error("cannot read the ServiceAccount token", extra={"kr": {"error": type(e).__name__}})
            return
        self._token_read = time.monotonic()
        self.headers["Authorization"] = f"Bearer {token}"
        if self._session is not None:
            self._session.headers["Authorization"] = self.headers["Authorization"]

    def _client(self) -> aiohttp.ClientSession:
        self._refresh_token()
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

    async def watch(
        self, url_path: str, params: Mapping[str, str] | None = None, *, server_timeout: int = 290
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """List, then watch from the listing's resourceVersion: ``(type, object)`` pairs, ``type`` being
        ``LISTED`` for the listing, then ``ADDED`` / ``MODIFIED`` / ``DELETED``. Returns when the server
        ends the stream; raises :class:`ApiError` (410 when the version expired) or a connection error.
        Callers loop over it (:func:`watch_forever`)."""
        query = dict(params or {})
        listing = await self.request("GET", url_path + ("?" + urlencode(query) if query else ""))
        for item in listing.get("items") or []:
            if isinstance(item, dict):
                yield "LISTED", item
        version = (listing.get("metadata") or {}).get("resourceVersion")
        query.update(watch="true", timeoutSeconds=str(server_timeout), allowWatchBookmarks="true")
        if version:
            query["resourceVersion"] = str(version)
        async with self._client().get(
            f"{self.server}{url_path}?{urlencode(query)}",
            ssl=self.ssl_context if self.ssl_context is not None else True,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=server_timeout + 30),
        ) as resp:
            if resp.status >= 400:
                raise ApiError("WATCH", url_path, resp.status, resp.reason or "")
            async for line in resp.content:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("unreadable watch line", extra={"kr": {"path": url_path}})
                    continue
                kind, obj = event.get("type"), event.get("object")
                if kind == "ERROR":
                    code = obj.get("code", 500) if isinstance(obj, dict) else 500
                    raise ApiError("WATCH", url_path, int(code), str((obj or {}).get("reason", "")))
                if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                    yield kind, obj

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


async def watch_forever(
    kube: Kube,
    url_path: str,
    handle: Callable[[str, dict[str, Any]], Awaitable[None] | None],
    *,
    params: Mapping[str, str] | None = None,
    backoff: tuple[float, float] = (0.5, 30.0),
    what: str = "",
) -> None:
    """Keep a list-and-watch of ``url_path`` going until cancelled, re-listing after every break
    (a watch that ended, expired or failed): ``handle`` gets every object of each listing and every
    change. Failures are logged once per streak and retried with a doubling backoff."""
    delay = backoff[0]
    failing = False
    while True:
        try:
            async for kind, obj in kube.watch(url_path, params):
                result = handle(kind, obj)
                if result is not None:
                    await result
                if failing:
                    log.info("watch restored", extra={"kr": {"watch": what or url_path}})
                    failing = False
                delay = backoff[0]
        except asyncio.CancelledError:
            raise
        except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as e:
            if not failing:
                log.warning("watch failed; retrying", extra={"kr": {"watch": what or url_path, "error": str(e)}})
            failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff[1])
            continue
        await asyncio.sleep(backoff[0] / 10)  # a server that ends streams at once must not spin


# --- connecting from a sidecar: in-cluster or a kubeconfig -----------------------------------------

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class Connection:
    """How to reach the API server, with the attribute names of kopf's ``ConnectionInfo``."""

    server: str
    scheme: str | None = "Bearer"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False
    ca_path: str | None = None
    ca_data: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    certificate_data: str | None = field(default=None, repr=False)
    private_key_data: str | None = field(default=None, repr=False)
    namespace: str | None = None


class KubeconfigError(ValueError):
    """A kubeconfig keyroute cannot use. The message names fields, never credentials."""


def in_cluster(
    env: Mapping[str, str] | None = None, sa_dir: Path = SERVICE_ACCOUNT_DIR
) -> Connection | None:
    """The pod's ServiceAccount connection, or ``None`` outside a cluster (or with no token mounted)."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    token = sa_dir / "token"
    if not host or not token.is_file():
        return None
    if ":" in host:
        host = f"[{host}]"
    ns_file = sa_dir / "namespace"
    return Connection(
        server=f"https://{host}:{port}",
        token_file=str(token),
        ca_path=str(sa_dir / "ca.crt") if (sa_dir / "ca.crt").is_file() else None,
        namespace=ns_file.read_text().strip() if ns_file.is_file() else None,
    )


def from_kubeconfig(path: str | Path, context: str | None = None) -> Connection:
    """The connection of ``context`` (default: the current one) in a kubeconfig file.

    Tokens, client certificates (files or inline data), basic auth and ``insecure-skip-tls-verify``
    are understood; ``exec`` and ``auth-provider`` plugins are not (use a token for the sidecar).
    """
    base = Path(path).parent
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {type(e).__name__}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a mapping")

    def named(section: str, name: str | None) -> dict[str, Any]:
        for item in doc.get(section) or []:
            if isinstance(item, dict) and item.get("name") == name:
                body = item.get(section[:-1])
                return body if isinstance(body, dict) else {}
        raise KubeconfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

    ctx = named("contexts", context or doc.get("current-context"))
    cluster = named("clusters", ctx.get("cluster"))
    user = named("users", ctx.get("user")) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise KubeconfigError(f"kubeconfig {path}: exec and auth-provider users are not supported")
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeconfigError(f"kubeconfig {path}: the cluster has no server")

    def file(value: Any) -> str | None:
        return str(base / value) if isinstance(value, str) and value else None

    def data(value: Any) -> str | None:
        return base64.b64decode(value).decode() if isinstance(value, str) and value else None

    return Connection(
        server=server,
        token=user.get("token"),
        token_file=file(user.get("tokenFile")),
        username=user.get("username"),
        password=user.get("password"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        ca_path=file(cluster.get("certificate-authority")),
        ca_data=data(cluster.get("certificate-authority-data")),
        certificate_path=file(user.get("client-certificate")),
        private_key_path=file(user.get("client-key")),
        certificate_data=data(user.get("client-certificate-data")),
        private_key_data=data(user.get("client-key-data")),
        namespace=ctx.get("namespace"),
    )


def _load_cert_data(ctx: ssl.SSLContext, cert: Any, key: Any) -> None:
    """ssl loads client certificates from files only: write them to private temp files, load, remove."""
    with tempfile.TemporaryDirectory(prefix="keyroute-") as tmp:
        paths = []
        for name, value in (("tls.crt", cert), ("tls.key", key)):
            p = Path(tmp) / name
            p.touch(mode=0o600)
            p.write_text(value.decode() if isinstance(value, bytes) else str(value))
            paths.append(str(p))
        ctx.load_cert_chain(paths[0], paths[1])
