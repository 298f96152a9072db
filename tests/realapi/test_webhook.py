"""The sidecar-injection webhook called by the real API server.

The operator (the chart's ServiceAccount) serves the webhook over HTTPS with a certificate for
127.0.0.1; the chart's own MutatingWebhookConfiguration is applied with ``clientConfig.url`` and
that certificate's CA as ``caBundle`` (a Service cannot reach 127.0.0.1). Two operators serve the
module: one cluster-wide in native mode (the chart's default injection settings), one serving only
the webhook in container mode with ``missingChain: Inject``; a namespace picks one with a label.
Pods are created with ``kubectl`` or by the controller manager from a Deployment, as users create
them, and what the API server stored is asserted (the API server runs with SidecarContainers=true,
as 1.29+ does by default, so a native sidecar is stored as such).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from keyroute.core import inject as core
from tests.polling import eventually
from tests.realapi.chart import (
    ChartRbac,
    Helm,
    WebhookTls,
    delete_webhook_configuration,
    forbidden_lines,
    run_operator,
    wait_serving,
    webhook_configuration,
)
from tests.realapi.client import Api, ApiStatusError, api_path
from tests.realapi.controlplane import ControlPlane, free_port
from tests.realapi.objects import chain, pool, secret
from tests.realapi.processes import KeyrouteProcess, Processes

KEY = "sk-test-REALAPI-WEBHOOK-KEY-00001"
MODE_LABEL = "keyroute-test/injection"


@dataclass
class Webhooks:
    native: KeyrouteProcess
    container: KeyrouteProcess


def injection_settings(helm: Helm, rbac: ChartRbac, values: dict[str, Any]) -> str:
    """The chart's rendered ``injection.yaml`` (what the operator reads from its ConfigMap)."""
    objects = helm.template(rbac.release, rbac.namespace, values)
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-injection"))
    return str(cm["data"]["injection.yaml"])


@pytest.fixture(scope="module")
def webhooks(
    control_plane: ControlPlane,
    helm: Helm,
    chart_rbac: ChartRbac,
    module_processes: Processes,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Webhooks]:
    folder = tmp_path_factory.mktemp("webhook")
    tls = WebhookTls.make(folder / "tls")
    chart_objects = helm.template(chart_rbac.release, chart_rbac.namespace)
    native_file, container_file = folder / "native.yaml", folder / "container.yaml"
    native_file.write_text(injection_settings(helm, chart_rbac, {}))
    container_file.write_text(
        injection_settings(helm, chart_rbac, {"injection": {"mode": "container", "missingChain": "Inject"}})
    )
    quiet = f"{chart_rbac.release}-webhook-only"  # the container-mode operator reconciles nothing
    control_plane.kubectl("create", "namespace", quiet)
    native_port, container_port = free_port(), free_port()
    hooks = [
        webhook_configuration(
            chart_objects,
            f"{chart_rbac.release}-{mode}",
            f"https://127.0.0.1:{port}{path_of(chart_objects)}",
            tls.ca_bundle,
            {"matchLabels": {MODE_LABEL: mode}},
        )
        for mode, port in (("native", native_port), ("container", container_port))
    ]
    webhook_args = ("--webhook-cert-dir", str(tls.cert_dir))
    try:
        with (
            run_operator(
                chart_rbac, module_processes, "--webhook-port", str(native_port), *webhook_args,
                "--injection-config", str(native_file), name="operator-native",
            ) as native,
            run_operator(
                chart_rbac, module_processes, "--webhook-port", str(container_port), *webhook_args,
                "--injection-config", str(container_file), name="operator-container", namespaces=[quiet],
            ) as container,
        ):  # fmt: skip
            wait_serving(native_port, tls.ca.cert)
            wait_serving(container_port, tls.ca.cert)
            control_plane.apply(hooks)
            yield Webhooks(native, container)
    finally:
        for hook in hooks:
            delete_webhook_configuration(control_plane, hook["metadata"]["name"])
        control_plane.kubectl("delete", "namespace", quiet, "--wait=false", check=False)


