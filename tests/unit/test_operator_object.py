"""``keyroute operator``'s flags become one Operator object; two of them share nothing."""

from __future__ import annotations

import os
import socket

import kopf
import pytest

from keyroute.cli import build_parser, main, operator_config
from keyroute.controller.election import default_identity, default_namespace
from keyroute.controller.handlers import FencedKube, NotLeader, Operator, register
from keyroute.controller.settings import OperatorConfig
from keyroute.kube import Connection


def config(*flags: str) -> OperatorConfig:
    result: OperatorConfig = operator_config(build_parser().parse_args(["operator", *flags]))
    return result


def test_leader_election_is_on_by_default_with_controller_runtimes_names_and_timings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "keyroute-system")
    monkeypatch.setenv("POD_NAME", "keyroute-7d9f-abcde")
    election = config().election
    assert election is not None
    assert (election.name, election.namespace, election.identity) == (
        "keyroute-operator",
        "keyroute-system",
        "keyroute-7d9f-abcde",
    )
    t = election.timings
    assert (t.lease_duration, t.renew_deadline, t.retry_period) == (15.0, 10.0, 2.0)

    custom = config(
        "--leader-elect=true",
        "--leader-election-id", "kr",
        "--leader-election-namespace", "ops",
        "--leader-elect-lease-duration", "30s",
        "--leader-elect-renew-deadline", "20s",
        "--leader-elect-retry-period", "500ms",
    ).election  # fmt: skip
    assert custom is not None and (custom.name, custom.namespace) == ("kr", "ops")
    assert (custom.timings.lease_duration, custom.timings.renew_deadline, custom.timings.retry_period) == (30, 20, 0.5)


def test_leader_elect_false_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert config("--leader-elect=false").election is None
    assert config("--leader-elect", "false").election is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--leader-elect=maybe"])


def test_without_a_lease_namespace_the_operator_says_which_flag_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    if default_namespace() is not None:
        pytest.skip("running in a pod: the ServiceAccount's namespace is the default")
    with pytest.raises(ValueError, match="--leader-election-namespace"):
        config()
    assert main(["operator", "--log-format", "text"]) == 2
    assert "--leader-elect=false" in capsys.readouterr().err


def test_timings_that_allow_two_leaders_are_refused_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--leader-election-namespace", "ns", "--leader-elect-lease-duration", "5s"]
    with pytest.raises(ValueError, match="longer than the renew deadline"):
        config(*flags)
    assert main(["operator", "--log-format", "text", *flags]) == 2
    assert "renew deadline" in capsys.readouterr().err


def test_the_identity_is_the_pod_name_else_host_and_pid() -> None:
    assert default_identity({"POD_NAME": "op-1"}) == "op-1"
    assert default_identity({}) == f"{socket.gethostname()}_{os.getpid()}"
    assert default_namespace({"POD_NAMESPACE": "ns"}) == "ns"


def test_resync_and_namespaces_come_from_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYROUTE_RESYNC_SECONDS", "60")
    c = config("--leader-elect=false", "-n", "a", "-n", "b")
    assert (c.namespaces, c.resync) == (("a", "b"), 60.0)
    assert config("--leader-elect=false", "--resync-interval", "2m").resync == 120.0


def test_listen_addresses_have_flags() -> None:
    args = build_parser().parse_args(
        ["operator", "--metrics-address", "127.0.0.1", "--health-address", "::1", "--webhook-address", "::"]
    )
    assert (args.metrics_address, args.health_address, args.webhook_address) == ("127.0.0.1", "::1", "::")
    defaults = build_parser().parse_args(["operator"])
    assert (defaults.metrics_address, defaults.health_address, defaults.webhook_address) == ("0.0.0.0", "0.0.0.0", None)


def test_two_operators_in_one_process_share_nothing() -> None:
    one, two = Operator(OperatorConfig()), Operator(OperatorConfig(election=None, namespaces=("x",)))
    one.known["pools"].add(("ns", "p"))
    assert two.known["pools"] == set()
    assert one.metrics.registry is not two.metrics.registry
    registries = kopf.OperatorRegistry(), kopf.OperatorRegistry()
    register(one, registries[0])
    register(two, registries[1])
    ids = [{h.id for h in r._changing.get_all_handlers()} | {h.id for h in r._watching.get_all_handlers()} for r in registries]
    # No kopf resource handlers: pools, chains and Secrets are keyroute's own list-and-watch (issue 11);
    # kopf runs the lifecycle only.
    assert ids[0] == ids[1] == set()
    activities = [{h.id for h in r._activities.get_all_handlers()} for r in registries]
    assert activities[0] == activities[1] == {"configure", "login", "cleanup"}
    # Without an election a replica always leads; with one, not until it holds the Lease.
    assert one.is_leader()
    from keyroute.controller.election import ElectionConfig

    assert not Operator(OperatorConfig(election=ElectionConfig(namespace="ns"))).is_leader()


