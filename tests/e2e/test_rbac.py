"""The chart's RBAC is exactly what the code uses: derived from the API requests the real operator
(kopf included), its webhook and a real sidecar send while they do everything they do.

One scenario drives every path that talks to the API server: objects created, changed, rotated
and deleted; a pod admitted through the webhook; a sidecar reporting a cooldown, its repeat (an Event
patch), its presence, and watching its pool for shared cooldowns. kmock records every request; the
``User-Agent`` tells the sidecar's (``keyroute-sidecar/…``) from the operator's (keyroute's own client
and kopf). Each request becomes an RBAC triple (API group, resource[/subresource], verb), and the
triples are compared with the rules of the rendered chart, both ways: every verb used is granted, and
every verb granted is either used or listed in :data:`NOT_EXERCISED` with the reason the scenario
cannot show it.

The leader election's Lease Role (``<fullname>-leader-election``, get/create/update on ``leases`` in
the release namespace) is not compared here: the election renews with PUT, which kmock does not
serve. ``tests/realapi/test_leader_election.py::test_the_charts_rbac_is_all_a_leader_needs`` runs the
operator as the chart's ServiceAccount with exactly the chart's RBAC on a real API server, and
``tests/chart/test_chart.py`` checks the Role against ``keyroute.controller.election.VERBS``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyroute.core.reports import Origin
from keyroute.fakeprovider import Behaviour
from keyroute.kube import SIDECAR_AGENT
from keyroute.kube import Kube as ApiClient
from keyroute.sidecar.app import Address, Sidecar
from keyroute.sidecar.sources import RenderedConfigFile
from tests.chart import test_chart as _chart
from tests.chart.test_chart import FULLNAME, HelmRunner, one, triples
from tests.e2e import test_webhook as _webhook
from tests.e2e.conftest import HARNESS_HEADER, eventually
from tests.e2e.test_operator import API, config_of, pool, secret
from tests.e2e.test_reporting import watching_reports
from tests.e2e.test_webhook import MODULES, labelled_pod

# Fixtures of other modules, made available here by name.
helm = _chart.helm
cert_dir = _webhook.cert_dir
webhook_env = _webhook.webhook_env

pytestmark = pytest.mark.e2e

KEY1 = "sk-test-RBAC-KEY-00000000000001"
KEY2 = "sk-test-RBAC-KEY-00000000000002"
ROTATED = "sk-test-RBAC-KEY-ROTATED-000001"

_VERB = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch", "DELETE": "delete"}

# Granted by the chart but not shown by this scenario, and why. Anything else granted must be used.
NOT_EXERCISED = {
    # kopf scans CRDs to find its resources; the harness disables scanning (kmock cannot serve it).
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # A credential or config Secret is read only when the operator's Secret watch has not brought it
    # (not listed yet, or a config Secret created meanwhile: the 409 path); here every reconcile finds
    # its Secrets in the watch-fed cache. tests/realapi runs the operator with exactly the chart's RBAC.
    ("", "secrets", "get"),
}


def triple(request: Any) -> tuple[str, str, str]:
    resource = request.resource
    assert resource is not None and resource.plural, request.url
    name = resource.plural + (f"/{request.subresource}" if request.subresource else "")
    verb = _VERB[str(request.action.value)]
    if str(request.method.value).upper() == "PUT":
        verb = "update"
    return (resource.group or "", name, verb)


async def test_the_charts_rbac_grants_exactly_what_the_code_uses(
    kube, operator_runner, webhook_env, fake_provider, helm: HelmRunner, tmp_path: Path
):
    hook, _ = webhook_env
    openai = await fake_provider("openai", keys=[KEY1, KEY2, ROTATED])
    openai.script(Behaviour.rate_limited(retry_after=1), Behaviour.rate_limited(retry_after=1), key=KEY1)
    await kube.create(secret("openai-keys", k1=KEY1, k2=KEY2))
    await kube.create(pool("openai", "openai", ("k1", "openai-keys", "k1"), ("k2", "openai-keys", "k2")))
    await kube.create(
        {
            "apiVersion": API,
            "kind": "ProviderChain",
            "metadata": {"name": "agents"},
            "spec": {
                "providers": [
                    {"provider": "openai", "baseURL": openai.base_url, "credentialPoolRef": {"name": "openai"}}
                ],
                "fallback": {"maxWait": "0s"},
            },
        }
    )
    async with operator_runner(*MODULES, namespaces=["default"]), aiohttp.ClientSession() as session:
        rendered = await eventually(lambda: kube.get("v1", "secrets", "default", "agents-keyroute"), timeout=10)
        await watching_reports(kube)
        # The webhook admits a labelled pod (it looks the chain up).
        await eventually(hook.up, timeout=10)
        assert (await hook.review(labelled_pod()))["allowed"] is True

        # A sidecar: a cooldown, its repeat after the key came back (an Event patch), its presence,
        # and the watch of its pool for shared cooldowns.
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config_of(rendered)))
        sidecar = Sidecar(RenderedConfigFile(path), listen=Address("127.0.0.1", 0), admin_listen=None, tick_interval=0.05)
        sidecar.enable_reporting(
            ApiClient.from_connection(kube.connection_info(), user_agent=SIDECAR_AGENT),
            Origin("agent-pod", "default"),
            retry=(0.05, 0.2),
        )
        await sidecar.start()
        try:
            for _ in range(2):
                async with session.post(
                    f"{sidecar.base_url}/chat/completions", json={"model": "m", "messages": []}
                ) as resp:
                    assert resp.status == 200
                await asyncio.sleep(1.2)  # the key's cooldown ends: the next 429 is the same transition again
            await eventually(lambda: sidecar.metrics.reports.labels("merged")._value.get() >= 1, timeout=5)
            await eventually(lambda: sidecar.reporter is not None and sidecar.reporter.pending == 0)
        finally:
            await sidecar.stop(flush=1)

        # Changes: a pool spec edit, a key rotation, then deletions.
        await kube.patch(API, "credentialpools", "default", "openai", {"spec": {"strategy": "RoundRobin"}}, bump_generation=True)
        await kube.patch("v1", "secrets", "default", "openai-keys", {"stringData": {"k1": ROTATED}})

        async def rerendered() -> bool:
            # The config Secret patched with the rotated key (a fixed sleep lost this on a loaded machine).
            return ROTATED in json.dumps(config_of(await kube.get("v1", "secrets", "default", "agents-keyroute")))

        await eventually(rerendered, timeout=10)
        await kube.delete(API, "providerchains", "default", "agents")
        await kube.delete(API, "credentialpools", "default", "openai")
        await asyncio.sleep(0.5)

    used: dict[str, set[tuple[str, str, str]]] = {"operator": set(), "sidecar": set()}
    for request in kube.requests():
        if request.headers.get(HARNESS_HEADER) or request.resource is None or not request.resource.plural:
            continue  # the test's own requests; API discovery (/api, /apis) needs no RBAC
        role = "sidecar" if request.headers.get("User-Agent", "").startswith("keyroute-sidecar/") else "operator"
        used[role].add(triple(request))
    assert used["sidecar"], "the sidecar made no API request: the scenario is broken"

    objs = helm.template({})  # default values: cluster-wide
    granted_operator = triples(one(objs, "ClusterRole", FULLNAME)["rules"])
    granted_sidecar = triples(one(objs, "ClusterRole", f"{FULLNAME}-sidecar")["rules"])

    assert used["operator"] - granted_operator == set(), "the operator uses verbs the chart does not grant"
    assert used["sidecar"] - granted_sidecar == set(), "the sidecar uses verbs the chart does not grant"
    assert granted_operator - used["operator"] - NOT_EXERCISED == set(), "granted to the operator, never used"
    assert granted_sidecar - used["sidecar"] == set(), "granted to the sidecar, never used"