def path_of(chart_objects: list[dict[str, Any]]) -> str:
    hook = next(o for o in chart_objects if o["kind"] == "MutatingWebhookConfiguration")
    return str(hook["webhooks"][0]["clientConfig"]["service"]["path"])


async def use(control_plane: ControlPlane, api: Api, namespace: str, mode: str) -> None:
    """Send the namespace's labelled pods to the ``mode`` operator's webhook, once that is in effect."""
    control_plane.kubectl("label", "namespace", namespace, f"{MODE_LABEL}={mode}")
    await in_effect(api, namespace, refused=True)


async def in_effect(api: Api, namespace: str, *, refused: bool, timeout: float = 10) -> None:  # noqa: ASYNC109
    """Until a labelled pod created in ``namespace`` is refused by keyroute's webhook (``refused``),
    or admitted (not ``refused``: no configuration that fails it applies any more).

    The API server reads webhook configurations and namespaces' labels from its own informers: a
    configuration just applied, deleted, or a namespace just labelled takes effect a moment later
    (Kubernetes' own e2e tests wait for it the same way, with marker requests). The probe is a
    server-side dry run (nothing stored; the chart's hook has ``sideEffects: None``, so it is called
    for dry runs too) of a pod whose chain label no chain can have: a webhook that answers refuses
    it before any ProviderChain lookup, so the probe opens no connection for the lookup client."""
    probe = yaml.safe_load(pod_manifest("in-effect-probe", "Not_A_Chain"))

    async def answered() -> bool:
        try:
            await api.request("POST", api_path("v1", "pods", namespace), probe, params={"dryRun": "All"})
        except ApiStatusError as e:
            return refused and "inject.keyroute.dev" in str(e)
        return not refused

    await eventually(answered, timeout=timeout, interval=0.1)


def create_chain(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.apply(
        [
            secret("openai-keys", k1=KEY),
            pool("openai", "openai", ("k1", "openai-keys", "k1")),
            chain("agents", ("openai", "openai", "https://api.openai.com/v1", "openai")),
        ],
        namespace=namespace,
    )


def pod_manifest(name: str, chain_name: str | None, **spec: Any) -> str:
    labels = {"app": "agent"} | ({core.CHAIN_LABEL: chain_name} if chain_name else {})
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}], **spec},
        }
    )


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


async def test_pods_of_a_labelled_deployment_get_the_native_sidecar(
    control_plane: ControlPlane, api: Api, namespace: str, webhooks: Webhooks
) -> None:
    """The controller manager creates the pods (``generateName``, no namespace in the pod's metadata)."""
    await use(control_plane, api, namespace, "native")
    create_chain(control_plane, namespace)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "my-agent"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent", core.CHAIN_LABEL: "agents"}},
                "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}]},
            },
        },
    }
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(deployment))
    pods = await eventually(lambda: _at_least(api.list("v1", "pods", namespace), 2), timeout=30)
    for pod in pods:
        init = pod["spec"]["initContainers"]
        assert init[0]["name"] == core.SIDECAR_NAME and init[0]["restartPolicy"] == "Always"
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == core.CONFIG_VOLUME)
        assert volume["secret"]["secretName"] == "agents-keyroute"
        agent = pod["spec"]["containers"][0]
        assert env_of(agent)["OPENAI_BASE_URL"] == "http://127.0.0.1:8411/v1"
        assert pod["metadata"]["annotations"][core.INJECTED_ANNOTATION] == "agents"
    assert "sidecar injected" in webhooks.native.output
    assert forbidden_lines(webhooks.native.output, namespace) == []
    assert KEY not in webhooks.native.output


async def test_a_pod_already_injected_is_left_alone_and_an_unlabelled_pod_never_reaches_the_webhook(
    control_plane: ControlPlane, api: Api, namespace: str, webhooks: Webhooks
) -> None:
    await use(control_plane, api, namespace, "native")
    create_chain(control_plane, namespace)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=pod_manifest("plain", None))
    plain = await api.get("v1", "pods", namespace, "plain")
    assert plain is not None and not plain["spec"].get("initContainers")
    assert [c["name"] for c in plain["spec"]["containers"]] == ["agent"]

    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=pod_manifest("first", "agents"))
    first = await api.get("v1", "pods", namespace, "first")
    assert first is not None
    # The same pod again, as a retried create or a copy (`kubectl get -o yaml` then create) sends it.
    copy = {k: first[k] for k in ("apiVersion", "kind", "spec")}
    copy["metadata"] = {
        "name": "again",
        "labels": first["metadata"]["labels"],
        "annotations": first["metadata"]["annotations"],
    }
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(copy))
    again = await api.get("v1", "pods", namespace, "again")
    assert again is not None
    names = [c["name"] for c in again["spec"]["initContainers"]]
    assert names.count(core.SIDECAR_NAME) == 1


