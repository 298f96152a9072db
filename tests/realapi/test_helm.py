"""``helm install`` / ``upgrade`` / ``uninstall`` of the chart on the real API server.

What ``helm template`` cannot show: every object the API server accepts as rendered (and the
Deployment controller makes the operator's pod from it), the CRDs in place, the ``lookup`` that keeps
the webhook certificate on upgrade, and uninstall removing what install created. The server is
Kubernetes 1.28, so the chart is installed with ``injection.mode=container`` (native sidecars need
1.29, and the chart refuses them on 1.28: tested too). No kubelet: the operator's pod stays Pending.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.realapi.chart import CHART, Helm
from tests.realapi.controlplane import ControlPlane

CRDS = ("credentialpools.keyroute.dev", "providerchains.keyroute.dev")


@dataclass
class Release:
    name: str
    namespace: str

    @property
    def fullname(self) -> str:
        return f"{self.name}-keyroute"


def install(helm: Helm, *args: str) -> Release:
    release = Release(f"helm-{secrets.token_hex(3)}", f"helm-{secrets.token_hex(3)}-system")
    helm.run(
        "install", release.name, str(CHART), "-n", release.namespace, "--create-namespace",
        "--set", "injection.mode=container", *args,
    )  # fmt: skip
    return release


def manifest(helm: Helm, release: Release) -> list[dict[str, Any]]:
    out = helm.run("get", "manifest", release.name, "-n", release.namespace).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def get(
    control_plane: ControlPlane, kind: str, name: str, namespace: str | None = None
) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", *(["-n", namespace] if namespace else [])]
    result = control_plane.kubectl(*args, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, helm: Helm) -> Iterator[Release]:
    installed = install(helm)
    try:
        yield installed
    finally:
        helm.run("uninstall", installed.name, "-n", installed.namespace, "--wait", check=False)
        control_plane.kubectl("delete", "namespace", installed.namespace, "--wait=false", check=False)


def test_install_creates_every_object_and_the_operator_pod(
    control_plane: ControlPlane, helm: Helm, release: Release
) -> None:
    objects = manifest(helm, release)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
            "Secret", "ConfigMap", "Service"} <= kinds  # fmt: skip
    for obj in objects:
        namespaced = obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration")
        found = get(
            control_plane, obj["kind"], obj["metadata"]["name"], release.namespace if namespaced else None
        )
        assert found is not None, f"{obj['kind']} {obj['metadata']['name']} not on the server"
    for crd in CRDS:
        established = control_plane.kubectl(
            "get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        )
        assert established.stdout == "True"

    # The webhook's caBundle is the CA of the certificate the operator will serve.
    hook = get(control_plane, "mutatingwebhookconfiguration", release.fullname)
    tls = get(control_plane, "secret", f"{release.fullname}-webhook-tls", release.namespace)
    assert hook is not None and tls is not None
    assert hook["webhooks"][0]["clientConfig"]["caBundle"] == tls["data"]["ca.crt"]
    assert hook["webhooks"][0]["clientConfig"]["service"]["namespace"] == release.namespace

    # The controller manager makes the operator's pod (it stays Pending: no kubelet here).
    def operator_pod_accounts() -> str:
        return control_plane.kubectl(
            "-n", release.namespace, "get", "pods", "-l", "app.kubernetes.io/component=operator",
            "-o", "jsonpath={.items[*].spec.serviceAccountName}",
        ).stdout  # fmt: skip

    # Two replicas by default (a leader and a standby, both serving the webhook).
    deadline = time.monotonic() + 20
    while len(accounts := operator_pod_accounts().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert accounts == [release.fullname] * 2
    status = helm.run("status", release.name, "-n", release.namespace).stdout
    assert "STATUS: deployed" in status and "keyroute.dev/chain" in status  # NOTES: what to do next


def test_upgrade_keeps_the_webhook_certificate_and_applies_new_values(
    control_plane: ControlPlane, helm: Helm, release: Release, namespace: str
) -> None:
    before = get(control_plane, "secret", f"{release.fullname}-webhook-tls", release.namespace)
    assert before is not None
    helm.run(
        "upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values",
        "--set", "webhook.failurePolicy=Ignore", "--set", f"watchNamespaces={{{namespace}}}",
    )  # fmt: skip
    after = get(control_plane, "secret", f"{release.fullname}-webhook-tls", release.namespace)
    hook = get(control_plane, "mutatingwebhookconfiguration", release.fullname)
    assert after is not None and hook is not None
    # The chart's `lookup` found the Secret: the same certificate, so running pods keep trusting it.
    assert after["data"] == before["data"]
    assert hook["webhooks"][0]["clientConfig"]["caBundle"] == before["data"]["ca.crt"]
    assert hook["webhooks"][0]["failurePolicy"] == "Ignore"
    deployment = get(control_plane, "deployment", release.fullname, release.namespace)
    assert deployment is not None
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--namespace") + 1] == namespace
    # Watching a list of namespaces: a Role and RoleBinding in each, and no cluster-wide grant on them.
    assert get(control_plane, "role", release.fullname, namespace) is not None
    assert get(control_plane, "rolebinding", release.fullname, namespace) is not None
    cluster_role = get(control_plane, "clusterrole", release.fullname)
    assert cluster_role is not None
    assert not any("secrets" in rule.get("resources", []) for rule in cluster_role["rules"])


def test_uninstall_removes_what_install_created_and_keeps_the_crds(
    control_plane: ControlPlane, helm: Helm
) -> None:
    release = install(helm)
    objects = manifest(helm, release)
    helm.run("uninstall", release.name, "-n", release.namespace, "--wait")
    for obj in objects:
        namespaced = obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration")
        left = get(
            control_plane, obj["kind"], obj["metadata"]["name"], release.namespace if namespaced else None
        )
        assert left is None, f"{obj['kind']} {obj['metadata']['name']} left behind"
    for crd in CRDS:  # Helm never deletes CRDs (they hold the users' pools and chains)
        assert get(control_plane, "crd", crd) is not None
    control_plane.kubectl("delete", "namespace", release.namespace, "--wait=false", check=False)


def test_the_default_native_mode_is_refused_on_kubernetes_1_28_with_what_to_set(
    control_plane: ControlPlane, helm: Helm
) -> None:
    name, namespace = f"helm-{secrets.token_hex(3)}", f"helm-{secrets.token_hex(3)}-system"
    result = helm.run("install", name, str(CHART), "-n", namespace, "--create-namespace", check=False)
    assert result.returncode != 0
    assert "injection.mode=native needs Kubernetes >= 1.29" in result.stderr
    assert "set injection.mode=container" in result.stderr
    assert helm.run("list", "-n", namespace, "-q").stdout.strip() == ""
    control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_deleting_the_webhook_secret_and_upgrading_rotates_the_certificate(
    control_plane: ControlPlane, helm: Helm, release: Release
) -> None:
    """values.yaml: "To rotate: delete the Secret, `helm upgrade`, restart the operator." The upgrade
    generates a new CA and certificate, and the webhook's caBundle follows them."""
    name = f"{release.fullname}-webhook-tls"
    before = get(control_plane, "secret", name, release.namespace)
    assert before is not None
    control_plane.kubectl("-n", release.namespace, "delete", "secret", name)
    # The install's own values (an earlier test may have pointed watchNamespaces at a deleted namespace).
    helm.run(
        "upgrade", release.name, str(CHART), "-n", release.namespace, "--reset-values",
        "--set", "injection.mode=container",
    )  # fmt: skip
    after = get(control_plane, "secret", name, release.namespace)
    hook = get(control_plane, "mutatingwebhookconfiguration", release.fullname)
    assert after is not None and hook is not None
    assert after["data"]["ca.crt"] != before["data"]["ca.crt"]
    assert after["data"]["tls.crt"] != before["data"]["tls.crt"]
    assert hook["webhooks"][0]["clientConfig"]["caBundle"] == after["data"]["ca.crt"]
