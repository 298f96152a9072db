"""End-to-end fixtures: the real kopf operator against kmock, an in-memory Kubernetes API over HTTP.

Fixtures and helpers:

- ``kube`` (:class:`Kube`): a kmock :class:`Emulator` on 127.0.0.1 with the bundled core resources
  (``v1/namespaces``, ``v1/secrets``, ``v1/events``, …), the ``default`` namespace and keyroute's
  ``keyroute.dev/v1alpha1`` ``credentialpools`` and ``providerchains`` (namespaced, ``status``
  subresource). ``kube.url`` and ``kube.token`` are what the operator connects with. The helpers
  speak real HTTP (aiohttp) and raise :class:`KubeAPIError` on failures::

      await kube.create({"apiVersion": API_VERSION, "kind": "CredentialPool",
                         "metadata": {"name": "p"}, "spec": {...}})
      await kube.get(API_VERSION, "credentialpools", "default", "p")  # dict | None
      await kube.patch(API_VERSION, "credentialpools", "default", "p", {"spec": {...}},
                       bump_generation=True)  # merge patch; subresource="status" also works
      await kube.delete(API_VERSION, "credentialpools", "default", "p")  # last state | None
      await kube.list("v1", "secrets", "default")  # namespace None: all namespaces
      await kube.events("default", involving="p")  # core v1 Events, oldest first

  ``create`` seeds ``metadata.resourceVersion``, ``uid``, ``generation`` (1) and the namespace
  (``default``), without which kopf does nothing. ``kube.emulator`` is the kmock object itself (its
  ``objects``, its DSL); ``kube.requests()`` lists what the operator sent.

- ``operator_runner`` (:class:`OperatorRunners`): runs the real operator with
  ``kopf.testing.KopfRunner`` (own thread and loop; ``kopf run --standalone --verbose -m MODULE``)
  after setting ``keyroute.controller.login.OVERRIDE`` to ``kube.connection_info()``::

      async with operator_runner("keyroute.controller.standalone", namespaces=["default"]) as op:
          await op.wait_watching("credentialpools", "providerchains", "secrets")
          ...
      assert op.exit_code == 0 and "sk-" not in op.log + op.output

  ``op.log`` is what the operator logged so far, live; ``op.output`` (kopf's own formatted output),
  ``op.exit_code`` and ``op.exception`` are set once it stopped. Leaving the block raises
  :class:`OperatorFailedError` if the operator failed. Runs still going at teardown are stopped
  before ``kube`` is. ``op = await operator_runner(...).start()`` leaves stopping to the fixture.

- :func:`eventually` polls a condition (sync or async) until it is truthy: no fixed sleeps.

Making the API fail (for reporting tests); outages start at once and end with the ``with`` block,
``outage.end()``, or after ``times`` failures::

    with kube.outage(503, plural="credentialpools", method="PATCH") as outage:  # Status replies
        ...
    with kube.outage(unreachable=True):  # connections dropped; open watch streams cut as well
        ...
    kube.outage(500, times=2, match=lambda request: request.subresource == "status")

An outage answers before kmock's store is touched, so a rejected PATCH changes nothing (kmock's own
``kube.emulator[...] << 503`` reactions answer 503 but still apply the change). Requests from the
``kube`` helpers carry :data:`HARNESS_HEADER` and are never failed, so a test can inspect the store
meanwhile. ``outage.hits`` lists the requests that were failed.

Gotchas, each handled here:

- kmock 0.8 cannot parse ``/api/v1/namespaces`` (500 on list, watch and create), which kopf lists and
  watches whenever it is given namespaces. Every run therefore sets
  ``settings.scanning.disabled = True`` (kopf then takes the namespaces and CRDs it is given), and
  the ``default`` namespace is put straight into kmock's store.
- kopf posts every Event with only ``generateName``; kmock stores it under no name and answers the
  second one with 409. The emulator names objects from ``generateName``, fills ``uid``,
  ``resourceVersion``, ``generation`` and ``creationTimestamp`` on every create (the operator's own
  Secrets included) and folds Secrets' ``stringData`` into base64 ``data``, as an API server does.
- aiohttp's shutdown waits up to 60 s for open requests, and a watch stays open while its client
  lives; kopf also re-opens a cut watch within milliseconds. The operator is always stopped first,
  and ``kube``'s teardown still drops every open watch and every later request, so it never hangs.
- kopf registers handlers at import time into a global registry: each run gets a fresh registry
  and a fresh import of its modules (removed from ``sys.modules`` first). Pass every module that
  holds handlers. kopf's global logging set-up is undone after each run; one operator at a time.
- Click's runner swaps ``sys.stdout``/``sys.stderr`` for the whole process while the operator runs:
  a test's ``print()`` inside the block lands in ``op.output``.
- kopf retries a failed API call after 1, 1, 2, 3… s: pass ``settings=`` with shorter
  ``networking.error_backoffs`` for outage tests (the modules' startup handlers may still change it).

Still not like a real API server: ``resourceVersion`` and ``generation`` never change (use
``bump_generation=True``), no schema validation, pruning or defaulting (validate status shapes
against the CRD schema separately), ``/status`` is not isolated, no label or field selectors, no PUT.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import dataclasses
import datetime
import http
import logging
import secrets
import sys
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
import aiohttp.web
import kmock
import kopf
import pytest
from kopf.testing import KopfRunner

import keyroute.controller.login
from tests.polling import eventually
from tests.realapi.client import api_path as _api_path  # one path builder for both tiers

GROUP = "keyroute.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CUSTOM_RESOURCES = {"credentialpools": "CredentialPool", "providerchains": "ProviderChain"}
"""The keyroute resources declared on every emulator: plural → kind."""

HARNESS_HEADER = "X-Keyroute-E2E"
"""Sent by the ``kube`` helpers so outages and request assertions can tell them from the operator."""

Json = dict[str, Any]


class KubeAPIError(Exception):
    """A non-2xx answer to a ``kube`` helper; ``body`` is the Kubernetes ``Status`` (or raw text)."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> {status}: {message}")
        self.status = status
        self.body = body