async def test_a_missing_chain_is_refused_with_the_message_the_user_sees(
    control_plane: ControlPlane, api: Api, namespace: str, webhooks: Webhooks
) -> None:
    await use(control_plane, api, namespace, "native")
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=pod_manifest("agent", "nowhere"), check=False
    )
    assert result.returncode != 0
    assert (
        'admission webhook "inject.keyroute.dev" denied the request: keyroute: ProviderChain "nowhere" '
        f'not found in namespace "{namespace}": create it first, or remove the keyroute.dev/chain label'
    ) in result.stderr, result.stderr
    assert await api.get("v1", "pods", namespace, "agent") is None
    bad = control_plane.kubectl(
        "run",
        "bad",
        "-n",
        namespace,
        "--image=agent:1",
        "--labels=keyroute.dev/chain=Not_A_Chain",
        check=False,
    )
    assert (
        bad.returncode != 0 and "keyroute.dev/chain='Not_A_Chain' is not a ProviderChain name" in bad.stderr
    )
    # A user's mistake, not the operator's: one warning each, no ERROR line to page anybody (kopf's
    # own error line for a refused admission is filtered out).
    mine = decisions(webhooks.native, namespace)
    assert [r for r in mine if r["level"] in ("error", "critical")] == []
    assert sum(r["msg"] == "pod refused: chain not found" and r["level"] == "warning" for r in mine) == 1
    assert sum(r["msg"] == "pod refused: invalid chain label" and r["level"] == "warning" for r in mine) == 1


async def test_container_mode_injects_a_missing_chain_with_a_warning_when_the_policy_says_so(
    control_plane: ControlPlane, api: Api, namespace: str, webhooks: Webhooks
) -> None:
    await use(control_plane, api, namespace, "container")
    result = control_plane.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=pod_manifest("agent", "later", automountServiceAccountToken=False),
    )
    # kubectl prints admission warnings: the user is told why the pod will wait.
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert any('ProviderChain "later" not found' in w for w in warnings), result.stderr
    pod = await api.get("v1", "pods", namespace, "agent")
    assert pod is not None
    assert [c["name"] for c in pod["spec"]["containers"]] == ["agent", core.SIDECAR_NAME]
    assert not pod["spec"].get("initContainers")
    # No ServiceAccount token in the pod: the sidecar is told not to report (it could not).
    assert pod["spec"]["containers"][1]["args"][-2:] == ["--report", "off"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == core.CONFIG_VOLUME)
    assert volume["secret"]["secretName"] == "later-keyroute"
    assert "sidecar injected" in webhooks.container.output


async def _refused_as(api: Api, namespace: str, pod: dict[str, Any], why: str) -> bool:
    """Whether a server-side dry run (nothing stored) of ``pod`` is refused saying ``why``."""
    try:
        await api.request("POST", api_path("v1", "pods", namespace), pod, params={"dryRun": "All"})
    except ApiStatusError as e:
        return why in str(e)
    return False


def decisions(operator: KeyrouteProcess, namespace: str) -> list[dict[str, Any]]:
    """The webhook's log lines about the namespace's pods, its in_effect() dry runs left out."""
    lines = [json.loads(line) for line in operator.output.splitlines() if namespace in line and line.startswith("{")]
    return [r for r in lines if not r.get("dryRun")]


async def _at_least(getter: Any, n: int) -> Any:
    items = await getter
    return items if len(items) >= n else None


RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


