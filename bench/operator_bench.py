"""keyroute operator benchmark: the real ``keyroute operator`` against a kmock API in another process.

    python bench/operator_bench.py            # 1,000 pools / 1,000 Secrets / 300 chains, ~4.5 minutes
    python bench/operator_bench.py --quick    # 100 pools / 100 Secrets / 30 chains, ~1 minute
    python bench/operator_bench.py --serve-kmock --pools 10 --chains 3   # just the seeded API (prints URL)

Processes (2 cores): the kmock emulator of the e2e harness (``tests/e2e/conftest.py``: ``running_kube``,
``Emulator``, ``Kube``), seeded and serving, runs as ``--serve-kmock`` on core 1 next to this
orchestrator; ``keyroute operator -n default --metrics-port P --health-port 0 --log-level warning`` runs
alone on core 0 with ``KUBECONFIG`` pointing at a kubeconfig written for kmock (URL + bearer token,
plain http: kopf's kubeconfig login works as is), so its RSS and CPU are its own. Everything listens on
127.0.0.1; the children die with this process (PR_SET_PDEATHSIG), kmock also exits by itself after
``--max-seconds`` and the whole run is bounded by a timeout.

Phases:

1. **Initial sync**: start the operator; done when every pool and chain has
   ``status.observedGeneration == metadata.generation`` and every chain's ``<chain>-keyroute`` Secret
   exists (followed on kmock's watch streams, confirmed by listing). RSS sampled every 0.1 s + VmHWM.
2. **Quiet period**: the operator's write requests (POST/PATCH/PUT/DELETE, as kmock received them)
   while nothing changes.
3. **Secret change → config**: merge-patch one key of a credential Secret; time until every chain using it
   has a ``<chain>-keyroute`` Secret with a new ``keyroute.dev/config-hash`` (seen on a watch stream).
4. **Pool change → config**: drop a pool's third credential, with ``metadata.generation`` bumped as an
   API server would (the harness's ``bump_generation``); same timing, plus the pool's
   ``status.observedGeneration``.
5. **Restart + forced resync**: stop the operator, start it again with ``KEYROUTE_RESYNC_SECONDS`` set so
   that its periodic resync pass runs after the restart's resume pass; the writes of each.

What the ``--serve-kmock`` process changes in kmock 0.8 (in that process only), each needed for the
figures to be about the operator rather than the emulator:

- ``/api/v1/namespaces`` is parsed (kmock answers 500, and kopf lists and watches it whenever it is given
  ``-n``): see ``_teach_kmock_namespaces``;
- kmock's per-request cost stops growing with the number of requests and objects served
  (``_speed_up_kmock``: otherwise operator GETs time out after 30 s at 100 pools);
- resourceVersions behave as on an API server (``_instrument``): without it kopf re-handles stale events
  (3 reconciles and 3 annotation patches per object at startup) and every watch (re)connection replays
  every object (kopf reconnects idle watches every 70 s, kmock sends no bookmarks), re-running
  keyroute's ``secret_event`` for every Secret each time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import re
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import aiohttp.web

SELF = Path(__file__).resolve()
BENCH = SELF.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.append(str(ROOT))  # tests.e2e.conftest; appended so the repo's operator/ folder shadows nothing
from benchlib import cpu_seconds, free_port, percentiles, rss_kib  # noqa: E402

if TYPE_CHECKING:
    import kmock
    from tests.e2e.conftest import Kube

PY = sys.executable
KEYROUTE = str(Path(PY).parent / "keyroute")
RESULTS = BENCH / "results"
LIFETIME = 900.0  # seconds the kmock process may live at most
NAMESPACE = "default"
GROUP_VERSION = "keyroute.dev/v1alpha1"
HASH_ANNOTATION = "keyroute.dev/config-hash"
CONFIG_SUFFIX = "-keyroute"
HARNESS_HEADER = "X-Keyroute-E2E"  # the harness's header (tests.e2e.conftest.HARNESS_HEADER)
PROVIDERS = ("acme", "globex", "initech", "umbrella", "hooli", "vandelay")
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}
CORE_OPERATOR, CORE_REST = {0}, {1}
CORES = frozenset(os.sched_getaffinity(0))  # before this process pins itself to CORE_REST

Json = dict[str, Any]

try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _LIBC = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_setup(cores: set[int]) -> Callable[[], None]:
    usable = cores & CORES

    def setup() -> None:
        if usable:
            os.sched_setaffinity(0, usable)
        if _LIBC is not None:
            _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the orchestrator

    return setup


# ----------------------------------------------------------------------------------------------------
# The seeded objects: deterministic, shared by the kmock process (which creates them) and the
# orchestrator (which knows which Secret feeds which chain).


@dataclasses.dataclass(frozen=True)
class Layout:
    """``pools`` CredentialPools, one Secret each (3 keys → 3 credentials); ``chains`` ProviderChains of
    2-3 entries, each entry a distinct provider and one of that provider's pools."""

    pools: int
    chains: int

    @staticmethod
    def pool_name(i: int) -> str:
        return f"pool-{i:04d}"

    @staticmethod
    def secret_name(i: int) -> str:
        return f"keys-{i:04d}"

    @staticmethod
    def chain_name(j: int) -> str:
        return f"chain-{j:04d}"

    @staticmethod
    def provider(i: int) -> str:
        return PROVIDERS[i % len(PROVIDERS)]

    def chain_pools(self, j: int) -> list[int]:
        """The pool index of each entry of chain ``j``."""
        n_providers = min(len(PROVIDERS), self.pools)
        out: list[int] = []
        for k in range(min(2 + j % 2, n_providers)):
            p = (j + k) % n_providers
            count = len(range(p, self.pools, len(PROVIDERS)))
            out.append(p + len(PROVIDERS) * ((j * 7 + k * 13) % count))
        return out

    def chains_of_pool(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j in range(self.chains):
            for i in self.chain_pools(j):
                out.setdefault(i, []).append(j)
        return out

    def secret(self, i: int) -> Json:
        data = {f"key-{k}": _b64(f"sk-bench-{i:04d}-{k}-{secrets.token_hex(12)}") for k in (1, 2, 3)}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": self.secret_name(i), "namespace": NAMESPACE},
            "data": data,
        }

    def pool_credentials(self, i: int, count: int = 3) -> list[Json]:
        return [
            {
                "name": f"{self.provider(i)}-{k}",
                "secretRef": {"name": self.secret_name(i), "key": f"key-{k}"},
                "priority": k,
            }
            for k in range(1, count + 1)
        ]

    def pool(self, i: int) -> Json:
        return {
            "apiVersion": GROUP_VERSION,
            "kind": "CredentialPool",
            "metadata": {"name": self.pool_name(i), "namespace": NAMESPACE},
            "spec": {
                "provider": self.provider(i),
                "strategy": "FillFirst" if i % 2 else "RoundRobin",
                "credentials": self.pool_credentials(i),
            },
        }

    def chain(self, j: int) -> Json:
        entries = [
            {
                "provider": self.provider(i),
                "baseURL": f"https://{self.provider(i)}.invalid/v1",
                "credentialPoolRef": {"name": self.pool_name(i)},
            }
            for i in self.chain_pools(j)
        ]
        return {
            "apiVersion": GROUP_VERSION,
            "kind": "ProviderChain",
            "metadata": {"name": self.chain_name(j), "namespace": NAMESPACE},
            "spec": {"providers": entries, "fallback": {"restoreAfter": "60s"}},
        }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ----------------------------------------------------------------------------------------------------