# ----------------------------------------------------------------------------------------------------
# The emulator


@dataclasses.dataclass(eq=False)
class Outage:
    """An injected API failure; active from creation until :meth:`end` (or the ``with`` block's end).

    ``status`` is the HTTP status answered with a Kubernetes ``Status`` body; ``None`` drops the
    connection instead (the client sees ``ServerDisconnectedError``).
    """

    status: int | None
    matches: Callable[[kmock.Request], bool]
    times: int | None = None
    hits: builtins.list[kmock.Request] = dataclasses.field(default_factory=list)
    active: bool = True

    def claims(self, request: kmock.Request) -> bool:
        if not self.active or _is_harness(request) or not self.matches(request):
            return False
        self.hits.append(request)
        if self.times is not None and len(self.hits) >= self.times:
            self.active = False
        return True

    def end(self) -> None:
        self.active = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()

    async def fail(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.status is None:
            _abort(request)
            return aiohttp.web.Response(status=503)  # never delivered: the connection is gone
        phrase = http.HTTPStatus(self.status).phrase
        raise kmock.KubernetesError(  # kmock renders it as a Kubernetes Status with this code
            status=self.status,
            reason=phrase.title().replace(" ", "").replace("-", ""),
            message=f"{phrase} (injected by the e2e harness)",
            details={"causes": [{"message": "e2e harness outage"}]},  # else kmock adds a traceback
        )


class Emulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator plus the API-server habits kopf and keyroute rely on.

    See the module docstring for what it adds. ``outages`` are checked before anything else.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.outages: builtins.list[Outage] = []
        self.closing = False

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.closing:
            _abort(request)
            return aiohttp.web.Response(status=503)  # never delivered: the connection is gone
        for outage in self.outages:
            if outage.claims(request):
                return await outage.fail(request)
        _imitate_api_server(request)
        return await super()._handle(request)

    def close_connections(self) -> None:
        """Drop every open watch and every later request, so that kmock's shutdown is immediate.

        aiohttp's shutdown waits up to 60 s for active requests, and a watch stays active until
        its client goes. Cutting the open watches is not enough: a client still running (an
        operator that did not stop) reconnects before the listening socket closes.
        """
        self.closing = True
        self.cut_streams()

    def cut_streams(self) -> int:
        """Drop every open watch connection (the client sees the stream end); return how many."""
        cut = 0
        for request in builtins.list(self):
            if request.action == kmock.action.WATCH and _abort(request):
                cut += 1
        return cut


def _is_harness(request: kmock.Request) -> bool:
    return any(key.lower() == HARNESS_HEADER.lower() for key in request.headers)


def _abort(request: kmock.Request) -> bool:
    raw = request._raw_request  # kmock keeps aiohttp's request; its transport is the only way to cut
    transport = raw.transport if raw is not None else None
    if transport is None or transport.is_closing():
        return False
    transport.abort()
    return True


def _imitate_api_server(request: kmock.Request) -> None:
    """Mutate a create/patch body in place the way kube-apiserver would before storing it."""
    data = request.data
    if not isinstance(data, dict) or request.subresource is not None:
        return
    resource = request.resource
    if request.action == kmock.action.CREATE:
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", _now())
    if (
        request.action in (kmock.action.CREATE, kmock.action.UPDATE)
        and resource is not None
        and (resource.group, resource.version, resource.plural) == ("", "v1", "secrets")
        and isinstance(data.get("stringData"), dict)
    ):
        string_data = data.pop("stringData")
        encoded = {key: base64.b64encode(str(value).encode()).decode() for key, value in string_data.items()}
        data["data"] = {**(data.get("data") or {}), **encoded}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------
# The `kube` helper


class Kube:
    """A running emulator plus small HTTP helpers; see the module docstring."""

    def __init__(self, emulator: Emulator, url: str, token: str, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.url = url
        self.token = token
        self._session = session

    def connection_info(self) -> kopf.ConnectionInfo:
        """What ``keyroute.controller.login.OVERRIDE`` is set to for operators run against this."""
        return kopf.ConnectionInfo(server=self.url, scheme="Bearer", token=self.token)

    async def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self._session.request(method, path, **kwargs) as response:
            text = await response.text()
            try:
                body: Any = await response.json(content_type=None) if text else None
            except ValueError:
                body = text
            if response.status >= 400 and response.status != 404:
                raise KubeAPIError(method, path, response.status, body)
            return response.status, body

    def _resource_of(self, api_version: str, kind: str) -> tuple[str, bool]:
        group, _, version = api_version.rpartition("/")
        for resource in self.emulator.resources:
            info = self.emulator.resources[resource]
            if (resource.group, resource.version, info.kind) == (group, version, kind):
                assert resource.plural is not None
                return resource.plural, bool(info.namespaced)
        raise LookupError(f"{kind} of {api_version} is not declared in the emulator")

    async def create(self, obj: Mapping[str, Any]) -> Json:
        """Create ``obj`` (namespace ``default`` unless given) with the metadata kopf needs."""
        body: Json = {**obj, "metadata": dict(obj.get("metadata") or {})}
        plural, namespaced = self._resource_of(body["apiVersion"], body["kind"])
        meta = body["metadata"]
        if namespaced:
            meta.setdefault("namespace", "default")
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        path = _api_path(body["apiVersion"], plural, meta.get("namespace"))
        status, created = await self._request("POST", path, json=body)
        if status == 404:
            raise KubeAPIError("POST", path, status, created)
        return dict(created)

    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Json | None:
        """The object, or ``None`` if there is none."""
        status, body = await self._request("GET", _api_path(api_version, plural, namespace, name))
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
        bump_generation: bool = False,
    ) -> Json:
        """Merge-patch the object; ``bump_generation`` does what a real API server does on spec changes."""
        body: Json = dict(patch)
        if bump_generation:
            current = await self.get(api_version, plural, namespace, name)
            if current is None:
                raise KubeAPIError("GET", _api_path(api_version, plural, namespace, name), 404, None)
            generation = int(current.get("metadata", {}).get("generation") or 0) + 1
            body["metadata"] = {**(body.get("metadata") or {}), "generation": generation}
        path = _api_path(api_version, plural, namespace, name, subresource)
        headers = {"Content-Type": "application/merge-patch+json"}
        status, patched = await self._request("PATCH", path, json=body, headers=headers)
        if status == 404:
            raise KubeAPIError("PATCH", path, status, patched)
        return dict(patched)

    async def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> Json | None:
        """Delete the object; return its last state, or ``None`` if there was none."""
        status, body = await self._request("DELETE", _api_path(api_version, plural, namespace, name))
        return None if status == 404 else dict(body)

    async def events(
        self, namespace: str = "default", *, involving: str | None = None
    ) -> builtins.list[Json]:
        """Core v1 Events of ``namespace``, oldest first; ``involving`` keeps one object's only."""
        items = await self.list("v1", "events", namespace)
        if involving is not None:
            items = [e for e in items if (e.get("involvedObject") or {}).get("name") == involving]
        return items

    def outage(
        self,
        status: int | None = 503,
        *,
        unreachable: bool = False,
        plural: str | None = None,
        method: str | None = None,
        match: Callable[[kmock.Request], bool] | None = None,
        times: int | None = None,
        cut_watches: bool | None = None,
    ) -> Outage:
        """Fail the operator's API requests from now on; see the module docstring.

        ``plural``/``method``/``match`` narrow which requests fail (all of them by default);
        ``times`` ends the outage after that many failures. ``cut_watches`` (default: only when
        ``unreachable``) also drops the watch streams already open, as a real outage would.
        """
        http_method = method.upper() if method is not None else None

        def matches(request: kmock.Request) -> bool:
            if plural is not None and (request.resource is None or request.resource.plural != plural):
                return False
            if http_method is not None and str(request.method.value).upper() != http_method:
                return False
            return match is None or match(request)

        outage = Outage(None if unreachable else status, matches, times=times)
        self.emulator.outages[:] = [*(o for o in self.emulator.outages if o.active), outage]
        if cut_watches if cut_watches is not None else unreachable:
            self.emulator.cut_streams()
        return outage

    def requests(self, *, harness: bool = False) -> builtins.list[kmock.Request]:
        """Requests served so far, oldest first; the operator's only unless ``harness``."""
        return [r for r in self.emulator if harness or not _is_harness(r)]

    async def list(self, api_version: str, plural: str, namespace: str | None = None) -> builtins.list[Json]:
        """Objects of a resource in ``namespace`` (all namespaces if ``None``)."""
        status, body = await self._request("GET", _api_path(api_version, plural, namespace))
        if status == 404:
            raise KubeAPIError("GET", _api_path(api_version, plural, namespace), status, body)
        return builtins.list(body.get("items") or [])


@contextlib.asynccontextmanager
async def running_kube() -> AsyncIterator[Kube]:
    """Start an emulator as the ``kube`` fixture does; usable directly to time its teardown."""
    token = f"e2e-token-{secrets.token_hex(8)}"
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        for plural, kind in CUSTOM_RESOURCES.items():
            emulator.resources[f"{API_VERSION}/{plural}"] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=True,
                subresources={"status"},
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
        emulator.objects["v1/namespaces", None, "default"] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default", "uid": str(uuid.uuid4()), "resourceVersion": "1"},
        }
        url = str(server.url).rstrip("/")
        headers = {"Authorization": f"Bearer {token}", HARNESS_HEADER: "1"}
        async with aiohttp.ClientSession(base_url=url, headers=headers) as session:
            kube = Kube(emulator, url, token, session)
            try:
                yield kube
            finally:
                emulator.close_connections()


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    """A running Kubernetes emulator on 127.0.0.1 with keyroute's resources declared."""
    async with running_kube() as running:
        yield running


