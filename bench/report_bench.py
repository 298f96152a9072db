"""keyroute reporting benchmark (issues #4, #11): upstream 429 → pool status latency, and a report flood.

    python bench/report_bench.py                  # ~2 minutes: 40 iterations 0.8 s apart, then the flood
    python bench/report_bench.py --back-to-back   # the same with the 40 iterations back to back
    python bench/report_bench.py --iterations 10 --flood-requests 300 --flood-seconds 3   # ~1 minute
    python bench/report_bench.py --api kmock      # against the e2e emulator instead of a real API server
    python bench/report_bench.py --serve-kmock    # just the instrumented kmock (prints URL, token)

Targets (issues #4 and #11):

- "Upstream 429 → pool status shows it: p99 ≤ 2 s", also for "40 new cooldowns back to back from one
  pod", "without exceeding the API-server budget the README promises" (per pod: 50 report writes at
  once, then 1 per second).
- "Report flood: status writes per pool ≤ 2 per second; Events deduplicated per transition."

Processes (2 cores, as ``operator_bench.py``). ``--api real`` (the default): the real etcd,
kube-apiserver and kube-controller-manager v1.28 (``tests/realapi/controlplane.py``'s ``ControlPlane``,
binaries from ``KUBEBUILDER_ASSETS``; ``./dev test`` unpacks them into ``.tools/envtest/bin``) on core 1,
keyroute's CRDs applied, the API server writing an audit log (report Event writes and pool/chain status
writes with their bodies, the operator's GETs of pools; never a Secret) that serves as the request log:
``requestReceivedTimestamp`` (µs, wall clock) converted to this process's monotonic clock.
``keyroute operator -n default`` runs alone on core 0 with the admin's static-token kubeconfig
(``admin_token_kubeconfig``; operator_bench's ``Operator``, ``--log-level warning``, JSON log to a file).
The sidecars report as the namespace's ``default`` ServiceAccount (a TokenRequest token in a kubeconfig)
bound to the README's sidecar Role. ``--api kmock``: the e2e harness's kmock emulator as
``report_bench.py --serve-kmock`` (operator_bench's kmock patches + a request log with arrival times,
served at ``GET /_bench/log?since=N``) on core 1 instead. This process, on core 1 next to the API,
runs a ``FakeProvider``, two real in-process sidecars (pods ``bench-a`` and ``bench-b``, default
reporter settings: ``core.reports.REPORT_BURST`` / ``REPORT_RATE`` / ``REPEAT_RESERVE``), the HTTP
client and a watch of the CredentialPools. Every time is ``time.monotonic()``.

Objects: Secret ``openai-keys`` (60 fake keys ``sk-bench-REPORT-KEY-000001``...), CredentialPool
``openai`` (provider openai, FillFirst, credentials ``k01``..``k60``), ProviderChain ``agents`` (one
entry at the fake provider, ``fallback.maxWait: 0s``); the sidecars run on the operator's rendered
``agents-keyroute`` Secret.

Phases:

1. **Latency** (``--iterations``, model ``bench-model``): per iteration the provider is scripted to
   answer the next key k_i once with 429 ``Retry-After: 600``; one request through sidecar A, which
   cools k_i and answers with k_{i+1}. t0 = the answer's arrival here; t1 = the arrival here of the
   first watch event of pool ``openai`` whose status shows k_i ``CoolingDown`` (a watch, not polling).
   Iterations start ≥ ``--spacing`` s apart and only once the previous one was seen, so each is
   measured alone (the operator reconciles an object at most every 0.5 s). ``--back-to-back``: no
   spacing, each request is sent as soon as the previous answer arrived, then every status is awaited
   (a separate run: same keys, fresh reporter). From the request log each iteration is split into:
   request → sidecar action; action → Event at the API (reporter, its token bucket); Event → the
   operator's GET of the pool (its watch, 0.1 s coalescing, 0.55 s min interval); GET → status PATCH
   (the reconcile); PATCH → this watch (the API's watch delivery).
2. **Flood** (same model, so keys k01..k40 are already cooling for 600 s): every request now gets
   429 ``Retry-After: 1`` (``--flood-retry-after``); ``--flood-requests`` requests paced evenly over
   ``--flood-seconds`` (at most ``--flood-concurrency`` in flight), alternately through A and B; then
   until the flood's cooldowns have ended and both reporters have delivered everything (bounded by
   ``--drain-seconds``). Measured from the request log: the operator's status PATCHes of pool ``openai``
   per 1-s window; the sidecars' Event creates (POST) and repeats (PATCH) against their recovery
   actions; Event ``count`` sums; how late each report reached the API; ``keyroute_reports_total``.
3. **No key in sight**: no key value (nor the ``sk-bench-REPORT-KEY`` prefix) in the operator's log,
   the sidecars' log (JSON, unredacted formatter), the Events, the pools and chains.

Writes ``bench/results/<stamp>-report[-kmock][-back-to-back].{json,md}`` and ``latest-report*.{json,md}``
(gitignored), with the processes' logs and the request log (``requests.json``) in ``<stamp>-report*-logs/``. The sidecars' config files (they
hold the keys) live in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import itertools
import json
import logging
import os
import platform
import signal
import ssl
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import aiohttp.web

SELF = Path(__file__).resolve()
BENCH = SELF.parent
sys.path.insert(0, str(BENCH))
import operator_bench as ob  # noqa: E402  (adds the repository root to sys.path: tests.e2e.conftest)
from benchlib import audited_control_plane, cpu_seconds, percentiles  # noqa: E402

if TYPE_CHECKING:
    import kmock
    from tests.realapi.controlplane import ControlPlane

    from keyroute.fakeprovider import FakeProvider
    from keyroute.kube import Kube as KubeClient
    from keyroute.sidecar.app import Sidecar

Json = dict[str, Any]

ROOT = ob.ROOT
RESULTS = ob.RESULTS
NAMESPACE = ob.NAMESPACE
LIFETIME = 600.0  # seconds the kmock process may live at most
KEY_PREFIX = "sk-bench-REPORT-KEY"
N_KEYS = 60
POOL, CHAIN, SECRET = "openai", "agents", "openai-keys"
PODS = ("bench-a", "bench-b")
MODEL = "bench-model"
CORE_PATH = f"/api/v1/namespaces/{NAMESPACE}"
KR_PATH = f"/apis/{ob.GROUP_VERSION}/namespaces/{NAMESPACE}"
_TIMES = frozenset({"t_req", "t0", "t1", "t_patch"})  # monotonic instants, left out of the JSON
SEEN_TIMEOUT = 15.0  # seconds an iteration's status may take before it counts as not seen


def key_value(i: int) -> str:
    return f"{KEY_PREFIX}-{i:06d}"


def cred_name(i: int) -> str:
    return f"k{i:02d}"


def log(msg: str) -> None:
    ob.log(msg)


# ----------------------------------------------------------------------------------------------------
# --serve-kmock: operator_bench's kmock (same patches) plus a request log with arrival times.


def _who_agent(agent: str) -> str:
    for prefix, who in (("keyroute-operator", "operator"), ("keyroute-sidecar", "sidecar"), ("kopf", "kopf")):
        if agent.lower().startswith(prefix):
            return who
    return agent[:40] or "?"


def _log_row(request: kmock.Request, at: float) -> Json:
    """One request, as little as the analysis needs (never a Secret's data)."""
    resource = request.resource
    row = _row(
        at,
        str(request.method.value).upper(),
        str(resource.plural if resource is not None else request.url.path),
        request.subresource,
        request.name,
        next((v for k, v in request.headers.items() if k.lower() == "user-agent"), ""),
        request.data if isinstance(request.data, dict) else {},
    )
    if request.action is not None and request.action.value == "watch":
        row["m"] = "WATCH"
    return row


def _row(
    at: float, method: str, resource: str, subresource: str | None, name: str | None, agent: str, data: Json
) -> Json:
    """A request-log row, the same from kmock's log and from the API server's audit log."""
    from keyroute.core.reports import ANN_ACTION, ANN_CREDENTIAL, ANN_MODEL, ANN_POD, REPORT_LABEL

    row: Json = {"t": at, "m": method, "r": resource, "s": subresource, "n": name, "w": _who_agent(agent)}
    if resource == "events" and method in ("POST", "PATCH"):
        meta = data.get("metadata") or {}
        ann = meta.get("annotations") or {}
        row["n"] = row["n"] or meta.get("name")
        row["ev"] = {
            "reason": data.get("reason") or ann.get(ANN_ACTION),
            "report": (meta.get("labels") or {}).get(REPORT_LABEL) == "sidecar" or ANN_POD in ann,
            "cred": ann.get(ANN_CREDENTIAL),
            "model": ann.get(ANN_MODEL),
            "pod": ann.get(ANN_POD),
            "count": data.get("count"),
        }
    elif resource == "credentialpools" and subresource == "status" and method == "PATCH":
        rows = (data.get("status") or {}).get("credentials") or []
        row["cool"] = [
            f"{c.get('name')}|{c.get('model') or ''}"
            for c in rows
            if isinstance(c, dict) and c.get("state") == "CoolingDown"
        ]
    return row


def _record_requests(rows: list[Json]) -> None:
    from tests.e2e.conftest import Emulator, _is_harness

    inner = Emulator._handle  # already operator_bench's instrumented one

    async def handle(self: Emulator, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.url.path == "/_bench/log":
            since = int(request.params.get("since", "0"))
            return aiohttp.web.json_response({"cursor": len(rows), "rows": rows[since:]})
        if not _is_harness(request):
            rows.append(_log_row(request, time.monotonic()))
        return await inner(self, request)

    Emulator._handle = handle  # type: ignore[method-assign]


async def serve_kmock(max_seconds: float) -> int:
    with warnings.catch_warnings():  # the harness imports kopf.testing and kmock
        warnings.simplefilter("ignore", DeprecationWarning)
        from tests.e2e.conftest import running_kube
    ob._teach_kmock_namespaces()
    ob._speed_up_kmock()
    ob._instrument(ob.RequestLog())
    _record_requests([])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_kube() as kube:
        print(json.dumps({"url": kube.url, "token": kube.token}), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    return 0


# ----------------------------------------------------------------------------------------------------
# --api real: etcd + kube-apiserver + kube-controller-manager (tests/realapi/controlplane.py), the API
# server's audit log serving as the request log.

#: Audit only what the analysis reads: report Event writes and pool/chain status writes with their
#: bodies, the operator's GETs of pools without. Never a Secret (its data would be in the log).
AUDIT_POLICY: Json = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {"level": "Request", "verbs": ["create", "patch", "update"], "resources": [{"group": "", "resources": ["events"]}]},
        {
            "level": "Request",
            "verbs": ["patch", "update"],
            "resources": [{"group": "keyroute.dev", "resources": ["credentialpools/status", "providerchains/status"]}],
        },
        {
            "level": "Metadata",
            "verbs": ["get", "patch", "update"],
            "resources": [{"group": "keyroute.dev", "resources": ["credentialpools", "providerchains"]}],
        },
        {"level": "None"},
    ],
}
_VERBS = {"create": "POST", "patch": "PATCH", "update": "PUT", "get": "GET", "delete": "DELETE"}


def control_plane_class() -> type[ControlPlane]:
    """The test tier's ``ControlPlane`` with the API server writing the audit log above."""
    return cast("type[ControlPlane]", audited_control_plane(AUDIT_POLICY))


def sidecar_rbac() -> list[Json]:
    """What the README's "RBAC for the sidecar" grants, to the ``default`` ServiceAccount."""
    meta = {"name": "keyroute-sidecar", "namespace": NAMESPACE}
    rules = [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["keyroute.dev"], "resources": ["credentialpools"], "verbs": ["list", "watch"]},
    ]
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "keyroute-sidecar"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}],
    }
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules}, binding]