# --serve-kmock: the e2e harness's emulator in its own process, seeded, with a stats endpoint.


def _teach_kmock_namespaces() -> None:
    """kmock 0.8's path parser fails on ``/api/v1/namespaces`` (and ``/api/v1/namespaces/NAME``):
    parse them as the cluster-scoped ``v1/namespaces`` resource, as kube-apiserver does."""
    from kmock._internal import parsing

    original = parsing.parse_path

    def parse_path(path: str) -> parsing.ParsedPath:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
            return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None)
        return original(path)

    parsing.parse_path = parse_path


def _speed_up_kmock() -> None:
    """Two shortcuts with the same answers, without which kmock 0.8 cannot hold this many objects:

    - A reaction serves a request if ``request in view``, which walks the view over *every request
      recorded so far* (``View.__contains__``): each request costs O(requests served * reactions), so
      the run slows down quadratically (30 ms per request after ~300 creates, operator GETs timing
      out after 30 s at 100 pools). Here the one request is checked against the view's filters: same
      answer for the Filter/Priority chains over the root that the emulator's reactions are made of.
    - Serving a GET, PATCH or POST of one object scans every stored object (``_serve_fetch``,
      ``_serve_update``, ``_serve_create``): ~5 ms each at 2,600 objects. Here it is a dict lookup
      first (the key kmock's ``_handle`` itself stores and updates the object under), kmock's own
      scan only if that finds nothing.
    """
    from kmock._internal import dsl, k8s, rendering

    original = dsl.View.__contains__

    def contains(self: dsl.View, item: Any) -> bool:
        if not isinstance(item, rendering.Request):
            return bool(original(self, item))
        view: Any = self
        while True:
            kind = type(view)
            if kind is dsl.Filter:
                if not view.criteria(item):
                    return False
                view = view._source
            elif kind is dsl.Priority or kind is dsl.Chained:
                view = view._source
            elif isinstance(view, dsl.Root):
                served = view._requests
                if 0 <= item.id < len(served) and served[item.id] is item:
                    return True
                return any(request is item for request in served)
            else:  # slices, groups, exclusions: kmock's own (exhaustive) way
                return bool(original(view, item))

    dsl.View.__contains__ = contains  # type: ignore[method-assign]

    emulator = k8s.KubernetesEmulator
    original_fetch = emulator._serve_fetch
    original_update, original_create = emulator._serve_update, emulator._serve_create

    def stored(self: k8s.KubernetesEmulator, request: rendering.Request, namespace: Any, name: Any) -> Any:
        return self._objects._objects.get((request.resource, namespace, name))

    async def serve_fetch(self: k8s.KubernetesEmulator, request: rendering.Request) -> Any:
        obj = stored(self, request, request.namespace, request.name)
        if obj is not None and not obj.deleted:
            return obj.raw
        return await original_fetch(self, request)

    async def serve_update(self: k8s.KubernetesEmulator, request: rendering.Request) -> Any:
        obj = stored(self, request, request.namespace, request.name)
        return obj.last.raw if obj is not None else await original_update(self, request)

    async def serve_create(self: k8s.KubernetesEmulator, request: rendering.Request) -> Any:
        meta = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
        obj = stored(
            self, request, request.namespace or meta.get("namespace"), request.name or meta.get("name")
        )
        return obj.raw if obj is not None else await original_create(self, request)

    emulator._serve_fetch = serve_fetch  # type: ignore[method-assign]
    emulator._serve_update = serve_update  # type: ignore[method-assign]
    emulator._serve_create = serve_create  # type: ignore[method-assign]


def _describe_write(request: kmock.Request) -> str:
    """What a write was about, without values: e.g. ``status``, ``annotations[a,b]``, ``event:Ready``."""
    data = request.data if isinstance(request.data, dict) else {}
    plural = request.resource.plural if request.resource is not None else "?"
    if plural == "events":
        return f"event:{data.get('reason')}"
    if request.subresource:
        return request.subresource
    if str(request.method.value).upper() == "POST":
        return "create"
    parts: list[str] = []
    for key in sorted(data):
        if key == "metadata" and isinstance(data[key], dict):
            for mkey in sorted(data[key]):
                value = data[key][mkey]
                parts.append(
                    f"metadata.{mkey}" + (f"[{','.join(sorted(value))}]" if isinstance(value, dict) else "")
                )
        else:
            parts.append(key)
    return " ".join(parts) or "empty"


@dataclasses.dataclass
class RequestLog:
    """The operator's requests as kmock received them (the harness's own are left out), and the
    resourceVersions given out."""

    rows: list[tuple[float, str, str | None]] = dataclasses.field(default_factory=list)
    """(time.monotonic(), "ACTION plural[/sub]", what was written or None for reads)."""
    version: int = 1000
    """The last resourceVersion given out."""
    in_flight: set[int] = dataclasses.field(default_factory=set)
    """Versions given to writes not stored yet."""

    def stats(self, since: int) -> Json:
        counts: Counter[str] = Counter()
        writes: Counter[str] = Counter()
        rows = self.rows[since:]
        for _, label, write in rows:
            counts[label] += 1
            if write is not None:
                writes[write] += 1
        return {
            "cursor": len(self.rows),
            "counts": dict(counts),
            "writes": dict(writes),
            "first": rows[0][0] if rows else None,
            "last": rows[-1][0] if rows else None,
            "first_write": next((t for t, _, write in rows if write is not None), None),
            "lists": [(t, label) for t, label, _ in rows if label.startswith(("LIST", "WATCH"))],
        }

    def list_version(self) -> int:
        """A version every stored object is at or below, and every write still in flight above."""
        return min(self.in_flight) - 1 if self.in_flight else self.version


