"""keyroute operator start-up on a real kube-apiserver (issue #11): initial sync and restart.

    python bench/startup_bench.py                       # 1,000 pools / 1,000 Secrets / 300 chains, then twice as many
    python bench/startup_bench.py --sizes 1 --runs 2    # the 1,000-pool size only, twice
    python bench/startup_bench.py --sizes 0.1           # 100 / 100 / 30: a quick check (~1 minute)

Processes (2 cores, as ``operator_bench.py``): etcd, kube-apiserver and kube-controller-manager v1.28
(``tests/realapi/controlplane.py``'s ``ControlPlane``, binaries from ``KUBEBUILDER_ASSETS``) on core 1
with this orchestrator, the API server writing a metadata-level audit log of the keyroute kinds,
Secrets, Events and Leases (the request record: never a body); ``keyroute operator -n default
--leader-elect=false`` alone on core 0 (operator_bench's ``Operator``: RSS sampled every 0.1 s, VmHWM
at the end) logged in as in a pod (``PodOperator``: the service variables and a ServiceAccount folder
holding the admin's static token; a kubeconfig would import the official client first). The objects
are operator_bench's ``Layout`` (``pools`` CredentialPools with one 3-key Secret each, ``chains``
ProviderChains of 2-3 entries), created by this process before the operator starts. One fresh
control plane per size and run.
``--control-plane-cores all`` lets the control plane use both cores (the operator stays alone on
core 0, so it then shares that core with the API server): closer to a cluster whose control plane runs
on nodes of its own, where the API server is not confined to one core.
``--leader-elect on`` runs the operator with leader election, as the Helm chart does (its Lease
renewals are not counted as writes).

Figures per run:

- **initial sync**: from the operator's start to its last write of the first sync (the audit log's
  ``requestReceivedTimestamp``), and separately to its last status or config write (what sidecars and
  ``kubectl get`` read) and its last Event (posted behind them), once its metrics count a reconcile of every pool and chain and a
  listing confirms every pool's and chain's ``status.observedGeneration`` and every chain's config
  Secret; also the first write's time, and the first request's (the process's start, imports and
  login, before the API server has any part);
- **renders per chain**: ``keyroute_operator_reconciles_total{kind="ProviderChain"}`` / chains (every
  chain reconcile renders the chain) after the sync and a quiet second;
- **peak RSS**: the operator's VmHWM;
- **control plane CPU**: the CPU seconds kube-apiserver, etcd and the controller manager used from the
  operator's start until the sync was confirmed (is the API server the limit?), and this
  orchestrator's own (it shares their core: its polling is taken from the API server);
- **requests** by verb and resource from the operator (user agents ``keyroute-operator`` and kopf's);
- **restart**: SIGTERM, start again, wait for a reconcile of every pool and chain and a quiet 3 s:
  the writes of that second operator (goal: 0) and how long its sync took;
- **floor** (``--floor``): the same statuses and config Secrets written by a bare client on a fresh
  control plane with the same objects and watches (``floor_run``): the operator's write phase, from
  its first write to its last status or config, over the API server's own time for those writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
BENCH = SELF.parent
sys.path.insert(0, str(BENCH))
import operator_bench as ob  # noqa: E402  (adds the repository root to sys.path)
from benchlib import CLK_TCK, audited_control_plane, core_ticks, cpu_seconds  # noqa: E402

Json = dict[str, Any]
ROOT = ob.ROOT
NS = ob.NAMESPACE
BENCH_AGENT = "keyroute-startup-bench"
OPERATOR_AGENTS = (
    "keyroute-operator",
    "kopf",
)  # keyroute's client, kopf's (the controller manager's are not counted)
WRITES = {"create", "patch", "update", "delete", "deletecollection"}
SYNC_TIMEOUT = 300.0

#: Metadata only (no bodies: Secrets' data never reaches the log), for what the operator touches.
AUDIT_POLICY: Json = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {"level": "None", "verbs": ["watch"]},
        {
            "level": "Metadata",
            "resources": [
                {"group": "", "resources": ["secrets", "events", "namespaces"]},
                {
                    "group": "keyroute.dev",
                    "resources": [
                        "credentialpools",
                        "credentialpools/status",
                        "providerchains",
                        "providerchains/status",
                    ],
                },
                {"group": "coordination.k8s.io", "resources": ["leases"]},
            ],
        },
        {"level": "None"},
    ],
}


def log(msg: str) -> None:
    ob.log(msg)


class AuditLog:
    """The API server's audit log, read incrementally: the operator's requests, wall-clock seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rows: list[tuple[float, str, str, str]] = []  # (wall time, verb, resource[/sub], name)

    def read(self) -> None:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1
            self.offset += end
            for line in data[:end].splitlines():
                e = json.loads(line)
                agent = str(e.get("userAgent") or "")
                if e.get("stage") != "ResponseComplete" or not agent.startswith(OPERATOR_AGENTS):
                    continue
                ref = e.get("objectRef") or {}
                res = str(ref.get("resource") or "?") + (
                    f"/{ref['subresource']}" if ref.get("subresource") else ""
                )
                at = datetime.datetime.fromisoformat(
                    str(e["requestReceivedTimestamp"]).replace("Z", "+00:00")
                )
                self.rows.append((at.timestamp(), str(e.get("verb")), res, str(ref.get("name") or "")))

    def since(self, wall: float) -> list[tuple[float, str, str, str]]:
        self.read()
        return [r for r in self.rows if r[0] >= wall]


