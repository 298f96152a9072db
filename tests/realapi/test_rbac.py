"""The chart's RBAC on the real API server: the namespaced install (``watchNamespaces``) is enough for
the operator, and neither the operator's nor the sidecar's account gets more than it needs.

The cluster-wide install is exercised by every other module's operator; ``tests/e2e/test_rbac.py``
(kmock) compares the chart's rules with every request the code sends, both ways.
"""

from __future__ import annotations

from pathlib import Path

from tests.polling import eventually
from tests.realapi.chart import ChartRbac, Helm, forbidden_lines, run_operator
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane
from tests.realapi.objects import API, cond
from tests.realapi.processes import Processes


def can(control_plane: ControlPlane, who: str, verb: str, what: str, namespace: str) -> bool:
    """``kubectl auth can-i``; ``what`` may name a subresource (``pools.group/status``), which kubectl
    itself would read as an object's name."""
    resource, _, sub = what.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    result = control_plane.kubectl(
        "auth", "can-i", verb, resource, *extra, "-n", namespace, f"--as={who}", check=False
    )
    return result.stdout.strip() == "yes"


async def test_the_operator_runs_with_the_charts_namespaced_rbac(
    control_plane: ControlPlane,
    api: Api,
    helm: Helm,
    namespace: str,
    keyroute_process: Processes,
    tmp_path: Path,
) -> None:
    """``--set watchNamespaces={NS}``: a Role and RoleBinding in NS, a small ClusterRole (CRDs,
    namespaces), and the operator run with ``-n NS`` as the chart runs it."""
    with ChartRbac.install(control_plane, helm, tmp_path, watch_namespaces=[namespace]) as rbac:
        assert {o["kind"] for o in rbac.objects} >= {"Role", "RoleBinding", "ClusterRole"}
        control_plane.kubectl("apply", "-n", namespace, "-f", "examples/")
        with run_operator(rbac, keyroute_process, namespaces=[namespace]) as operator:

            async def chain_ready() -> bool:
                chain = await api.get(API, "providerchains", namespace, "agents")
                return cond(chain, "Ready").get("status") == "True"

            await eventually(chain_ready, timeout=30)
            assert await api.get("v1", "secrets", namespace, "agents-keyroute") is not None
            assert operator.running, operator.output[-3000:]
            assert forbidden_lines(operator.output) == []
            assert "REPLACE-ME" not in operator.output  # the examples' placeholder keys


def test_the_operator_account_reads_secrets_only_where_it_watches(
    control_plane: ControlPlane, helm: Helm, namespace: str, tmp_path: Path
) -> None:
    with ChartRbac.install(control_plane, helm, tmp_path, watch_namespaces=[namespace]) as rbac:
        who = f"system:serviceaccount:{rbac.namespace}:{rbac.service_account}"
        assert can(control_plane, who, "list", "secrets", namespace)
        assert can(control_plane, who, "patch", "credentialpools.keyroute.dev/status", namespace)
        assert not can(control_plane, who, "patch", "credentialpools.keyroute.dev", namespace)  # status only
        assert not can(control_plane, who, "list", "secrets", "kube-system")
        assert not can(control_plane, who, "list", "secrets", "default")
        assert not can(control_plane, who, "delete", "secrets", namespace)  # it never deletes (GC does)
        assert not can(control_plane, who, "update", "mutatingwebhookconfigurations", "default")


def test_an_agents_account_bound_as_the_readme_says_can_report_and_read_pools_not_secrets(
    control_plane: ControlPlane, namespace: str, chart_rbac: ChartRbac
) -> None:
    chart_rbac.sidecar_kubeconfig(namespace, "agent")
    who = f"system:serviceaccount:{namespace}:agent"
    assert can(control_plane, who, "create", "events", namespace)
    assert can(control_plane, who, "patch", "events", namespace)
    assert can(control_plane, who, "watch", "credentialpools.keyroute.dev", namespace)
    assert not can(control_plane, who, "get", "secrets", namespace)
    assert not can(control_plane, who, "patch", "credentialpools.keyroute.dev/status", namespace)
    assert not can(control_plane, who, "create", "events", "default")  # bound in its namespace only


def test_the_refusal_matcher_finds_refusals_and_nothing_else() -> None:
    """A plain-function check of the log matcher every operator test here relies on: it failed tests
    four times by reading a port, a timestamp, a config hash and a name suffix as a 403."""
    refused = [
        '{"msg": "reconcile failed", "error": "PATCH /api/v1/namespaces/ns/secrets/x: 403 Forbidden"}',
        'kopf: APIForbiddenError: secrets is forbidden: User "system:serviceaccount:ns:op" cannot list',
        '{"status": 403, "reason": "Forbidden"}',
    ]
    harmless = [
        '{"msg": "listening", "url": "https://127.0.0.1:40339"}',
        '{"ts": "2026-12-06T10:47:10.403Z", "msg": "config rendered"}',
        '{"msg": "config rendered", "hash": "403ed60329812f97"}',
        '{"msg": "config rendered", "hash": "9a403b"}',
        '{"msg": "config rendered", "hash": "d1c2403"}',
        '{"msg": "lease acquired", "lease": "keyroute-operator-403f4f"}',
        '{"msg": "lease acquired", "lease": "keyroute-operator-403"}',
    ]
    assert forbidden_lines("\n".join(refused + harmless)) == refused
