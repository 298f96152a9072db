"""An API outage done for real: the kube-apiserver process is killed and started again.

While it is down the sidecar keeps routing (the data path never waits for the API), its reports
are buffered; once it is back they arrive, the operator (which lost its watches) folds them into
status, and a change made after the restart is reconciled. This module stops the session's shared
API server: it leaves it ready again (``start_apiserver`` waits for ``/readyz``) whatever happens.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.polling import eventually
from tests.realapi.chart import ChartRbac, forbidden_lines, run_operator
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane
from tests.realapi.objects import API, chain, config_of, pool, row, secret
from tests.realapi.processes import Processes
from tests.realapi.sidecars import start_sidecar

KEYS = [f"sk-test-REALAPI-OUTAGE-KEY-{i:06d}" for i in range(4)]
ROTATED = "sk-test-REALAPI-OUTAGE-ROTATED-01"


@pytest.fixture
async def openai() -> AsyncIterator[FakeProvider]:
    fp = FakeProvider("openai", keys=[*KEYS, ROTATED])
    await fp.start()
    yield fp
    await fp.stop()


@pytest.fixture
def restart_on_failure(control_plane: ControlPlane):  # type: ignore[no-untyped-def]
    yield
    if not control_plane.processes["kube-apiserver"].alive:
        control_plane.start_apiserver()


@pytest.mark.timeout(180)
async def test_through_an_api_outage_the_sidecar_routes_buffers_its_reports_and_the_operator_resumes(
    control_plane: ControlPlane,
    api: Api,
    namespace: str,
    chart_rbac: ChartRbac,
    keyroute_process: Processes,
    openai: FakeProvider,
    tmp_path: Path,
    restart_on_failure: None,
) -> None:
    for key in KEYS[:3]:
        openai.set(Behaviour.rate_limited(retry_after=120), key=key)
    names = [f"k{i}" for i in range(4)]
    control_plane.apply(
        [
            secret("openai-keys", **dict(zip(names, KEYS, strict=True))),
            pool("openai", "openai", *((n, "openai-keys", n) for n in names)),
            chain("agents", ("openai", "openai", openai.base_url, "openai"), fallback={"maxWait": "0s"}),
        ],
        namespace=namespace,
    )
    agent = chart_rbac.sidecar_kubeconfig(namespace)
    # Cluster-wide, as the chart runs it with these (default) values.
    with run_operator(chart_rbac, keyroute_process) as operator:
        sidecar = await start_sidecar(
            keyroute_process, api, namespace, "pod-a", kubeconfig=agent, folder=tmp_path
        )
        await eventually(
            lambda: _where(
                api.get(API, "providerchains", namespace, "agents"),
                lambda c: c["status"].get("sidecars") == 1,
            ),
            timeout=20,
        )

        # A restarting API server refuses requests (403) until its RBAC caches are loaded: grants
        # are checked on what the operator logged before the outage; after it, on what it did.
        assert forbidden_lines(operator.output, namespace) == []
        control_plane.stop_apiserver()
        async with aiohttp.ClientSession() as session:
            began = time.monotonic()
            for _ in range(3):
                async with session.post(
                    f"{sidecar.base_url}/chat/completions",
                    json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                ) as resp:
                    await resp.read()
                    assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k3"
            assert time.monotonic() - began < 2  # the data path never waited for the API
        await eventually(lambda: _equals(sidecar.metric("keyroute_reports_pending"), 3), timeout=10)
        await eventually(
            lambda: _positive(sidecar.metric("keyroute_reports_total", result="retried")), timeout=10
        )

        await asyncio.to_thread(control_plane.start_apiserver)
        back = time.monotonic()
        p = await eventually(
            lambda: _where(
                api.get(API, "credentialpools", namespace, "openai"),
                lambda p: p["status"].get("available") == 1,
            ),
            timeout=45,
        )
        print(
            f"buffered reports in pool status {time.monotonic() - back:.2f}s after the API server was ready"
        )
        assert [row(p, n)["state"] for n in names] == ["CoolingDown"] * 3 + ["Available"]
        assert all(row(p, n)["reportedBy"] == "pod-a" for n in names[:3])
        assert await sidecar.metric("keyroute_reports_total", result="dropped") == 0
        assert await sidecar.metric("keyroute_reports_pending") == 0

        # The operator resumed its watches: a key rotated now reaches the rendered config.
        changed = time.monotonic()
        await api.patch(
            "v1",
            "secrets",
            namespace,
            "openai-keys",
            {"data": {"k3": base64.b64encode(ROTATED.encode()).decode()}},
        )

        async def rotated() -> bool:
            cfg = config_of(await api.get("v1", "secrets", namespace, "agents-keyroute"))
            return any(c["key"] == ROTATED for c in cfg["pools"][0]["credentials"])

        await eventually(rotated, timeout=45)
        print(f"a change after the restart reconciled in {time.monotonic() - changed:.2f}s")
        assert operator.running
        print(f"403s while the restarted API server loaded its RBAC: {len(forbidden_lines(operator.output))}")
    assert control_plane.processes["kube-controller-manager"].alive
    for key in [*KEYS, ROTATED]:
        assert key not in operator.output + sidecar.process.output


async def _where(getter, ok):  # type: ignore[no-untyped-def]
    obj = await getter
    return obj if obj is not None and obj.get("status") and ok(obj) else None


async def _equals(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return bool(await value == expected)


async def _positive(value) -> bool:  # type: ignore[no-untyped-def]
    return bool(await value > 0)