def object_write(row: tuple[float, str, str, str]) -> bool:
    """A write of the operator's to an object (a Lease renewal is the election's, every few seconds)."""
    return row[1] in WRITES and row[2] != "leases"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def seed(kube: Any, layout: ob.Layout, concurrency: int = 16) -> None:
    from keyroute.kube import path

    limit = asyncio.Semaphore(concurrency)

    async def create(url: str, body: Json) -> None:
        async with limit:
            await kube.create(url, body)

    for url, bodies in (
        (path("", "v1", "secrets", NS), [layout.secret(i) for i in range(layout.pools)]),
        (
            path("keyroute.dev", "v1alpha1", "credentialpools", NS),
            [layout.pool(i) for i in range(layout.pools)],
        ),
        (
            path("keyroute.dev", "v1alpha1", "providerchains", NS),
            [layout.chain(j) for j in range(layout.chains)],
        ),
    ):
        await asyncio.gather(*(create(url, b) for b in bodies))


async def synced_objects(kube: Any) -> tuple[Json, Json, Json]:
    """The listings of the pools, the chains and the operator's config Secrets."""
    from keyroute.kube import path

    pools = await kube.request("GET", path("keyroute.dev", "v1alpha1", "credentialpools", NS))
    chains = await kube.request("GET", path("keyroute.dev", "v1alpha1", "providerchains", NS))
    secrets = await kube.request(
        "GET", path("", "v1", "secrets", NS) + "?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkeyroute"
    )
    return pools, chains, secrets


async def synced(kube: Any, layout: ob.Layout) -> bool:
    """Every pool's and chain's status is current and every chain has its config Secret (one listing each)."""
    pools, chains, secrets = await synced_objects(kube)
    items = [*pools.get("items", []), *chains.get("items", [])]
    current = sum(1 for o in items if ob._status_current(o))
    configs = {o["metadata"]["name"] for o in secrets.get("items", [])}
    want = {layout.chain_name(j) + ob.CONFIG_SUFFIX for j in range(layout.chains)}
    return current == layout.pools + layout.chains and want <= configs


def reconciles(m: dict[str, float], kind: str) -> float:
    return sum(
        v
        for k, v in m.items()
        if k.startswith("keyroute_operator_reconciles_total{") and f'kind="{kind}"' in k
    )


async def metrics(op: ob.Operator) -> dict[str, float]:
    import aiohttp

    # Uncompressed: gzip of a 1,000-pool exposition costs the operator's core ~0.1 s.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{op.metrics_port}/metrics", headers={"Accept-Encoding": "identity"}
        ) as resp,
    ):
        return ob.parse_metrics(await resp.text())


