"""The webhook's failure cases on the real API server, with the chart's own MutatingWebhookConfiguration.

docs/injection.md and the README promise:

- while no operator answers, a labelled pod is refused (``webhook.failurePolicy: Fail``, the default)
  or created without the sidecar (``Ignore``), and a pod without the label is never sent to the
  webhook, so a broken operator never blocks it (``objectSelector``);
- when the ProviderChain cannot be looked up because the API server is slow, the pod is injected
  with a warning rather than blocked, with the chart's default ``timeoutSeconds`` (5) and
  ``failurePolicy: Fail``: the lookup must give up before the API server gives up on the webhook.

The slow API server is a TCP proxy between the operator and the real API server that, on cue, stops
forwarding new connections (the webhook's lookup client connects afresh; kopf's watches, already
connected, carry on). The API server itself stays fast: it calls the webhook and stores the pod.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from keyroute.core import inject as core
from tests.realapi.chart import (
    ChartRbac,
    Helm,
    WebhookTls,
    applied_webhook,
    stop,
    wait_serving,
    webhook_configuration,
)
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane, free_port
from tests.realapi.processes import Processes
from tests.realapi.test_webhook import in_effect, injection_settings, path_of, pod_manifest

SELECT_LABEL = "keyroute-test/failures"


@contextlib.contextmanager
def chart_webhook(
    control_plane: ControlPlane, helm: Helm, rbac: ChartRbac, namespace: str, url: str, ca_bundle: str,
    values: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The chart's webhook (``values`` rendered) pointed at ``url``, for ``namespace`` only."""
    objects = helm.template(rbac.release, rbac.namespace, values or {})
    tag = secrets.token_hex(3)
    control_plane.kubectl("label", "namespace", namespace, f"{SELECT_LABEL}={tag}", "--overwrite")
    hook = webhook_configuration(
        objects, f"{rbac.release}-failures-{tag}", url, ca_bundle, {"matchLabels": {SELECT_LABEL: tag}}
    )
    with applied_webhook(control_plane, hook) as webhook:
        yield webhook


def create_pod(control_plane: ControlPlane, namespace: str, name: str, chain: str | None) -> Any:
    return control_plane.kubectl(
        "create", "-n", namespace, "-f", "-", input=pod_manifest(name, chain), check=False
    )


async def test_with_no_operator_answering_fail_refuses_labelled_pods_and_ignore_admits_them_bare(
    control_plane: ControlPlane, api: Api, helm: Helm, chart_rbac: ChartRbac, namespace: str, tmp_path: Path
) -> None:
    down = f"https://127.0.0.1:{free_port()}/keyroute-inject"  # nothing listens: the operator is down
    ca = WebhookTls.make(tmp_path / "tls").ca_bundle
    with chart_webhook(control_plane, helm, chart_rbac, namespace, down, ca) as hook:
        assert hook["failurePolicy"] == "Fail"  # the chart's default
        await in_effect(api, namespace, refused=True)
        refused = create_pod(control_plane, namespace, "labelled", "agents")
        assert refused.returncode != 0
        assert 'failed calling webhook "inject.keyroute.dev"' in refused.stderr, refused.stderr
        assert await api.get("v1", "pods", namespace, "labelled") is None
        # Not labelled: never sent to the webhook, so the broken operator does not block it.
        plain = create_pod(control_plane, namespace, "plain", None)
        assert plain.returncode == 0, plain.stderr
    with chart_webhook(
        control_plane, helm, chart_rbac, namespace, down, ca, {"webhook": {"failurePolicy": "Ignore"}}
    ) as hook:
        assert hook["failurePolicy"] == "Ignore"
        await in_effect(api, namespace, refused=False)  # the Fail configuration above no longer applies
        admitted = create_pod(control_plane, namespace, "bare", "agents")
        assert admitted.returncode == 0, admitted.stderr
        pod = await api.get("v1", "pods", namespace, "bare")
        assert pod is not None
        # Started without routing, as documented: no sidecar, no annotation.
        assert [c["name"] for c in pod["spec"]["containers"]] == ["agent"]
        assert not pod["spec"].get("initContainers")
        assert core.INJECTED_ANNOTATION not in (pod["metadata"].get("annotations") or {})