# ----------------------------------------------------------------------------------------------------
# This process's view of the API (kmock or real).


class Api:
    """Plain requests to kmock, marked as the harness's (left out of its request log)."""

    def __init__(self, url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}", ob.HARNESS_HEADER: "1"}
        self.session = aiohttp.ClientSession(base_url=url, headers=headers)

    async def close(self) -> None:
        await self.session.close()

    async def create(self, path: str, body: Json) -> Json:
        async with self.session.post(path, json=body) as response:
            text = await response.text()
            if response.status >= 400:
                raise RuntimeError(f"POST {path}: {response.status} {text[:200]}")
            return dict(json.loads(text))

    async def get(self, path: str) -> Json | None:
        async with self.session.get(path) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return dict(await response.json(content_type=None))

    async def items(self, path: str) -> list[Json]:
        body = await self.get(path)
        return list((body or {}).get("items") or [])

    async def log(self, since: int = 0) -> tuple[int, list[Json]]:
        async with self.session.get("/_bench/log", params={"since": str(since)}) as response:
            response.raise_for_status()
            body = await response.json(content_type=None)
        return int(body["cursor"]), list(body["rows"])

    async def report_events(self) -> list[Json]:
        from keyroute.core.reports import is_report

        return [e for e in await self.items(f"{CORE_PATH}/events") if is_report(e)]


class RealApi(Api):
    """The bench's admin requests to the real API server; the request log is its audit log, read
    incrementally, rows timestamped on arrival (``requestReceivedTimestamp``, µs) in this process's
    monotonic clock."""

    def __init__(self, cp: Any) -> None:
        ctx = ssl.create_default_context(cafile=str(cp.pki / "ca.crt"))
        headers = {"Authorization": f"Bearer {cp.admin_token}", "User-Agent": "keyroute-report-bench"}
        self.session = aiohttp.ClientSession(
            base_url=cp.server, headers=headers, connector=aiohttp.TCPConnector(ssl=ctx)
        )
        self.audit_log: Path = cp.audit_log
        self.rows: list[Json] = []
        self._offset = 0
        # Wall clock → monotonic (the audit log's times are wall-clock).
        self._wall_minus_mono = time.time() - time.monotonic()

    async def log(self, since: int = 0) -> tuple[int, list[Json]]:
        with contextlib.suppress(FileNotFoundError), self.audit_log.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            self._offset += end
            for line in data[:end].splitlines():
                row = self._audit_row(json.loads(line))
                if row is not None:
                    self.rows.append(row)
        return len(self.rows), self.rows[since:]

    def _audit_row(self, e: Json) -> Json | None:
        ref = e.get("objectRef") or {}
        if e.get("stage") != "ResponseComplete" or not ref.get("resource"):
            return None
        wall = datetime.datetime.fromisoformat(str(e["requestReceivedTimestamp"]).replace("Z", "+00:00"))
        verb = str(e.get("verb"))
        row = _row(
            wall.timestamp() - self._wall_minus_mono,
            _VERBS.get(verb, verb.upper()),
            str(ref["resource"]),
            ref.get("subresource"),
            ref.get("name"),
            str(e.get("userAgent") or ""),
            e.get("requestObject") or {},
        )
        row["code"] = (e.get("responseStatus") or {}).get("code")
        return row


