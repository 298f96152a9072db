"""The one place keyroute speaks HTTP to the Kubernetes API (besides kopf itself).

Building a request is pure (paths, bodies); sending it is :class:`Kube`, a thin aiohttp client. Who
it is comes from :class:`Credentials`: the pod's ServiceAccount token (read here: a sidecar in a pod
must stay small), or a kubeconfig loaded by the official kubernetes client (imported only then), so
exec plugins, inline certificates and token files work as they do for kubectl. The operator's kopf
logs in with the very same :class:`Credentials`. Errors carry the status and the API's ``reason``,
never a body that could hold a Secret; no credential reaches a log line, an error or a ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from keyroute import __version__

log = logging.getLogger("keyroute.kube")

CORE = ("", "v1")
OPERATOR_AGENT = f"keyroute-operator/{__version__}"
SIDECAR_AGENT = f"keyroute-sidecar/{__version__}"
KEYROUTE = ("keyroute.dev", "v1alpha1")
#: Connections one :class:`Kube` keeps open to the API server at most (watches included).
MAX_CONNECTIONS = 16


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


class Kube:
    """A minimal async Kubernetes API client.

    It authenticates with a :class:`Credentials` (the same ones kopf logs in with, in the operator):
    before a request it renews them when they are due (a ServiceAccount token re-read every minute,
    an exec plugin's token before it expires), and once more when the server answers 401 (a rotated
    or revoked token), retrying that request once if the renewal changed anything. Renewing may read
    a file or run a plugin: it runs in a thread, off the event loop.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        user_agent: str = OPERATOR_AGENT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.credentials = credentials
        self.user_agent = user_agent
        self._extra = dict(headers or {})  # sent with every request (e.g. a test harness's marker)
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._conn: Connection | None = None
        self._authorization: str | None = None
        self._tls: tuple[Any, ...] = ()
        self.ssl_context: ssl.SSLContext | bool | None = None
        self._apply(credentials.connection())

    def __repr__(self) -> str:  # never the Authorization header
        return f"Kube(server={self.server!r}, credentials={self.credentials.describe!r})"

    @classmethod
    def from_connection(
        cls, info: Any, *, user_agent: str = OPERATOR_AGENT, headers: Mapping[str, str] | None = None
    ) -> Kube:
        """Build from kopf's ``ConnectionInfo`` or a :class:`Connection` (duck-typed: no kopf import).
        ``user_agent`` tells the operator's requests from the sidecars' in audit logs (and in the
        RBAC test, which derives each role's verbs from what it really sent)."""
        return cls(Credentials.of(Connection.of(info)), user_agent=user_agent, headers=headers)

    @property
    def server(self) -> str:
        assert self._conn is not None
        return self._conn.server.rstrip("/")

    @property
    def headers(self) -> dict[str, str]:
        """The headers the next request carries (tests look; nothing should log them)."""
        out = {**self._extra, "User-Agent": self.user_agent}
        if self._authorization:
            out["Authorization"] = self._authorization
        return out

    def _apply(self, conn: Connection) -> None:
        self._conn = conn
        self._authorization = conn.authorization()
        tls = conn.tls_material()
        if tls != self._tls or self.ssl_context is None:
            self.ssl_context = conn.ssl_context()
            self._tls = tls

    async def _refresh(self, *, rejected: bool = False) -> bool:
        """Renew the credentials when due (or ``rejected``); whether the connection changed."""
        if not rejected and not self.credentials.due():
            return False
        async with self._lock:
            if not rejected and not self.credentials.due():
                return False  # another request renewed them meanwhile
            before = self._conn
            conn = await asyncio.to_thread(self.credentials.connection, renew=rejected)
            if conn is before:
                return False
            self._apply(conn)
            return True

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={**self._extra, "User-Agent": self.user_agent},
                timeout=aiohttp.ClientTimeout(total=30, sock_connect=5),
                # aiohttp's default is 100: at an operator's start-up, hundreds of reconciles at once
                # opened ~100 kept-alive TLS connections (each with its buffers: tens of MiB) for no
                # gain on one core. Requests beyond the limit wait for a free connection.
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
            )
        return self._session

    def _watch_client(self) -> aiohttp.ClientSession:
        """Watches hold their connection for minutes: their own pool, so that they never take one of
        the :data:`MAX_CONNECTIONS` the requests share (one watch per namespace could take them all)."""
        if self._watch_session is None or self._watch_session.closed:
            self._watch_session = aiohttp.ClientSession(
                headers={**self._extra, "User-Agent": self.user_agent},
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._watch_session

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": self._authorization} if self._authorization else {}

    async def _send(
        self, method: str, url_path: str, data: bytes | None, content_type: str
    ) -> tuple[int, str, bytes]:
        headers = self._auth_headers()
        if data is not None:
            headers["Content-Type"] = content_type
        async with self._client().request(
            method,
            self.server + url_path,
            data=data,
            headers=headers,
            ssl=self.ssl_context if self.ssl_context is not None else True,
        ) as resp:
            return resp.status, resp.reason or "", await resp.read()

    async def request(
        self,
        method: str,
        url_path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        read: bool = True,
    ) -> dict[str, Any]:
        """Send one request; raise :class:`ApiError` on a non-2xx answer. ``read=False``: the answer's
        object is not parsed (``{}`` is returned), for writes whose answer nobody reads (a status
        patch, an Event: parsing the object the API server sends back was a tenth of a start-up)."""
        data = json.dumps(body).encode() if body is not None else None
        await self._refresh()
        status, reason, payload = await self._send(method, url_path, data, content_type)
        # 401: the server processed nothing, so sending it again with renewed credentials is safe.
        if status == 401 and await self._refresh(rejected=True):
            status, reason, payload = await self._send(method, url_path, data, content_type)
        if status >= 400:
            with contextlib.suppress(ValueError, AttributeError):
                reason = str(json.loads(payload).get("reason") or reason)
            raise ApiError(method, url_path, status, reason)
        if not payload or not read:
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

    async def create(self, url_path: str, body: dict[str, Any], *, read: bool = True) -> dict[str, Any]:
        return await self.request("POST", url_path, body, read=read)

    async def merge_patch(self, url_path: str, body: dict[str, Any], *, read: bool = True) -> dict[str, Any]:
        return await self.request("PATCH", url_path, body, content_type="application/merge-patch+json", read=read)

    async def list_objects(
        self, url_path: str, params: Mapping[str, str] | None = None, *, from_cache: bool = False
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The objects at ``url_path`` and the listing's resourceVersion (to watch from).

        ``from_cache``: ``resourceVersion=0``, served from the API server's watch cache (possibly a
        moment behind etcd; a watch from the listing's version catches up), as client-go's reflector
        lists first. A consistent listing is read from etcd, every object decoded again: the API
        server took 0.4 to 0.6 s to answer one of 1,000 CredentialPools, 0.06 to 0.1 s from its cache."""
        query = {**(params or {}), "resourceVersion": "0"} if from_cache else dict(params or {})
        listing = await self.request("GET", url_path + ("?" + urlencode(query) if query else ""))
        items = [item for item in listing.get("items") or [] if isinstance(item, dict)]
        version = (listing.get("metadata") or {}).get("resourceVersion")
        return items, str(version) if version else None

    async def watch(
        self,
        url_path: str,
        params: Mapping[str, str] | None = None,
        *,
        version: str | None,
        server_timeout: int = 290,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The changes after ``version``: ``(type, object)`` pairs, ``type`` being ``ADDED``,
        ``MODIFIED``, ``DELETED`` or ``BOOKMARK`` (whose object carries only the resourceVersion to
        resume from). Returns when the server ends the stream (``server_timeout``); raises
        :class:`ApiError` (410 when ``version`` left the server's history) or a connection error.
        :func:`watch_forever` lists and resumes around it."""
        query = dict(params or {})
        query.update(watch="true", timeoutSeconds=str(server_timeout), allowWatchBookmarks="true")
        if version:
            query["resourceVersion"] = version
        await self._refresh()
        async with self._watch_client().get(
            f"{self.server}{url_path}?{urlencode(query)}",
            headers=self._auth_headers(),
            ssl=self.ssl_context if self.ssl_context is not None else True,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=server_timeout + 30),
        ) as resp:
            if resp.status >= 400:
                if resp.status == 401:
                    await self._refresh(rejected=True)  # the caller's retry uses the renewed ones
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
                if kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") and isinstance(obj, dict):
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
    on_listed: Callable[[], None] | None = None,
) -> None:
    """Keep a list-and-watch of ``url_path`` going until cancelled, as client-go's reflector does:
    ``handle`` gets every object of a listing (type ``LISTED``) and every change; ``on_listed`` is
    called after each listing. Failures are logged once per streak and retried with a doubling
    backoff.

    A watch that ends (the server closes streams every few minutes) or whose connection breaks is
    resumed from the last resourceVersion seen (changes and bookmarks), without listing again. Only
    an error from the API server (410: that version left its history) starts over with a listing.
    The first listing is served from the API server's watch cache (cheap, for a process that has
    seen nothing yet); a later one is a consistent read, never older than what was handled."""
    delay = backoff[0]
    failing = False
    listed_once = False
    version: str | None = None
    must_list = True

    def restored() -> None:
        nonlocal failing, delay
        if failing:
            log.info("watch restored", extra={"kr": {"watch": what or url_path}})
            failing = False
        delay = backoff[0]

    while True:
        try:
            if must_list:
                items, version = await kube.list_objects(url_path, params, from_cache=not listed_once)
                for obj in items:
                    result = handle("LISTED", obj)
                    if result is not None:
                        await result
                listed_once, must_list = True, version is None  # no version to resume from: list again
                if on_listed is not None:
                    on_listed()
                restored()
            async for kind, obj in kube.watch(url_path, params, version=version):
                version = str((obj.get("metadata") or {}).get("resourceVersion") or "") or version
                if kind != "BOOKMARK":
                    result = handle(kind, obj)
                    if result is not None:
                        await result
                restored()
        except asyncio.CancelledError:
            raise
        except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as e:
            # The connection broke: resume from ``version``. The API server refused: list again.
            must_list = must_list or isinstance(e, ApiError)
            if not failing:
                log.warning("watch failed; retrying", extra={"kr": {"watch": what or url_path, "error": str(e)}})
            failing = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff[1])
            continue
        await asyncio.sleep(backoff[0] / 10)  # a server that ends streams at once must not spin


