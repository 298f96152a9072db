"""Two operators, one leader: a Lease on the real API server, operators as processes.

- SIGKILL the leader: the standby's webhook still admits pods at once, the standby holds the Lease
  within 20 s (controller-runtime's default timings) and renders a rotation made after that;
- SIGTERM the leader: it stops within 5 s and the standby holds the Lease within 5 s;
- never two writers: a leader frozen (SIGSTOP) past its renew deadline wakes up fenced; its write
  counter does not move after the standby took over, and it can lead again later;
- SIGTERM stops the operator within 5 s while the API server is down;
- two electors in one process (the election shell itself): one leads, a crash hands over;
- a release that meets a renewal in flight gives up the Lease as that renewal left it, and one that
  meets a newer Lease of its own (409) reads it again and gives it up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from keyroute.controller.election import ElectionConfig, LeaderElector
from keyroute.core.election import Timings, micro_time
from keyroute.core.inject import CHAIN_LABEL, is_injected
from keyroute.kube import Kube, from_kubeconfig
from tests.chart.test_chart import HelmRunner, _helm_path
from tests.e2e.test_webhook import cert_dir as _cert_dir  # the fixture, by name
from tests.polling import eventually
from tests.realapi.bursts import assert_written_before_events, create_burst, written_then_events
from tests.realapi.chart import delete_webhook_configuration
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane, free_port
from tests.realapi.processes import KeyrouteProcess, Processes
from tests.realapi.test_webhook import in_effect

cert_dir = _cert_dir
API = "keyroute.dev/v1alpha1"
LEASE = ("coordination.k8s.io/v1", "leases")
# Short timings where the test is not about the defaults: 2 s lease, 1.5 s renew deadline, 0.5 s retry.
FAST = ("--leader-elect-lease-duration", "2s", "--leader-elect-renew-deadline", "1.5s", "--leader-elect-retry-period", "0.5s")
# Where a test is about what the Lease needs, not about takeover speed: a 1.5 s renew deadline can
# pass on a loaded machine, and a leader that lost the Lease rightly has nothing to release.
STEADY = ("--leader-elect-lease-duration", "6s", "--leader-elect-renew-deadline", "4s", "--leader-elect-retry-period", "0.5s")


class Replica:
    """One operator process with its metrics port (and webhook port, if any)."""

    def __init__(
        self, name: str, process: KeyrouteProcess, metrics_port: int, health_port: int, webhook_port: int | None
    ) -> None:
        self.name = name
        self.process = process
        self.metrics_port = metrics_port
        self.health_port = health_port
        self.webhook_port = webhook_port

    def healthy(self) -> bool:
        """kopf's liveness endpoint, on the address given by ``--health-address``."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def leader(self) -> float:
        """``keyroute_operator_leader``: 1 while it leads."""
        found = re.search(r"^keyroute_operator_leader (\S+)$", self.metrics(), re.M)
        assert found, "no keyroute_operator_leader series"
        return float(found.group(1))

    def writes(self, what: str = "") -> float:
        """``keyroute_operator_writes_total``: every status, config and Event write it made (``what``:
        only those of that kind)."""
        text = self.metrics()
        labels = rf'[^}}]*what="{what}"[^}}]*' if what else r"[^}]*"
        return sum(float(v) for v in re.findall(rf"^keyroute_operator_writes_total\{{{labels}\}} (\S+)$", text, re.M))


def start(
    procs: Processes,
    cp: ControlPlane,
    namespace: str,
    name: str,
    *extra: str,
    webhook: tuple[Path, Path] | None = None,
) -> Replica:
    metrics_port, health_port = free_port(), free_port()
    args = ["operator", "-n", namespace, "--metrics-port", str(metrics_port), "--metrics-address", "127.0.0.1"]
    args += ["--health-port", str(health_port), "--health-address", "127.0.0.1"]
    args += ["--leader-election-namespace", namespace, *extra]
    webhook_port = None
    if webhook is not None:
        webhook_port = free_port()
        tls, injection = webhook
        args += ["--webhook-port", str(webhook_port), "--webhook-address", "127.0.0.1"]
        args += ["--webhook-cert-dir", str(tls), "--injection-config", str(injection)]
    process = procs.start(*args, kubeconfig=cp.admin_token_kubeconfig, name=name, env={"POD_NAME": name})
    return Replica(name, process, metrics_port, health_port, webhook_port)


