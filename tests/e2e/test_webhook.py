"""The sidecar-injection webhook's start-up and options, with the operator (kopf) on kmock.

Injection itself (native and container mode, idempotence, a missing chain refused or injected with a
warning) is tested with the real API server calling the webhook (``tests/realapi/test_webhook.py``).
Kept here: how the operator starts with or without a webhook port and with bad settings (no API
behaviour involved; kmock is the quickest API to start it on), the option parsing, and the webhook
client and fixtures ``test_rbac.py`` uses to record the webhook's own API requests."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest

from keyroute.controller import webhook
from keyroute.core import inject as core
from tests.e2e.conftest import eventually

pytestmark = pytest.mark.e2e

API = "keyroute.dev/v1alpha1"
KEY = "sk-test-WEBHOOK-SECRET-KEY-000000001"
MODULES = ("keyroute.controller.standalone", "keyroute.controller.webhook")
IMAGE = "registry.example/keyroute:e2e"


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 in ``tls.crt``/``tls.key``, as cert-manager would mount."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the webhook's test certificate")
    d = tmp_path_factory.mktemp("webhook-tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt"),
            "-subj", "/CN=keyroute-webhook", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Webhook:
    """The operator's webhook endpoint, spoken to as the API server does."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.raw: list[str] = []  # every response body, for the secrets-hygiene check

    async def review(
        self, pod: dict[str, Any], *, operation: str = "CREATE", namespace: str = "default"
    ) -> dict[str, Any]:
        """POST one AdmissionReview; return its ``response`` (checked to answer this request)."""
        uid = str(uuid.uuid4())
        kind = {"group": "", "version": "v1", "kind": "Pod"}
        resource = {"group": "", "version": "v1", "resource": "pods"}
        request = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": kind,
                "resource": resource,
                "requestKind": kind,
                "requestResource": resource,
                "namespace": namespace,
                "operation": operation,
                "userInfo": {
                    "username": "system:serviceaccount:kube-system:replicaset-controller",
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                },
                "object": pod,
                "oldObject": pod if operation == "UPDATE" else None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        async with self.session.post(self.url, json=request) as response:
            text = await response.text()
            assert response.status == 200, text
        self.raw.append(text)
        review = json.loads(text)
        assert (review["apiVersion"], review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
        assert review["response"]["uid"] == uid
        return review["response"]  # type: ignore[no-any-return]

    async def up(self) -> bool:
        try:
            await self.review(labelled_pod(chain="probe"))
        except aiohttp.ClientConnectionError:
            return False
        return True


@pytest.fixture
async def webhook_env(
    cert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Webhook, Path]]:
    """Environment for the operator's webhook (port, TLS, settings file) and a client for it."""
    port = free_port()
    settings_file = tmp_path / "injection.yaml"
    settings_file.write_text(f"image: {IMAGE}\n")
    monkeypatch.setenv(webhook.ENV_PORT, str(port))
    monkeypatch.setenv(webhook.ENV_CERT_DIR, str(cert_dir))
    monkeypatch.setenv(webhook.ENV_INJECTION_CONFIG, str(settings_file))
    tls = ssl.create_default_context(cafile=str(cert_dir / "tls.crt"))  # verifies the served cert
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls), timeout=timeout) as session:
        yield Webhook(session, f"https://127.0.0.1:{port}{webhook.WEBHOOK_PATH}"), settings_file