async def test_a_fenced_client_refuses_writes_before_sending_anything() -> None:
    leading = False
    kube = FencedKube.from_connection(Connection(server="https://192.0.2.1:1", token="t"))
    kube.fence = lambda: leading
    for method in ("POST", "PATCH", "PUT", "DELETE"):
        with pytest.raises(NotLeader, match=f"{method} /api/v1/x: not the leader"):
            await kube.request(method, "/api/v1/x", {})
    with pytest.raises(NotLeader):
        await kube.merge_patch("/api/v1/x", {})
    await kube.close()


async def test_shutdown_reports_a_dead_background_task_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """kopf retries a failed cleanup 60 s later while SIGTERM waits: shutdown must not raise."""
    import asyncio

    op = Operator(OperatorConfig())

    async def dead() -> None:
        raise RuntimeError("the report watch died")

    blocked = asyncio.Event()
    op._leader_tasks = [asyncio.create_task(dead()), asyncio.create_task(blocked.wait())]  # type: ignore[list-item]
    await asyncio.sleep(0)  # the first task dies
    loop = asyncio.get_running_loop()
    began = loop.time()
    await op.shutdown()
    assert loop.time() - began < 1.0
    assert all(t.done() for t in op._leader_tasks) and op._leader_tasks == []
    [record] = [r for r in caplog.records if r.getMessage() == "a background task had failed"]
    assert record.kr == {"error": "the report watch died"}  # type: ignore[attr-defined]


def test_the_first_retry_delay_has_a_flag_and_must_fit_in_the_resync() -> None:
    assert config("--leader-elect=false").retry_delay == 5.0
    assert config("--leader-elect=false", "--retry-delay", "500ms").retry_delay == 0.5
    with pytest.raises(ValueError, match="--retry-delay must be > 0"):
        config("--leader-elect=false", "--retry-delay", "0s")
    with pytest.raises(ValueError, match=r"--retry-delay \(600s\) .* --resync-interval \(300s\)"):
        config("--leader-elect=false", "--retry-delay", "10m")
    assert config("--leader-elect=false", "--resync-interval", "2s").retry_delay == 2.0  # unset: fits


async def test_a_failing_object_is_retried_after_doubling_delays_and_each_line_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README: 5 s, then twice as long per further failure up to the resync interval; 5 s again once
    it reconciled. A failure while a retry is pending (another event's reconcile) is the same streak."""
    op = Operator(OperatorConfig(resync=60.0))
    key = ("chain", "ns", "agents")
    delays = []
    for _ in range(6):
        delays.append(op.retry_later(*key, RuntimeError("PATCH refused: 422")))
        op._retries.pop(key).cancel()  # as if it fired: the next failure is the retry's
    assert delays == [5, 10, 20, 40, 60, 60]

    first = op.retry_later(*key, RuntimeError("again"))
    again = op.retry_later(*key, RuntimeError("another event's reconcile"))
    assert (first, op.backoff.failures(key)) == (60, 7) and 59 < again <= 60  # the pending retry stands

    lines = [r for r in caplog.records if r.getMessage().startswith("chain reconcile failed")]
    fields = [r.kr for r in lines]  # type: ignore[attr-defined]
    assert [f["failures"] for f in fields] == [1, 2, 3, 4, 5, 6, 7, 7]
    assert [f["retry_in"] for f in fields][:7] == [5, 10, 20, 40, 60, 60, 60]
    assert fields[0] == {"namespace": "ns", "chain": "agents", "error": "PATCH refused: 422", "failures": 1, "retry_in": 5}
    assert lines[0].getMessage() == "chain reconcile failed; retrying in 5s"
    assert [r.exc_info is not None for r in lines] == [True] + [False] * 7  # the traceback once per streak

    op.reconciled(*key)  # succeeded: the streak ends and the pending retry is moot
    assert key not in op._retries and op.backoff.failures(key) == 0
    assert op.retry_later(*key, RuntimeError("new streak")) == 5
    assert lines[-1] is not caplog.records[-1] and caplog.records[-1].exc_info is not None

    op.forget(*key)  # deleted: nothing pending, nothing counted
    assert key not in op._retries and op.backoff.failures(key) == 0

    # Not logged in yet is no failure: the first delay, no count, no log line.
    before = len(caplog.records)
    assert op.retry_later("pool", "ns", "openai") == 5 and op.backoff.failures(("pool", "ns", "openai")) == 0
    assert len(caplog.records) == before
    # A deposed leader's write refused by its own fence: no retry, no count, no error line.
    assert op.retry_later("pool", "ns", "other", NotLeader("PATCH /x: not the leader")) == 0
    assert ("pool", "ns", "other") not in op._retries and op.backoff.failures(("pool", "ns", "other")) == 0
    assert len(caplog.records) == before
    op._stopped_leading()  # losing the Lease drops every retry and streak
    assert op._retries == {}