# --- credentials: the pod's ServiceAccount, a kubeconfig, or what kopf logged in with --------------

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "~/.kube/config"
# A token file (the kubelet rotates projected ServiceAccount tokens) is re-read this often.
TOKEN_FILE_RECHECK = 60.0
# The server refusing credentials renews them, but at most this often (a refused token must not
# make every request run an exec plugin).
MIN_RENEW_INTERVAL = 2.0
# After a failed renewal the current credentials are kept and renewal is tried again this much later.
RENEW_RETRY = 10.0


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(value: str | bytes) -> str:
    """PEM text from PEM or base64-encoded PEM (kopf passes kubeconfig ``*-data`` fields encoded)."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    if "-----BEGIN" in text:
        return text
    try:
        return base64.b64decode(text, validate=False).decode()
    except (ValueError, UnicodeDecodeError):
        raise KubeconfigError("certificate data is neither PEM nor base64-encoded PEM") from None


@dataclass(frozen=True)
class Connection:
    """How to reach the API server and who to be there, with the attribute names of kopf's
    ``ConnectionInfo``; credentials are hidden from ``repr``. ``*_data`` fields hold PEM (or
    base64-encoded PEM, as in a kubeconfig). ``expiration`` is when a token stops being valid."""

    server: str
    scheme: str | None = "Bearer"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    insecure: bool = False
    ca_path: str | None = None
    ca_data: str | None = field(default=None, repr=False)
    certificate_path: str | None = None
    private_key_path: str | None = None
    certificate_data: str | None = field(default=None, repr=False)
    private_key_data: str | None = field(default=None, repr=False)
    namespace: str | None = None
    expiration: datetime.datetime | None = None

    @classmethod
    def of(cls, info: Any) -> Connection:
        """A :class:`Connection` as is, or one from kopf's ``ConnectionInfo`` (duck-typed)."""
        if isinstance(info, Connection):
            return info

        def text(name: str) -> str | None:
            value = getattr(info, name, None)
            if value is None:
                return None
            return value.decode() if isinstance(value, bytes) else str(value)

        return cls(
            server=str(info.server),
            scheme=getattr(info, "scheme", None) or "Bearer",
            token=getattr(info, "token", None),
            token_file=text("token_file"),
            username=getattr(info, "username", None),
            password=getattr(info, "password", None),
            insecure=bool(getattr(info, "insecure", False)),
            ca_path=text("ca_path"),
            ca_data=text("ca_data"),
            certificate_path=text("certificate_path"),
            private_key_path=text("private_key_path"),
            certificate_data=text("certificate_data"),
            private_key_data=text("private_key_data"),
            namespace=getattr(info, "namespace", None) or getattr(info, "default_namespace", None),
            expiration=getattr(info, "expiration", None),
        )

    def authorization(self) -> str | None:
        """The ``Authorization`` header value, if these credentials use one."""
        if self.token:
            return f"{self.scheme or 'Bearer'} {self.token}"
        if self.username and self.password:
            creds = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return f"Basic {creds}"
        return None

    def tls_material(self) -> tuple[Any, ...]:
        """What the TLS context is made of: a new context is built only when this changes."""
        return (
            self.server.startswith("https"),
            self.insecure,
            self.ca_path,
            self.ca_data,
            self.certificate_path,
            self.private_key_path,
            self.certificate_data,
            self.private_key_data,
        )

    def ssl_context(self) -> ssl.SSLContext | bool | None:
        """The TLS context for an ``https`` server (``False``: verification off); ``None`` for http."""
        if not self.server.startswith("https"):
            return None
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.ca_data:
            ctx.load_verify_locations(cadata=_pem(self.ca_data))
        if self.certificate_path:
            ctx.load_cert_chain(self.certificate_path, self.private_key_path)
        elif self.certificate_data:
            if not self.private_key_data:
                raise KubeconfigError("a client certificate without its key")
            _load_cert_data(ctx, _pem(self.certificate_data), _pem(self.private_key_data))
        return ctx