async def settled(replica: Replica, quiet: float = 1.0) -> float:
    """Its write count, once it stayed the same for ``quiet`` seconds."""
    last = replica.writes()
    for _ in range(20):
        await asyncio.sleep(quiet)
        now = replica.writes()
        if now == last:
            return now
        last = now
    raise AssertionError(f"{replica.name} keeps writing: {last}")


async def holder(api: Api, namespace: str) -> str | None:
    lease = await api.get(*LEASE, namespace, "keyroute-operator")
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


async def config_hash(api: Api, namespace: str) -> str | None:
    secret = await api.get("v1", "secrets", namespace, "agents-keyroute")
    return ((secret or {}).get("metadata", {}).get("annotations") or {}).get("keyroute.dev/config-hash")


async def rotate(api: Api, namespace: str, value: str) -> None:
    await api.patch("v1", "secrets", namespace, "openai-keys", {"stringData": {"key-1": value}})


async def rendered_anew(api: Api, namespace: str, before: str | None, timeout: float = 10) -> str:  # noqa: ASYNC109
    async def changed() -> str | None:
        now = await config_hash(api, namespace)
        return now if now is not None and now != before else None

    result: str = await eventually(changed, timeout=timeout)
    return result


@contextlib.asynccontextmanager
async def renewed_as(api: Api, namespace: str, identity: str, every: float = 0.25) -> AsyncIterator[None]:
    """While inside, the test renews the operators' Lease in ``identity``'s name, as a live leader
    would: a standby sees the record change and waits a whole lease duration from its last change."""

    async def renew() -> None:
        while True:
            renewed = {"holderIdentity": identity, "renewTime": micro_time(time.time())}
            await api.patch(*LEASE, namespace, "keyroute-operator", {"spec": renewed})
            await asyncio.sleep(every)

    task = asyncio.create_task(renew())
    try:
        await asyncio.sleep(0)  # the first renewal is on its way before the block starts
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def setup_examples(cp: ControlPlane, api: Api, namespace: str) -> str:
    cp.kubectl("apply", "-n", namespace, "-f", "examples/")
    return await rendered_anew(api, namespace, None, timeout=30)


async def test_sigkill_the_leader_the_standby_admits_pods_takes_over_within_20s_and_renders(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes, cert_dir: Path, tmp_path: Path
) -> None:
    """Default timings (15 s lease): the numbers a user gets."""
    injection = tmp_path / "injection.yaml"
    injection.write_text("image: registry.example/keyroute:test\nmode: container\nmissingChain: Reject\n")
    a = start(keyroute_process, control_plane, namespace, "op-a", webhook=(cert_dir, injection))
    await a.process.wait_for("became the leader", timeout=30)
    b = start(keyroute_process, control_plane, namespace, "op-b", webhook=(cert_dir, injection))
    await b.process.wait_for("standing by", timeout=30)
    first = await setup_examples(control_plane, api, namespace)
    assert b.writes() == 0  # a standby writes nothing

    # The API server calls the standby's webhook (a Service cannot reach loopback: a URL).
    hook_name = f"keyroute-{namespace}"
    control_plane.apply(webhook_configuration(hook_name, namespace, b.webhook_port or 0, cert_dir))
    try:
        # The API server uses a webhook configuration once its informer brought it: the pod below is
        # created in-process within milliseconds of the apply, so wait until the hook answers.
        await in_effect(api, namespace, refused=True)
        killed = time.monotonic()
        await a.process.terminate(signal.SIGKILL)
        assert await holder(api, namespace) == "op-a"  # the dead leader still holds the Lease...
        pod = await api.create(labelled_pod(), namespace)  # ...and a labelled pod is admitted meanwhile
        assert is_injected(pod), pod["spec"]
        assert await holder(api, namespace) == "op-a"

        async def b_holds() -> bool:
            return await holder(api, namespace) == "op-b"

        await eventually(b_holds, timeout=25, interval=0.1)
        took = time.monotonic() - killed
        print(f"takeover after SIGKILL: {took:.1f}s")
        assert took <= 20
    finally:
        delete_webhook_configuration(control_plane, hook_name)

    await b.process.wait_for("became the leader", timeout=5)
    await rotate(api, namespace, "REPLACE-ME-rotated-after-the-takeover")
    await rendered_anew(api, namespace, first)
    await eventually(lambda: b.writes() > 0, timeout=5)  # counted just after the write returns