async def test_the_injected_sidecar_as_stored_keeps_a_restricted_namespace_admissible(
    control_plane: ControlPlane, api: Api, namespace: str, webhooks: Webhooks
) -> None:
    """docs/injection.md's sidecar, field by field, as the API server stored it; and the API server's
    own Pod Security admission (``restricted``, enforced after the mutating webhooks) accepts it."""
    await use(control_plane, api, namespace, "native")
    control_plane.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    # Pod Security reads the namespace's labels from the API server's informer too: wait until it
    # enforces them (a dry run of a pod without the chain label, which no webhook sees).
    plain = yaml.safe_load(pod_manifest("enforced-probe", None))
    await eventually(lambda: _refused_as(api, namespace, plain, "violates PodSecurity"), timeout=10, interval=0.1)
    create_chain(control_plane, namespace)
    # Enforced here: a labelled pod whose own container is not restricted is refused.
    loose = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=pod_manifest("loose", "agents"), check=False
    )
    assert loose.returncode != 0 and "violates PodSecurity" in loose.stderr, loose.stderr
    manifest = yaml.safe_load(pod_manifest("agent", "agents"))
    manifest["spec"]["containers"][0]["securityContext"] = RESTRICTED
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    pod = await api.get("v1", "pods", namespace, "agent")
    assert pod is not None
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == core.SIDECAR_NAME and sidecar["restartPolicy"] == "Always"
    # The chart's injection.resources: no CPU limit (a throttled proxy slows every call).
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert sidecar["securityContext"] == {
        **RESTRICTED,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
    }
    assert sidecar["ports"] == [{"name": "kr-admin", "containerPort": 8412, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == 8412, probe
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]} == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    # The config: the chain's Secret as a directory (never subPath), read-only, in the sidecar only.
    # (The ServiceAccount admission adds the token's mount to every container, the sidecar's too.)
    assert [m for m in sidecar["volumeMounts"] if m["name"] == core.CONFIG_VOLUME] == [
        {"name": core.CONFIG_VOLUME, "mountPath": "/etc/keyroute/config", "readOnly": True}
    ]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == core.CONFIG_VOLUME)
    assert volume["secret"] == {"secretName": "agents-keyroute", "optional": False, "defaultMode": 0o444}
    agent = pod["spec"]["containers"][0]
    assert core.CONFIG_VOLUME not in {m["name"] for m in agent.get("volumeMounts") or []}
    assert {k: v for k, v in env_of(agent).items() if k.endswith(("_BASE_URL", "_API_BASE"))} == {
        "OPENAI_BASE_URL": "http://127.0.0.1:8411/v1",
        "OPENAI_API_BASE": "http://127.0.0.1:8411/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8411",
    }
    assert "--report" not in sidecar["args"]  # the pod has its ServiceAccount token: it reports


async def test_an_empty_label_and_a_pod_that_cannot_take_the_sidecar_are_refused_saying_why(
    control_plane: ControlPlane, api: Api, namespace: str, webhooks: Webhooks
) -> None:
    """docs/injection.md's other refusals, as ``kubectl`` shows them: an empty ``keyroute.dev/chain``
    (the objectSelector's ``Exists`` sends it; it names no chain) and ``CannotInject`` (the pod has a
    volume named like keyroute's config volume)."""
    await use(control_plane, api, namespace, "native")
    create_chain(control_plane, namespace)
    empty = yaml.safe_load(pod_manifest("empty", None))
    empty["metadata"]["labels"][core.CHAIN_LABEL] = ""
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(empty), check=False
    )
    assert result.returncode != 0
    assert "label keyroute.dev/chain is empty: set it to the name of a ProviderChain" in result.stderr, (
        result.stderr
    )
    clash = pod_manifest("clash", "agents", volumes=[{"name": core.CONFIG_VOLUME, "emptyDir": {}}])
    result = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=clash, check=False)
    assert result.returncode != 0
    assert "the pod already has a volume named 'keyroute-config'" in result.stderr, result.stderr
    assert await api.get("v1", "pods", namespace, "empty") is None
    assert await api.get("v1", "pods", namespace, "clash") is None
    mine = decisions(webhooks.native, namespace)
    assert sum(r["msg"] == "pod refused: cannot inject" and r["level"] == "warning" for r in mine) == 1
