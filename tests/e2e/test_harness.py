"""The e2e harness itself: a real kopf operator (``sample_operator``) against kmock, end to end.

If these fail, e2e failures elsewhere say nothing about keyroute.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import kopf
import pytest

from tests.e2e.conftest import (
    API_VERSION,
    Kube,
    OperatorFailedError,
    OperatorRunners,
    eventually,
    running_kube,
)

pytestmark = pytest.mark.e2e

SAMPLE = "tests.e2e.sample_operator"


def fast_retries() -> kopf.OperatorSettings:
    """kopf retries a failed API call after 1, 1, 2, 3… s by default; tests need not wait that long."""
    settings = kopf.OperatorSettings()
    settings.networking.error_backoffs = [0.05, 0.1, 0.2, 0.5]
    settings.watching.reconnect_backoff = 0.05
    return settings


def pool(name: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "CredentialPool", "metadata": {"name": name}, "spec": {}}


async def observed_generation(kube: Kube, name: str) -> int | None:
    obj = await kube.get(API_VERSION, "credentialpools", "default", name)
    return None if obj is None else obj.get("status", {}).get("observedGeneration")


async def test_operator_writes_status_posts_event_and_stops_cleanly(
    kube: Kube, operator_runner: OperatorRunners
) -> None:
    async with operator_runner(SAMPLE, namespaces=["default"]) as op:
        await op.wait_watching("credentialpools", "secrets")
        await kube.create(pool("p1"))

        assert await eventually(lambda: observed_generation(kube, "p1")) == 1
        events = await eventually(lambda: kube.events("default", involving="p1"))
        assert [(e["reason"], e["message"]) for e in events] == [("Observed", "generation 1")]
        assert events[0]["involvedObject"]["kind"] == "CredentialPool"
        assert "sample operator saw pool p1" in op.log  # live, while it runs

    assert (op.exit_code, op.exception) == (0, None)
    assert op.stop_duration is not None and op.stop_duration < 2.0
    assert "sample operator saw pool p1" in op.output  # kopf's own formatted output, after the stop
    assert kube.token not in op.log + op.output
    assert not op.running


async def test_operator_sees_secret_updates(kube: Kube, operator_runner: OperatorRunners) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"}, "stringData": {"a": "x"}}
    created = await kube.create(secret)
    assert created["data"] == {"a": "eA=="}  # stringData folded into data, as an API server does

    async with operator_runner(SAMPLE) as op:
        await op.wait_watching("secrets")

        async def modified(count: int) -> list[str]:
            events = await kube.events(involving="keys")
            messages = [e["message"] for e in events if e["reason"] == "SecretModified"]
            return messages if len(messages) == count else []

        # One change at a time: kopf squashes the events of one object that arrive within 0.1 s.
        await kube.patch("v1", "secrets", "default", "keys", {"stringData": {"b": "y"}})
        assert await eventually(lambda: modified(1)) == ["keys=a,b"]
        await kube.patch("v1", "secrets", "default", "keys", {"data": {"a": None}})
        # Two Events, each posted with only generateName: kmock alone would refuse the second.
        assert await eventually(lambda: modified(2)) == ["keys=a,b", "keys=b"]


async def test_cluster_wide_operator_sees_other_namespaces(
    kube: Kube, operator_runner: OperatorRunners
) -> None:
    async with operator_runner(SAMPLE, namespaces=None) as op:  # -A
        await op.wait_watching("credentialpools")
        await kube.create({**pool("p7"), "metadata": {"name": "p7", "namespace": "team-a"}})

        async def observed() -> Any:
            obj = await kube.get(API_VERSION, "credentialpools", "team-a", "p7")
            return (obj or {}).get("status", {}).get("observedGeneration")

        assert await eventually(observed) == 1
        assert await eventually(lambda: kube.events("team-a", involving="p7"))
    assert "-A" in op.args


async def test_helpers_round_trip_and_bump_generation(kube: Kube) -> None:
    created = await kube.create(pool("p2"))
    meta = created["metadata"]
    assert (meta["namespace"], meta["generation"], meta["resourceVersion"]) == ("default", 1, "1")
    assert meta["uid"]

    await kube.patch(API_VERSION, "credentialpools", "default", "p2", {"spec": {"x": 1}})
    unchanged = await kube.get(API_VERSION, "credentialpools", "default", "p2")
    assert unchanged is not None and unchanged["metadata"]["generation"] == 1  # kmock never bumps it

    await kube.patch(
        API_VERSION, "credentialpools", "default", "p2", {"spec": {"x": 2}}, bump_generation=True
    )
    bumped = await kube.get(API_VERSION, "credentialpools", "default", "p2")
    assert bumped is not None and (bumped["metadata"]["generation"], bumped["spec"]) == (2, {"x": 2})

    await kube.patch(
        API_VERSION, "credentialpools", "default", "p2", {"status": {"phase": "Ready"}}, subresource="status"
    )
    assert [p["metadata"]["name"] for p in await kube.list(API_VERSION, "credentialpools")] == ["p2"]
    assert (await kube.delete(API_VERSION, "credentialpools", "default", "p2")) is not None
    assert await kube.get(API_VERSION, "credentialpools", "default", "p2") is None
    assert await kube.delete(API_VERSION, "credentialpools", "default", "p2") is None


async def test_outage_answers_errors_without_touching_the_store(kube: Kube) -> None:
    await kube.create(pool("p3"))
    path = f"/apis/{API_VERSION}/namespaces/default/credentialpools/p3"
    headers = {"Content-Type": "application/merge-patch+json"}
    async with aiohttp.ClientSession(kube.url) as operator_like:  # no harness header: fair game
        with kube.outage(503, plural="credentialpools", method="PATCH") as outage:
            async with operator_like.patch(path, json={"spec": {"x": 1}}, headers=headers) as response:
                assert response.status == 503
                status = await response.json()
            async with operator_like.get(path) as response:
                assert response.status == 200  # GETs are not part of this outage
            # The harness's own helpers are never failed, so the store can be inspected meanwhile.
            assert (await kube.get(API_VERSION, "credentialpools", "default", "p3") or {})["spec"] == {}
        assert (status["kind"], status["code"], status["reason"]) == ("Status", 503, "ServiceUnavailable")
        assert [r.method.value for r in outage.hits] == ["PATCH"]

        with kube.outage(unreachable=True), pytest.raises(aiohttp.ServerDisconnectedError):
            async with operator_like.get(path):
                pass

        kube.outage(500, times=1)
        async with operator_like.get(path) as response:
            assert response.status == 500
        async with operator_like.get(path) as response:
            assert response.status == 200


async def test_operator_retries_through_an_outage(kube: Kube, operator_runner: OperatorRunners) -> None:
    def status_patch(request: Any) -> bool:
        return bool(request.subresource == "status")

    async with operator_runner(SAMPLE, settings=fast_retries()) as op:
        await op.wait_watching("credentialpools")
        outage = kube.outage(503, plural="credentialpools", method="PATCH", match=status_patch, times=2)
        await kube.create(pool("p4"))

        assert await eventually(lambda: observed_generation(kube, "p4")) == 1
        assert len(outage.hits) == 2 and not outage.active
        assert "503" in op.log


async def test_operator_reconnects_after_the_api_was_unreachable(
    kube: Kube, operator_runner: OperatorRunners
) -> None:
    async with operator_runner(SAMPLE, settings=fast_retries()) as op:
        await op.wait_watching("credentialpools")
        with kube.outage(unreachable=True) as outage:  # also cuts the open watch streams
            await eventually(lambda: len(outage.hits) >= 2)  # kopf keeps trying to re-watch
        await kube.create(pool("p5"))
        assert await eventually(lambda: observed_generation(kube, "p5")) == 1
        assert "ServerDisconnectedError" in op.log


async def test_a_failing_operator_fails_fast(kube: Kube, operator_runner: OperatorRunners) -> None:
    began = time.monotonic()
    with pytest.raises(OperatorFailedError, match="no_such_module"):
        async with operator_runner("tests.e2e.no_such_module") as op:
            await op.wait_watching("credentialpools")
    assert op.exit_code == 1
    assert isinstance(op.exception, ModuleNotFoundError)
    assert time.monotonic() - began < 2.0


async def test_teardown_is_quick_even_with_the_operator_left_running() -> None:
    # The fixtures' own machinery, timed: stop the operator first, as the fixtures do.
    async with running_kube() as kube:
        runners = OperatorRunners(kube)
        op = await runners(SAMPLE).start()
        await op.wait_watching("credentialpools", "secrets")
        await kube.create(pool("p6"))
        await eventually(lambda: observed_generation(kube, "p6"))
        began = time.monotonic()
        await runners.aclose()
        stopped = time.monotonic()
    assert stopped - began < 2.0 and time.monotonic() - stopped < 1.0
    assert (op.exit_code, op.exception) == (0, None)

    # The wrong order (kmock first, with watches open) costs ~70 s in plain kmock; not here.
    async with running_kube() as kube:
        runners = OperatorRunners(kube)
        op = await runners(SAMPLE).start()
        await op.wait_watching("credentialpools", "secrets")
        began = time.monotonic()
    assert time.monotonic() - began < 1.0
    began = time.monotonic()
    await runners.aclose()
    assert time.monotonic() - began < 2.0


async def test_eventually_reports_the_last_result() -> None:
    calls: list[int] = []

    def never() -> int:
        calls.append(1)
        return 0

    with pytest.raises(AssertionError, match=r"last result: 0"):
        await eventually(never, timeout=0.2, interval=0.01)
    assert len(calls) > 2

    calls.clear()

    async def soon() -> str:
        calls.append(1)
        assert len(calls) >= 3  # an AssertionError means "not yet"
        return "done"

    assert await eventually(soon, timeout=1.0, interval=0.01) == "done"