class KubeconfigError(ValueError):
    """Credentials keyroute cannot use. The message names files and fields, never credentials."""


class Credentials:
    """A :class:`Connection` and how to renew it, shared by kopf's login handler and :class:`Kube`
    (thread-safe: kopf logs in from a thread, :class:`Kube` renews in one).

    Renewal reloads from the source: the token file is read again (every
    :data:`TOKEN_FILE_RECHECK` seconds), the kubeconfig is loaded anew by the kubernetes client
    (which runs its exec plugin again) when the token nears its ``expiration`` or the server refused
    it. A failed renewal keeps the current connection (logged; retried :data:`RENEW_RETRY` s later).
    ``clock`` (monotonic seconds) and ``now`` (aware UTC datetime) are parameters for tests.
    """

    def __init__(
        self,
        load: Callable[[], Connection],
        *,
        describe: str,
        recheck: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self._load = load
        self.describe = describe  # for logs: a path or a kind, never a credential
        self.recheck = recheck
        self.clock = clock
        self.now = now
        self._guard = threading.Lock()
        self._current: Connection | None = None
        self._loaded_at = -math.inf
        self._renew_after: datetime.datetime | None = None
        self._retry_at: float | None = None
        self.renewals = 0

    def __repr__(self) -> str:
        return f"Credentials({self.describe})"

    # -- sources

    @classmethod
    def of(cls, conn: Connection, **kwargs: Any) -> Credentials:
        """Fixed credentials, or a token file re-read when ``conn.token_file`` is set."""
        if conn.token_file:
            return cls.token_file(conn, **kwargs)
        return cls(lambda: conn, describe=f"fixed credentials for {conn.server}", **kwargs)

    @classmethod
    def token_file(cls, conn: Connection, **kwargs: Any) -> Credentials:
        """``conn`` with its token read from ``conn.token_file``, again every minute and after a
        refusal (a projected ServiceAccount token is rotated by the kubelet). An unreadable file keeps
        the last token."""
        path = conn.token_file
        assert path is not None
        last: list[str | None] = [None]

        def load() -> Connection:
            try:
                last[0] = Path(path).read_text().strip() or None
            except OSError as e:
                log.error(
                    "cannot read the ServiceAccount token",
                    extra={"kr": {"file": path, "error": type(e).__name__}},
                )
            return dataclasses.replace(conn, token=last[0], scheme="Bearer")

        kwargs.setdefault("recheck", TOKEN_FILE_RECHECK)
        return cls(load, describe=f"token file {path}", **kwargs)

    @classmethod
    def kubeconfig(cls, path: str | Path | None = None, context: str | None = None, **kwargs: Any) -> Credentials:
        """A kubeconfig loaded by the official kubernetes client (:func:`from_kubeconfig`), now, so a
        bad one fails at start-up with :class:`KubeconfigError`."""
        where = str(path) if path else os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
        creds = cls(
            lambda: from_kubeconfig(where, context),
            describe=f"kubeconfig {where}" + (f" (context {context})" if context else ""),
            **kwargs,
        )
        creds.connection()
        return creds

    @classmethod
    def resolve(
        cls,
        kubeconfig: str | Path | None = None,
        context: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        sa_dir: Path | None = None,
        home_config: str = DEFAULT_KUBECONFIG,
    ) -> Credentials:
        """The operator's credentials, in controller-runtime's order: ``kubeconfig`` (the flag),
        else ``$KUBECONFIG``, else the pod's ServiceAccount, else ``~/.kube/config``."""
        env = os.environ if env is None else env
        if kubeconfig:
            return cls.kubeconfig(kubeconfig, context)
        if env.get("KUBECONFIG"):
            return cls.kubeconfig(env["KUBECONFIG"], context)
        conn = in_cluster(env, sa_dir)
        if conn is not None:
            if context:
                raise KubeconfigError("--context needs a kubeconfig; in a pod the ServiceAccount is used")
            return cls.token_file(conn)
        home = Path(home_config).expanduser()
        if home.is_file():
            return cls.kubeconfig(str(home), context)
        raise KubeconfigError(
            "no credentials: not in a pod (no KUBERNETES_SERVICE_HOST and ServiceAccount token), "
            f"and no --kubeconfig, $KUBECONFIG or {home_config}"
        )

    # -- renewal

    def due(self) -> bool:
        """Whether :meth:`connection` would load anew (cheap: no I/O)."""
        if self._current is None:
            return True
        if self._retry_at is not None:
            return self.clock() >= self._retry_at
        if self._renew_after is not None and self.now() >= self._renew_after:
            return True
        return self.recheck is not None and self.clock() - self._loaded_at >= self.recheck

    @property
    def renew_after(self) -> datetime.datetime | None:
        """When the current token is renewed (ahead of its expiration), if it expires."""
        return self._renew_after

    def connection(self, *, renew: bool = False) -> Connection:
        """The current connection, loaded anew first when :meth:`due` or ``renew`` (the server
        refused it). Blocking (a file read, an exec plugin): :class:`Kube` calls it in a thread.
        Raises :class:`KubeconfigError` only when there is no connection yet to fall back on."""
        with self._guard:
            current = self._current
            if current is not None:
                if renew:
                    if self.clock() - self._loaded_at < MIN_RENEW_INTERVAL:
                        return current
                elif not self.due():
                    return current
            try:
                conn = self._load()
            except (KubeconfigError, OSError) as e:
                if current is None:
                    raise
                self._retry_at = self.clock() + RENEW_RETRY
                log.error(
                    "cannot renew the Kubernetes credentials; keeping the current ones",
                    extra={"kr": {"source": self.describe, "error": str(e), "retry_in": RENEW_RETRY}},
                )
                return current
            self._retry_at = None
            self._loaded_at = self.clock()
            self._renew_after = None
            if conn.expiration is not None:
                expires = conn.expiration
                if expires.tzinfo is None:
                    expires = expires.replace(tzinfo=datetime.UTC)
                lifetime = (expires - self.now()).total_seconds()
                # Renew ahead: a fifth of the lifetime, at most a minute (an EKS token lives 15 min).
                self._renew_after = expires - datetime.timedelta(seconds=max(0.0, min(60.0, lifetime / 5)))
            if current is not None:
                self.renewals += 1
                log.info(
                    "Kubernetes credentials renewed",
                    extra={"kr": {"source": self.describe, "expires": str(conn.expiration or "")}},
                )
            self._current = conn
            return conn


def in_cluster(env: Mapping[str, str] | None = None, sa_dir: Path | None = None) -> Connection | None:
    """The pod's ServiceAccount connection, or ``None`` outside a cluster (or with no token mounted).

    This one is keyroute's own (a host, a port and three files, as every client reads them): the
    sidecar in a pod must not import the kubernetes client for it (see the README)."""
    env = os.environ if env is None else env
    sa_dir = SERVICE_ACCOUNT_DIR if sa_dir is None else sa_dir  # read at call time: tests point it elsewhere
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
    """The connection of ``context`` (default: the current one) in a kubeconfig, as the official
    kubernetes client loads it: tokens, token files, client certificates (files or inline data),
    basic auth, exec credential plugins (EKS, GKE, AKS, …; run now) and the auth-providers it knows.
    ``path`` may list several files (``a:b``, as ``$KUBECONFIG`` does).

    The client writes inline certificates and keys to files; they are read back into the
    connection and the files removed at once. The kubernetes package is imported here only: it is
    heavy, and a sidecar in a pod never needs it. Raises :class:`KubeconfigError` naming the
    problem (a file, a context, a plugin's command), never a credential.
    """
    where = str(path)
    # As kubectl does, files missing from a list are skipped; none at all is an error.
    files = [str(Path(p).expanduser()) for p in where.split(os.pathsep) if p]
    existing = [p for p in files if Path(p).is_file()]
    if not existing:
        raise KubeconfigError(f"kubeconfig {where}: no such file: {', '.join(files) or where}")
    try:
        # Here, not at the top: only a kubeconfig needs YAML (the kubernetes client imports it
        # anyway), and a sidecar in a pod reads a token file (its idle memory, issue 13).
        import yaml
        from kubernetes.client import Configuration
        from kubernetes.config.config_exception import ConfigException
        from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger
    except ImportError:  # pragma: no cover - a dependency of keyroute
        raise KubeconfigError("reading a kubeconfig needs the kubernetes package (pip install kubernetes)") from None

    with tempfile.TemporaryDirectory(prefix="keyroute-kubeconfig-") as tmp, _plugin_errors() as errors:
        try:
            merged = KubeConfigMerger(os.pathsep.join(existing)).config  # type: ignore[no-untyped-call]
            if merged is None or not isinstance(merged.value, dict):
                raise KubeconfigError(f"kubeconfig {where} is not a mapping")
            loader = KubeConfigLoader(  # type: ignore[no-untyped-call]
                config_dict=merged, active_context=context, config_base_path=None, temp_file_path=tmp
            )
            cfg = Configuration()
            loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
        except ConfigException as e:
            raise KubeconfigError(f"kubeconfig {where}: {_config_problem(e, context)}") from None
        except yaml.YAMLError as e:
            raise KubeconfigError(f"cannot read kubeconfig {where}: {type(e).__name__}") from None
        except (AttributeError, KeyError, TypeError) as e:  # a malformed file the loader trips on
            raise KubeconfigError(f"kubeconfig {where} is malformed ({type(e).__name__})") from None
        ctx = loader.current_context.get("context") or {}
        if not _named(merged, "clusters", ctx.get("cluster")).get("server"):
            raise KubeconfigError(f"kubeconfig {where}: cluster {ctx.get('cluster')!r} has no server")
        user = _named(merged, "users", ctx.get("user"))
        authorization = cfg.api_key.get("BearerToken")  # the header: "Bearer …" or "Basic …"
        cert, key = cfg.cert_file, cfg.key_file
        if "exec" in user and not authorization and not cert:
            command = os.path.basename(str((user.get("exec") or {}).get("command", "?")))
            why = "; ".join(errors) or "it printed no token or client certificate"
            raise KubeconfigError(f"kubeconfig {where}: the exec credential plugin {command!r} failed: {why}")

        def inline(value: str | None) -> tuple[str | None, str | None]:
            """(path, data): a file the loader wrote from inline data is read back, a user's file kept."""
            if not value:
                return None, None
            if Path(value).is_relative_to(tmp):
                return None, Path(value).read_text()
            return value, None

        ca_path, ca_data = inline(cfg.ssl_ca_cert)
        cert_path, cert_data = inline(cert)
        key_path, key_data = inline(key)
    # A token file ends with a newline more often than not (client-go trims it too).
    scheme, _, token = (authorization or "").strip().partition(" ")
    expiry = getattr(loader, "expiry", None)  # set by the loader for exec plugins that say when
    return Connection(
        server=str(cfg.host),
        scheme=scheme or None,
        token=token.strip() or None,
        insecure=not cfg.verify_ssl,
        ca_path=ca_path,
        ca_data=ca_data,
        certificate_path=cert_path,
        certificate_data=cert_data,
        private_key_path=key_path,
        private_key_data=key_data,
        namespace=ctx.get("namespace"),
        expiration=expiry if isinstance(expiry, datetime.datetime) else None,
    )


def _named(merged: Any, section: str, name: Any) -> dict[str, Any]:
    for item in (merged.value.get(section) or []) if name else []:
        value = getattr(item, "value", item)
        if isinstance(value, dict) and value.get("name") == name:
            body = value.get(section[:-1])
            return body if isinstance(body, dict) else {}
    return {}


def _config_problem(e: Exception, context: str | None) -> str:
    """The kubernetes client's message, reworded where it is cryptic; it names keys, not values."""
    text = str(e)
    named = re.search(r"Expected object with name (.*) in .*?(contexts|clusters|users) list", text)
    if named:
        name, section = named.group(1), named.group(2)[:-1]
        which = "" if section != "context" or context else " (the current-context)"
        return f"no {section} named {name!r}{which}"
    if "Expected key current-context" in text:
        return "no current-context (pass a context)"
    return text.removeprefix("Invalid kube-config file. ")


class _Capture(logging.Filter):
    """Catches what the kubernetes client logs to the root logger while loading (an exec plugin's
    failure is logged there and swallowed): it becomes the error's text, and stays out of our logs."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread or record.levelno < logging.ERROR:
            return True
        self.messages.append(record.getMessage().strip()[:300])
        return False


@contextlib.contextmanager
def _plugin_errors() -> Iterator[list[str]]:
    capture = _Capture()
    root = logging.getLogger()
    root.addFilter(capture)
    try:
        yield capture.messages
    finally:
        root.removeFilter(capture)


def _load_cert_data(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """ssl loads client certificates from files only: write them to private temp files, load, remove."""
    with tempfile.TemporaryDirectory(prefix="keyroute-") as tmp:
        paths = []
        for name, value in (("tls.crt", cert), ("tls.key", key)):
            p = Path(tmp) / name
            p.touch(mode=0o600)
            p.write_text(value)
            paths.append(str(p))
        ctx.load_cert_chain(paths[0], paths[1])