def _instrument(requests: RequestLog) -> None:
    """Record the operator's requests, serve their figures, and give out resourceVersions as an API
    server does. kmock keeps whatever version an object was created with and lists at version
    ``...``; its watch replays every existing object as ``ADDED`` whatever version it is asked for.
    kopf relies on versions twice: after patching an object it skips events older than its patch
    (with one constant version it re-handles the stale ones: 3 reconciles and 3 annotation patches
    per object at startup instead of 1); and it lists, then watches from the list's version (a
    replay makes every ``on.event`` handler, e.g. keyroute's ``secret_event``, run twice per object).

    - every create/patch gets the next version (``metadata.resourceVersion`` of the stored object);
    - a list reports a version below every write still in flight and at or above every stored one;
    - a watch from a numeric version leaves out the replayed ``ADDED`` objects at or below it;
    - ``GET /_bench/stats?since=N``: the operator's requests from the N-th on (CLOCK_MONOTONIC times,
      comparable across processes).
    """
    import kmock
    from kmock._internal import k8s
    from tests.e2e.conftest import Emulator, _is_harness

    original_handle = Emulator._handle

    async def handle(self: Emulator, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.url.path == "/_bench/stats":
            since = int(request.params.get("since", "0"))
            return aiohttp.web.json_response(requests.stats(since))
        if not _is_harness(request):
            method = str(request.method.value).upper()
            plural = request.resource.plural if request.resource is not None else request.url.path
            action = request.action.value if request.action is not None else method
            label = f"{action} {plural}{'/' + request.subresource if request.subresource else ''}"
            write = f"{method} {plural}: {_describe_write(request)}" if method in WRITE_METHODS else None
            requests.rows.append((time.monotonic(), label, write))
        if request.action not in (kmock.action.CREATE, kmock.action.UPDATE) or not isinstance(
            request.data, dict
        ):
            return await original_handle(self, request)
        requests.version += 1
        version = requests.version
        request.data.setdefault("metadata", {})["resourceVersion"] = str(version)
        requests.in_flight.add(version)
        try:
            return await original_handle(self, request)
        finally:
            requests.in_flight.discard(version)

    Emulator._handle = handle  # type: ignore[method-assign]

    emulator = k8s.KubernetesEmulator
    original_list, original_watch = emulator._serve_list, emulator._serve_watch

    async def serve_list(self: k8s.KubernetesEmulator, request: kmock.Request) -> Any:
        version = requests.list_version()  # before listing: anything stored later is above it
        body = await original_list(self, request)
        body["metadata"]["resourceVersion"] = str(version)
        return body

    async def serve_watch(self: k8s.KubernetesEmulator, request: kmock.Request) -> AsyncIterator[Any]:
        since = str(request.params.get("resourceVersion", ""))
        floor = int(since) if since.isdigit() else None
        async for item in original_watch(self, request):
            if floor is not None and isinstance(item, dict) and item.get("type") == "ADDED":
                version = str(((item.get("object") or {}).get("metadata") or {}).get("resourceVersion"))
                if version.isdigit() and int(version) <= floor:
                    continue  # already in the list the client watches from
            yield item

    emulator._serve_list = serve_list  # type: ignore[method-assign]
    emulator._serve_watch = serve_watch  # type: ignore[method-assign]


async def _seed(kube: Kube, layout: Layout, concurrency: int = 32) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def create(body: Json) -> None:
        async with limit:
            await kube.create(body)

    for bodies in (
        [layout.secret(i) for i in range(layout.pools)],
        [layout.pool(i) for i in range(layout.pools)],
        [layout.chain(j) for j in range(layout.chains)],
    ):
        await asyncio.gather(*(create(b) for b in bodies))


async def serve_kmock(args: argparse.Namespace) -> int:
    import warnings

    with warnings.catch_warnings():  # the harness imports kopf.testing and kmock
        warnings.simplefilter("ignore", DeprecationWarning)
        from tests.e2e.conftest import running_kube
    _teach_kmock_namespaces()
    _speed_up_kmock()
    _instrument(RequestLog())

    layout = Layout(args.pools, args.chains)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_kube() as kube:
        started = time.perf_counter()
        await _seed(kube, layout)
        seeded = time.perf_counter() - started
        print(
            json.dumps({"url": kube.url, "token": kube.token, "seed_seconds": round(seeded, 2)}),
            flush=True,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.max_seconds)
        if not stop.is_set():
            print("operator_bench --serve-kmock: --max-seconds reached, exiting", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------
# The orchestrator's view of kmock: watch streams (config Secrets, pools, chains) and request stats.
# Every time is time.monotonic() (CLOCK_MONOTONIC: the same clock in every process of the host).


@dataclasses.dataclass
class Seen:
    value: Any
    at: float  # when the value last changed (time.monotonic() at the event's arrival)


class Watcher:
    """Follows kmock's watch streams; keeps, per object, what the benchmark waits for."""

    PATHS = {
        "secrets": f"/api/v1/namespaces/{NAMESPACE}/secrets",
        "credentialpools": f"/apis/{GROUP_VERSION}/namespaces/{NAMESPACE}/credentialpools",
        "providerchains": f"/apis/{GROUP_VERSION}/namespaces/{NAMESPACE}/providerchains",
    }

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}", HARNESS_HEADER: "1"}
        self.config_hash: dict[str, Seen] = {}  # chain name → its config Secret's hash annotation
        self.pool_synced: dict[str, Seen] = {}  # pool name → (generation, status.observedGeneration)
        self.chain_synced: dict[str, Seen] = {}  # chain name → (generation, status.observedGeneration)
        self.ready = {plural: asyncio.Event() for plural in self.PATHS}
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self, expected: dict[str, int]) -> None:
        """Open the watches; return once each has streamed the ``expected`` existing objects."""
        self._session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=None))
        for plural, path in self.PATHS.items():
            self._tasks.append(asyncio.create_task(self._follow(plural, path, expected[plural])))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.ready.values())), timeout=60)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _follow(self, plural: str, path: str, expected: int) -> None:
        assert self._session is not None
        seen = 0
        async with self._session.get(self.url + path, params={"watch": "true"}) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                self._record(plural, event.get("type"), event.get("object") or {}, time.monotonic())
                seen += 1
                if seen >= expected:
                    self.ready[plural].set()
                async with self._changed:
                    self._changed.notify_all()

    def _record(self, plural: str, type_: str | None, obj: Json, at: float) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name"))
        value: Any
        if plural == "secrets":
            if not name.endswith(CONFIG_SUFFIX):
                return
            target, name = self.config_hash, name[: -len(CONFIG_SUFFIX)]
            if type_ == "DELETED":
                target.pop(name, None)
                return
            value = (meta.get("annotations") or {}).get(HASH_ANNOTATION)
        else:
            target = self.pool_synced if plural == "credentialpools" else self.chain_synced
            value = (meta.get("generation"), (obj.get("status") or {}).get("observedGeneration"))
        previous = target.get(name)
        if previous is None or previous.value != value:
            target[name] = Seen(value, at)

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds (checked after every event); False on timeout."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=remaining)
        return True