def labelled_pod(chain: str | None = "agents", **spec: Any) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it: ``generateName``, and no namespace in its metadata."""
    meta: dict[str, Any] = {"generateName": "agent-7d9f-", "labels": {"app": "agent"}}
    if chain is not None:
        meta["labels"][core.CHAIN_LABEL] = chain
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [{"name": "agent", "image": "agent:1", "env": [{"name": "LOG", "value": "1"}]}],
            "initContainers": [{"name": "migrate", "image": "migrate:1"}],
            **spec,
        },
    }


async def test_without_a_port_the_operator_runs_without_a_webhook(kube, operator_runner, monkeypatch):
    # kopf refuses to start when admission handlers exist but no server is configured: port 0 must
    # still give it one (that serves nothing), or every operator without the webhook would crash.
    monkeypatch.delenv(webhook.ENV_PORT, raising=False)
    monkeypatch.setenv(webhook.ENV_INJECTION_CONFIG, "/nonexistent/injection.yaml")  # not even read
    async with operator_runner(*MODULES, namespaces=["default"]) as op:
        await op.wait_watching("credentialpools", "providerchains")
        await eventually(lambda: "sidecar injection webhook off" in op.log)
        op.raise_if_failed()


# kopf stops mid-start-up, before its authenticator task ran: a harmless warning from kopf itself.
@pytest.mark.filterwarnings("ignore:coroutine 'authenticator' was never awaited:RuntimeWarning")
async def test_invalid_injection_settings_stop_the_operator_naming_the_field(
    kube, operator_runner, webhook_env
):
    _, settings_file = webhook_env
    settings_file.write_text(f"image: {IMAGE}\nmode: sidecar\n")
    run = operator_runner(*MODULES, namespaces=["default"], reraise=False)
    async with run:
        await eventually(lambda: not run.running, timeout=10)
    assert run.exit_code not in (None, 0) or run.exception is not None
    assert f"{settings_file}: injection settings: mode:" in run.log


def test_configure_webhook_checks_its_files_up_front(cert_dir: Path, tmp_path: Path) -> None:
    settings = kopf.OperatorSettings()
    good = tmp_path / "injection.yaml"
    good.write_text(f"image: {IMAGE}\nmissingChain: Inject\n")
    injection = webhook.configure_webhook(settings, 9443, str(cert_dir), str(good))
    assert injection is not None and injection.missing_chain is core.MissingChain.INJECT
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert (server.addr, server.port, server.insecure) == ("0.0.0.0", 9443, False)
    webhook.configure_webhook(settings, 9443, str(cert_dir), str(good), address="::1")
    assert isinstance(settings.admission.server, kopf.WebhookServer)
    assert settings.admission.server.addr == "::1"
    assert (server.certfile, server.pkeyfile) == (str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"))
    assert settings.admission.managed is None  # the chart owns the MutatingWebhookConfiguration

    with pytest.raises(kopf.PermanentError, match=r"cannot read the injection settings .*nothing\.yaml"):
        webhook.configure_webhook(settings, 9443, str(cert_dir), str(tmp_path / "nothing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: x\nproxyPort: 0\n")
    with pytest.raises(kopf.PermanentError, match="proxyPort"):
        webhook.configure_webhook(settings, 9443, str(cert_dir), str(bad))
    with pytest.raises(kopf.PermanentError, match=r"tls\.crt not found.*--webhook-port 0"):
        webhook.configure_webhook(settings, 9443, str(tmp_path), str(good))

    # Port 0: no listening server, but still one for kopf (which refuses admission handlers without).
    assert webhook.configure_webhook(settings, 0, "/nowhere", "/nowhere") is None
    assert settings.admission.server is not None and not isinstance(
        settings.admission.server, kopf.WebhookServer
    )


def test_options_come_from_the_environment_and_the_flags_win() -> None:
    assert webhook.WebhookOptions.from_env({}) == webhook.WebhookOptions(
        port=0,
        cert_dir="/etc/keyroute/webhook-tls",
        injection_config="/etc/keyroute/injection/injection.yaml",
    )
    env = {webhook.ENV_PORT: "9443", webhook.ENV_CERT_DIR: "/tls"}
    webhook.export_options(port=8443, cert_dir=None, injection_config="/i.yaml", environ=env)
    assert webhook.WebhookOptions.from_env(env) == webhook.WebhookOptions(8443, "/tls", "/i.yaml")
    webhook.export_options(address="127.0.0.1", environ=env)
    assert webhook.WebhookOptions.from_env(env).address == "127.0.0.1"
    for raw in ("https", "-1", "65536"):
        with pytest.raises(ValueError, match=webhook.ENV_PORT):
            webhook.WebhookOptions.from_env({webhook.ENV_PORT: raw})


def test_the_cli_passes_its_webhook_flags() -> None:
    from keyroute.cli import build_parser

    args = build_parser().parse_args(["operator"])
    assert (args.webhook_port, args.webhook_cert_dir, args.injection_config) == (None, None, None)
    args = build_parser().parse_args(
        ["operator", "--webhook-port", "9443", "--webhook-cert-dir", "/tls", "--injection-config", "/i.yaml"]
    )
    assert (args.webhook_port, args.webhook_cert_dir, args.injection_config) == (9443, "/tls", "/i.yaml")


def test_the_request_namespace_fills_an_empty_pod_namespace() -> None:
    review = {
        "request": {"namespace": "team-a", "object": {"metadata": {"generateName": "a-"}}, "oldObject": None}
    }
    webhook.fill_namespace(review)
    assert review["request"]["object"]["metadata"] == {"generateName": "a-", "namespace": "team-a"}
    own = {"request": {"namespace": "team-a", "object": {"metadata": {"namespace": "team-b"}}}}
    webhook.fill_namespace(own)
    assert own["request"]["object"]["metadata"]["namespace"] == "team-b"
