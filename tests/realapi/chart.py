"""The Helm chart on the real API server: its RBAC applied as rendered, and keyroute run with it.

The operator under test runs as the chart's own ServiceAccount: ``helm template`` renders the chart,
its ServiceAccount, ClusterRoles, Roles and bindings are applied as they are, and the operator process
gets a TokenRequest token of that ServiceAccount in a kubeconfig. A grant the code needs and the chart
lacks is then a ``forbidden`` from the API server, and a failing test. Sidecars likewise run as an
agent's ServiceAccount bound to the chart's sidecar ClusterRole, the way the README tells users to::

    with ChartRbac.install(control_plane, helm, workdir) as rbac:          # cluster-wide values
        kubeconfig = rbac.operator_kubeconfig()
        agent = rbac.sidecar_kubeconfig(namespace)                          # SA "agent", bound
        with run_operator(rbac, processes, webhook=...) as operator: ...

Helm is the binary ``tools/fetch_helm.py`` puts at ``.tools/helm/helm`` (``./dev test`` runs it), or
the one ``KEYROUTE_HELM`` names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.realapi.controlplane import ControlPlane, KeyPair, b64, issue, make_ca
from tests.realapi.processes import KeyrouteProcess, Processes

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "keyroute"
DEFAULT_HELM = ROOT / ".tools" / "helm" / "helm"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
CLUSTER_KINDS = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration", "Namespace"}
API = "keyroute.dev/v1alpha1"


def helm_binary() -> Path:
    """The pinned helm; an AssertionError saying how to get it when missing (never a skip)."""
    configured = os.environ.get("KEYROUTE_HELM")
    path = Path(configured) if configured else DEFAULT_HELM
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise AssertionError(
            f"no helm binary at {path}: `.venv/bin/python tools/fetch_helm.py` (./dev test does it), "
            "or set KEYROUTE_HELM=/path/to/helm"
        )
    return path


class Helm:
    """Runs helm with its own empty config and cache folders, against the test API server."""

    def __init__(self, control_plane: ControlPlane, home: Path) -> None:
        self.binary = helm_binary()
        self.home = home
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("HELM_")},
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": str(control_plane.admin_kubeconfig),
        }
        self.env.pop("HELM_NAMESPACE", None)

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def values(self, values: dict[str, Any]) -> list[str]:
        path = self.home / f"values-{secrets.token_hex(4)}.json"  # JSON is YAML
        path.write_text(json.dumps(values))
        return ["--values", str(path)]

    def template(
        self, release: str, namespace: str, values: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        out = self.run("template", release, str(CHART), "--namespace", namespace, *self.values(values or {}))
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@dataclass
class ChartRbac:
    """The chart's RBAC objects for one release, applied to the API server; removed by :meth:`close`."""

    control_plane: ControlPlane
    release: str
    namespace: str  # the release namespace (the operator's ServiceAccount lives there)
    objects: list[dict[str, Any]]
    workdir: Path

    @classmethod
    @contextlib.contextmanager
    def install(
        cls,
        control_plane: ControlPlane,
        helm: Helm,
        workdir: Path,
        *,
        watch_namespaces: Sequence[str] = (),
        release: str | None = None,
    ) -> Iterator[ChartRbac]:
        """Render the chart (``watchNamespaces`` as given) and apply its RBAC objects as admin."""
        release = release or f"rbac-{secrets.token_hex(3)}"
        namespace = f"{release}-system"
        values: dict[str, Any] = {"watchNamespaces": list(watch_namespaces)}
        rendered = helm.template(release, namespace, values)
        objects = [o for o in rendered if o["kind"] in RBAC_KINDS]
        assert any(o["kind"] == "ServiceAccount" for o in objects), "the chart renders no ServiceAccount"
        control_plane.kubectl("create", "namespace", namespace)
        rbac = cls(control_plane, release, namespace, objects, workdir)
        try:
            control_plane.apply(objects)
            yield rbac
        finally:
            rbac.close()

    @property
    def fullname(self) -> str:
        """The release's full name: the name of the operator's ServiceAccount and ClusterRole."""
        return self.service_account

    @property
    def service_account(self) -> str:
        return next(o["metadata"]["name"] for o in self.objects if o["kind"] == "ServiceAccount")

    @property
    def sidecar_cluster_role(self) -> str:
        return f"{self.fullname}-sidecar"

    def operator_kubeconfig(self) -> Path:
        """A token kubeconfig of the chart's operator ServiceAccount (TokenRequest, 1 h)."""
        token = self.control_plane.create_token(self.namespace, self.service_account)
        path = self.workdir / f"{self.release}-operator.kubeconfig"
        return self.control_plane.write_kubeconfig(path, user={"token": token})

    def sidecar_kubeconfig(
        self, namespace: str, service_account: str = "agent", *, bind: bool = True
    ) -> Path:
        """An agent's ServiceAccount in ``namespace`` (made if missing), bound to the chart's sidecar
        ClusterRole as the README says (``kubectl create rolebinding``) unless ``bind`` is false,
        and a token kubeconfig of it."""
        cp = self.control_plane
        cp.kubectl("-n", namespace, "create", "serviceaccount", service_account, check=False)
        if bind:
            cp.kubectl(
                "-n", namespace, "create", "rolebinding", f"keyroute-sidecar-{service_account}",
                f"--clusterrole={self.sidecar_cluster_role}", f"--serviceaccount={namespace}:{service_account}",
            )  # fmt: skip
        token = cp.create_token(namespace, service_account)
        path = self.workdir / f"{namespace}-{service_account}.kubeconfig"
        return cp.write_kubeconfig(path, user={"token": token})

    def close(self) -> None:
        for obj in self.objects:
            if obj["kind"] in CLUSTER_KINDS:
                self.control_plane.kubectl(
                    "delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found", check=False
                )
        self.control_plane.kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)