def _synced(seen: Seen | None) -> bool:
    if seen is None:
        return False
    generation, observed = seen.value
    return observed is not None and observed == generation


@dataclasses.dataclass
class Stats:
    """The operator's requests since a cursor, as kmock's process logged them."""

    cursor: int
    counts: Counter[str]
    writes: Counter[str]
    first: float | None
    last: float | None
    first_write: float | None
    lists: list[tuple[float, str]]  # when the operator listed or (re)opened a watch

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def fetched(self, plural: str) -> int:
        return self.counts.get(f"FETCH {plural}", 0)


async def fetch_stats(session: aiohttp.ClientSession, since: int = 0) -> Stats:
    async with session.get("/_bench/stats", params={"since": str(since)}) as response:
        response.raise_for_status()
        body = await response.json(content_type=None)
    return Stats(
        int(body["cursor"]),
        Counter(body["counts"]),
        Counter(body["writes"]),
        body["first"],
        body["last"],
        body["first_write"],
        [(float(t), str(label)) for t, label in body["lists"]],
    )


async def wait_quiet(
    session: aiohttp.ClientSession,
    since: int,
    *,
    quiet: float,
    timeout: float,  # noqa: ASYNC109 -- a polling deadline, not a cancellation scope
    until: Callable[[Stats], bool] = lambda stats: True,
) -> tuple[Stats, bool]:
    """Poll until ``until(stats)`` holds and the operator has sent nothing for ``quiet`` seconds.

    Returns the stats from ``since`` and whether that happened within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await fetch_stats(session, since)
        now = time.monotonic()
        if until(stats) and now - (stats.last or 0.0) >= quiet:
            return stats, True
        if now >= deadline:
            return stats, False
        await asyncio.sleep(0.25)


# ----------------------------------------------------------------------------------------------------
# The operator process.


class Operator:
    """``keyroute operator`` as a subprocess alone on core 0, its RSS sampled every 0.1 s."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: dict[str, str]) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_env = env
        self.metrics_port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.rss_samples: list[tuple[float, int]] = []  # (time.monotonic(), KiB)
        self._sampler: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def command(self) -> list[str]:
        return [
            KEYROUTE,
            "operator",
            "-n",
            NAMESPACE,
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            "0",
            "--log-level",
            "warning",
            "--leader-elect=false",  # one replica
        ]

    def environment(self) -> dict[str, str]:
        """The operator's environment: this one's, the kubeconfig and the extra variables."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.extra_env}

    async def start(self) -> None:
        env = self.environment()
        with self.log_path.open("wb") as out:
            self.started_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=str(self.log_path.parent),
                preexec_fn=child_setup(CORE_OPERATOR),
            )
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while self.proc is not None and self.proc.returncode is None:
            kib = rss_kib(self.pid)
            if kib > 0:
                self.rss_samples.append((time.monotonic(), kib))
            await asyncio.sleep(0.1)

    def rss_mib(self, field: str = "VmRSS") -> float:
        return round(rss_kib(self.pid, field) / 1024, 1)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"the operator exited with {self.proc.returncode}; see {self.log_path}")

    async def metrics(self) -> dict[str, float]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response,
        ):
            return parse_metrics(await response.text())

    async def stop(self, timeout: float = 20.0) -> Json:  # noqa: ASYNC109
        """SIGTERM, wait (SIGKILL after ``timeout``); the exit code and how long stopping took."""
        assert self.proc is not None
        began = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        return {"exit_code": self.proc.returncode, "seconds": round(time.monotonic() - began, 2)}


def write_kubeconfig(path: Path, url: str, token: str) -> None:
    context = {"cluster": "kmock", "user": "bench", "namespace": NAMESPACE}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "bench", "user": {"token": token}}],
        "contexts": [{"name": "kmock", "context": context}],
        "current-context": "kmock",
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML: kopf's kubeconfig login reads it
    path.chmod(0o600)


def parse_metrics(text: str) -> dict[str, float]:
    """The ``keyroute_operator_*`` samples of a Prometheus exposition, by full sample name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("keyroute_operator_"):
            name, _, value = line.rpartition(" ")
            if not name.split("{")[0].endswith("_created"):
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
    return out


