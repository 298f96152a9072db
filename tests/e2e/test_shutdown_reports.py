"""On SIGTERM's path (:meth:`Sidecar.shutdown`), reports still buffered get what is left of the grace.

kmock, because the API server has to be unreachable when the shutdown starts and come back on cue
within the grace (or not at all): a real API server stopped and restarted takes seconds either way.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from keyroute.fakeprovider import Behaviour
from tests.e2e import test_reporting
from tests.e2e.conftest import eventually
from tests.e2e.test_reporting import agents, call, chain_of, pool_of_keys, reports

start_pod = test_reporting.start_pod  # the fixture: a sidecar on the rendered config, reporting to kmock

KEYS = [f"sk-test-SHUTDOWN-REPORT-KEY-{i:08d}" for i in range(2)]


async def test_a_report_buffered_during_an_outage_is_flushed_within_the_grace(
    kube, operator_runner, start_pod, fake_provider
):
    openai = await fake_provider("openai", keys=KEYS)
    openai.set(Behaviour.rate_limited(retry_after=60), key=KEYS[0])
    objects = [*pool_of_keys(KEYS), chain_of("agents", ("openai", "openai", openai))]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        await eventually(lambda: a.reporter.pending == 0 and a.reporter.delivered.is_set())
        with kube.outage(unreachable=True) as outage:
            assert (await call(session, a)).status == 200  # k0's 429, then k1: a report to send
            await eventually(lambda: a.reporter.pending == 1)
            began = time.monotonic()
            shutdown = asyncio.create_task(a.shutdown(grace=5))
            await asyncio.sleep(0.5)
            assert not shutdown.done()  # waiting for the report, within the grace
            outage.end()
            await asyncio.wait_for(shutdown, 10)
        took = time.monotonic() - began
        assert 0.5 <= took < 5
        events = await reports(kube, "openai")
        assert [e["metadata"]["annotations"]["keyroute.dev/credential"] for e in events] == ["k0"]


async def test_an_api_down_for_the_whole_grace_does_not_hold_the_shutdown(
    kube, operator_runner, start_pod, fake_provider, caplog
):
    openai = await fake_provider("openai", keys=KEYS)
    openai.set(Behaviour.rate_limited(retry_after=60), key=KEYS[0])
    objects = [*pool_of_keys(KEYS), chain_of("agents", ("openai", "openai", openai))]
    async with agents(kube, operator_runner, objects), aiohttp.ClientSession() as session:
        a = await start_pod("pod-a")
        await eventually(lambda: a.reporter.pending == 0 and a.reporter.delivered.is_set())
        with kube.outage(unreachable=True):
            assert (await call(session, a)).status == 200
            await eventually(lambda: a.reporter.pending == 1)
            began = time.monotonic()
            await asyncio.wait_for(a.shutdown(grace=1), 10)
            took = time.monotonic() - began
        assert 1 <= took < 1.5
        assert a.reporter.pending == 1  # what could not be sent within the grace, and it says so:
        assert "exiting with reports not delivered" in caplog.text