async def wait_audit(
    op: ob.Operator,
    audit: AuditLog,
    wall0: float,
    want: dict[str, set[str]],
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Until the audit log shows, since ``wall0``, a request ``verb resource`` for every name in ``want``
    (polling the log, not the operator: a metrics scrape costs the operator's core)."""
    deadline = time.monotonic() + timeout
    got: dict[str, set[str]] = {}
    done = 0  # rows of the log already counted (this process shares the API server's core: poll lightly)
    while True:
        op.check_alive()
        audit.read()
        for at, verb, res, name in audit.rows[done:]:
            if at >= wall0:
                got.setdefault(f"{verb} {res}", set()).add(name)
        done = len(audit.rows)
        if all(names <= got.get(k, set()) for k, names in want.items()):
            return
        if time.monotonic() > deadline:
            missing = {k: len(names - got.get(k, set())) for k, names in want.items()}
            raise RuntimeError(f"no full sync after {timeout:.0f} s (missing {missing}); see {op.log_path}")
        await asyncio.sleep(0.2)


async def wait_writes_settled(
    op: ob.Operator,
    audit: AuditLog,
    wall0: float,
    quiet: float,
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Until the audit log has shown no write since ``wall0`` for ``quiet`` seconds: the Events that
    follow the status writes are posted too."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    n, done = 0, 0
    while True:
        op.check_alive()
        audit.read()
        n += sum(1 for r in audit.rows[done:] if r[0] >= wall0 and object_write(r))
        done = len(audit.rows)
        if n != seen:
            seen, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"writes still coming after {timeout:.0f} s; see {op.log_path}")
        await asyncio.sleep(0.2)


async def wait_reconciled(op: ob.Operator, layout: ob.Layout, timeout: float) -> dict[str, float]:  # noqa: ASYNC109
    """Until the operator's metrics count a reconcile of every pool and chain (scraped once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        op.check_alive()
        with contextlib.suppress(Exception):
            m = await metrics(op)
            if (
                reconciles(m, "CredentialPool") >= layout.pools
                and reconciles(m, "ProviderChain") >= layout.chains
            ):
                return m
        if time.monotonic() > deadline:
            raise RuntimeError(f"no full sync after {timeout:.0f} s; see {op.log_path}")
        await asyncio.sleep(1.0)


def control_plane_cpu(cp: Any) -> dict[str, float]:
    """CPU seconds so far of the control plane's processes, by name."""
    out: dict[str, float] = {}
    for name, p in cp.processes.items():
        if p.popen is not None:
            with contextlib.suppress(OSError):
                out[name] = cpu_seconds(p.popen.pid)
    return out


def noise(ticks0: dict[int, list[int]], out: Json, cp0: dict[str, float], cp1: dict[str, float]) -> Json:
    """Per core since ``ticks0``: the host's steal, and the CPU used by anything but the operator,
    the control plane and this process (other engineers' work on a shared machine), in % of the core.
    With the control plane on one core, its core's figures say how far the API server was held up."""
    ours = out["operator_cpu_seconds"] + out["orchestrator_cpu_seconds"]
    ours += sum(cp1.get(k, 0.0) - v for k, v in cp0.items())
    res: Json = {}
    busy_all = 0.0
    for core, a in ticks0.items():
        d = [y - x for x, y in zip(a, core_ticks(core), strict=True)]
        total = max(1, sum(d))
        res[f"core{core}_steal_pct"] = round(100.0 * d[7] / total, 1)
        busy_all += (d[0] + d[1] + d[2] + d[5] + d[6]) / CLK_TCK
    # Not per core: the kernel moves the control plane's softirq work around.
    res["others_cpu_seconds"] = round(max(0.0, busy_all - ours), 2)
    return res


def counts(rows: list[tuple[float, str, str, str]]) -> Json:
    return dict(sorted(Counter(f"{verb} {res}" for _, verb, res, _ in rows).items()))


async def start_profiler(pid: int, out: Path) -> asyncio.subprocess.Process | None:
    """py-spy (``pip install py-spy`` into the venv) sampling ``pid`` into ``out`` (raw, collapsed
    stacks); None without py-spy. Sampling costs the profiled process little (no instrumentation),
    but py-spy itself needs CPU: it runs on the orchestrator's core."""
    spy = Path(ob.PY).parent / "py-spy"
    if not spy.exists():
        log("no py-spy in the venv: not profiling")
        return None
    return await asyncio.create_subprocess_exec(
        str(spy), "record", "--format", "raw", "-r", "200", "-o", str(out), "-p", str(pid),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, preexec_fn=ob.child_setup(ob.CORE_REST),
    )


async def stop_profiler(proc: asyncio.subprocess.Process | None) -> None:
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(2)  # SIGINT: py-spy writes what it sampled
    try:
        await asyncio.wait_for(proc.wait(), timeout=20)
    except TimeoutError:
        proc.kill()
        await proc.wait()


class PodOperator(ob.Operator):
    """``keyroute operator`` logged in as in a pod: ``KUBERNETES_SERVICE_HOST``/``PORT`` and a
    ServiceAccount folder (``token``, ``ca.crt``, ``namespace``; here the admin's static token), no
    kubeconfig. That is the chart's Deployment's path: it does not import the official kubernetes
    client, which a kubeconfig needs (~0.3 s of start-up on this machine, before the first request).
    The folder and the variables are the realapi tier's (``ControlPlane.service_account_mount``), and
    so is the launcher that points keyroute at the folder (``IN_POD``)."""

    def __init__(self, cp: Any, sa_dir: Path, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(sa_dir, log_path, env)  # (the parent's kubeconfig: unused, see environment())
        self.service = cp.service_account_mount(sa_dir, cp.admin_token, NS)
        self.sa_dir = sa_dir

    @property
    def command(self) -> list[str]:
        from tests.realapi.processes import IN_POD

        return [ob.PY, "-c", IN_POD, str(self.sa_dir), *super().command[1:]]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        return {**env, **self.service, **self.extra_env}


class ElectedOperator(PodOperator):
    """``keyroute operator`` with leader election on, as the Helm chart runs it (its Lease in ``default``)."""

    @property
    def command(self) -> list[str]:
        argv = [a for a in super().command if a != "--leader-elect=false"]
        return [*argv, "--leader-election-namespace", NS]


async def prepared_control_plane(layout: ob.Layout, cp_all_cores: bool, out: Json) -> tuple[Any, Any]:
    """A fresh audited control plane on its core(s), the CRDs established, ``layout`` created; and the
    bench's client."""
    from tests.realapi.controlplane import HOW_TO_GET_ASSETS, find_assets

    from keyroute.kube import Kube, from_kubeconfig

    assets = find_assets()
    if assets is None:
        raise RuntimeError(f"needs the control-plane binaries: {HOW_TO_GET_ASSETS}")
    cp = await asyncio.to_thread(audited_control_plane(AUDIT_POLICY).start, assets)
    kube: Any = None
    try:
        # Every thread: the control plane was started from this process, already pinned to the rest.
        cp_cores = ob.CORES if cp_all_cores else (ob.CORE_REST & ob.CORES) or ob.CORES
        for name in ("kube-apiserver", "etcd", "kube-controller-manager"):
            p = cp.processes.get(name)
            if p is not None and p.popen is not None:
                for tid in os.listdir(f"/proc/{p.popen.pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), cp_cores)
        out["control_plane_cores"] = len(cp_cores)
        crds = str(ROOT / "crds")
        await asyncio.to_thread(cp.kubectl, "apply", "--server-side", "-f", crds)
        await asyncio.to_thread(
            cp.kubectl, "wait", "--for=condition=Established", "--timeout=30s", "-f", crds
        )
        kube = Kube.from_connection(from_kubeconfig(Path(cp.admin_token_kubeconfig)), user_agent=BENCH_AGENT)
        began = time.monotonic()
        await seed(kube, layout)
        out["seed_seconds"] = round(time.monotonic() - began, 1)
        return cp, kube
    except BaseException:
        if kube is not None:
            await kube.close()
        await asyncio.to_thread(cp.close)
        raise


async def one_run(
    scale: float,
    run: int,
    logs: Path,
    profile: bool = False,
    cp_all_cores: bool = False,
    elect: bool = False,
    floor: bool = False,
) -> Json:
    layout = ob.Layout(round(1000 * scale), round(300 * scale))
    out: Json = {"pools": layout.pools, "secrets": layout.pools, "chains": layout.chains, "run": run, "leader_elect": elect}
    operator_cls = ElectedOperator if elect else PodOperator
    cp, kube = await prepared_control_plane(layout, cp_all_cores, out)
    ops: list[ob.Operator] = []
    written: Json | None = None
    try:
        sa_dir = Path(cp.workdir) / "serviceaccount"  # goes with the control plane
        audit = AuditLog(cp.audit_log)
        audit.read()
        await asyncio.sleep(1.0)

        # --- initial sync ---------------------------------------------------------------------------
        out["load_before"] = loadavg()
        op = operator_cls(
            cp, sa_dir, logs / f"operator-{layout.pools}-{run}.log", {"KEYROUTE_RESYNC_SECONDS": "3600"}
        )
        ops.append(op)
        cp_cpu0 = control_plane_cpu(cp)
        self_cpu0 = time.process_time()
        ticks0 = {core: core_ticks(core) for core in sorted(ob.CORES)}
        wall0 = time.time()
        await op.start()
        spy = await start_profiler(op.pid, logs / f"profile-{layout.pools}-{run}.txt") if profile else None
        log(f"{layout.pools} pools run {run}: operator started (load {out['load_before']})")
        pools = {layout.pool_name(i) for i in range(layout.pools)}
        chains = {layout.chain_name(j) for j in range(layout.chains)}
        want = {
            "patch credentialpools/status": pools,
            "patch providerchains/status": chains,
            "create secrets": {c + ob.CONFIG_SUFFIX for c in chains},
        }
        try:
            await wait_audit(op, audit, wall0, want, SYNC_TIMEOUT)
        finally:
            await stop_profiler(spy)
        seen = time.time() - wall0
        while not await synced(kube, layout):
            op.check_alive()
            if time.time() - wall0 > SYNC_TIMEOUT:
                raise RuntimeError("reconciled but not synced")
            await asyncio.sleep(0.5)
        await wait_writes_settled(op, audit, wall0, quiet=2.0, timeout=SYNC_TIMEOUT)
        m = await metrics(op)
        rows = audit.since(wall0)
        writes = [r for r in rows if object_write(r)]
        out["lease_writes"] = sum(1 for r in rows if r[1] in WRITES and r[2] == "leases")
        state = [r for r in writes if r[2] != "events"]
        events = [r for r in writes if r[2] == "events"]
        out["sync_seconds"] = round(max(r[0] for r in writes) - wall0, 2) if writes else None
        out["state_written_seconds"] = round(max(r[0] for r in state) - wall0, 2) if state else None
        out["events_done_seconds"] = round(max(r[0] for r in events) - wall0, 2) if events else None
        out["first_write_seconds"] = round(min(r[0] for r in writes) - wall0, 2) if writes else None
        # Process start, imports and login, before any listing: what the API server has no part in.
        out["first_request_seconds"] = round(min(r[0] for r in rows) - wall0, 2) if rows else None
        out["reconciled_seen_seconds"] = round(seen, 2)
        out["renders_per_chain"] = round(reconciles(m, "ProviderChain") / layout.chains, 2)
        out["pool_reconciles_per_pool"] = round(reconciles(m, "CredentialPool") / layout.pools, 2)
        out["requests"] = counts(rows)
        out["writes"] = len(writes)
        out["operator_cpu_seconds"] = round(cpu_seconds(op.pid), 2)
        # Until the sync was confirmed (a second or two past its last write): is the API server the limit?
        out["control_plane_cpu_seconds"] = {
            k: round(v - cp_cpu0.get(k, 0.0), 2) for k, v in control_plane_cpu(cp).items()
        }
        # This process shares the control plane's core: what its polling took from the API server.
        out["orchestrator_cpu_seconds"] = round(time.process_time() - self_cpu0, 2)
        out["noise"] = noise(ticks0, out, cp_cpu0, control_plane_cpu(cp))
        out["rss_now_mib"] = op.rss_mib()
        out["peak_rss_mib"] = op.rss_mib("VmHWM")
        out["load_after"] = loadavg()
        await op.stop()
        log(
            f"{layout.pools} pools run {run}: sync {out['sync_seconds']} s (status and configs {out['state_written_seconds']} s,"
            f" first request {out['first_request_seconds']} s, first write {out['first_write_seconds']} s), control plane cpu {out['control_plane_cpu_seconds']} (this process {out['orchestrator_cpu_seconds']}, noise {out['noise']}),"
            f" {out['renders_per_chain']} renders/chain, peak RSS {out['peak_rss_mib']} MiB, cpu {out['operator_cpu_seconds']} s"
        )

        # --- restart --------------------------------------------------------------------------------
        op2 = operator_cls(
            cp,
            sa_dir,
            logs / f"operator-{layout.pools}-{run}-restart.log",
            {"KEYROUTE_RESYNC_SECONDS": "3600"},
        )
        ops.append(op2)
        wall1 = time.time()
        await op2.start()
        await wait_reconciled(op2, layout, SYNC_TIMEOUT)
        out["restart_reconciled_seconds"] = round(time.time() - wall1, 2)
        await asyncio.sleep(3.0)
        rows = audit.since(wall1)
        # The Lease's renewals are the election's, not writes to the objects.
        out["restart_writes"] = counts([r for r in rows if object_write(r)])
        out["restart_lease_writes"] = sum(1 for r in rows if r[1] in WRITES and r[2] == "leases")
        out["restart_peak_rss_mib"] = op2.rss_mib("VmHWM")
        await op2.stop()
        log(
            f"{layout.pools} pools run {run}: restart reconciled in {out['restart_reconciled_seconds']} s, writes {out['restart_writes']}"
        )
        written = await what_the_operator_wrote(kube) if floor else None
    finally:
        for o in ops:
            if o.proc is not None and o.proc.returncode is None:
                await o.stop(timeout=5)
        await kube.close()
        await asyncio.to_thread(cp.close)
    if written is not None:
        out["floor"] = await floor_run(layout, written, cp_all_cores)
        operator_phase = out["state_written_seconds"] - out["first_write_seconds"]
        out["floor"]["operator_write_phase_seconds"] = round(operator_phase, 2)
        out["floor"]["operator_to_floor"] = round(operator_phase / out["floor"]["write_phase_seconds"], 2)
        log(f"{layout.pools} pools run {run}: floor {out['floor']}")
    return out


async def what_the_operator_wrote(kube: Any) -> Json:
    """Every status and config Secret the operator wrote, by name: what :func:`floor_run` replays."""
    pools, chains, secrets = await synced_objects(kube)
    return {
        "credentialpools": {o["metadata"]["name"]: o["status"] for o in pools["items"]},
        "providerchains": {o["metadata"]["name"]: o["status"] for o in chains["items"]},
        "secrets": [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    k: v for k, v in o["metadata"].items() if k in ("name", "labels", "annotations", "ownerReferences")
                },
                "type": o.get("type", "Opaque"),
                "data": o.get("data", {}),
            }
            for o in secrets["items"]
        ],
    }


async def floor_run(layout: ob.Layout, written: Json, cp_all_cores: bool) -> Json:
    """The API server's floor for the first sync's writes: on a fresh control plane with the same
    objects, a bare client sends exactly the statuses and config Secrets the operator wrote (16 at
    once, as the operator, and from the operator's core), with the operator's four watches open and
    drained, and nothing else.
    The operator's write phase (its first write to its last status or config) over this one says
    what is keyroute's and what is the API server's. The Secrets' ownerReferences are pointed at
    this control plane's chains (their uids differ)."""
    from keyroute.kube import path

    out: Json = {}
    cp, kube = await prepared_control_plane(layout, cp_all_cores, out)
    drained = [0]

    async def drain(url: str, params: dict[str, str] | None = None) -> None:
        listing = await kube.request("GET", url + "?resourceVersion=0")
        async for _ in kube.watch(url, params, version=listing["metadata"]["resourceVersion"]):
            drained[0] += 1

    watches = [
        asyncio.create_task(drain(path("keyroute.dev", "v1alpha1", "credentialpools", NS))),
        asyncio.create_task(drain(path("keyroute.dev", "v1alpha1", "providerchains", NS))),
        asyncio.create_task(drain(path("", "v1", "secrets", NS))),
        asyncio.create_task(drain(path("", "v1", "events", NS), {"labelSelector": "keyroute.dev/report=sidecar"})),
    ]
    try:
        chains = await kube.request("GET", path("keyroute.dev", "v1alpha1", "providerchains", NS))
        uids = {o["metadata"]["name"]: o["metadata"]["uid"] for o in chains["items"]}
        secrets = json.loads(json.dumps(written["secrets"]))
        for body in secrets:
            for ref in body["metadata"].get("ownerReferences", []):
                ref["uid"] = uids[ref["name"]]
        await asyncio.sleep(1.0)
        limit = asyncio.Semaphore(16)

        async def status(plural: str, name: str, body: Json) -> None:
            async with limit:
                url = path("keyroute.dev", "v1alpha1", plural, NS, name) + "/status"
                await kube.merge_patch(url, {"status": body}, read=False)

        async def secret(body: Json) -> None:
            async with limit:
                await kube.create(path("", "v1", "secrets", NS), body, read=False)

        writes = [
            *(status("credentialpools", n, b) for n, b in written["credentialpools"].items()),
            *(status("providerchains", n, b) for n, b in written["providerchains"].items()),
            *(secret(b) for b in secrets),
        ]
        # This process plays the operator: on the operator's core, off the API server's.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, ob.CORE_OPERATOR)
        try:
            cpu0 = control_plane_cpu(cp)
            began = time.monotonic()
            await asyncio.gather(*writes)
            out["write_phase_seconds"] = round(time.monotonic() - began, 2)
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, (ob.CORE_REST & ob.CORES) or ob.CORES)
        out["writes"] = len(writes)
        out["control_plane_cpu_seconds"] = {
            k: round(v - cpu0.get(k, 0.0), 2) for k, v in control_plane_cpu(cp).items()
        }
        out["watch_events"] = drained[0]
        return out
    finally:
        for w in watches:
            w.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await kube.close()
        await asyncio.to_thread(cp.close)


async def main_async(args: argparse.Namespace) -> Json:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = ob.RESULTS / f"{stamp}-startup-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, (ob.CORE_REST & ob.CORES) or ob.CORES)
    result: Json = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "runs": [],
    }
    for run in range(1, args.runs + 1):
        for scale in args.sizes:
            result["runs"].append(
                await one_run(
                    scale,
                    run,
                    logs,
                    args.profile,
                    args.control_plane_cores == "all",
                    args.leader_elect == "on",
                    args.floor,
                )
            )
            (ob.RESULTS / f"{stamp}-startup.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1.0, 2.0], help="multiples of 1,000 pools / 300 chains"
    )
    parser.add_argument("--runs", type=int, default=2, help="runs of each size (alternating)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the first operator's initial sync (raw collapsed stacks next to the logs)",
    )
    parser.add_argument(
        "--control-plane-cores",
        choices=["rest", "all"],
        default="rest",
        help="rest (default): the control plane shares the other core with this orchestrator; all: it may"
        " use both cores, as a control plane on nodes of its own would not share the operator's",
    )
    parser.add_argument(
        "--leader-elect",
        choices=["off", "on"],
        default="off",
        help="off (default): one replica that always leads; on: leader election through a Lease, as the"
        " Helm chart runs the operator (the Lease is taken before the first sync can start)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="after each run, replay the operator's first-sync writes from a bare client on a fresh control"
        " plane with the same objects: the API server's own time for them (see floor_run)",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    for r in result["runs"]:
        print(
            f"{r['pools']:>5} pools {r['chains']:>4} chains run {r['run']}: sync {r['sync_seconds']} s"
            f" (status and configs {r['state_written_seconds']} s, Events {r['events_done_seconds']} s)"
            f" (first request {r.get('first_request_seconds')} s, first write {r['first_write_seconds']} s),"
            f" renders/chain {r['renders_per_chain']},"
            f" peak RSS {r['peak_rss_mib']} MiB, cpu {r['operator_cpu_seconds']} s, load {r['load_before']},"
            f" restart writes {sum(r['restart_writes'].values())}"
        )
        if "floor" in r:
            f = r["floor"]
            print(
                f"      write phase {f['operator_write_phase_seconds']} s; a bare client's same {f['writes']} writes"
                f" {f['write_phase_seconds']} s: {f['operator_to_floor']}x"
            )
    by_size: dict[int, list[float]] = {}
    for r in result["runs"]:
        if r["sync_seconds"] is not None:
            by_size.setdefault(r["pools"], []).append(r["sync_seconds"])
    sizes = sorted(by_size)
    if len(sizes) >= 2:
        a, b = min(by_size[sizes[0]]), min(by_size[sizes[-1]])
        print(f"ratio {sizes[-1]}/{sizes[0]} pools (best runs): {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