# --- the webhook -----------------------------------------------------------------------------------


@dataclass
class WebhookTls:
    """A CA and a serving certificate for 127.0.0.1, written as ``tls.crt``/``tls.key`` in ``cert_dir``
    (what the chart mounts), and the ``caBundle`` for a webhook configuration."""

    cert_dir: Path
    ca: KeyPair

    @classmethod
    def make(cls, folder: Path) -> WebhookTls:
        ca, ca_key = make_ca("keyroute-webhook-test-ca")
        serving = issue(ca, ca_key, "keyroute-webhook", server=True, hosts=["127.0.0.1"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tls.crt").write_bytes(serving.cert)
        (folder / "tls.key").write_bytes(serving.key)
        (folder / "tls.key").chmod(0o600)
        return cls(folder, ca)

    @property
    def ca_bundle(self) -> str:
        return b64(self.ca.cert)


def webhook_configuration(
    chart_objects: list[dict[str, Any]],
    name: str,
    url: str,
    ca_bundle: str,
    namespace_selector: dict[str, Any],
) -> dict[str, Any]:
    """The chart's own MutatingWebhookConfiguration, pointed at ``url`` (a Service cannot reach
    127.0.0.1) with ``ca_bundle``; everything else (objectSelector, rules, failurePolicy, …) as rendered."""
    hook = next(o for o in chart_objects if o["kind"] == "MutatingWebhookConfiguration")
    hook = json.loads(json.dumps(hook))
    hook["metadata"] = {"name": name, "labels": hook["metadata"].get("labels", {})}
    for entry in hook["webhooks"]:
        entry["clientConfig"] = {"url": url, "caBundle": ca_bundle}
        entry["namespaceSelector"] = namespace_selector
    return hook  # type: ignore[no-any-return]


def delete_webhook_configuration(control_plane: ControlPlane, name: str) -> None:
    """Delete the MutatingWebhookConfiguration ``name`` if it is there (a test's cleanup: never fails)."""
    control_plane.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False)


@contextlib.contextmanager
def applied_webhook(control_plane: ControlPlane, hook: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``hook`` (a MutatingWebhookConfiguration) applied while inside, deleted after; yields its webhook."""
    control_plane.apply(hook)
    try:
        yield hook["webhooks"][0]
    finally:
        delete_webhook_configuration(control_plane, hook["metadata"]["name"])


def wait_serving(port: int, ca: bytes, timeout: float = 30) -> None:
    """Until the webhook answers HTTPS on ``port`` with a certificate ``ca`` signed."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # an answer: it serves
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise AssertionError(f"the webhook on port {port} did not answer within {timeout}s") from None
            time.sleep(0.1)


# --- the operator ----------------------------------------------------------------------------------


@contextlib.contextmanager
def run_operator(
    rbac: ChartRbac,
    processes: Processes,
    *args: str,
    name: str = "operator",
    namespaces: Sequence[str] = (),
) -> Iterator[KeyrouteProcess]:
    """``keyroute operator`` as the chart's ServiceAccount (cluster-wide unless ``namespaces``), with
    ``args`` appended; SIGTERM at the end.

    As the chart runs it: leader election on, its Lease in the release namespace (``$POD_NAMESPACE``),
    so the chart's Lease Role is exercised too. Each run elects on a Lease of its own, so an operator
    killed by an earlier test cannot hold up this one for a lease duration."""
    lease = f"keyroute-{name}-{secrets.token_hex(3)}"
    argv = ["operator", "--metrics-port", "0", "--health-port", "0", "--leader-election-id", lease, *args]
    for ns in namespaces:
        argv += ["-n", ns]
    env = {"POD_NAMESPACE": rbac.namespace, "POD_NAME": lease}
    process = processes.start(*argv, kubeconfig=rbac.operator_kubeconfig(), name=name, env=env)
    try:
        yield process
    finally:
        stop(process)


def stop(process: KeyrouteProcess, timeout: float = 10) -> None:
    """SIGTERM and wait (SIGKILL after ``timeout``), from synchronous code such as module fixtures."""
    if process.popen is None or process.popen.poll() is not None:
        return
    process.popen.send_signal(signal.SIGTERM)
    try:
        process.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def forbidden_lines(output: str, namespace: str | None = None) -> list[str]:
    """Log lines where the API server refused the operator something (a grant the chart lacks).

    With ``namespace``, lines about other namespaces are left out: a namespace being deleted refuses
    every create with a 403 too (its Secrets go, the operator re-renders into it), which is no RBAC."""
    # A 403 standing alone as a status, not digits inside a port (40339), a timestamp's milliseconds
    # (.403Z), a config hash ("403ed603...") or a random name suffix (the Lease keyroute-operator-403f4f).
    refused = re.compile(r"forbidden|(?<![\w.-])403(?!\w)", re.IGNORECASE)
    lines = [line for line in output.splitlines() if refused.search(line)]
    if namespace is not None:
        lines = [line for line in lines if namespace in line or "/namespaces/" not in line]
    return lines