def log_problems(path: Path) -> Json:
    """Counts of log lines by level in the operator's (JSON) log, and the most frequent messages."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                level, message = str(record.get("level")), str(record.get("msg"))
            except (ValueError, AttributeError):
                level, message = "raw", line
            levels[level] += 1
            messages[re.sub(r"\d+", "N", message)[:160]] += 1
    return {"levels": dict(levels), "top": messages.most_common(6)}


# ----------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    pools: int
    chains: int
    changes: int  # Secret changes, and as many pool changes
    quiet_seconds: float
    sync_timeout: float


MODES = {
    "quick": Mode("quick", 100, 30, 20, 5.0, 90.0),
    "full": Mode("full", 1000, 300, 50, 15.0, 200.0),
}
CHANGE_TIMEOUT = 10.0  # seconds one change may take to show before it counts as failed
CHANGE_GAP = 0.2  # seconds between changes


async def _latency_round(
    what: str,
    watcher: Watcher,
    chains: list[str],
    change: Callable[[], Awaitable[None]],
    pool: str | None = None,
) -> Json:
    """Apply ``change``; time until every chain's config hash differs (and ``pool``'s status is current)."""
    before = {c: watcher.config_hash[c].value for c in chains}
    generation_before = watcher.pool_synced[pool].value[0] if pool else None
    t0 = time.monotonic()
    await change()

    def done() -> bool:
        if any(c not in watcher.config_hash or watcher.config_hash[c].value == before[c] for c in chains):
            return False
        if pool is None:
            return True
        seen = watcher.pool_synced[pool]
        return seen.value[0] != generation_before and _synced(seen)

    ok = await watcher.wait(done, CHANGE_TIMEOUT)
    row: Json = {"what": what, "chains": len(chains), "ok": ok}
    if ok:
        arrivals = [watcher.config_hash[c].at - t0 for c in chains]
        row["all_ms"] = round(max(arrivals) * 1e3, 1)
        row["first_ms"] = round(min(arrivals) * 1e3, 1)
        if pool is not None:
            row["pool_status_ms"] = round((watcher.pool_synced[pool].at - t0) * 1e3, 1)
    return row


def _spread(items: list[int], n: int, offset: int = 0) -> list[int]:
    """``n`` items spread evenly over ``items`` (all of them if there are fewer)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[(int(k * step) + offset) % len(items)] for k in range(n)]


def _summary(rows: list[Json], key: str) -> Json:
    values = [int(r[key] * 1e6) for r in rows if r.get("ok") and key in r]
    out = {k: round(v, 1) for k, v in percentiles(values).items()}
    return {**out, "failed": sum(1 for r in rows if not r.get("ok"))}


async def run(mode: Mode, stamp: str, result: Json) -> None:
    """The whole benchmark; fills ``result`` as it goes (so a failure still leaves the figures so far)."""
    layout = Layout(mode.pools, mode.chains)
    logs = RESULTS / f"{stamp}-operator-{mode.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result["logs"] = str(logs.relative_to(ROOT))

    log(f"starting kmock with {mode.pools} pools, {mode.pools} Secrets, {mode.chains} chains")
    with (logs / "kmock.log").open("wb") as kmock_log:
        kmock_proc = await asyncio.create_subprocess_exec(
            PY,
            str(SELF),
            "--serve-kmock",
            "--pools",
            str(mode.pools),
            "--chains",
            str(mode.chains),
            "--max-seconds",
            str(LIFETIME),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=kmock_log,
            preexec_fn=child_setup(CORE_REST),
        )
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, (CORE_REST & CORES) or CORES)
    operators: list[Operator] = []
    watcher: Watcher | None = None
    try:
        assert kmock_proc.stdout is not None
        line = await asyncio.wait_for(kmock_proc.stdout.readline(), timeout=180)
        if not line:
            raise RuntimeError(f"kmock did not start; see {logs / 'kmock.log'}")
        info = json.loads(line)
        url, token = str(info["url"]), str(info["token"])
        result["seed_seconds"] = info["seed_seconds"]
        log(f"kmock at {url} (pid {kmock_proc.pid}), seeded in {info['seed_seconds']}s")
        kubeconfig = logs / "kubeconfig"
        write_kubeconfig(kubeconfig, url, token)

        headers = {"Authorization": f"Bearer {token}", HARNESS_HEADER: "1"}
        async with aiohttp.ClientSession(base_url=url, headers=headers) as session:
            from tests.e2e.conftest import Kube

            # Only the helpers that never touch the in-process emulator (get/list/patch) are used.
            kube = Kube(cast(Any, None), url, token, session)
            watcher = Watcher(url, token)
            expected = {"secrets": mode.pools, "credentialpools": mode.pools, "providerchains": mode.chains}
            await watcher.start(expected)
            bench = Bench(mode, layout, kube, session, watcher, kubeconfig, logs, kmock_proc.pid, result)
            try:
                await bench.initial_sync_and_changes()
                await bench.restart_and_resync()
            finally:
                operators.extend(bench.operators)
        result["kmock_cpu_seconds_total"] = round(cpu_seconds(kmock_proc.pid), 2)
    finally:
        for op in operators:
            if op.proc is not None and op.proc.returncode is None:
                await op.stop(timeout=5)
        if watcher is not None:
            await watcher.close()
        if kmock_proc.returncode is None:
            kmock_proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(kmock_proc.wait(), timeout=15)
            except TimeoutError:
                kmock_proc.kill()
                await kmock_proc.wait()