# ----------------------------------------------------------------------------------------------------
# The operator


class _ThreadLogCapture(logging.Handler):
    """Keeps every record not emitted by the test's own thread (kopf's thread and its executors)."""

    def __init__(self, test_thread: int) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        self.test_thread = test_thread
        self.lines: builtins.list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.test_thread:
            return
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)


class OperatorFailedError(Exception):
    """The operator exited with an error (or did not stop); its log is in the message."""


class OperatorRun:
    """One run of the real operator in a thread; an async context manager that starts and stops it."""

    def __init__(
        self,
        owner: OperatorRunners,
        modules: Sequence[str],
        args: Sequence[str],
        *,
        settings: kopf.OperatorSettings | None,
        stop_timeout: float,
        reraise: bool,
    ) -> None:
        self.owner = owner
        self.modules = tuple(modules)
        self.args = builtins.list(args)
        self.settings = settings
        self.stop_timeout = stop_timeout
        self.reraise = reraise
        self.registry = kopf.OperatorRegistry()
        self.exit_code: int | None = None
        self.exception: BaseException | None = None
        self.output = ""
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.stop_duration: float | None = None
        self._runner: KopfRunner | None = None
        self._capture = _ThreadLogCapture(threading.get_ident())
        self._restore: builtins.list[Callable[[], None]] = []

    # -- lifecycle

    async def start(self) -> Self:
        if self._runner is not None:
            raise RuntimeError("an OperatorRun starts once; make another")
        self.owner.claim(self)
        try:
            self._prepare_process_state()
            runner = KopfRunner(
                self.args,
                reraise=False,
                timeout=self.stop_timeout,
                registry=self.registry,
                settings=self.settings,
            )
            self.started_at = time.monotonic()
            runner.__enter__()  # starts the thread; returns as soon as its loop exists
        except BaseException:
            self._undo_process_state()
            raise
        self._runner = runner
        return self

    def _prepare_process_state(self) -> None:
        # Set before kopf imports the handlers module, so even an import-time read sees it.
        previous_override = keyroute.controller.login.OVERRIDE
        keyroute.controller.login.OVERRIDE = self.owner.kube.connection_info()
        self._restore.append(lambda: setattr(keyroute.controller.login, "OVERRIDE", previous_override))

        # kopf registers handlers at import time into the default registry; each run gets a fresh
        # registry (set by kopf's CLI) and a fresh import, so no handlers leak between runs/modules.
        previous_registry = kopf.get_default_registry()
        self._restore.append(lambda: kopf.set_default_registry(previous_registry))
        for name in self.modules:
            sys.modules.pop(name, None)

        # kopf's CLI reconfigures logging: the root level, a root handler writing to Click's captured
        # (later closed) stderr, and the asyncio logger. Undo exactly that; pytest swaps its own
        # root handlers between test phases, so the list is not restored wholesale.
        root, aio = logging.getLogger(), logging.getLogger("asyncio")
        root_level, aio_state = root.level, (aio.propagate, aio.handlers[:])

        def restore_logging() -> None:
            root.setLevel(root_level)
            for handler in root.handlers[:]:
                if handler is self._capture or type(handler).__module__.startswith("kopf."):
                    root.removeHandler(handler)
            aio.propagate, aio.handlers[:] = aio_state

        self._restore.append(restore_logging)
        root.addHandler(self._capture)

    async def stop(self) -> None:
        """Stop the operator (idempotent); never raises, records ``exception``/``exit_code``."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        began = time.monotonic()
        try:
            # In a worker thread: the operator may still be talking to kmock on this very loop.
            await asyncio.to_thread(runner.__exit__, None, None, None)
        except Exception as e:  # KopfRunner's own failures: the thread crashed or did not stop
            self.exception = e
        else:
            self._collect(runner)
        finally:
            self.stopped_at = time.monotonic()
            self.stop_duration = self.stopped_at - began
            self._undo_process_state()

    def _undo_process_state(self) -> None:
        while self._restore:
            self._restore.pop()()
        self.owner.release(self)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if exc is None and self.reraise:
            self.raise_if_failed()
        elif exc is not None and (self.exception is not None or self.exit_code not in (None, 0)):
            exc.add_note(f"meanwhile, the operator ended (exit code {self.exit_code}): {self.exception!r}")

    # -- observation

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.future.done()

    @property
    def log(self) -> str:
        """Everything logged outside the test's thread so far (kopf, handlers, their clients)."""
        return "\n".join(builtins.list(self._capture.lines))

    def _collect(self, runner: KopfRunner) -> None:
        error = runner.future.exception()
        if error is not None:
            self.exception = error
            return
        result = runner.future.result()
        self.exit_code, self.exception, self.output = result.exit_code, result.exception, result.output

    def raise_if_failed(self) -> None:
        """Raise :class:`OperatorFailedError` if the operator failed, or ended while it should run."""
        runner = self._runner
        ended_early = runner is not None and runner.future.done()
        if runner is not None and ended_early:
            self._collect(runner)
        if ended_early or self.exception is not None or self.exit_code not in (None, 0):
            raise OperatorFailedError(
                f"operator {self.modules} ended (exit code {self.exit_code}): {self.exception!r}\n"
                f"--- its log ---\n{self.log}"
            ) from self.exception

    async def wait_watching(self, *plurals: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until the operator has opened a watch on each resource (by plural name)."""
        wanted = set(plurals)

        def watched() -> bool:
            self.raise_if_failed()
            seen = {
                r.resource.plural
                for r in self.owner.kube.requests()
                if r.action == kmock.action.WATCH and r.resource is not None
            }
            return wanted <= seen

        await eventually(watched, timeout=timeout)


class OperatorRunners:
    """The ``operator_runner`` fixture: makes :class:`OperatorRun` objects and stops them all."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.runs: builtins.list[OperatorRun] = []
        self._active: OperatorRun | None = None

    def __call__(
        self,
        *modules: str,
        namespaces: Iterable[str] | None = ("default",),
        settings: kopf.OperatorSettings | None = None,
        extra_args: Sequence[str] = (),
        stop_timeout: float = 10.0,
        reraise: bool = True,
    ) -> OperatorRun:
        """An unstarted run of ``kopf run --standalone --verbose -m <modules>``.

        ``namespaces=None`` means ``-A``. ``settings`` is the starting point the modules'
        ``@kopf.on.startup`` handlers then adjust. With ``reraise``, leaving the ``async with``
        block raises :class:`OperatorFailedError` if the operator failed.
        """
        if not modules:
            raise TypeError("name at least one handlers module")
        if isinstance(namespaces, str):
            namespaces = [namespaces]
        args = ["run", "--standalone", "--verbose"]
        args += ["-A"] if namespaces is None else [f"--namespace={ns}" for ns in namespaces]
        for name in modules:
            args += ["-m", name]
        args += extra_args
        # kmock 0.8 cannot serve /api/v1/namespaces, which kopf lists and watches when given
        # namespaces; with scanning off, kopf takes the namespaces (and CRDs) it is given.
        settings = settings if settings is not None else kopf.OperatorSettings()
        settings.scanning.disabled = True
        run = OperatorRun(self, modules, args, settings=settings, stop_timeout=stop_timeout, reraise=reraise)
        self.runs.append(run)
        return run

    def claim(self, run: OperatorRun) -> None:
        if self._active is not None:
            raise RuntimeError("one operator at a time: kopf's registry, logging and stdio are global")
        self._active = run

    def release(self, run: OperatorRun) -> None:
        if self._active is run:
            self._active = None

    async def aclose(self) -> None:
        for run in reversed(self.runs):
            await run.stop()


@pytest.fixture
async def operator_runner(kube: Kube) -> AsyncIterator[OperatorRunners]:
    """``operator_runner(module, ...)`` → an :class:`OperatorRun`; all are stopped before ``kube`` is."""
    runners = OperatorRunners(kube)
    try:
        yield runners
    finally:
        await runners.aclose()