class PoolWatch:
    """A list-and-watch of the CredentialPools (keyroute's own client, marked as the harness's): when
    each (credential, model) was first seen ``CoolingDown`` in pool ``openai``'s status, timestamped
    on arrival."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.first_cooling: dict[tuple[str, str], float] = {}
        self.status: Json = {}
        self.changes: list[float] = []  # arrival of every event that changed the status
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        from keyroute.kube import watch_forever

        self.task = asyncio.create_task(
            watch_forever(self.kube, f"{KR_PATH}/credentialpools", self._handle, what="bench pools")
        )

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.kube.close()

    def _handle(self, kind: str, obj: Json) -> None:
        at = time.monotonic()
        if (obj.get("metadata") or {}).get("name") != POOL or kind == "DELETED":
            return
        status = obj.get("status") or {}
        if status != self.status:
            self.status = status
            self.changes.append(at)
        for row in status.get("credentials") or []:
            if row.get("state") == "CoolingDown":
                self.first_cooling.setdefault((str(row.get("name")), str(row.get("model") or "")), at)


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:  # noqa: ASYNC109
    """Poll ``predicate`` (a cheap in-memory check; the times measured are taken elsewhere)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)
    return True


# ----------------------------------------------------------------------------------------------------
# The objects.


def secret_body() -> Json:
    data = {f"key-{i:02d}": base64.b64encode(key_value(i).encode()).decode() for i in range(1, N_KEYS + 1)}
    meta = {"name": SECRET, "namespace": NAMESPACE}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "data": data}


def pool_body() -> Json:
    credentials = [
        {"name": cred_name(i), "secretRef": {"name": SECRET, "key": f"key-{i:02d}"}, "priority": i}
        for i in range(1, N_KEYS + 1)
    ]
    return {
        "apiVersion": ob.GROUP_VERSION,
        "kind": "CredentialPool",
        "metadata": {"name": POOL, "namespace": NAMESPACE},
        "spec": {"provider": "openai", "strategy": "FillFirst", "credentials": credentials},
    }


def chain_body(base_url: str) -> Json:
    entry = {"name": "openai", "provider": "openai", "baseURL": base_url, "credentialPoolRef": {"name": POOL}}
    return {
        "apiVersion": ob.GROUP_VERSION,
        "kind": "ProviderChain",
        "metadata": {"name": CHAIN, "namespace": NAMESPACE},
        "spec": {"providers": [entry], "fallback": {"maxWait": "0s"}},
    }


# ----------------------------------------------------------------------------------------------------
# Figures.


def _ms(summary_s: list[float]) -> Json:
    """Percentiles (ms) of durations in seconds."""
    out = percentiles([int(v * 1e9) for v in summary_s])
    return {k: (round(v, 1) if k != "n" else v) for k, v in out.items()}


def reports_total(sidecar: Sidecar) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in sidecar.metrics.registry.collect():
        if metric.name == "keyroute_reports":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["result"]] = sample.value
    return out


def _pending_count(sidecar: Sidecar) -> int:
    """Actions still queued in a sidecar's reporter (merged repeats included)."""
    reporter = sidecar.reporter
    if reporter is None:
        return 0
    return sum(p.count for _, p in reporter.queue.items() if p.action is not None)


