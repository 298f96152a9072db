"""The Helm chart ``charts/keyroute``, rendered by a real Helm and checked against real schemas.

Helm is the binary ``tools/fetch_helm.py`` puts at ``.tools/helm/helm`` (``./dev test`` runs it), or
the one ``KEYROUTE_HELM`` names. Without it these tests FAIL, they do not skip: a chart nobody
rendered is not a tested chart.

Each scenario below is rendered once per session (``helm template``, ~0.3 s: the chart generates an
RSA CA and certificate) and the tests assert on the parsed objects. Every rendered object of a kind
the Kubernetes OpenAPI schemas know is validated with ``kubernetes_validate`` (strict: unknown fields
fail). Not checked here, because there is no cluster: ``lookup`` reusing the webhook Secret on
upgrade (``helm template`` sees no cluster, so the chart always generates), the objects of kinds from
other projects' CRDs (see :func:`test_rendered_objects_match_the_kubernetes_schemas`), and whether the
operator really starts with these flags, mounts and permissions.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "keyroute"
TOP_CRDS = ROOT / "crds"
DEFAULT_HELM = ROOT / ".tools" / "helm" / "helm"
NAMESPACE = "keyroute-system"
RELEASE = "kr"
FULLNAME = "kr-keyroute"
# The oldest Kubernetes the default (native sidecar) mode supports, and the newest schema we carry.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version() + ".0")

# Kinds from other projects' CRDs: kubernetes_validate has no schema for them, so they are NOT
# schema-checked (the tests below assert on the fields the chart sets). Anything else must validate.
FOREIGN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}

# The RBAC the chart grants, as (apiGroup, resource, verb) triples. The chart defines its rules in one
# place (the named templates at the top of templates/rbac.yaml); these are what a reviewer compares
# with the code's API calls.
OPERATOR_NAMESPACED_RULES = {
    *(
        (g, r, v)
        for g in ["keyroute.dev"]
        for r in ["credentialpools", "providerchains"]
        for v in ["get", "list", "watch"]
    ),
    *(("keyroute.dev", r, v) for r in ["credentialpools/status", "providerchains/status"] for v in ["patch"]),
    *(("", "secrets", v) for v in ["get", "list", "watch", "create", "patch"]),
    *(("", "events", v) for v in ["create", "list", "watch"]),
}
# kopf scans CRDs (list+watch) always; it lists and watches namespaces only when given namespaces to
# watch (kopf/_core/reactor/observation.py: never in cluster-wide mode).
OPERATOR_CLUSTER_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
OPERATOR_NAMESPACE_RULES = {("", "namespaces", "list"), ("", "namespaces", "watch")}
SIDECAR_RULES = {
    ("", "events", "create"),
    ("", "events", "patch"),
    *(("keyroute.dev", "credentialpools", v) for v in ["list", "watch"]),
}

OPERATOR_ARGS = [
    "operator",
    "--metrics-port", "8080",
    "--metrics-address", "0.0.0.0",
    "--health-port", "8081",
    "--health-address", "0.0.0.0",
    "--webhook-port", "9443",
    "--webhook-address", "0.0.0.0",
    "--leader-election-id", FULLNAME,
    "--leader-elect-lease-duration", "15s",
    "--leader-elect-renew-deadline", "10s",
    "--leader-elect-retry-period", "2s",
    "--webhook-cert-dir", "/etc/keyroute/webhook-tls",
    "--injection-config", "/etc/keyroute/injection/injection.yaml",
]  # fmt: skip
# The Lease, in the release namespace only.
LEADER_ELECTION_RULES = {("coordination.k8s.io", "leases", v) for v in ["get", "create", "update"]}

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["agents", "agents-staging"]},
    "certmanager-container": {
        "image": {"repository": "registry.example/keyroute", "tag": "9.9.9", "pullPolicy": "Always"},
        "webhook": {"certManager": {"enabled": True}, "failurePolicy": "Ignore", "timeoutSeconds": 3},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "sidecarPodMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "prom"},
                "runbookURL": "https://runbooks.example/keyroute/runbook.md",
            },
            "dashboards": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
        },
        "injection": {
            "mode": "container",
            "missingChain": "Inject",
            "image": "registry.example/keyroute-sidecar:1.2.3",
            "proxyPort": 9411,
            "adminPort": 9412,
            "logLevel": "debug",
        },
        "sidecar": {
            "serviceAccounts": [
                {"namespace": "agents", "name": "agent"},
                {"namespace": "batch", "name": "runner"},
            ]
        },
        "extraArgs": ["--log-level", "debug"],
    },
}


# --- helm ---------------------------------------------------------------------------------------


def _helm_path() -> Path:
    configured = os.environ.get("KEYROUTE_HELM")
    path = Path(configured) if configured else DEFAULT_HELM
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"no helm binary at {path}. Get the pinned one with `.venv/bin/python tools/fetch_helm.py` "
            "(./dev test does it), or set KEYROUTE_HELM=/path/to/helm (Helm 3).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> HelmRunner:
    return HelmRunner(_helm_path(), tmp_path_factory.mktemp("helm"))


class HelmRunner:
    """Runs helm with its own empty config/cache dirs, values passed as files."""

    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.home = home
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(home / "no-kubeconfig"),
        }
        self._count = 0

    def values_file(self, values: dict[str, Any]) -> Path:
        self._count += 1
        path = self.home / f"values-{self._count}.json"  # JSON is YAML
        path.write_text(json.dumps(values))
        return path

    def run(
        self, *args: str, values: dict[str, Any] | None = None, chart: Path = CHART
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), *args, str(chart)]
        if values is not None:
            cmd += ["--values", str(self.values_file(values))]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60, check=False)

    def template(
        self, values: dict[str, Any] | None = None, *extra: str, chart: Path = CHART
    ) -> list[dict[str, Any]]:
        out = self.run(
            "template", RELEASE, "--namespace", NAMESPACE, *extra, values=values or {}, chart=chart
        )
        assert out.returncode == 0, out.stderr
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(helm: HelmRunner, scenario: str) -> list[dict[str, Any]]:
    """The scenario's objects (rendered once per session); tests get deep copies."""
    if scenario not in _RENDERED:
        _RENDERED[scenario] = helm.template(SCENARIOS[scenario])
    return copy.deepcopy(_RENDERED[scenario])