class StallingProxy:
    """A TCP proxy to ``target``; while :attr:`stalled` is set, new connections are accepted and held
    without forwarding a byte (a TLS handshake that never completes: an API server too slow to answer)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stalled = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._sockets.append(conn)
            if self.stalled.is_set():
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            self._sockets.append(upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(timeout=2)
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


async def test_a_slow_api_server_injects_with_a_warning_before_the_api_server_times_the_webhook_out(
    control_plane: ControlPlane,
    api: Api,
    helm: Helm,
    chart_rbac: ChartRbac,
    namespace: str,
    keyroute_process: Processes,
    tmp_path: Path,
) -> None:
    server = urlparse(control_plane.server)
    assert server.hostname and server.port
    proxy = StallingProxy((server.hostname, server.port))
    try:
        kubeconfig = chart_rbac.operator_kubeconfig()
        doc = yaml.safe_load(kubeconfig.read_text())
        doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        kubeconfig.write_text(yaml.safe_dump(doc))
        # The chart's defaults (Reject, timeoutSeconds 5, failurePolicy Fail) but container mode (1.28).
        settings = tmp_path / "injection.yaml"
        settings.write_text(injection_settings(helm, chart_rbac, {"injection": {"mode": "container"}}))
        tls = WebhookTls.make(tmp_path / "tls")
        port = free_port()
        lease = f"keyroute-slow-{secrets.token_hex(3)}"
        operator = keyroute_process.start(
            "operator", "--metrics-port", "0", "--health-port", "0", "--leader-election-id", lease,
            "--webhook-port", str(port), "--webhook-cert-dir", str(tls.cert_dir),
            "--injection-config", str(settings), "-n", namespace,
            kubeconfig=kubeconfig, name="operator-slow-api", env={"POD_NAMESPACE": chart_rbac.namespace, "POD_NAME": lease},
        )  # fmt: skip
        try:
            wait_serving(port, tls.ca.cert)
            objects = helm.template(chart_rbac.release, chart_rbac.namespace)
            url = f"https://127.0.0.1:{port}{path_of(objects)}"
            with chart_webhook(control_plane, helm, chart_rbac, namespace, url, tls.ca_bundle) as hook:
                assert (hook["timeoutSeconds"], hook["failurePolicy"]) == (5, "Fail")  # the chart's defaults
                await in_effect(api, namespace, refused=True)
                proxy.stalled.set()
                started = time.monotonic()
                result = create_pod(control_plane, namespace, "agent", "agents")
                took = time.monotonic() - started
            assert result.returncode == 0, f"refused after {took:.1f}s: {result.stderr}"
            assert 'could not check that ProviderChain "agents" exists' in result.stderr, result.stderr
            pod = await api.get("v1", "pods", namespace, "agent")
            assert pod is not None
            assert [c["name"] for c in pod["spec"]["containers"]] == ["agent", core.SIDECAR_NAME]
            assert took < 5, took
        finally:
            stop(operator)
    finally:
        proxy.close()


def chart_selector_webhook(
    control_plane: ControlPlane, helm: Helm, rbac: ChartRbac, url: str, ca_bundle: str, values: dict[str, Any]
) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """The chart's webhook with the chart's own namespaceSelector (not a test label), pointed at ``url``."""

    @contextlib.contextmanager
    def applied() -> Iterator[dict[str, Any]]:
        objects = helm.template(rbac.release, rbac.namespace, values)
        rendered = next(o for o in objects if o["kind"] == "MutatingWebhookConfiguration")
        selector = rendered["webhooks"][0]["namespaceSelector"]
        hook = webhook_configuration(
            objects, f"{rbac.release}-selector-{secrets.token_hex(3)}", url, ca_bundle, selector
        )
        with applied_webhook(control_plane, hook) as webhook:
            yield webhook

    return applied()


async def test_the_charts_namespace_selector_keeps_system_and_unwatched_namespaces_away_from_the_webhook(
    control_plane: ControlPlane, api: Api, helm: Helm, chart_rbac: ChartRbac, namespace: str, tmp_path: Path
) -> None:
    """values.yaml: by default the webhook sees every namespace but kube-system and kube-node-lease;
    with watchNamespaces, only those. Shown with no operator answering (failurePolicy Fail): a pod the
    webhook sees is refused, a pod it does not see is created."""
    down = f"https://127.0.0.1:{free_port()}/keyroute-inject"
    ca = WebhookTls.make(tmp_path / "tls").ca_bundle
    name = f"labelled-{secrets.token_hex(3)}"
    created: list[str] = []
    try:
        with chart_selector_webhook(control_plane, helm, chart_rbac, down, ca, {}):
            await in_effect(api, namespace, refused=True)
            assert create_pod(control_plane, namespace, name, "agents").returncode != 0  # seen: refused
            for system in ("kube-system", "kube-node-lease"):
                result = create_pod(control_plane, system, name, "agents")
                assert result.returncode == 0, (system, result.stderr)
                created.append(system)
        with chart_selector_webhook(
            control_plane, helm, chart_rbac, down, ca, {"watchNamespaces": [namespace]}
        ):
            # The first configuration (every namespace but the system ones) is gone from the API
            # server's view once a pod in "default" is admitted: only the new one can then refuse one.
            await in_effect(api, "default", refused=False)
            await in_effect(api, namespace, refused=True)
            assert create_pod(control_plane, namespace, name, "agents").returncode != 0  # watched: refused
            result = create_pod(control_plane, "default", name, "agents")  # not watched: never sent
            assert result.returncode == 0, result.stderr
            created.append("default")
    finally:
        for ns in created:
            control_plane.kubectl(
                "-n", ns, "delete", "pod", name, "--wait=false", "--ignore-not-found", check=False
            )