def windows(times: list[float], start: float, end: float) -> Json:
    """Writes per 1-s window: aligned on ``start``, and the most within any 1 s (sliding)."""
    inside = sorted(t for t in times if start <= t < end)
    n_windows = max(1, int((end - start) // 1) + (1 if (end - start) % 1 else 0))
    per = [0] * n_windows
    for t in inside:
        per[min(n_windows - 1, int(t - start))] += 1
    sliding = 0
    j = 0
    for i, t in enumerate(inside):
        while inside[j] <= t - 1.0:
            j += 1
        sliding = max(sliding, i - j + 1)
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    return {
        "total": len(inside),
        "seconds": round(end - start, 2),
        "per_window": per,
        "max_per_window": max(per),
        "mean_per_second": round(len(inside) / max(end - start, 1e-9), 2),
        "max_in_any_1s": sliding,
        "min_gap_ms": round(min(gaps) * 1e3, 1) if gaps else None,
    }


def report_delivery(writes: list[Json], actions: list[list[tuple[float, Any]]]) -> Json:
    """How late the flood's reports reached the API: per report Event write (POST or PATCH), the time
    since the oldest action it carries (the actions of that transition since its previous write), and
    whether a cooldown it reports had already ended when it arrived (the operator then has nothing to
    show: the status does not change)."""
    by_key: dict[tuple[Any, ...], list[tuple[float, Any]]] = {}
    for k, acts in enumerate(actions):
        for t, a in acts:
            by_key.setdefault((PODS[k], str(a.kind), a.credential, a.model), []).append((t, a))
    delays: list[float] = []
    stale = cooling = 0
    last_write: dict[tuple[Any, ...], float] = {}
    for w in sorted(writes, key=lambda r: r["t"]):
        ev = w.get("ev") or {}
        key = (ev.get("pod"), ev.get("reason"), ev.get("cred"), ev.get("model"))
        since = last_write.get(key, float("-inf"))
        carried = [(t, a) for t, a in by_key.get(key, []) if since < t <= w["t"]]
        last_write[key] = w["t"]
        if not carried:
            continue
        delays.append(w["t"] - carried[0][0])
        t_last, a_last = carried[-1]
        if ev.get("reason") == "CredentialCoolingDown" and a_last.until is not None:
            cooling += 1
            if w["t"] - t_last > a_last.until - a_last.at:
                stale += 1
    return {"delay": _ms(delays), "cooling_reports": cooling, "cooling_reports_ended_on_arrival": stale}


def leaks(texts: dict[str, str]) -> dict[str, int]:
    """Per place: how many times the keys' common prefix occurs in it (every key value holds it)."""
    return {where: text.count(KEY_PREFIX) for where, text in texts.items()}


# ----------------------------------------------------------------------------------------------------
# The run.


class Bench:
    def __init__(self, args: argparse.Namespace, result: Json, logs: Path) -> None:
        self.args = args
        self.result = result
        self.logs = logs
        self.api: Api | None = None
        self.watch: PoolWatch | None = None
        self.provider: FakeProvider | None = None
        self.sidecars: list[Sidecar] = []
        self.actions: list[list[tuple[float, Any]]] = [[], []]  # per sidecar: (monotonic, Action)
        self.operator: ob.Operator | None = None
        self.kmock: asyncio.subprocess.Process | None = None
        self.cp: ControlPlane | None = None
        self.admin: dict[str, Any] = {}  # how the bench's watch connects
        self.sidecar_user: dict[str, Any] = {}  # how the sidecars connect
        self.client: aiohttp.ClientSession | None = None
        self.max_latency_key = 0  # keys k01..this one cool for 600 s in the latency phases

    # --- set-up -----------------------------------------------------------------------------------

    async def start(self, tmp: Path) -> None:
        from keyroute.fakeprovider import FakeProvider

        r = self.result
        if self.args.api == "real":
            kubeconfig = await self._start_real(tmp)
        else:
            kubeconfig = await self._start_kmock()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, (ob.CORE_REST & ob.CORES) or ob.CORES)
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        assert self.api is not None

        self.provider = FakeProvider("openai", keys=[key_value(i) for i in range(1, N_KEYS + 1)])
        await self.provider.start()
        await self.api.create(f"{CORE_PATH}/secrets", secret_body())
        await self.api.create(f"{KR_PATH}/credentialpools", pool_body())
        await self.api.create(f"{KR_PATH}/providerchains", chain_body(self.provider.base_url))

        self.watch = PoolWatch(self._kube("keyroute-report-bench", self.admin))
        self.watch.start()
        self.operator = ob.Operator(
            kubeconfig, self.logs / "operator.log", {"KEYROUTE_RESYNC_SECONDS": "3600"}
        )
        await self.operator.start()
        r["affinity"] = {
            "operator": sorted(os.sched_getaffinity(self.operator.pid)),
            "api_and_bench": sorted(os.sched_getaffinity(self.api_pids()[0])),
        }
        log(f"operator started (pid {self.operator.pid}); waiting for {CHAIN}-keyroute")
        started = time.monotonic()
        rendered: Json | None = None
        while rendered is None:
            self.operator.check_alive()
            if time.monotonic() - started > 60:
                raise RuntimeError(f"no {CHAIN}-keyroute Secret after 60 s; see {self.operator.log_path}")
            rendered = await self.api.get(f"{CORE_PATH}/secrets/{CHAIN}-keyroute")
            if rendered is None:
                await asyncio.sleep(0.1)
        r["config_seconds"] = round(time.monotonic() - started, 2)
        config = base64.b64decode(rendered["data"]["config.json"])
        await self._start_sidecars(tmp, config)

        # Settled: the pool's first status (60 rows), both sidecars counted on the chain.
        def ready() -> bool:
            assert self.watch is not None
            return len(self.watch.status.get("credentials") or []) == N_KEYS

        if not await until(ready, 30):
            raise RuntimeError("pool openai has no status with 60 credentials after 30 s")
        for _ in range(100):
            chain = await self.api.get(f"{KR_PATH}/providerchains/{CHAIN}")
            if ((chain or {}).get("status") or {}).get("sidecars") == 2:
                break
            await asyncio.sleep(0.1)
        r["sidecars_on_chain"] = ((chain or {}).get("status") or {}).get("sidecars")
        await asyncio.sleep(1.0)
        r["setup_seconds"] = round(time.monotonic() - started, 2)
        log(f"set up in {r['setup_seconds']} s (config Secret after {r['config_seconds']} s)")

    async def _start_kmock(self) -> Path:
        """kmock in its own process on core 1; the operator's kubeconfig (a token)."""
        with (self.logs / "kmock.log").open("wb") as kmock_log:
            self.kmock = await asyncio.create_subprocess_exec(
                ob.PY,
                str(SELF),
                "--serve-kmock",
                "--max-seconds",
                str(LIFETIME),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=kmock_log,
                preexec_fn=ob.child_setup(ob.CORE_REST),
            )
        assert self.kmock.stdout is not None
        line = await asyncio.wait_for(self.kmock.stdout.readline(), timeout=60)
        if not line:
            raise RuntimeError(f"kmock did not start; see {self.logs / 'kmock.log'}")
        info = json.loads(line)
        url, token = str(info["url"]), str(info["token"])
        log(f"kmock at {url} (pid {self.kmock.pid})")
        self.api = Api(url, token)
        self.admin = {"server": url, "token": token}
        self.sidecar_user = self.admin
        kubeconfig = self.logs / "kubeconfig"
        ob.write_kubeconfig(kubeconfig, url, token)
        return kubeconfig

    async def _start_real(self, tmp: Path) -> Path:
        """etcd, kube-apiserver (auditing) and kube-controller-manager on core 1, keyroute's CRDs, the
        sidecars' Role; the operator's kubeconfig: the admin's static token."""
        from tests.realapi.controlplane import HOW_TO_GET_ASSETS, find_assets

        assets = find_assets()
        if assets is None:
            raise RuntimeError(f"--api real needs the control-plane binaries: {HOW_TO_GET_ASSETS}")
        began = time.monotonic()
        cp = self.cp = await asyncio.to_thread(control_plane_class().start, assets)
        for pid in self.api_pids():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, (ob.CORE_REST & ob.CORES) or ob.CORES)
        crds = str(ROOT / "crds")
        await asyncio.to_thread(cp.kubectl, "apply", "--server-side", "-f", crds)
        await asyncio.to_thread(cp.kubectl, "wait", "--for=condition=Established", "--timeout=30s", "-f", crds)
        await asyncio.to_thread(cp.apply, sidecar_rbac())
        await asyncio.to_thread(cp.wait_service_account, NAMESPACE)
        # The sidecars run as the namespace's default ServiceAccount with the README's Role (a real
        # TokenRequest token in a kubeconfig), as an injected pod's sidecar would.
        token = await asyncio.to_thread(cp.create_token, NAMESPACE, "default")
        sidecar_kubeconfig = cp.write_kubeconfig(tmp / "sidecar.kubeconfig", user={"token": token})
        self.sidecar_user = {"kubeconfig": sidecar_kubeconfig}
        self.admin = {"kubeconfig": cp.admin_token_kubeconfig}
        self.api = RealApi(cp)
        log(f"control plane at {cp.server} in {time.monotonic() - began:.1f} s")
        return Path(cp.admin_token_kubeconfig)

    def api_pids(self) -> list[int]:
        """The processes serving the API: kmock, or the API server and etcd."""
        if self.cp is not None:
            procs = [self.cp.processes.get(n) for n in ("kube-apiserver", "etcd", "kube-controller-manager")]
            return [p.popen.pid for p in procs if p is not None and p.popen is not None]
        assert self.kmock is not None
        return [self.kmock.pid]

    @staticmethod
    def _kube(agent: str, user: dict[str, Any]) -> KubeClient:
        """keyroute's client for ``user`` (kmock: URL and token, marked as the harness's; real: a kubeconfig)."""
        from keyroute.kube import Connection, Kube, from_kubeconfig

        if "kubeconfig" in user:
            return Kube.from_connection(from_kubeconfig(user["kubeconfig"]), user_agent=agent)
        kube = Kube.from_connection(Connection(server=user["server"], token=user["token"]), user_agent=agent)
        if agent == "keyroute-report-bench":
            kube.headers[ob.HARNESS_HEADER] = "1"  # left out of kmock's request log
        return kube

    async def _start_sidecars(self, tmp: Path, config: bytes) -> None:
        from keyroute.core.reports import Origin
        from keyroute.kube import SIDECAR_AGENT
        from keyroute.logs import JsonFormatter
        from keyroute.sidecar.app import Address, Sidecar
        from keyroute.sidecar.sources import RenderedConfigFile

        # The sidecars' log lines: JSON to a file, WARNING and up, no redactor (checked for keys later).
        handler = logging.FileHandler(self.logs / "sidecars.log")
        handler.setFormatter(JsonFormatter())
        logger = logging.getLogger("keyroute")
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False

        for n, pod in enumerate(PODS):
            path = tmp / pod / "config.json"
            path.parent.mkdir(parents=True)
            path.write_bytes(config)
            path.chmod(0o600)
            sidecar = Sidecar(RenderedConfigFile(path), listen=Address("127.0.0.1", 0), admin_listen=None)
            sidecar.enable_reporting(self._kube(SIDECAR_AGENT, self.sidecar_user), Origin(pod, NAMESPACE))
            seen = self.actions[n]
            sidecar.listeners.append(lambda action, seen=seen: seen.append((time.monotonic(), action)))
            await sidecar.start()
            self.sidecars.append(sidecar)
        cfg = self.sidecars[0].config
        assert cfg is not None
        self.result["credentials_in_config"] = len(cfg.pools[0].credentials)
        if len(cfg.pools[0].credentials) != N_KEYS:
            raise RuntimeError(f"the rendered config has {len(cfg.pools[0].credentials)} credentials, not 60")

    async def stop(self) -> None:
        for sidecar in self.sidecars:
            with contextlib.suppress(Exception):
                await sidecar.stop(flush=0)
        if self.watch is not None:
            await self.watch.close()
        if self.provider is not None:
            await self.provider.stop()
        if self.client is not None:
            await self.client.close()
        if (
            self.operator is not None
            and self.operator.proc is not None
            and self.operator.proc.returncode is None
        ):
            self.result["operator_stop"] = await self.operator.stop(timeout=10)
        if self.api is not None:
            await self.api.close()
        if self.cp is not None:
            await asyncio.to_thread(self.cp.close)
        if self.kmock is not None and self.kmock.returncode is None:
            self.kmock.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.kmock.wait(), timeout=10)
            except TimeoutError:
                self.kmock.kill()
                await self.kmock.wait()

    # --- helpers ----------------------------------------------------------------------------------

    async def call(self, sidecar: Sidecar, model: str) -> tuple[int, str | None]:
        assert self.client is not None
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        async with self.client.post(f"{sidecar.base_url}/chat/completions", json=body) as response:
            await response.read()
            return response.status, response.headers.get("X-Keyroute-Credential")

    def cpu(self) -> Json:
        assert self.operator is not None
        return {
            "operator": cpu_seconds(self.operator.pid),
            "api": sum(cpu_seconds(pid) for pid in self.api_pids()),
            "bench": cpu_seconds(os.getpid()),
        }

    @staticmethod
    def cpu_delta(before: Json, after: Json) -> Json:
        return {k: round(after[k] - before[k], 2) for k in before}

    # --- phases 1 and 2 ---------------------------------------------------------------------------

    async def latency(self, name: str, model: str, n: int, spacing: float | None) -> Json:
        assert self.api is not None and self.watch is not None and self.provider is not None
        from keyroute.fakeprovider import Behaviour

        a, watch = self.sidecars[0], self.watch
        reporter = a.reporter
        assert reporter is not None
        reporter.bucket.wait_time()  # refreshes the bucket's tokens
        tokens = round(reporter.bucket.tokens, 1)
        cursor, _ = await self.api.log()
        cpu0 = self.cpu()
        log(f"{name}: {n} iterations, model {model}, reporter A has {tokens} tokens")
        iterations: list[Json] = []
        began = time.monotonic()
        for i in range(1, n + 1):
            cred = cred_name(i)
            self.provider.script(Behaviour.rate_limited(retry_after=600), key=key_value(i), model=model)
            t_req = time.monotonic()
            status, used = await self.call(a, model)
            t0 = time.monotonic()
            iterations.append(
                {"i": i, "cred": cred, "status": status, "used": used, "t_req": t_req, "t0": t0}
            )
            if spacing is not None:
                await until(lambda c=cred: (c, model) in watch.first_cooling, SEEN_TIMEOUT)
                await asyncio.sleep(max(0.0, t_req + spacing - time.monotonic()))
        sent_all = time.monotonic()
        await until(
            lambda: all((it["cred"], model) in watch.first_cooling for it in iterations),
            SEEN_TIMEOUT if spacing is not None else SEEN_TIMEOUT + n * 1.5,
        )
        _, rows = await self.api.log(cursor)
        for it in iterations:
            t1 = watch.first_cooling.get((it["cred"], model))
            if t1 is not None:
                it["t1"] = t1
                it["total_s"] = t1 - it["t0"]
        actions = {
            (act.credential, act.model): t
            for t, act in self.actions[0]
            if t >= began and str(act.kind) == "CredentialCoolingDown"
        }
        for it in iterations:
            self._explain(it, model, actions, rows)
        missing = [it["cred"] for it in iterations if "t1" not in it]
        if missing:  # not seen on the watch: is it in the store at all?
            pool = await self.api.get(f"{KR_PATH}/credentialpools/{POOL}")
            cooling = {
                (c.get("name"), c.get("model") or "")
                for c in ((pool or {}).get("status") or {}).get("credentials") or []
                if c.get("state") == "CoolingDown"
            }
            stored = [c for c in missing if (c, model) in cooling]
        else:
            stored = []

        def seg(key: str) -> Json:
            return _ms([it[key] for it in iterations if key in it])

        out: Json = {
            "model": model,
            "iterations": n,
            "spacing_s": spacing,
            "reporter_tokens_at_start": tokens,
            "seconds": round(time.monotonic() - began, 2),
            "send_seconds": round(sent_all - began, 2),
            "answers": dict(Counter(str(it["status"]) for it in iterations)),
            "answered_with_next_key": sum(1 for it in iterations if it["used"] == cred_name(it["i"] + 1)),
            "not_seen": missing,
            "not_seen_but_stored": stored,
            "t1_minus_t0": seg("total_s"),
            "t1_minus_action": seg("from_action_s"),
            "segments": {
                "request_to_action": seg("req_action_s"),
                "action_to_answer": seg("action_answer_s"),
                "action_to_event_at_api": seg("action_event_s"),
                "event_to_operator_get": seg("event_get_s"),
                "operator_get_to_status_patch": seg("get_patch_s"),
                "status_patch_to_bench_watch": seg("patch_watch_s"),
            },
            "cpu_seconds": self.cpu_delta(cpu0, self.cpu()),
            "rows": [
                {k: (round(v * 1e3, 1) if k.endswith("_s") else v) for k, v in it.items() if k not in _TIMES}
                for it in iterations
            ],
        }
        s = out["t1_minus_t0"]
        log(
            f"{name}: t1-t0 p50 {s.get('p50')} p90 {s.get('p90')} p99 {s.get('p99')} max {s.get('max')} ms"
            + (f"; not seen: {missing}" if missing else "")
        )
        return out

    @staticmethod
    def _explain(it: Json, model: str, actions: dict[Any, float], rows: list[Json]) -> None:
        """Fill an iteration's times from the sidecar's action, kmock's log and the bench's watch."""
        cred = it["cred"]
        t_action = actions.get((cred, model))
        if t_action is None:
            return
        it["req_action_s"] = t_action - it["t_req"]
        it["action_answer_s"] = it["t0"] - t_action
        if "t1" in it:
            it["from_action_s"] = it["t1"] - t_action
        event = next(
            (
                r
                for r in rows
                if r["r"] == "events"
                and r["w"] == "sidecar"
                and (r.get("ev") or {}).get("cred") == cred
                and (r.get("ev") or {}).get("model") == model
                and (r.get("ev") or {}).get("pod") == PODS[0]
                and r["t"] >= t_action - 0.001
            ),
            None,
        )
        if event is None:
            return
        it["action_event_s"] = event["t"] - t_action
        it["event_write"] = event["m"]
        patch_i = next(
            (
                k
                for k, r in enumerate(rows)
                if r["m"] == "PATCH"
                and r["r"] == "credentialpools"
                and r["s"] == "status"
                and r["n"] == POOL
                and r["w"] == "operator"
                and f"{cred}|{model}" in (r.get("cool") or [])
                and r["t"] >= event["t"]
            ),
            None,
        )
        if patch_i is None:
            return
        patch = rows[patch_i]
        get = next(
            (
                r
                for r in reversed(rows[:patch_i])
                if r["m"] == "GET" and r["r"] == "credentialpools" and r["n"] == POOL and r["w"] == "operator"
            ),
            None,
        )
        if get is not None and get["t"] >= event["t"]:
            it["event_get_s"] = get["t"] - event["t"]
            it["get_patch_s"] = patch["t"] - get["t"]
        it["t_patch"] = patch["t"]
        if "t1" in it:
            it["patch_watch_s"] = it["t1"] - patch["t"]

    # --- phase 3 ----------------------------------------------------------------------------------

    async def flood(self) -> Json:
        assert self.api is not None and self.provider is not None and self.watch is not None
        from keyroute.core.reports import dedup_key
        from keyroute.fakeprovider import Behaviour

        args = self.args
        model = MODEL
        events_before = {
            e["metadata"]["name"]: int(e.get("count") or 1) for e in await self.api.report_events()
        }
        metrics_before = [reports_total(s) for s in self.sidecars]
        tokens = [round(s.reporter.bucket.tokens, 1) if s.reporter else None for s in self.sidecars]
        received_before = len(self.provider.received)
        cursor, _ = await self.api.log()
        cpu0 = self.cpu()
        # Every key, every model, from now on.
        self.provider.set(Behaviour.rate_limited(retry_after=args.flood_retry_after))
        n, seconds, limit = args.flood_requests, args.flood_seconds, asyncio.Semaphore(args.flood_concurrency)
        statuses: Counter[str] = Counter()
        in_flight = [0, 0]  # now, most
        log(
            f"flood: {n} requests over {seconds:.0f} s (≤ {args.flood_concurrency} in flight), "
            f"reporter tokens A/B {tokens}"
        )
        t_start = time.monotonic()

        async def one(i: int) -> None:
            async with limit:
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
                try:
                    status, _ = await self.call(self.sidecars[i % 2], model)
                    statuses[str(status)] += 1
                except (aiohttp.ClientError, TimeoutError) as e:
                    statuses[type(e).__name__] += 1
                finally:
                    in_flight[0] -= 1

        tasks: list[asyncio.Task[None]] = []
        for i in range(n):
            await asyncio.sleep(max(0.0, t_start + i * seconds / n - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        t_end = time.monotonic()
        log(f"flood sent in {t_end - t_start:.1f} s: {dict(statuses)}; waiting for the reporters to drain")

        # Drain: the flood's cooldowns have ended (and the sidecars' 1-s tick has restored them), nothing
        # is pending in either reporter and no action came for 1.5 s; then the operator's trailing reconcile.
        expired = t_end + args.flood_retry_after + 1.5

        def quiet() -> bool:
            last = max((t for acts in self.actions for t, _ in acts), default=0.0)
            pending = sum(s.reporter.pending for s in self.sidecars if s.reporter)
            now = time.monotonic()
            return now >= expired and pending == 0 and now - last >= 1.5

        drained = await until(quiet, args.drain_seconds, step=0.05)
        t_drained = time.monotonic()
        await asyncio.sleep(1.5)
        t_settled = time.monotonic()
        log(f"drained: {drained} after {t_drained - t_end:.1f} s")
        _, rows = await self.api.log(cursor)

        flood_actions = [[(t, a) for t, a in acts if t >= t_start] for acts in self.actions]
        pending_actions = [_pending_count(s) for s in self.sidecars]
        transitions = {(PODS[k], dedup_key(a)) for k, acts in enumerate(flood_actions) for _, a in acts}
        writes = [
            r["t"]
            for r in rows
            if r["m"] == "PATCH" and r["r"] == "credentialpools" and r["s"] == "status" and r["n"] == POOL
        ]
        chain_writes = [
            r["t"] for r in rows if r["m"] == "PATCH" and r["r"] == "providerchains" and r["s"] == "status"
        ]
        sidecar_events = [r for r in rows if r["r"] == "events" and r["w"] == "sidecar"]
        report_writes = [r for r in sidecar_events if (r.get("ev") or {}).get("reason") != "SidecarReporting"]
        creates_per_transition = Counter(
            (ev.get("pod"), ev.get("reason"), ev.get("cred"), ev.get("model"))
            for r in report_writes
            if r["m"] == "POST"
            for ev in [r.get("ev") or {}]
        )
        operator_events = [
            r for r in rows if r["r"] == "events" and r["w"] == "operator" and r["m"] == "POST"
        ]
        events_after = await self.api.report_events()
        new_events = [e for e in events_after if e["metadata"]["name"] not in events_before]
        increments = sum(
            int(e.get("count") or 1) - events_before[e["metadata"]["name"]]
            for e in events_after
            if e["metadata"]["name"] in events_before and (e.get("reason") or "") != "SidecarReporting"
        )
        new_counts = sum(
            int(e.get("count") or 1) for e in new_events if e.get("reason") != "SidecarReporting"
        )
        upstream = Counter(r.key for r in self.provider.received[received_before:] if r.key is not None)
        metrics_after = [reports_total(s) for s in self.sidecars]
        out: Json = {
            "model": model,
            "requests": n,
            "target_seconds": seconds,
            "concurrency_limit": args.flood_concurrency,
            "most_in_flight": in_flight[1],
            "send_seconds": round(t_end - t_start, 2),
            "drained": drained,
            "drain_seconds": round(t_drained - t_end, 2),
            "answers": dict(statuses),
            "upstream_requests": sum(upstream.values()),
            "upstream_keys": len(upstream),
            "upstream_to_latency_phase_keys": sum(
                v for k, v in upstream.items() if int(k[-6:]) <= self.max_latency_key
            ),
            "reporter_tokens_at_start": tokens,
            "status_writes_flood": windows(writes, t_start, t_end),
            "status_writes_until_settled": windows(writes, t_start, t_settled),
            "chain_status_writes_until_settled": windows(chain_writes, t_start, t_settled),
            "actions": {PODS[k]: len(acts) for k, acts in enumerate(flood_actions)},
            "actions_by_kind": dict(Counter(str(a.kind) for acts in flood_actions for _, a in acts)),
            "actions_still_pending": pending_actions,
            "distinct_transitions": len(transitions),
            "report_event_creates": sum(1 for r in report_writes if r["m"] == "POST"),
            "report_event_repeats": sum(1 for r in report_writes if r["m"] == "PATCH"),
            "transitions_with_several_creates": sum(1 for v in creates_per_transition.values() if v > 1),
            "transitions_with_an_event": len(creates_per_transition),
            "report_event_writes_by_reason": dict(
                Counter(f"{r['m']} {(r.get('ev') or {}).get('reason')}" for r in report_writes)
            ),
            "presence_writes": len(sidecar_events) - len(report_writes),
            "report_events_new": len([e for e in new_events if e.get("reason") != "SidecarReporting"]),
            "report_events_new_by_reason": dict(Counter(str(e.get("reason")) for e in new_events)),
            "event_count_sum_new": new_counts,
            "event_count_increments_existing": increments,
            "operator_events_by_reason": dict(
                Counter(str((r.get("ev") or {}).get("reason")) for r in operator_events)
            ),
            "reports_total": {
                PODS[k]: {key: after.get(key, 0) - metrics_before[k].get(key, 0) for key in sorted(after)}
                for k, after in enumerate(metrics_after)
            },
            "reports_total_whole_run": dict(zip(PODS, metrics_after, strict=True)),
            "watch_status_changes": sum(1 for t in self.watch.changes if t_start <= t < t_settled),
            "report_delivery": report_delivery(report_writes, flood_actions),
            "cpu_seconds": self.cpu_delta(cpu0, self.cpu()),
        }
        sw = out["status_writes_until_settled"]
        log(
            f"flood: {sw['total']} pool status writes in {sw['seconds']} s (max {sw['max_per_window']}/window, "
            f"{sw['max_in_any_1s']} in any 1 s); {out['report_event_creates']} Event creates + "
            f"{out['report_event_repeats']} repeats for {sum(out['actions'].values())} actions "
            f"({out['distinct_transitions']} distinct transitions)"
        )
        return out

    # --- phase 4 ----------------------------------------------------------------------------------

    async def check_leaks(self) -> Json:
        assert self.api is not None and self.operator is not None
        texts = {
            "operator_log": self.operator.log_path.read_text(errors="replace"),
            "sidecars_log": (self.logs / "sidecars.log").read_text(errors="replace"),
            "events": json.dumps(await self.api.items(f"{CORE_PATH}/events")),
            "pools": json.dumps(await self.api.items(f"{KR_PATH}/credentialpools")),
            "chains": json.dumps(await self.api.items(f"{KR_PATH}/providerchains")),
        }
        return {"occurrences": leaks(texts), "bytes_checked": {k: len(v) for k, v in texts.items()}}


async def run(args: argparse.Namespace, result: Json, logs: Path) -> None:
    bench = Bench(args, result, logs)
    with tempfile.TemporaryDirectory(prefix="keyroute-report-bench-") as tmp:
        try:
            await bench.start(Path(tmp))
            assert bench.operator is not None
            if args.iterations:
                spacing = None if args.back_to_back else args.spacing
                result["latency"] = await bench.latency(result["mode"], MODEL, args.iterations, spacing)
                bench.operator.check_alive()
            bench.max_latency_key = args.iterations
            if args.flood_requests:
                # Let the operator and the reporters finish with the latency phases first.
                await until(
                    lambda: all(s.reporter is None or s.reporter.pending == 0 for s in bench.sidecars), 60
                )
                await asyncio.sleep(1.0)
                result["flood"] = await bench.flood()
                bench.operator.check_alive()
            result["operator_metrics"] = await bench.operator.metrics()
            result["operator_rss_mib"] = bench.operator.rss_mib()
            result["leaks"] = await bench.check_leaks()
            assert bench.api is not None
            _, rows = await bench.api.log()
            (logs / "requests.json").write_text(json.dumps(rows) + "\n")
        finally:
            await bench.stop()
            result["operator_log"] = ob.log_problems(logs / "operator.log")


# ----------------------------------------------------------------------------------------------------
# Report.


API_NAMES = {"real": "a real kube-apiserver (v1.28, etcd)", "kmock": "kmock"}


def reporter_settings() -> str:
    """The sidecars' reporter budget (the defaults: the README's per-pod promise)."""
    from keyroute.core.reports import REPEAT_RESERVE, REPORT_BURST, REPORT_RATE

    return f"burst {REPORT_BURST}, {REPORT_RATE:g}/s, {REPEAT_RESERVE} kept for new transitions"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _trim(values: list[int]) -> list[int]:
    while len(values) > 1 and values[-1] == 0:
        values = values[:-1]
    return values


def _pcts(s: Json) -> str:
    if "p50" not in s:
        return "n/a"
    return f"{s['p50']:.0f} / {s['p90']:.0f} / {s['p99']:.0f} / {s['max']:.0f} ms"


def report(r: Json) -> str:
    lines = [
        f"### Reporting benchmark on {API_NAMES[r['api']]}, {r['mode']}: upstream 429 → pool status, "
        f"report flood ({r['stamp']})",
        "",
        f"Pool `{POOL}`: {N_KEYS} credentials (FillFirst); chain `{CHAIN}`, one entry; two in-process sidecars "
        f"({', '.join(PODS)}; reporter {r.get('reporter')}); the operator on core "
        f"{r.get('affinity', {}).get('operator')}, the API + sidecars + provider + client on core "
        f"{r.get('affinity', {}).get('api_and_bench')}.",
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
    ]
    for key in ("latency",) if "latency" in r else ():
        p = r[key]
        title = f"{p['spacing_s']} s apart" if p["spacing_s"] is not None else "back to back"
        s = p["t1_minus_t0"]
        ok = "p99" in s and s["p99"] <= 2000 and not p["not_seen"]
        missing = f"; **{len(p['not_seen'])} not seen within the timeout**" if p["not_seen"] else ""
        lines.append(
            f"| upstream 429 → pool status shows the key CoolingDown, {title} "
            f"(n={s.get('n', 0)}{missing}): t1 - t0 p50 / p90 / p99 / max | **{_pcts(s)}** | p99 ≤ 2 s | {_met(ok)} |"
        )
    f = r.get("flood")
    if f:
        sw, sf = f["status_writes_until_settled"], f["status_writes_flood"]

        def verdict(w: Json) -> str:
            text = _met(w["max_per_window"] <= 2) + " (aligned windows)"
            if w["max_in_any_1s"] > 2:
                text += f"; a sliding 1-s window held {w['max_in_any_1s']}"
            return text

        lines.append(
            f"| flood: pool status writes per 1-s window, flood + drain ({sw['seconds']:.0f} s): max / mean; "
            f"most in any 1 s (sliding) | **{sw['max_per_window']} / {sw['mean_per_second']:.2f}**; "
            f"{sw['max_in_any_1s']} | ≤ 2 per second | {verdict(sw)} |"
        )
        lines.append(
            f"| flood: the same, flood only ({sf['seconds']:.0f} s) | {sf['max_per_window']} / "
            f"{sf['mean_per_second']:.2f}; {sf['max_in_any_1s']} | ≤ 2 per second | {verdict(sf)} |"
        )
        actions = sum(f["actions"].values())
        dedup_ok = (
            f["report_event_creates"] <= f["distinct_transitions"]
            and f["transitions_with_several_creates"] == 0
        )
        lines.append(
            f"| flood: report Events created / distinct transitions (pod x object x action x credential x "
            f"model) / recovery actions | **{f['report_event_creates']} / {f['distinct_transitions']} / "
            f"{actions}** (+{f['report_event_repeats']} repeat PATCHes; transitions created twice: "
            f"{f['transitions_with_several_creates']}) | one Event per transition | {_met(dedup_ok)} |"
        )
        delivered = actions - sum(f["actions_still_pending"])
        counted = f["event_count_sum_new"] + f["event_count_increments_existing"]
        lines.append(
            f"| flood: sum of Event `count`s (new Events + increments) vs actions delivered | {counted} vs "
            f"{delivered} ({sum(f['actions_still_pending'])} still queued) | equal | {_met(counted == delivered)} |"
        )
    leaks_ = (r.get("leaks") or {}).get("occurrences")
    if leaks_ is not None:
        total = sum(leaks_.values())
        where = ", ".join(f"{k} {v}" for k, v in leaks_.items())
        lines.append(
            f"| key values in operator log, sidecars' log, Events, pools, chains | {where} | 0 | {_met(total == 0)} |"
        )
    for key in ("latency",) if "latency" in r else ():
        p = r[key]
        title = f"{p['spacing_s']} s apart" if p["spacing_s"] is not None else "back to back"
        lines += [
            "",
            f"Where the time goes, {title} (model `{p['model']}`, reporter A had {p['reporter_tokens_at_start']} "
            f"tokens at the start; {p['answered_with_next_key']}/{p['iterations']} answered by the next key; "
            f"answers {p['answers']}; CPU s {p['cpu_seconds']}):",
            "",
            "| segment | p50 / p90 / p99 / max |",
            "|---|---|",
            f"| t1 - t0 (answer → this watch shows it) | {_pcts(p['t1_minus_t0'])} |",
            f"| t1 - sidecar action | {_pcts(p['t1_minus_action'])} |",
        ]
        names = {
            "request_to_action": "request sent → sidecar's CoolingDown action",
            "action_to_answer": "action → answer here (t0)",
            "action_to_event_at_api": "action → report Event at the API (reporter, token bucket)",
            "event_to_operator_get": "Event → operator GETs the pool (its watch, coalescing)",
            "operator_get_to_status_patch": "operator GET → status PATCH at the API (reconcile)",
            "status_patch_to_bench_watch": "status PATCH → this watch (the API's watch delivery)",
        }
        lines += [f"| {names[k]} | {_pcts(v)} |" for k, v in p["segments"].items()]
    if f:
        lines += [
            "",
            f"Flood: {f['requests']} requests in {f['send_seconds']} s (≤ {f['concurrency_limit']} in flight, most "
            f"{f['most_in_flight']}), answers {f['answers']}; {f['upstream_requests']} upstream attempts on "
            f"{f['upstream_keys']} keys ({f['upstream_to_latency_phase_keys']} to the keys cooling since the latency "
            f"phases); reporters drained: {f['drained']} after {f['drain_seconds']} s; reporter tokens at the start "
            f"{f['reporter_tokens_at_start']}; CPU s {f['cpu_seconds']}.",
            "",
            f"- status writes per aligned 1-s window (flood + drain, trailing zeros cut): "
            f"{_trim(sw['per_window'])}; closest two "
            f"{sw['min_gap_ms']} ms apart; chain status writes: {f['chain_status_writes_until_settled']['total']}; "
            f"status changes seen on the watch: {f['watch_status_changes']}",
            f"- actions by kind: {f['actions_by_kind']}; per pod {f['actions']}",
            f"- report delivery, oldest action carried → its Event write at the API: "
            f"{_pcts(f['report_delivery']['delay'])} (p50 / p90 / p99 / max); CoolingDown reports whose "
            f"cooldown had already ended on arrival: {f['report_delivery']['cooling_reports_ended_on_arrival']} "
            f"of {f['report_delivery']['cooling_reports']}",
            f"- report Event writes: {f['report_event_writes_by_reason']}; presence refreshes {f['presence_writes']}",
            f"- new report Events by reason: {f['report_events_new_by_reason']}",
            f"- the operator's own Events posted: {f['operator_events_by_reason']}",
            f"- `keyroute_reports_total` during the flood: {f['reports_total']}",
            f"- `keyroute_reports_total` over the whole run: {f['reports_total_whole_run']}",
        ]
    metrics = r.get("operator_metrics") or {}
    interesting = {
        k: v for k, v in metrics.items() if "report" in k or "writes" in k or "reconciles_total" in k
    }
    if interesting:
        lines += [
            "",
            "Operator metrics at the end: "
            + ", ".join(f"`{k}` {v:g}" for k, v in sorted(interesting.items())),
        ]
    lines += [
        "",
        f"Operator log lines by level: {(r.get('operator_log') or {}).get('levels')}; run took "
        f"{r.get('wall_seconds')} s (set-up {r.get('setup_seconds')} s).",
    ]
    if r.get("error"):
        lines += ["", f"**The run failed:** {r['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--serve-kmock", action="store_true", help="only run the instrumented kmock; prints its URL"
    )
    p.add_argument("--max-seconds", type=float, default=LIFETIME, help="--serve-kmock: exit after this long")
    p.add_argument(
        "--api",
        choices=sorted(API_NAMES),
        default="real",
        help="real: etcd + kube-apiserver (KUBEBUILDER_ASSETS); kmock: the e2e emulator",
    )
    p.add_argument("--iterations", type=int, default=40, help="latency iterations (0: skip)")
    p.add_argument("--spacing", type=float, default=0.8, help="seconds between the iterations' requests")
    p.add_argument("--back-to-back", action="store_true", help="no spacing between the iterations")
    p.add_argument("--flood-requests", type=int, default=1000, help="flood requests (0: skip the flood)")
    p.add_argument("--flood-seconds", type=float, default=10.0, help="spread the flood over this long")
    p.add_argument("--flood-concurrency", type=int, default=50)
    p.add_argument("--flood-retry-after", type=float, default=1.0, help="Retry-After of the flood's 429s")
    p.add_argument(
        "--drain-seconds", type=float, default=90.0, help="wait at most this long for the reporters"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="abort the run after this long")
    args = p.parse_args(argv)

    if args.serve_kmock:
        return int(asyncio.run(serve_kmock(args.max_seconds)))
    if args.iterations >= N_KEYS - 1:
        p.error(f"at most {N_KEYS - 2} iterations ({N_KEYS} keys)")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("-kmock" if args.api == "kmock" else "") + ("-back-to-back" if args.back_to_back else "")
    logs = RESULTS / f"{stamp}-report{suffix}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    mode = "back-to-back" if args.back_to_back else "spaced"
    result: Json = {
        "stamp": stamp,
        "mode": mode,
        "api": args.api,
        "reporter": reporter_settings(),
        "args": vars(args),
        "logs": str(logs.relative_to(ROOT)),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
    }
    began = time.monotonic()
    code = 0
    try:
        asyncio.run(asyncio.wait_for(run(args, result, logs), timeout=args.timeout))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {result['error']}")
        code = 1
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    text = report(result)
    print(text)
    base = RESULTS / f"{stamp}-report{suffix}"
    for ext, content in ((".json", json.dumps(result, indent=2, default=str) + "\n"), (".md", text)):
        base.with_suffix(ext).write_text(content)
        (RESULTS / f"latest-report{suffix}{ext}").write_text(content)
    log(f"wrote {base.relative_to(ROOT)}.json and .md ({result['wall_seconds']} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