async def test_sigterm_the_leader_stops_within_5s_and_the_standby_takes_over_within_5s(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    """Default timings: a graceful stop releases the Lease, the standby takes it at its next try (2 s)."""
    a = start(keyroute_process, control_plane, namespace, "op-a")
    await a.process.wait_for("became the leader", timeout=30)
    b = start(keyroute_process, control_plane, namespace, "op-b")
    await b.process.wait_for("standing by", timeout=30)
    first = await setup_examples(control_plane, api, namespace)
    await eventually(lambda: a.healthy() and b.healthy(), timeout=10)  # leader and standby alike
    assert (a.leader(), b.leader()) == (1, 0)

    began = time.monotonic()
    stop = asyncio.create_task(a.process.terminate(signal.SIGTERM))

    async def b_holds() -> bool:
        return await holder(api, namespace) == "op-b"

    try:
        await eventually(b_holds, timeout=10, interval=0.05)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- op-a:\n{a.process.output[-4000:]}\n--- op-b:\n{b.process.output[-4000:]}") from None
    took = time.monotonic() - began
    stopped = await stop
    print(f"takeover after SIGTERM: {took:.2f}s; the leader stopped in {stopped:.2f}s")
    assert a.process.returncode == 0, a.process.output[-3000:]
    assert "lease released" in a.process.output
    assert stopped <= 5
    assert took <= 5
    await eventually(lambda: b.leader() == 1, timeout=5)
    await rotate(api, namespace, "REPLACE-ME-rotated-after-sigterm")
    await rendered_anew(api, namespace, first)


async def test_a_new_leader_reconciles_what_it_saw_as_a_standby_as_one_burst(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    """Objects created while there was no leader (the leader killed, its Lease not yet expired) are
    listed by the standby, which does not reconcile them; when it takes the Lease it reconciles them
    all as a burst, as the handlers reconcile a listing: at most 16 at once, with every status and
    config written before the burst's Events (before, one at a time: 15-18 s for 1,000 pools where a
    listing takes ~10 s, the Events interleaved with the statuses).

    The dead leader's Lease is renewed in its name while the objects are created: with the 2 s lease
    the standby could otherwise take over halfway through the 56 creates on a loaded machine, and
    reconcile part of them as watch events instead of as the burst this test is about."""
    a = start(keyroute_process, control_plane, namespace, "op-a", *FAST)
    await a.process.wait_for("became the leader", timeout=30)
    b = start(keyroute_process, control_plane, namespace, "op-b", *FAST)
    await b.process.wait_for("standing by", timeout=30)
    await a.process.terminate(signal.SIGKILL)
    async with renewed_as(api, namespace, "op-a"):  # the Lease stays op-a's until the burst exists
        began = time.monotonic()
        pools, chains = await create_burst(api, namespace)
        print(f"the burst's objects created in {time.monotonic() - began:.2f}s (the lease: 2 s)")
        assert b.writes() == 0 and await holder(api, namespace) == "op-a"
    await b.process.wait_for("became the leader", timeout=20)
    got = await eventually(
        lambda: written_then_events(api, namespace, pools, chains, lambda: b.writes(what="event")),
        timeout=60,
    )
    state, events = got
    assert_written_before_events(state, events, b.process.output)


async def test_never_two_writers_a_frozen_leader_wakes_up_fenced(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    """SIGSTOP is the GC pause / partition case: the leader cannot know it lost the Lease until it
    runs again, and must not write then, whatever it had in flight."""
    a = start(keyroute_process, control_plane, namespace, "op-a", *FAST)
    await a.process.wait_for("became the leader", timeout=30)
    b = start(keyroute_process, control_plane, namespace, "op-b", *FAST)
    await b.process.wait_for("standing by", timeout=30)
    h0 = await setup_examples(control_plane, api, namespace)
    a_writes = await settled(a)  # the start-up burst of status writes is over
    assert a_writes > 0 and b.writes() == 0

    a.process.popen.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        await rotate(api, namespace, "REPLACE-ME-rotated-while-a-is-frozen")  # a may have it in flight

        async def b_holds() -> bool:
            return await holder(api, namespace) == "op-b"

        await eventually(b_holds, timeout=10, interval=0.1)
        h1 = await rendered_anew(api, namespace, h0)
    finally:
        a.process.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    await a.process.wait_for("stopped leading", timeout=5)
    # Fenced, it no longer exports the objects' state: no stale series for the alerts to read.
    assert a.leader() == 0 and "keyroute_operator_credential_state{" not in a.metrics()
    await rotate(api, namespace, "REPLACE-ME-rotated-after-a-woke-up")
    h2 = await rendered_anew(api, namespace, h1)
    await asyncio.sleep(1.0)  # whatever a had queued has run by now
    assert a.writes() == a_writes, "the old leader wrote after it lost the Lease"
    await eventually(lambda: b.writes() > 0, timeout=5)
    assert await holder(api, namespace) == "op-b"

    # Leadership moves back: a leads again (a new term) and renders a rotation itself.
    await b.process.terminate(signal.SIGTERM)
    await a.process.wait_for('"became the leader"', timeout=5)
    await eventually(lambda: a.process.output.count("became the leader") == 2, timeout=5)
    await rotate(api, namespace, "REPLACE-ME-rotated-when-a-leads-again")
    await rendered_anew(api, namespace, h2)
    await eventually(lambda: "keyroute_operator_credential_state{" in a.metrics(), timeout=5)
    await eventually(lambda: a.writes() > a_writes, timeout=5)  # counted just after the write returns


async def test_sigterm_stops_the_operator_within_5s_while_the_api_server_is_down(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes
) -> None:
    a = start(keyroute_process, control_plane, namespace, "op-a", *FAST)
    await a.process.wait_for("became the leader", timeout=30)
    await setup_examples(control_plane, api, namespace)
    with control_plane.outage():
        await asyncio.sleep(2.5)  # past the renew deadline: renewals and watches are failing
        took = await a.process.terminate(signal.SIGTERM)
    print(f"SIGTERM during an API outage: stopped in {took:.2f}s")
    assert a.process.returncode == 0, a.process.output[-3000:]
    assert took <= 5


async def test_a_failed_startup_exits_at_once(
    control_plane: ControlPlane, namespace: str, keyroute_process: Processes, tmp_path: Path
) -> None:
    """The webhook's TLS files are missing: the operator says so and exits, its election stopped."""
    injection = tmp_path / "injection.yaml"
    injection.write_text("image: x\n")
    a = start(keyroute_process, control_plane, namespace, "op-a", webhook=(tmp_path / "no-tls", injection))
    await asyncio.to_thread(a.process.popen.wait, 30)  # type: ignore[union-attr]
    exited = time.time()
    assert a.process.returncode not in (0, None)
    failure = next(json.loads(line) for line in a.process.output.splitlines() if "tls.crt not found" in line)
    failed = datetime.fromisoformat(failure["ts"].replace("Z", "+00:00")).timestamp()
    # From the failure to the exit (Python's start-up before it is not the operator's doing); kopf
    # would wait 5 s for background tasks that a failed start-up had left running.
    print(f"failed start-up: exited {exited - failed:.2f}s after the failure")
    assert exited - failed <= 1.0


async def test_two_electors_in_one_process_one_leads_and_a_crash_hands_over(
    control_plane: ControlPlane, api: Api, namespace: str
) -> None:
    timings = Timings(lease_duration=2, renew_deadline=1.5, retry_period=0.25)
    events: list[str] = []

    def elector(name: str) -> LeaderElector:
        kube = Kube.from_connection(from_kubeconfig(control_plane.admin_token_kubeconfig))
        config = ElectionConfig(name="pair", namespace=namespace, identity=name, timings=timings)
        return LeaderElector(
            kube, config, lambda: events.append(f"{name} started"), lambda: events.append(f"{name} stopped")
        )

    one, two = elector("one"), elector("two")
    tasks = {e: asyncio.create_task(e.run()) for e in (one, two)}
    try:
        await eventually(lambda: one.is_leader() or two.is_leader(), timeout=5)
        leader, standby = (one, two) if one.is_leader() else (two, one)
        await asyncio.sleep(1.0)  # several retry periods: still one leader, still the same
        assert leader.is_leader() and not standby.is_leader()

        crashed = time.monotonic()
        tasks.pop(leader).cancel()  # no release: the Lease must expire
        await eventually(standby.is_leader, timeout=5, interval=0.05)
        took = time.monotonic() - crashed
        # Not before the lease duration has passed since the last renewal the standby saw, which the
        # crashed leader made up to one retry period before it was cancelled.
        assert timings.lease_duration - timings.retry_period <= took <= 3.5, took
        lease = await api.get(*LEASE, namespace, "pair")
        assert lease is not None and lease["spec"]["leaseTransitions"] == 1

        await standby.release()
        assert not standby.is_leader()
        lease = await api.get(*LEASE, namespace, "pair")
        assert lease is not None and lease["spec"].get("holderIdentity") is None
        assert events.count(f"{standby.config.identity} started") == 1
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await one.kube.close()
        await two.kube.close()


class AnswerHeld(Kube):
    """The real API server applies each Lease update at once; its answer is held until ``gate`` opens.

    A reply slow on the wire, on cue: the one window in which a release could carry the
    resourceVersion from before the renewal the server has already applied."""

    def __init__(self, credentials: Any, **kwargs: Any) -> None:
        super().__init__(credentials, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()
        self.applied = asyncio.Event()

    async def request(self, method: str, url_path: str, body: Any = None, **kwargs: Any) -> Any:
        answer = await super().request(method, url_path, body, **kwargs)
        if method == "PUT" and not self.gate.is_set():
            self.applied.set()
            await self.gate.wait()
        return answer


async def test_a_release_during_a_renewal_in_flight_gives_up_the_lease_the_renewal_left(
    control_plane: ControlPlane, api: Api, namespace: str
) -> None:
    """SIGTERM while the leader's renewal is on the wire: the release waits for that answer (its
    resourceVersion is the Lease's now) instead of replacing an older one, which the server refuses
    with 409 and leaves the Lease held for a whole lease duration; the renewal's answer, landing after
    the fence closed, does not make the replica lead again."""
    timings = Timings(lease_duration=6, renew_deadline=4, retry_period=0.5)
    events: list[str] = []
    kube = AnswerHeld.from_connection(from_kubeconfig(control_plane.admin_token_kubeconfig))
    config = ElectionConfig(name="held", namespace=namespace, identity="one", timings=timings)
    elector = LeaderElector(kube, config, lambda: events.append("started"), lambda: events.append("stopped"))
    task = asyncio.create_task(elector.run())
    try:
        await eventually(elector.is_leader, timeout=5)
        kube.gate.clear()
        await asyncio.wait_for(kube.applied.wait(), timeout=5)  # a renewal is in, its answer is not

        release = asyncio.create_task(elector.release(within=3.0))
        await asyncio.sleep(0.3)
        assert not elector.is_leader(), "the fence closes before anything else"
        kube.gate.set()
        await asyncio.wait_for(release, timeout=5)

        lease = await api.get(*LEASE, namespace, "held")
        assert lease is not None and lease["spec"].get("holderIdentity") is None, lease["spec"]
        assert events == ["started", "stopped"], events
        await asyncio.sleep(2 * timings.retry_period)  # the election loop runs on: it takes nothing back
        lease = await api.get(*LEASE, namespace, "held")
        assert lease is not None and lease["spec"].get("holderIdentity") is None, lease["spec"]
        assert events == ["started", "stopped"] and not elector.is_leader(), events
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await kube.close()


async def test_a_release_that_meets_a_newer_lease_of_its_own_reads_it_again_and_gives_it_up(
    control_plane: ControlPlane, api: Api, namespace: str
) -> None:
    """A renewal the server applied but whose answer never came (the try's own timeout cut it) leaves
    the elector one resourceVersion behind: the release's 409 makes it read the Lease again, and as
    the Lease is still this replica's, give it up. One held by somebody else is left alone."""
    timings = Timings(lease_duration=6, renew_deadline=4, retry_period=0.5)
    kube = Kube.from_connection(from_kubeconfig(control_plane.admin_token_kubeconfig))

    def elector(name: str) -> LeaderElector:
        config = ElectionConfig(name=name, namespace=namespace, identity="one", timings=timings)
        return LeaderElector(kube, config, lambda: None, lambda: None)

    try:
        for lease_name, later_holder in (("ours", "one"), ("theirs", "two")):
            e = elector(lease_name)
            assert await e.attempt() and e.is_leader()
            # The write whose answer was lost: renewTime moves (and with it the resourceVersion).
            renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            before = await api.get(*LEASE, namespace, lease_name)
            after = await api.patch(
                *LEASE, namespace, lease_name, {"spec": {"holderIdentity": later_holder, "renewTime": renewed}}
            )
            assert before and after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
            await e.release(within=3.0)
            lease = await api.get(*LEASE, namespace, lease_name)
            assert lease is not None
            expected = None if later_holder == "one" else "two"
            assert lease["spec"].get("holderIdentity") == expected, (lease_name, lease["spec"])
            assert not e.is_leader()
    finally:
        await kube.close()


async def test_the_charts_rbac_is_all_a_leader_needs(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process: Processes, tmp_path: Path
) -> None:
    """The operator as the chart's ServiceAccount, with the chart's RBAC (``helm template``) and nothing
    else: it takes the Lease (get, create), renews it (update), renders, and releases it on SIGTERM."""
    release = f"kr{namespace[-6:]}"  # the chart's cluster-scoped objects carry the release's name
    (tmp_path / "helm").mkdir()
    helm = HelmRunner(_helm_path(), tmp_path / "helm")
    out = helm.run("template", release, "--namespace", namespace, values={"watchNamespaces": [namespace]})
    assert out.returncode == 0, out.stderr
    wanted = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    objs = [o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] in wanted]
    fullname = f"{release}-keyroute"
    assert any(o["kind"] == "Role" and o["metadata"]["name"] == f"{fullname}-leader-election" for o in objs)
    control_plane.apply(objs)
    try:
        token = control_plane.create_token(namespace, fullname)
        kubeconfig = control_plane.write_kubeconfig(tmp_path / "sa.kubeconfig", user={"token": token})
        process = keyroute_process.start(
            "operator", "-n", namespace, "--metrics-port", "0", "--health-port", "0",
            "--leader-election-id", fullname, "--leader-election-namespace", namespace, *STEADY,
            kubeconfig=kubeconfig, name="chart-sa", env={"POD_NAME": "chart-sa"},
        )  # fmt: skip
        await process.wait_for("became the leader", timeout=30)
        await setup_examples(control_plane, api, namespace)
        await asyncio.sleep(1.5)  # a few renewals
        took = await process.terminate(signal.SIGTERM)
        assert process.returncode == 0 and took <= 5, process.output[-3000:]
        assert "lease released" in process.output
        assert "forbidden" not in process.output.lower() and " 403 " not in process.output, process.output[-3000:]
        lease = await api.get(*LEASE, namespace, fullname)
        assert lease is not None and lease["spec"].get("holderIdentity") is None
    finally:
        for kind in ("clusterrolebinding", "clusterrole"):
            control_plane.kubectl("delete", kind, fullname, check=False)


def labelled_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "agent-", "labels": {CHAIN_LABEL: "agents"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }


def webhook_configuration(name: str, namespace: str, port: int, cert_dir: Path) -> dict[str, Any]:
    ca = base64.b64encode((cert_dir / "tls.crt").read_bytes()).decode()
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "inject.keyroute.dev",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {"url": f"https://127.0.0.1:{port}/keyroute-inject", "caBundle": ca},
                "rules": [
                    {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "objectSelector": {"matchExpressions": [{"key": CHAIN_LABEL, "operator": "Exists"}]},
            }
        ],
    }



async def test_two_whole_operators_in_one_process_share_nothing_but_the_lease(
    control_plane: ControlPlane, api: Api, namespace: str, monkeypatch: Any
) -> None:
    """Two Operator objects, two kopf registries, one process (a thread and loop each: kopf cancels
    every task of its loop when it stops): the point of having no module state."""
    import threading

    import kopf

    from keyroute.controller import login
    from keyroute.controller.handlers import Operator, operate, register
    from keyroute.controller.settings import OperatorConfig

    info = kopf.ConnectionInfo(
        server=control_plane.server,
        scheme="Bearer",
        token=control_plane.admin_token,
        ca_path=str(control_plane.pki / "ca.crt"),
    )
    monkeypatch.setattr(login, "OVERRIDE", info)
    timings = Timings(lease_duration=2, renew_deadline=1.5, retry_period=0.25)
    ops: dict[str, Operator] = {}
    stops: dict[str, threading.Event] = {}
    threads: dict[str, threading.Thread] = {}
    for name in ("one", "two"):
        op = ops[name] = Operator(
            OperatorConfig(
                namespaces=(namespace,),
                election=ElectionConfig(name="in-process", namespace=namespace, identity=name, timings=timings),
            )
        )
        registry = kopf.OperatorRegistry()
        register(op, registry, start_on_startup=False)
        stops[name] = threading.Event()
        running = operate(op, registry, standalone=True, namespaces=[namespace], stop_flag=stops[name])
        threads[name] = threading.Thread(target=asyncio.run, args=(running,), name=f"operator-{name}", daemon=True)
        threads[name].start()
    try:
        await eventually(lambda: sum(op.is_leader() for op in ops.values()) == 1, timeout=20)
        leader = next(n for n, op in ops.items() if op.is_leader())
        standby = "two" if leader == "one" else "one"
        first = await setup_examples(control_plane, api, namespace)
        # The standby's cache is warm: its own watch brings the chain, on no schedule the leader's
        # render can vouch for (two watch streams, two threads), so it is waited for.
        await eventually(lambda: ops[standby].known["chains"] == {(namespace, "agents")}, timeout=5)
        assert ops[standby].metrics.writes.labels("status")._value.get() == 0

        stops[leader].set()  # a graceful stop: the Lease is released
        await asyncio.to_thread(threads[leader].join, 10)
        assert not threads[leader].is_alive()
        await eventually(ops[standby].is_leader, timeout=5)
        await rotate(api, namespace, "REPLACE-ME-rotated-in-process")
        await rendered_anew(api, namespace, first)
        assert not ops[leader].is_leader()
    finally:
        for name, stop in stops.items():
            stop.set()
            await asyncio.to_thread(threads[name].join, 10)