def of_kind(objs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no wildcards
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert "*" not in (g, r, v), rule
                    out.add((g, r, v))
    return out


def operator_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    container: dict[str, Any] = pod["containers"][0]
    return container


def injection_settings(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(objs, "ConfigMap", f"{FULLNAME}-injection")
    assert set(cm["data"]) == {"injection.yaml"}
    data: dict[str, Any] = yaml.safe_load(cm["data"]["injection.yaml"])
    return data


# --- the chart as a whole -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(helm: HelmRunner, scenario: str) -> None:
    out = helm.run("lint", "--strict", "--namespace", NAMESPACE, values=SCENARIOS[scenario])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_match_the_kubernetes_schemas(helm: HelmRunner, scenario: str) -> None:
    """Every rendered object validates against the Kubernetes OpenAPI schemas (strict).

    NOT schema-checked: ServiceMonitor (Prometheus Operator) and cert-manager's Certificate and
    Issuer; kubernetes_validate has no schemas for other projects' CRDs. Their fields are asserted
    by the tests below instead; this test fails if any other kind goes unchecked.
    """
    unchecked = set()
    for obj in rendered(helm, scenario):
        key = (obj["apiVersion"], obj["kind"])
        if key in FOREIGN_KINDS:
            unchecked.add(key)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    expected_unchecked = FOREIGN_KINDS if scenario == "certmanager-container" else set()
    assert unchecked == expected_unchecked


def test_chart_crds_validate_against_the_kubernetes_schema() -> None:
    files = sorted((CHART / "crds").glob("*.yaml"))
    assert files
    for path in files:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(yaml.safe_load(path.read_text()), version, strict=True)


def test_chart_crds_are_the_generated_ones_byte_for_byte() -> None:
    # crds/ is generated (python -m keyroute.crdgen --write crds/) and checked for drift by
    # tests/unit/test_crds.py; the chart carries copies: cp crds/*.yaml charts/keyroute/crds/
    top = {p.name: p.read_bytes() for p in TOP_CRDS.glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert sorted(chart) == sorted(top), "run: cp crds/*.yaml charts/keyroute/crds/"
    for name, content in top.items():
        assert chart[name] == content, (
            f"charts/keyroute/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/keyroute/crds/"
        )


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_has_the_standard_labels_and_the_release_namespace(
    helm: HelmRunner, scenario: str
) -> None:
    watched = set(SCENARIOS[scenario].get("watchNamespaces", []))
    bound = {sa["namespace"] for sa in SCENARIOS[scenario].get("sidecar", {}).get("serviceAccounts", [])}
    for obj in rendered(helm, scenario):
        meta = obj["metadata"]
        labels = meta["labels"]
        assert labels["app.kubernetes.io/name"] == "keyroute", obj["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "keyroute"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "keyroute-0.1.0"
        assert meta["name"].startswith(FULLNAME)
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert "namespace" not in meta
        elif obj["kind"] in ("Role", "RoleBinding") and meta["namespace"] != NAMESPACE:
            assert meta["namespace"] in watched | bound
        else:
            assert meta["namespace"] == NAMESPACE, (obj["kind"], meta["name"])


# --- the operator Deployment --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_runs_replicas_locked_down(helm: HelmRunner, scenario: str) -> None:
    objs = rendered(helm, scenario)
    deploy = one(objs, "Deployment", FULLNAME)
    assert deploy["spec"]["replicas"] == 2  # every replica serves the webhook; a Lease elects the writer
    # Never fewer ready webhooks than replicas during an upgrade: a new pod first, then an old one goes.
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c = operator_container(objs)
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "command" not in c  # the image's ENTRYPOINT is `keyroute`
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert (
        volumes[mounts["/etc/keyroute/webhook-tls"]["name"]]["secret"]["secretName"]
        == f"{FULLNAME}-webhook-tls"
    )
    assert volumes[mounts["/etc/keyroute/injection"]["name"]]["configMap"]["name"] == f"{FULLNAME}-injection"
    assert all(m.get("readOnly") for p, m in mounts.items() if p != "/tmp")
    assert "subPath" not in json.dumps(c["volumeMounts"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_liveness_is_kopfs_and_readiness_is_the_webhook(helm: HelmRunner, scenario: str) -> None:
    c = operator_container(rendered(helm, scenario))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081, "webhook": 9443}
    get = c["livenessProbe"]["httpGet"]
    assert get["path"] == "/healthz"  # kopf's liveness endpoint serves this path only
    assert ports[get["port"]] == 8081
    # Ready = the webhook server accepts connections (kopf's serves POST only: a TCP probe).
    assert ports[c["readinessProbe"]["tcpSocket"]["port"]] == 9443
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["timeoutSeconds"] >= 1
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    # The Lease's namespace and the replica's identity in it.
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}


def test_pod_disruption_budget_and_spread_across_nodes(helm: HelmRunner) -> None:
    objs = rendered(helm, "default")
    pdb = one(objs, "PodDisruptionBudget", FULLNAME)
    deploy = one(objs, "Deployment", FULLNAME)
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    assert deploy["spec"]["template"]["spec"]["topologySpreadConstraints"] == [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
        }
    ]
    # One replica: no PDB (minAvailable 1 of 1 would block every node drain).
    single = helm.template({"replicaCount": 1, "leaderElection": {"enabled": False}})
    assert of_kind(single, "PodDisruptionBudget") == []
    assert one(single, "Deployment", FULLNAME)["spec"]["replicas"] == 1
    # Given constraints replace the default verbatim.
    zones = [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    ]
    spread = helm.template(
        {"topologySpreadConstraints": zones, "podDisruptionBudget": {"minAvailable": "50%"}}
    )
    assert (
        one(spread, "Deployment", FULLNAME)["spec"]["template"]["spec"]["topologySpreadConstraints"] == zones
    )
    assert one(spread, "PodDisruptionBudget", FULLNAME)["spec"]["minAvailable"] == "50%"


def test_leader_election_and_listen_addresses_from_values(helm: HelmRunner) -> None:
    from keyroute.cli import build_parser, operator_config

    values = {
        "leaderElection": {
            "leaseName": "kr-lock",
            "leaseDuration": "30s",
            "renewDeadline": "20s",
            "retryPeriod": "4s",
        },
        "listen": {"webhook": "::", "metrics": "127.0.0.1", "health": "0.0.0.0"},
    }
    args = build_parser().parse_args(operator_container(helm.template(values))["args"])
    assert (args.webhook_address, args.metrics_address, args.health_address) == ("::", "127.0.0.1", "0.0.0.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POD_NAMESPACE", NAMESPACE)
        mp.setenv("POD_NAME", "keyroute-abc")
        election = operator_config(args).election
    assert election is not None
    assert (election.name, election.namespace, election.identity) == ("kr-lock", NAMESPACE, "keyroute-abc")
    t = election.timings
    assert (t.lease_duration, t.renew_deadline, t.retry_period) == (30.0, 20.0, 4.0)

    off = helm.template({"replicaCount": 1, "leaderElection": {"enabled": False}})
    assert one(off, "Deployment", FULLNAME)["spec"]["strategy"] == {"type": "Recreate"}  # never two writers
    refused = helm.run("template", RELEASE, values={"leaderElection": {"enabled": False}})
    assert refused.returncode != 0 and "would run 2 writers: enable leaderElection" in refused.stderr
    c = operator_container(off)
    assert "--leader-elect=false" in c["args"]
    assert not any(a.startswith("--leader-election-id") for a in c["args"])
    assert operator_config(build_parser().parse_args(c["args"])).election is None
    assert of_kind(off, "Role") == [] and of_kind(off, "RoleBinding") == []


def test_operator_args_cluster_wide(helm: HelmRunner) -> None:
    c = operator_container(rendered(helm, "default"))
    assert c["args"] == OPERATOR_ARGS
    assert c["image"] == "keyroute:0.1.0"  # tag defaults to appVersion
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def test_operator_args_watch_each_namespace(helm: HelmRunner) -> None:
    c = operator_container(rendered(helm, "namespaced"))
    assert c["args"] == [*OPERATOR_ARGS, "--namespace", "agents", "--namespace", "agents-staging"]


def test_operator_image_and_extra_args_from_values(helm: HelmRunner) -> None:
    c = operator_container(rendered(helm, "certmanager-container"))
    assert c["image"] == "registry.example/keyroute:9.9.9"
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == [*OPERATOR_ARGS, "--log-level", "debug"]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_cli_accepts_the_charts_operator_args(helm: HelmRunner, scenario: str) -> None:
    from keyroute.cli import build_parser

    args = build_parser().parse_args(operator_container(rendered(helm, scenario))["args"])
    assert args.command == "operator"
    assert (args.metrics_port, args.health_port, args.webhook_port) == (8080, 8081, 9443)
    assert args.leader_elect is True and args.leader_election_id == FULLNAME
    assert args.webhook_cert_dir == "/etc/keyroute/webhook-tls"
    assert args.injection_config == "/etc/keyroute/injection/injection.yaml"
    assert (args.namespace or []) == SCENARIOS[scenario].get("watchNamespaces", [])


# --- RBAC -----------------------------------------------------------------------------------------


def leader_election_role(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Lease Role (in the release namespace), checked with its binding; removed from ``objs``."""
    role = one(objs, "Role", f"{FULLNAME}-leader-election")
    binding = one(objs, "RoleBinding", f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    objs.remove(role)
    objs.remove(binding)
    return role


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_for_the_lease_is_a_role_in_the_release_namespace(helm: HelmRunner, scenario: str) -> None:
    from keyroute.controller.election import LEASES, VERBS

    role = leader_election_role(rendered(helm, scenario))
    assert triples(role["rules"]) == LEADER_ELECTION_RULES == {(LEASES[0], LEASES[2], v) for v in VERBS}


def test_rbac_cluster_wide(helm: HelmRunner) -> None:
    objs = rendered(helm, "default")
    leader_election_role(objs)
    assert of_kind(objs, "Role") == [] and of_kind(objs, "RoleBinding") == []
    role = one(objs, "ClusterRole", FULLNAME)
    assert triples(role["rules"]) == OPERATOR_NAMESPACED_RULES | OPERATOR_CLUSTER_RULES
    binding = one(objs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert one(objs, "ServiceAccount", FULLNAME)


def test_rbac_namespaced_grants_a_role_per_namespace(helm: HelmRunner) -> None:
    objs = rendered(helm, "namespaced")
    leader_election_role(objs)
    roles = of_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["agents", "agents-staging"]
    for role in roles:
        assert role["metadata"]["name"] == FULLNAME
        assert triples(role["rules"]) == OPERATOR_NAMESPACED_RULES
    bindings = of_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["agents", "agents-staging"]
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # Cluster-scoped reads only: no Secret or pool anywhere outside the watched namespaces.
    cluster = one(objs, "ClusterRole", FULLNAME)
    assert triples(cluster["rules"]) == OPERATOR_CLUSTER_RULES | OPERATOR_NAMESPACE_RULES
    assert one(objs, "ClusterRoleBinding", FULLNAME)["roleRef"]["name"] == FULLNAME


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sidecar_cluster_role(helm: HelmRunner, scenario: str) -> None:
    role = one(rendered(helm, scenario), "ClusterRole", f"{FULLNAME}-sidecar")
    assert triples(role["rules"]) == SIDECAR_RULES


def test_sidecar_role_bindings_from_values(helm: HelmRunner) -> None:
    objs = rendered(helm, "certmanager-container")
    leader_election_role(objs)
    bindings = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in of_kind(objs, "RoleBinding")}
    assert set(bindings) == {("agents", f"{FULLNAME}-sidecar-agent"), ("batch", f"{FULLNAME}-sidecar-runner")}
    for (ns, _), b in bindings.items():
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{FULLNAME}-sidecar",
        }
        assert [(s["kind"], s["namespace"]) for s in b["subjects"]] == [("ServiceAccount", ns)]
    objs = rendered(helm, "default")
    leader_election_role(objs)
    assert of_kind(objs, "RoleBinding") == []


def test_rbac_rules_are_written_in_one_place() -> None:
    # templates/rbac.yaml defines every rule set once; no other template grants anything.
    for path in (CHART / "templates").iterdir():
        text = path.read_text()
        if path.name == "rbac.yaml":
            for name in (
                "operatorNamespacedRules",
                "operatorClusterRules",
                "leaderElectionRules",
                "sidecarRules",
            ):
                assert text.count(f'define "keyroute.{name}"') == 1
        else:
            assert "verbs:" not in text, path.name


# --- the webhook ------------------------------------------------------------------------------------


def webhook_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    mwc = one(objs, "MutatingWebhookConfiguration", FULLNAME)
    assert len(mwc["webhooks"]) == 1
    hook: dict[str, Any] = mwc["webhooks"][0]
    return hook


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_webhook_only_sees_labelled_pod_creations(helm: HelmRunner, scenario: str) -> None:
    objs = rendered(helm, scenario)
    hook = webhook_of(objs)
    assert hook["name"] == "inject.keyroute.dev"
    assert hook["objectSelector"] == {
        "matchExpressions": [{"key": "keyroute.dev/chain", "operator": "Exists"}]
    }
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    service = hook["clientConfig"]["service"]
    assert service == {
        "name": f"{FULLNAME}-webhook",
        "namespace": NAMESPACE,
        "path": "/keyroute-inject",
        "port": 443,
    }
    # The Service routes 443 to the operator's 9443, and selects the operator pod.
    svc = one(objs, "Service", f"{FULLNAME}-webhook")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(443, "webhook")]
    c_ports = {p["name"]: p["containerPort"] for p in operator_container(objs)["ports"]}
    assert c_ports["webhook"] == 9443
    pod_labels = one(objs, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_webhook_path_is_the_one_kopf_serves() -> None:
    # keyroute.controller.webhook registers kopf handlers at import: read it in a child process.
    out = subprocess.run(
        [sys.executable, "-c", "from keyroute.controller.webhook import WEBHOOK_PATH; print(WEBHOOK_PATH)"],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT / "tests",
    )  # fmt: skip
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["webhook"]["path"] == out.stdout.strip()
    # ... and values.yaml is the only place the chart names it.
    assert not [p.name for p in (CHART / "templates").iterdir() if "keyroute-inject" in p.read_text()]


def test_webhook_policy_defaults_and_overrides(helm: HelmRunner) -> None:
    default = webhook_of(rendered(helm, "default"))
    assert default["failurePolicy"] == "Fail"
    assert default["timeoutSeconds"] == 5
    other = webhook_of(rendered(helm, "certmanager-container"))
    assert other["failurePolicy"] == "Ignore"
    assert other["timeoutSeconds"] == 3


def test_webhook_namespace_selector(helm: HelmRunner) -> None:
    assert webhook_of(rendered(helm, "default"))["namespaceSelector"] == {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-system", "kube-node-lease"],
            }
        ]
    }
    assert webhook_of(rendered(helm, "namespaced"))["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["agents", "agents-staging"]}
        ]
    }
    custom = {"matchLabels": {"keyroute.dev/injection": "enabled"}}
    objs = helm.template({"webhook": {"namespaceSelector": custom}, "watchNamespaces": ["agents"]})
    assert webhook_of(objs)["namespaceSelector"] == custom


def _tls_handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> dict[str, Any]:
    """A TLS handshake over memory BIOs (no sockets); returns the certificate the client verified."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(10):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            peer = c.getpeercert()
            assert peer
            return peer
    raise AssertionError("TLS handshake did not complete")


def test_generated_webhook_certificate_is_trusted_by_the_ca_bundle(helm: HelmRunner, tmp_path: Path) -> None:
    objs = rendered(helm, "default")
    secret = one(objs, "Secret", f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    ca_bundle = webhook_of(objs)["clientConfig"]["caBundle"]
    assert ca_bundle == secret["data"]["ca.crt"]
    assert "cert-manager.io/inject-ca-from" not in one(objs, "MutatingWebhookConfiguration")["metadata"].get(
        "annotations", {}
    )
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    # The operator's side (Python's ssl, as kopf's webhook server) with the mounted files; the API
    # server's side trusting only caBundle and checking the Service's DNS name.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    svc = f"{FULLNAME}-webhook"
    for name in (f"{svc}.{NAMESPACE}.svc", f"{svc}.{NAMESPACE}.svc.cluster.local"):
        peer = _tls_handshake(server, client, name)
        assert ("DNS", f"{svc}.{NAMESPACE}.svc") in peer["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(server, client, f"other.{NAMESPACE}.svc")


def test_every_render_generates_a_fresh_certificate_without_a_cluster(helm: HelmRunner) -> None:
    # `lookup` finds nothing without a cluster, so each render generates; on a real `helm upgrade` the
    # existing Secret is reused (not testable here: no cluster).
    a = one(helm.template({}), "Secret")["data"]["tls.crt"]
    b = one(rendered(helm, "default"), "Secret")["data"]["tls.crt"]
    assert a != b


def test_cert_manager_issues_the_webhook_certificate(helm: HelmRunner) -> None:
    objs = rendered(helm, "certmanager-container")
    assert of_kind(objs, "Secret") == []  # cert-manager writes it
    cert = one(objs, "Certificate", f"{FULLNAME}-webhook")
    issuer = one(objs, "Issuer", f"{FULLNAME}-selfsigned")
    assert issuer["spec"] == {"selfSigned": {}}
    spec = cert["spec"]
    assert spec["issuerRef"] == {
        "name": issuer["metadata"]["name"],
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert spec["secretName"] == f"{FULLNAME}-webhook-tls"
    svc = f"{FULLNAME}-webhook"
    assert f"{svc}.{NAMESPACE}.svc" in spec["dnsNames"]
    mwc = one(objs, "MutatingWebhookConfiguration", FULLNAME)
    assert (
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == f"{NAMESPACE}/{cert['metadata']['name']}"
    )
    assert "caBundle" not in webhook_of(objs)["clientConfig"]
    volumes = one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": spec["secretName"]}} in volumes


def test_cert_manager_with_an_existing_issuer(helm: HelmRunner) -> None:
    objs = helm.template(
        {
            "webhook": {
                "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
            }
        }
    )
    assert of_kind(objs, "Issuer") == []
    assert one(objs, "Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"
    }  # fmt: skip


# --- injection settings ---------------------------------------------------------------------------


def test_injection_config_defaults(helm: HelmRunner) -> None:
    objs = rendered(helm, "default")
    settings = injection_settings(objs)
    assert settings == {
        "image": operator_container(objs)["image"],
        "imagePullPolicy": "IfNotPresent",
        "mode": "native",
        "missingChain": "Reject",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "proxyPort": 8411,
        "adminPort": 8412,
        "logLevel": "info",
        "lookupTimeoutSeconds": 2.5,  # half of webhook.timeoutSeconds
    }


def test_injection_config_from_values(helm: HelmRunner) -> None:
    settings = injection_settings(rendered(helm, "certmanager-container"))
    assert settings == {
        "image": "registry.example/keyroute-sidecar:1.2.3",
        "imagePullPolicy": "Always",  # follows image.pullPolicy unless set
        "mode": "container",
        "missingChain": "Inject",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "proxyPort": 9411,
        "adminPort": 9412,
        "logLevel": "debug",
        "lookupTimeoutSeconds": 1.5,  # webhook.timeoutSeconds 3
    }


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_operator_accepts_the_injection_config(helm: HelmRunner, scenario: str) -> None:
    from keyroute.core.inject import load_settings

    cm = one(rendered(helm, scenario), "ConfigMap", f"{FULLNAME}-injection")
    settings = load_settings(cm["data"]["injection.yaml"])
    assert settings.model_dump(by_alias=True, mode="json") == injection_settings(rendered(helm, scenario))


@pytest.mark.parametrize("timeout", [1, 2, 5, 30])
def test_the_chain_lookup_gives_up_before_the_api_server_gives_up_on_the_webhook(
    helm: HelmRunner, timeout: int
) -> None:
    # docs/injection.md: a chain that cannot be looked up (a slow API server) injects with a warning.
    # A lookup that outlives the webhook's timeoutSeconds is refused by failurePolicy Fail instead
    # (it did with the defaults, 5 s each; tests/realapi/test_webhook_failures.py shows it on a real
    # API server). The chart gives the lookup half of the webhook's time, the rest for the round trip.
    from keyroute.core.inject import load_settings

    objs = helm.template({"webhook": {"timeoutSeconds": timeout}})
    cm = one(objs, "ConfigMap", f"{FULLNAME}-injection")
    lookup = load_settings(cm["data"]["injection.yaml"]).lookup_timeout
    assert webhook_of(objs)["timeoutSeconds"] == timeout
    assert 0 < lookup <= timeout / 2


def test_injection_change_rolls_the_operator(helm: HelmRunner) -> None:
    sums = set()
    for scenario in ("default", "certmanager-container"):
        objs = rendered(helm, scenario)
        content = one(objs, "ConfigMap", f"{FULLNAME}-injection")["data"]["injection.yaml"]
        annotation = one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/injection"
        ]
        assert annotation == hashlib.sha256(content.removesuffix("\n").encode()).hexdigest()
        sums.add(annotation)
    assert len(sums) == 2


def test_native_mode_needs_kubernetes_1_29(helm: HelmRunner) -> None:
    out = helm.run("template", RELEASE, "--kube-version", "1.28.0", values={})
    assert out.returncode != 0
    assert "injection.mode=native needs Kubernetes >= 1.29" in out.stderr
    assert helm.template({"injection": {"mode": "container"}}, "--kube-version", "1.28.0")


# --- metrics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_metrics_service(helm: HelmRunner, scenario: str) -> None:
    objs = rendered(helm, scenario)
    svc = one(objs, "Service", f"{FULLNAME}-metrics")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    monitors = of_kind(objs, "ServiceMonitor")
    assert len(monitors) == (1 if scenario == "certmanager-container" else 0)
    # Off by default, like the ServiceMonitor: they need the Prometheus Operator's (or Grafana's) CRDs.
    for kind in ("PodMonitor", "PrometheusRule"):
        assert len(of_kind(objs, kind)) == (1 if scenario == "certmanager-container" else 0), kind


def test_service_monitor_scrapes_only_the_metrics_service(helm: HelmRunner) -> None:
    objs = rendered(helm, "certmanager-container")
    sm = one(objs, "ServiceMonitor", FULLNAME)
    assert sm["metadata"]["labels"]["release"] == "prom"
    selector = sm["spec"]["selector"]["matchLabels"]
    matching = [
        s["metadata"]["name"]
        for s in of_kind(objs, "Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert matching == [f"{FULLNAME}-metrics"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("metrics", "/metrics")]
    # The operator's per-object metrics keep their own namespace label (the alerts group by it).
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True


def test_sidecar_pod_monitor_scrapes_labelled_pods_on_the_admin_port(helm: HelmRunner) -> None:
    from keyroute.core.inject import ADMIN_PORT_NAME, CHAIN_LABEL

    pm = one(rendered(helm, "certmanager-container"), "PodMonitor", f"{FULLNAME}-sidecars")
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert pm["spec"]["selector"] == {"matchExpressions": [{"key": CHAIN_LABEL, "operator": "Exists"}]}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert [(e["port"], e["path"]) for e in pm["spec"]["podMetricsEndpoints"]] == [
        (ADMIN_PORT_NAME, "/metrics")
    ]
    namespaced = helm.template(
        {"watchNamespaces": ["agents"], "metrics": {"sidecarPodMonitor": {"enabled": True}}}
    )
    assert one(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["agents"]}


# --- values.schema.json -----------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown mode", {"injection": {"mode": "bogus"}}, "injection.mode"),
    ("unknown missingChain", {"injection": {"missingChain": "Maybe"}}, "injection.missingChain"),
    ("unknown failurePolicy", {"webhook": {"failurePolicy": "Sometimes"}}, "webhook.failurePolicy"),
    ("negative port", {"injection": {"proxyPort": -1}}, "injection.proxyPort"),
    ("port too high", {"injection": {"adminPort": 70000}}, "injection.adminPort"),
    ("port as text", {"injection": {"proxyPort": "8411"}}, "injection.proxyPort"),
    ("unknown top-level key", {"replicas": 2}, "replicas"),
    ("no replicas", {"replicaCount": 0}, "replicaCount"),
    ("bad lease duration", {"leaderElection": {"leaseDuration": "15"}}, "leaderElection.leaseDuration"),
    ("typo in leaderElection", {"leaderElection": {"enable": False}}, "enable"),
    ("bad listen address", {"listen": {"webhook": "0.0.0.0:9443x"}}, "listen.webhook"),
    (
        "bad minAvailable",
        {"podDisruptionBudget": {"minAvailable": "half"}},
        "podDisruptionBudget.minAvailable",
    ),
    ("typo in a section", {"webhook": {"failurePolicyy": "Fail"}}, "failurePolicyy"),
    ("namespaces as a string", {"watchNamespaces": "agents"}, "watchNamespaces"),
    ("bad namespace name", {"watchNamespaces": ["Agents_1"]}, "watchNamespaces.0"),
    ("bad pull policy", {"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ("webhook timeout > 30", {"webhook": {"timeoutSeconds": 60}}, "webhook.timeoutSeconds"),
    ("serviceAccount without namespace", {"sidecar": {"serviceAccounts": [{"name": "agent"}]}}, "namespace"),
    ("boolean as text", {"webhook": {"certManager": {"enabled": "yes"}}}, "webhook.certManager.enabled"),
    ("bad log level", {"injection": {"logLevel": "loud"}}, "injection.logLevel"),
    ("bad resources key", {"injection": {"resources": {"limit": {"memory": "1Gi"}}}}, "limit"),
    ("webhook timeout 0", {"webhook": {"timeoutSeconds": 0}}, "webhook.timeoutSeconds"),
    ("webhook path without /", {"webhook": {"path": "keyroute-inject"}}, "webhook.path"),
    (
        "bad namespaceSelector operator",
        {"webhook": {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Has"}]}}},
        "operator",
    ),
    (
        "issuerRef kind without name",
        {"webhook": {"certManager": {"issuerRef": {"kind": "ClusterIssuer"}}}},
        "name",
    ),
    (
        "bad issuerRef kind",
        {"webhook": {"certManager": {"issuerRef": {"name": "ca", "kind": "Vault"}}}},
        "kind",
    ),
    (
        "bad cert duration",
        {"webhook": {"certManager": {"duration": "1 year"}}},
        "webhook.certManager.duration",
    ),
    ("bad lease name", {"leaderElection": {"leaseName": "Lease_1"}}, "leaderElection.leaseName"),
    ("duplicate watched namespace", {"watchNamespaces": ["agents", "agents"]}, "watchNamespaces"),
    ("bad sidecar pull policy", {"injection": {"imagePullPolicy": "Sometimes"}}, "injection.imagePullPolicy"),
    ("bad quantity", {"resources": {"limits": {"memory": "lots"}}}, "memory"),
    (
        "runbook URL without scheme",
        {"metrics": {"prometheusRule": {"runbookURL": "runbooks.example/x"}}},
        "runbookURL",
    ),
    (
        "bad serviceAccount namespace",
        {"sidecar": {"serviceAccounts": [{"namespace": "Agents", "name": "a"}]}},
        "namespace",
    ),
    ("extraEnv without name", {"extraEnv": [{"value": "x"}]}, "name"),
    ("fullnameOverride too long", {"fullnameOverride": "x" * 51}, "fullnameOverride"),
]


@pytest.mark.parametrize(
    ("values", "where"), [(v, w) for _, v, w in BAD_VALUES], ids=[n for n, _, _ in BAD_VALUES]
)
def test_helm_rejects_bad_values(helm: HelmRunner, values: dict[str, Any], where: str) -> None:
    out = helm.run("template", RELEASE, values=values)
    assert out.returncode != 0, out.stdout[:500]
    assert "values don't meet the specifications of the schema" in out.stderr
    assert where in out.stderr, out.stderr


def test_helm_rejects_bad_values_given_with_set(helm: HelmRunner) -> None:
    out = helm.run("template", RELEASE, "--set", "injection.mode=bogus")
    assert out.returncode != 0
    assert 'injection.mode must be one of the following: "native", "container"' in out.stderr


def _schema_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_schema_accepts_the_default_values_and_every_scenario() -> None:
    validator = _schema_validator()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(validator.iter_errors(defaults)) == []
    for values in SCENARIOS.values():
        merged = _merge(copy.deepcopy(defaults), values)
        assert list(validator.iter_errors(merged)) == []


@pytest.mark.parametrize(
    ("values", "where"), [(v, w) for _, v, w in BAD_VALUES], ids=[n for n, _, _ in BAD_VALUES]
)
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = list(_schema_validator().iter_errors(_merge(defaults, values)))
    assert errors
    assert any(where.split(".")[-1] in ".".join(map(str, e.absolute_path)) + e.message for e in errors)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of values files: maps merge, everything else replaces."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def test_equal_sidecar_ports_are_refused(helm: HelmRunner) -> None:
    out = helm.run("template", RELEASE, values={"injection": {"adminPort": 8411}})
    assert out.returncode != 0
    assert "injection.proxyPort and injection.adminPort must differ" in out.stderr


# --- NOTES.txt ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def notes_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart that renders NOTES.txt as a manifest.

    Helm 3.17 renders NOTES.txt only on install, and `helm install --dry-run=client` still insists on
    reaching a cluster (helm/helm#13144); so the copy gets a template that runs NOTES.txt through
    `tpl` and emits it as a YAML string.
    """
    chart = tmp_path_factory.mktemp("notes") / "keyroute"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "NOTES.test.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: {{ tpl (.Files.Get "NOTES.test.txt") . | toJson }}\n'
    )
    return chart


def render_notes(helm: HelmRunner, chart: Path, values: dict[str, Any]) -> str:
    out = helm.run(
        "template",
        RELEASE,
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/zz-notes.yaml",
        values=values,
        chart=chart,
    )
    assert out.returncode == 0, out.stderr
    notes: str = yaml.safe_load(out.stdout)["notes"]
    return notes


def test_notes_say_what_to_do_next(helm: HelmRunner, notes_chart: Path) -> None:
    notes = render_notes(helm, notes_chart, {})
    assert (
        f"kubectl create rolebinding keyroute-sidecar --clusterrole={FULLNAME}-sidecar --serviceaccount=NS:SA -n NS"
        in notes
    )
    assert "keyroute.dev/chain: <chain name>" in notes
    assert "kubectl get cpool,pchain" in notes
    assert "kubectl describe cpool <name>" in notes
    assert "CredentialPool" in notes and "ProviderChain" in notes and "Secret" in notes
    assert "every namespace" in notes
    assert "refused while the operator is down" in notes
    assert not re.search(r"<no value>|%!|\{\{", notes)


def test_notes_follow_the_values(helm: HelmRunner, notes_chart: Path) -> None:
    notes = render_notes(
        helm, notes_chart, SCENARIOS["certmanager-container"] | {"watchNamespaces": ["agents"]}
    )
    assert "the namespaces agents" in notes
    assert "agents/agent" in notes and "batch/runner" in notes
    assert "start WITHOUT the sidecar" in notes
    assert "cert-manager" in notes
    assert "(container mode)" in notes
    assert not re.search(r"<no value>|%!|\{\{", notes)


# --- every other documented value changes what values.yaml says it does --------------------------


def test_pod_placement_and_metadata_values_reach_the_operator_pod(helm: HelmRunner) -> None:
    """values.yaml's pass-through values, each where a user of other charts expects it."""
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "infra", "operator": "Exists"}]}]
            }
        }
    }
    tolerations = [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}]
    objs = helm.template(
        {
            "imagePullSecrets": [{"name": "regcred"}],
            "podAnnotations": {"team/owner": "llm"},
            "podLabels": {"team": "llm"},
            "nodeSelector": {"pool": "infra"},
            "tolerations": tolerations,
            "affinity": affinity,
            "priorityClassName": "system-cluster-critical",
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
            "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "metrics": {"service": {"annotations": {"prometheus.io/scrape": "true"}}},
        }
    )
    template = one(objs, "Deployment", FULLNAME)["spec"]["template"]
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["metadata"]["annotations"]["team/owner"] == "llm"
    assert "checksum/injection" in template["metadata"]["annotations"]  # podAnnotations add, never replace
    assert template["metadata"]["labels"]["team"] == "llm"
    assert (pod["nodeSelector"], pod["tolerations"], pod["affinity"]) == (
        {"pool": "infra"},
        tolerations,
        affinity,
    )
    assert pod["priorityClassName"] == "system-cluster-critical"
    c = operator_container(objs)
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in c["env"]
    assert {e["name"] for e in c["env"]} >= {"POD_NAME", "POD_NAMESPACE"}  # extraEnv adds, never replaces
    assert c["resources"] == {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    svc = one(objs, "Service", f"{FULLNAME}-metrics")
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    # Unset, they leave nothing behind.
    bare = one(rendered(helm, "default"), "Deployment", FULLNAME)["spec"]["template"]["spec"]
    assert not {"imagePullSecrets", "nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(
        bare
    )


def test_an_existing_service_account_is_bound_and_not_created(helm: HelmRunner) -> None:
    """``serviceAccount.create: false``: ``name`` must exist already; RBAC still binds it."""
    objs = helm.template({"serviceAccount": {"create": False, "name": "platform-operator"}})
    assert of_kind(objs, "ServiceAccount") == []
    assert (
        one(objs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["serviceAccountName"]
        == "platform-operator"
    )
    for binding in of_kind(objs, "ClusterRoleBinding") + of_kind(objs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "platform-operator", "namespace": NAMESPACE}
        ]
    annotated = helm.template(
        {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/kr"}}}
    )
    sa = one(annotated, "ServiceAccount", FULLNAME)
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/kr"}


def test_name_overrides_rename_every_object(helm: HelmRunner) -> None:
    full = helm.template({"fullnameOverride": "router"})
    names = {(o["kind"], o["metadata"]["name"]) for o in full}
    assert ("Deployment", "router") in names and ("ClusterRole", "router-sidecar") in names
    assert ("Secret", "router-webhook-tls") in names and ("ConfigMap", "router-injection") in names
    assert all(name.startswith("router") for _, name in names)
    short = helm.template({"nameOverride": "kr2"})
    deploy = one(short, "Deployment", f"{RELEASE}-kr2")
    assert deploy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "kr2"
    hook = one(short, "MutatingWebhookConfiguration", f"{RELEASE}-kr2")["webhooks"][0]
    assert hook["clientConfig"]["service"]["name"] == f"{RELEASE}-kr2-webhook"


def test_pod_disruption_budget_can_be_turned_off(helm: HelmRunner) -> None:
    assert of_kind(helm.template({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget") == []


def test_cert_manager_certificate_lifetimes_from_values(helm: HelmRunner) -> None:
    objs = helm.template(
        {"webhook": {"certManager": {"enabled": True, "duration": "2160h", "renewBefore": "360h"}}}
    )
    spec = one(objs, "Certificate")["spec"]
    assert (spec["duration"], spec["renewBefore"]) == ("2160h", "360h")
    default = one(rendered(helm, "certmanager-container"), "Certificate")["spec"]
    assert (default["duration"], default["renewBefore"]) == ("8760h", "720h")


def test_sidecar_settings_from_values_reach_the_injection_config(helm: HelmRunner) -> None:
    resources = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}
    settings = injection_settings(
        helm.template({"injection": {"imagePullPolicy": "Never", "resources": resources}})
    )
    assert settings["imagePullPolicy"] == "Never"  # wins over image.pullPolicy
    assert settings["resources"] == resources


def test_sidecar_pod_monitor_namespaces_from_values(helm: HelmRunner) -> None:
    objs = helm.template(
        {
            "watchNamespaces": ["agents"],
            "metrics": {"sidecarPodMonitor": {"enabled": True, "namespaces": ["batch"]}},
        }
    )
    assert one(objs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["batch"]}


@pytest.mark.parametrize(
    ("release", "cluster_role"),
    [
        ("keyroute", "keyroute-sidecar"),
        ("keyroute-prod", "keyroute-prod-sidecar"),
        ("platform", "platform-keyroute-sidecar"),
    ],
)
def test_the_docs_name_the_sidecar_cluster_role_as_the_chart_does(
    helm: HelmRunner, release: str, cluster_role: str
) -> None:
    """The README, docs/reporting.md and the runbook tell users which ClusterRole to bind. It is
    ``<fullname>-sidecar``: ``keyroute-sidecar`` for a release named ``keyroute`` (the README's
    install), ``<release>-keyroute-sidecar`` for a release name without ``keyroute`` in it; the docs
    said ``<release>-sidecar``, which names no ClusterRole for such a release."""
    out = helm.run("template", release, "--namespace", NAMESPACE, values={})
    assert out.returncode == 0, out.stderr
    roles = {
        o["metadata"]["name"] for o in yaml.safe_load_all(out.stdout) if o and o["kind"] == "ClusterRole"
    }
    assert cluster_role in roles
    for doc in ("README.md", "docs/reporting.md", "docs/runbook.md"):
        text = (ROOT / doc).read_text()
        assert "<release>-sidecar" not in text, doc
        assert "<fullname>-sidecar" in text, doc
    # Nor the operator's objects as `<release>-keyroute...`: for the README's release `keyroute` that is
    # `keyroute-keyroute`, which does not exist (`<release>-keyroute` only as the definition of <fullname>).
    for doc in ("README.md", "docs/metrics.md", "docs/reporting.md", "docs/runbook.md"):
        assert re.findall(r"<release>-keyroute(?!`)", (ROOT / doc).read_text()) == [], doc
    fullname = cluster_role.removesuffix("-sidecar")
    names = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(out.stdout) if o}
    assert {
        ("Deployment", fullname),
        ("Service", f"{fullname}-metrics"),
        ("ConfigMap", f"{fullname}-injection"),
    } <= names
    readme = (ROOT / "README.md").read_text()
    assert (
        "release name when it contains `keyroute` (`keyroute-sidecar` for the install above), `<release>-keyroute`\notherwise"
        in readme
    )