@dataclasses.dataclass
class Bench:
    mode: Mode
    layout: Layout
    kube: Kube
    session: aiohttp.ClientSession
    watcher: Watcher
    kubeconfig: Path
    logs: Path
    kmock_pid: int
    result: Json
    operators: list[Operator] = dataclasses.field(default_factory=list)

    @property
    def pools(self) -> list[str]:
        return [self.layout.pool_name(i) for i in range(self.layout.pools)]

    @property
    def chains(self) -> list[str]:
        return [self.layout.chain_name(j) for j in range(self.layout.chains)]

    def all_synced(self) -> bool:
        w = self.watcher
        return (
            all(_synced(w.pool_synced.get(p)) for p in self.pools)
            and all(_synced(w.chain_synced.get(c)) for c in self.chains)
            and all(c in w.config_hash for c in self.chains)
        )

    async def _progress(self, op: Operator) -> None:
        w = self.watcher
        while True:
            await asyncio.sleep(10)
            pools = sum(1 for p in self.pools if _synced(w.pool_synced.get(p)))
            chains = sum(1 for c in self.chains if _synced(w.chain_synced.get(c)))
            log(
                f"  {time.monotonic() - op.started_at:4.0f}s: pools {pools}/{len(self.pools)}, chains "
                f"{chains}/{len(self.chains)}, configs {len(w.config_hash)}/{len(self.chains)}, "
                f"operator RSS {rss_kib(op.pid) / 1024:.0f} MiB"
            )

    # --- phases 1-4 ------------------------------------------------------------------------------

    async def initial_sync_and_changes(self) -> None:
        r, w = self.result, self.watcher
        # No periodic resync during this phase (it is measured on its own, after a restart).
        op = Operator(self.kubeconfig, self.logs / "operator-1.log", {"KEYROUTE_RESYNC_SECONDS": "3600"})
        self.operators.append(op)
        r["command"] = " ".join(["keyroute", *op.command[1:]])
        kmock_cpu0 = cpu_seconds(self.kmock_pid)
        await op.start()
        r["affinity"] = {
            "operator": sorted(os.sched_getaffinity(op.pid)),
            "kmock": sorted(os.sched_getaffinity(self.kmock_pid)),
        }
        log(
            f"operator started (pid {op.pid}, cores {r['affinity']['operator']}); waiting for the initial sync"
        )
        progress = asyncio.create_task(self._progress(op))
        try:
            ok = await w.wait(self.all_synced, timeout=self.mode.sync_timeout)
        finally:
            progress.cancel()
        op.check_alive()
        if not ok:
            r["operator_log_1"] = log_problems(op.log_path)
            raise RuntimeError(
                f"initial sync incomplete after {self.mode.sync_timeout:.0f}s; see {op.log_path}"
            )
        pools_done = max(w.pool_synced[p].at for p in self.pools)
        chains_done = max(w.chain_synced[c].at for c in self.chains)
        configs_done = max(w.config_hash[c].at for c in self.chains)
        done = max(pools_done, chains_done, configs_done)
        sync_stats = await fetch_stats(self.session)
        sync: Json = {
            "seconds": round(done - op.started_at, 2),
            "first_request_seconds": round((sync_stats.first or done) - op.started_at, 2),
            "first_write_seconds": round((sync_stats.first_write or done) - op.started_at, 2),
            "pools_seconds": round(pools_done - op.started_at, 2),
            "chains_seconds": round(chains_done - op.started_at, 2),
            "configs_seconds": round(configs_done - op.started_at, 2),
            "operator_cpu_seconds": round(cpu_seconds(op.pid), 2),
            "kmock_cpu_seconds": round(cpu_seconds(self.kmock_pid) - kmock_cpu0, 2),
            "peak_rss_mib_sampled": round(
                max((k for t, k in op.rss_samples if t <= done), default=0) / 1024, 1
            ),
        }
        r["sync"] = sync
        log(
            f"initial sync: {sync['seconds']}s (operator CPU {sync['operator_cpu_seconds']}s, "
            f"kmock CPU {sync['kmock_cpu_seconds']}s)"
        )
        # Confirm by listing: the watch streams said so, the store must agree.
        listed_pools = await self.kube.list(GROUP_VERSION, "credentialpools", NAMESPACE)
        listed_chains = await self.kube.list(GROUP_VERSION, "providerchains", NAMESPACE)
        names = {s["metadata"]["name"] for s in await self.kube.list("v1", "secrets", NAMESPACE)}
        sync["confirmed_by_list"] = (
            len(listed_pools) == self.layout.pools
            and len(listed_chains) == self.layout.chains
            and all(_status_current(o) for o in listed_pools + listed_chains)
            and all(c + CONFIG_SUFFIX in names for c in self.chains)
        )
        sync["pools_ready"] = dict(Counter(_ready(o) for o in listed_pools))
        sync["chains_ready"] = dict(Counter(_ready(o) for o in listed_chains))

        # Whatever the operator still does after the last status/config landed (kopf's annotations...).
        settled, ok = await wait_quiet(self.session, 0, quiet=2.0, timeout=120)
        sync["settled"] = ok
        sync["settled_seconds"] = round((settled.last or done) - op.started_at, 2)
        sync["requests"] = dict(sorted(settled.counts.items()))
        sync["writes"] = dict(sorted(settled.writes.items()))
        r["rss_mib_after_sync"] = op.rss_mib()
        r["vmhwm_mib_after_sync"] = op.rss_mib("VmHWM")
        r["metrics_after_sync"] = await op.metrics()

        # --- 2. quiet period
        log(f"quiet period: {self.mode.quiet_seconds:.0f}s")
        await asyncio.sleep(self.mode.quiet_seconds)
        quiet = await fetch_stats(self.session, settled.cursor)
        r["quiet"] = {
            "seconds": self.mode.quiet_seconds,
            "requests": dict(quiet.counts),
            "writes": dict(quiet.writes),
        }

        # --- 3. Secret changes; 4. pool changes (other pools)
        chains_of_pool = self.layout.chains_of_pool()
        used = sorted(chains_of_pool)
        secret_pools = _spread(used, self.mode.changes)
        rest = [i for i in used if i not in set(secret_pools)] or used
        pool_pools = _spread(rest, self.mode.changes, offset=1)
        log(f"{len(secret_pools)} Secret changes, then {len(pool_pools)} pool changes")
        cursor = quiet.cursor
        rows: list[Json] = []
        for i in secret_pools:
            name, value = self.layout.secret_name(i), _b64(f"sk-bench-{i:04d}-1-{secrets.token_hex(12)}")

            async def change_secret(name: str = name, value: str = value) -> None:
                await self.kube.patch("v1", "secrets", NAMESPACE, name, {"data": {"key-1": value}})

            affected = [self.layout.chain_name(j) for j in chains_of_pool[i]]
            rows.append(await _latency_round(name, w, affected, change_secret))
            await asyncio.sleep(CHANGE_GAP)
        stats = await fetch_stats(self.session, cursor)
        r["secret_change"] = self._change_summary(rows, stats)

        cursor, rows = stats.cursor, []
        for i in pool_pools:
            # A real spec change (the third credential goes), with the generation bump an API server does.
            name, credentials = self.layout.pool_name(i), self.layout.pool_credentials(i, count=2)

            async def change_pool(name: str = name, credentials: list[Json] = credentials) -> None:
                patch = {"spec": {"credentials": credentials}}
                await self.kube.patch(
                    GROUP_VERSION, "credentialpools", NAMESPACE, name, patch, bump_generation=True
                )

            affected = [self.layout.chain_name(j) for j in chains_of_pool[i]]
            rows.append(await _latency_round(name, w, affected, change_pool, pool=name))
            await asyncio.sleep(CHANGE_GAP)
        stats = await fetch_stats(self.session, cursor)
        r["pool_change"] = self._change_summary(rows, stats, pool_status=True)
        r["rss_mib_after_changes"] = op.rss_mib()
        r["vmhwm_mib_phase1"] = op.rss_mib("VmHWM")
        r["metrics"] = await op.metrics()
        op.check_alive()
        r["stop"] = await op.stop()
        r["operator_log_1"] = log_problems(op.log_path)
        log(f"operator stopped: {r['stop']}")

    @staticmethod
    def _change_summary(rows: list[Json], stats: Stats, pool_status: bool = False) -> Json:
        out: Json = {
            "all_chains": _summary(rows, "all_ms"),
            "first_chain": _summary(rows, "first_ms"),
            "chains_per_change": dict(sorted(Counter(r["chains"] for r in rows).items())),
            "requests": dict(sorted(stats.counts.items())),
            "writes": dict(sorted(stats.writes.items())),
            "rows": rows,
        }
        if pool_status:
            out["pool_status"] = _summary(rows, "pool_status_ms")
        return out

    # --- phase 5 ---------------------------------------------------------------------------------

    async def restart_and_resync(self) -> None:
        """A restart against the synced store (kopf resumes every object), then one periodic resync
        pass of keyroute's own resync task; the writes of each."""
        r = self.result
        n_pools, n_chains = self.layout.pools, self.layout.chains
        # The resync pass must come after the restart's resume pass: give that twice the initial sync.
        period = max(20, round(float(r["sync"]["settled_seconds"]) * 2 + 10))
        cursor = (await fetch_stats(self.session)).cursor
        env = {"KEYROUTE_RESYNC_SECONDS": str(period)}
        op = Operator(self.kubeconfig, self.logs / "operator-2.log", env)
        self.operators.append(op)
        await op.start()
        log(f"restarted (KEYROUTE_RESYNC_SECONDS={period}); waiting for the resume pass")

        def everything_fetched(stats: Stats) -> bool:
            return stats.fetched("credentialpools") >= n_pools and stats.fetched("providerchains") >= n_chains

        resumed, ok = await wait_quiet(
            self.session, cursor, quiet=2.0, timeout=period - 3, until=everything_fetched
        )
        r["restart"] = {
            "settled_before_resync": ok,
            "lists_and_watches": [(round(t - op.started_at, 1), label) for t, label in resumed.lists],
            "resume_seconds": round((resumed.last or op.started_at) - op.started_at, 2),
            "requests": dict(sorted(resumed.counts.items())),
            "writes": dict(sorted(resumed.writes.items())),
            "rss_mib_after": op.rss_mib(),
            "vmhwm_mib": op.rss_mib("VmHWM"),
        }
        log(f"resume pass: {r['restart']['resume_seconds']}s; waiting for the periodic resync pass")
        resync_at = op.started_at + period
        await asyncio.sleep(max(0.0, resync_at - time.monotonic()))
        passed, ok = await wait_quiet(
            self.session,
            resumed.cursor,
            quiet=3.0,
            timeout=min(240.0, period * 3 + 30),
            until=everything_fetched,
        )
        r["resync"] = {
            "period_seconds": period,
            "completed": ok,
            "lists_and_watches": [(round(t - op.started_at, 1), label) for t, label in passed.lists],
            "pass_seconds": round((passed.last or resync_at) - resync_at, 2),
            "requests": dict(sorted(passed.counts.items())),
            "writes": dict(sorted(passed.writes.items())),
            "rss_mib_after": op.rss_mib(),
            "vmhwm_mib": op.rss_mib("VmHWM"),
        }
        r["metrics_restart"] = await op.metrics()
        op.check_alive()
        r["stop_restart"] = await op.stop()
        r["operator_log_2"] = log_problems(op.log_path)
        log(f"resync pass: {r['resync']['pass_seconds']}s, {sum(passed.writes.values())} writes; stopped")


def _status_current(obj: Json) -> bool:
    observed = (obj.get("status") or {}).get("observedGeneration")
    return observed is not None and observed == (obj.get("metadata") or {}).get("generation")


def _ready(obj: Json) -> str:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("status"))
    return "none"


# ----------------------------------------------------------------------------------------------------
# Report.


def _pct(summary: Json) -> str:
    if "p50" not in summary:
        return "n/a"
    return f"{summary['p50']:.0f} / {summary['p99']:.0f} ms"


def _is_kopfs(write: str) -> bool:
    """Writes kopf makes on its own: Events it posts, its diff-base/progress annotations."""
    return write.startswith("POST events") or "metadata.annotations" in write


def _own(writes: Json) -> int:
    return sum(v for k, v in writes.items() if not _is_kopfs(k))


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _mb(mib: float) -> str:
    return f"{mib:.0f} MiB ({mib * 1.048576:.0f} MB)"


def report(r: Json) -> str:
    objects = r["objects"]
    lines = [
        f"### Operator benchmark, {r['mode']}: {objects['pools']} CredentialPools + {objects['secrets']} "
        f"Secrets, {objects['chains']} ProviderChains ({r['stamp']})",
        "",
    ]
    if "sync" not in r:
        return "\n".join([*lines, f"Failed before the initial sync completed: {r.get('error')}", ""])
    sync = r["sync"]
    peak = max(sync["peak_rss_mib_sampled"], r["vmhwm_mib_after_sync"])
    lines += [
        "| measure | value | target | |",
        "|---|---|---|---|",
        f"| full resync: operator start → every status current and every config Secret there | "
        f"**{sync['seconds']:.1f} s** (first API request {sync['first_request_seconds']:.1f} s, first write "
        f"{sync.get('first_write_seconds', 0):.1f} s; pools {sync['pools_seconds']:.1f} s, chains "
        f"{sync['chains_seconds']:.1f} s; operator busy until {sync['settled_seconds']:.1f} s) | — | |",
        f"| CPU during it: operator / kmock | {sync['operator_cpu_seconds']:.1f} s / "
        f"{sync['kmock_cpu_seconds']:.1f} s | — | |",
        f"| operator RSS after the initial sync | {_mb(r['rss_mib_after_sync'])} | ≤ 150 MB | "
        f"{_met(r['rss_mib_after_sync'] * 1.048576 <= 150)} |",
        f"| operator peak RSS up to then (VmHWM) | {_mb(peak)} | ≤ 150 MB | {_met(peak * 1.048576 <= 150)} |",
    ]
    for key, title in (("secret_change", "Secret change"), ("pool_change", "pool spec change")):
        if key not in r:
            continue
        c = r[key]
        all_chains = c["all_chains"]
        ok = "p99" in all_chains and all_chains["p99"] <= 1000 and not all_chains["failed"]
        failed = (
            f", {all_chains['failed']} not seen within {CHANGE_TIMEOUT:.0f} s" if all_chains["failed"] else ""
        )
        lines.append(
            f"| {title} → every chain using it re-rendered (new config hash), p50 / p99 "
            f"(n={all_chains.get('n', 0)}{failed}) | **{_pct(all_chains)}** | p99 ≤ 1 s | {_met(ok)} |"
        )
        if "pool_status" in c:
            lines.append(
                f"| pool spec change → pool status observedGeneration, p50 / p99 | {_pct(c['pool_status'])} | — | |"
            )
    windows = (
        [("quiet", f"a {r['quiet']['seconds']:.0f} s quiet period after the sync")] if "quiet" in r else []
    )
    if "restart" in r:
        windows.append(("restart", f"a restart's resume pass ({r['restart']['resume_seconds']:.1f} s)"))
    if "resync" in r:
        windows.append(
            (
                "resync",
                f"a periodic resync pass (KEYROUTE_RESYNC_SECONDS={r['resync']['period_seconds']}, "
                f"{r['resync']['pass_seconds']:.1f} s)",
            )
        )
    for key, title in windows:
        writes = r[key]["writes"]
        lines.append(
            f"| writes for unchanged objects: {title}; keyroute's / kopf's | {_own(writes)} / "
            f"{sum(writes.values()) - _own(writes)} | 0 | {_met(_own(writes) == 0)} |"
        )
    if "stop" in r:
        lines.append(
            f"| operator stop (SIGTERM → exit) | {r['stop']['seconds']:.1f} s (exit {r['stop']['exit_code']}) | — | |"
        )
    lines += [
        "",
        "kopf's writes are the Events it posts and its `metadata.annotations` patches (diff-base"
        " `last-handled-configuration`, progress); every write is listed by kind below.",
        "",
        "Operator requests seen by kmock, by phase (reads = FETCH of one object):",
        "",
        "| phase | requests | FETCH pools / chains / Secrets | writes by kind |",
        "|---|---|---|---|",
    ]
    for key, title in (
        ("sync", "initial sync (until quiet)"),
        ("quiet", "quiet period"),
        ("secret_change", "Secret changes"),
        ("pool_change", "pool changes"),
        ("restart", "restart resume pass"),
        ("resync", "periodic resync pass"),
    ):
        if key not in r:
            continue
        requests, writes = r[key]["requests"], r[key]["writes"]
        fetches = " / ".join(
            str(requests.get(f"FETCH {p}", 0)) for p in ("credentialpools", "providerchains", "secrets")
        )
        detail = "<br>".join(f"`{k}` x{v}" for k, v in sorted(writes.items())) or "none"
        lines.append(f"| {title} | {sum(requests.values())} | {fetches} | {detail} |")
    metrics = r.get("metrics") or r.get("metrics_after_sync") or {}
    if metrics:
        lines += ["", "Operator `/metrics` at the end of phase 1 (histogram buckets left out):", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:g} |" for k, v in sorted(metrics.items()) if "_bucket" not in k]
        before = r.get("metrics_after_sync") or {}
        for kind in ("CredentialPool", "ProviderChain"):
            sum_key = f'keyroute_operator_reconcile_seconds_sum{{kind="{kind}"}}'
            count_key = f'keyroute_operator_reconcile_seconds_count{{kind="{kind}"}}'
            for title, total, count in (
                ("initial sync", before.get(sum_key), before.get(count_key)),
                (
                    "the changes",
                    metrics.get(sum_key, 0) - before.get(sum_key, 0),
                    metrics.get(count_key, 0) - before.get(count_key, 0),
                ),
            ):
                if total is not None and count:
                    lines.append(
                        f"| mean {kind} reconcile (wall time) during {title} | "
                        f"{total / count * 1e3:.1f} ms over {count:g} |"
                    )
    affinity = r.get("affinity") or {}
    lines += [
        "",
        f"Cores: operator {affinity.get('operator')}, kmock and this orchestrator {affinity.get('kmock')} "
        f"(of {r['host']['cpus']}); kmock seeded in {r.get('seed_seconds')} s; run took {r.get('wall_seconds')} s.",
    ]
    levels = [r.get(f"operator_log_{n}", {}).get("levels") for n in (1, 2)]
    lines += [
        "",
        f"Operator log lines by level (`--log-level warning`): run 1 {levels[0]}, run 2 {levels[1]}.",
    ]
    if r.get("error"):
        lines += ["", f"**The run failed:** {r['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100 pools / 30 chains / 20 changes each")
    p.add_argument("--serve-kmock", action="store_true", help="only run the seeded kmock; prints its URL")
    p.add_argument("--pools", type=int, default=None, help="override the number of pools (and Secrets)")
    p.add_argument("--chains", type=int, default=None, help="override the number of chains")
    p.add_argument("--changes", type=int, default=None, help="override the number of Secret/pool changes")
    p.add_argument("--max-seconds", type=float, default=LIFETIME, help="--serve-kmock: exit after this long")
    args = p.parse_args(argv)

    if args.serve_kmock:
        args.pools = args.pools if args.pools is not None else 10
        args.chains = args.chains if args.chains is not None else 3
        return int(asyncio.run(serve_kmock(args)))

    mode = MODES["quick" if args.quick else "full"]
    mode = dataclasses.replace(
        mode,
        pools=args.pools or mode.pools,
        chains=args.chains or mode.chains,
        changes=args.changes or mode.changes,
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: Json = {
        "mode": mode.name,
        "stamp": stamp,
        "objects": {"pools": mode.pools, "secrets": mode.pools, "chains": mode.chains},
        "changes": mode.changes,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
    }
    began = time.monotonic()
    code = 0
    try:
        asyncio.run(asyncio.wait_for(run(mode, stamp, result), timeout=LIFETIME - 60))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {result['error']}")
        code = 1
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    text = report(result)
    print(text)
    base = RESULTS / f"{stamp}-operator-{mode.name}"
    for suffix, content in ((".json", json.dumps(result, indent=2, default=str) + "\n"), (".md", text)):
        base.with_suffix(suffix).write_text(content)
        (RESULTS / f"latest-operator-{mode.name}{suffix}").write_text(content)
    log(f"wrote {base.relative_to(ROOT)}.json and .md ({result['wall_seconds']}s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
