"""Every kubeconfig users have, against the real API server (issue 9).

``keyroute operator`` runs as a process with each form of credentials and must reconcile a pool to
Ready: a client certificate inline (what kind, minikube and kubeadm write: issue 9's bug 1) and as
files, a bearer token, a token file, an exec credential plugin (as EKS, GKE and AKS use) and one
whose tokens expire within seconds and are revoked by the server afterwards, so only an operator
that fetched new ones keeps working. The in-cluster form is the code pointed at a fake
ServiceAccount folder and the test server's address, with a real TokenRequest token. The sidecar
reports through a kubeconfig with an exec plugin. Bad kubeconfigs stop both with a message naming
the problem, and no token or key is ever printed.

Tokens come from TokenRequest for a ServiceAccount bound (in its namespace only) to ``cluster-admin``:
a token the server did not issue, or revoked, is refused (401) for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import keyroute.controller.login as login
from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.kube import Credentials, Kube, KubeconfigError
from tests.polling import eventually
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane, free_port
from tests.realapi.processes import IN_POD, KeyrouteProcess, Processes

API = "keyroute.dev/v1alpha1"
KEY = "sk-test-REPLACE-ME-auth-key"
OPERATOR_FLAGS = ("--metrics-port", "0", "--health-port", "0", "--leader-elect=false")


# --- helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def service_account(control_plane: ControlPlane, namespace: str) -> Iterator[Callable[[str], None]]:
    """Makes ServiceAccounts of ``namespace`` bound to ``cluster-admin`` (kopf lists namespaces and
    CRDs cluster-wide); the bindings go at teardown."""
    made: list[str] = []

    def make(name: str = "operator") -> None:
        control_plane.kubectl("create", "serviceaccount", name, "-n", namespace)
        binding = f"{namespace}-{name}"
        control_plane.kubectl(
            "create", "clusterrolebinding", binding, "--clusterrole=cluster-admin",
            f"--serviceaccount={namespace}:{name}",
        )  # fmt: skip
        made.append(binding)

    yield make
    for binding in made:
        control_plane.kubectl("delete", "clusterrolebinding", binding, check=False)


def bound_token(cp: ControlPlane, namespace: str, secret: str, sa: str = "operator", seconds: int = 3600) -> str:
    """A TokenRequest token bound to a Secret: deleting the Secret revokes the token (401 from then on)."""
    status, body = cp.request(
        "POST", f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}},
    )  # fmt: skip
    assert status == 201, body
    status, token = cp.request(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": secret, "uid": body["metadata"]["uid"]},
        }},
    )  # fmt: skip
    assert status == 201, token
    return str(token["status"]["token"])


def token_works(cp: ControlPlane, token: str) -> bool:
    """Whether the server accepts ``token`` (no client certificate: the token alone)."""
    req = urllib.request.Request(cp.server + "/api", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=cp.ssl_context(admin=False), timeout=5) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code
        return False


# An exec credential plugin: hands out the tokens listed in tokens.json, the n-th call the n-th token
# (the last one from then on), each valid for LIFETIME seconds; every call is a line in calls.log.
PLUGIN = """
import datetime, json, os, pathlib, sys
here = pathlib.Path(__file__).parent
tokens = json.loads((here / "tokens.json").read_text())
calls = here / "calls.log"
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as f:
    f.write(f"{datetime.datetime.now().isoformat()} {sys.argv[1:]}\\n")
expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=int(os.environ["LIFETIME"]))
json.dump({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
           "status": {"token": tokens[min(n, len(tokens) - 1)],
                      "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}, sys.stdout)
"""


def write_plugin(folder: Path, tokens: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokens.json").write_text(json.dumps(tokens))
    script = folder / "get-token"
    script.write_text(f"#!{sys.executable}\n{PLUGIN}")
    script.chmod(0o755)
    return script


def exec_user(script: Path, lifetime: int = 900) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(script),
            "args": ["eks", "get-token", "--cluster-name", "envtest"],
            "env": [{"name": "LIFETIME", "value": str(lifetime)}],
            "interactiveMode": "Never",
        }
    }


def plugin_calls(folder: Path) -> int:
    log = folder / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def pool(name: str, secret: str = "keys") -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "CredentialPool",
        "metadata": {"name": name},
        "spec": {
            "provider": "openai",
            "strategy": "FillFirst",
            "credentials": [{"name": f"{name}-1", "secretRef": {"name": secret, "key": "k1"}}],
        },
    }


async def create_pool(api: Api, namespace: str, name: str = "openai") -> None:
    if await api.get("v1", "secrets", namespace, "keys") is None:
        await api.create(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"}, "stringData": {"k1": KEY}},
            namespace,
        )
    await api.create(pool(name), namespace)


async def wait_ready(api: Api, namespace: str, name: str, op: KeyrouteProcess, timeout: float = 30) -> None:  # noqa: ASYNC109
    async def ready() -> bool:
        if not op.running:
            raise AssertionError(f"the operator exited ({op.returncode}):\n{op.output[-3000:]}")
        body = await api.get(API, "credentialpools", namespace, name)
        conditions = {c["type"]: c["status"] for c in ((body or {}).get("status") or {}).get("conditions", [])}
        return conditions.get("Ready") == "True"

    await eventually(ready, timeout=timeout, interval=0.2)


async def operator_reconciles(
    procs: Processes, api: Api, namespace: str, *, kubeconfig: Path, secrets: list[str], flag: bool = False
) -> KeyrouteProcess:
    """Start the operator with ``kubeconfig`` (``--kubeconfig`` if ``flag``, else ``$KUBECONFIG``),
    wait for a pool to be Ready, stop it: it exits 0 and printed none of ``secrets``."""
    await create_pool(api, namespace)
    if flag:
        op = procs.start("operator", "-n", namespace, *OPERATOR_FLAGS, "--kubeconfig", str(kubeconfig), name="operator")
    else:
        op = procs.start("operator", "-n", namespace, *OPERATOR_FLAGS, kubeconfig=kubeconfig, name="operator")
    await wait_ready(api, namespace, "openai", op)
    await op.terminate()
    assert op.returncode == 0, op.output[-3000:]
    assert_clean(op.output, secrets)
    return op


def assert_clean(output: str, secrets: list[str]) -> None:
    """No credential, key or API key in a process's output (and kopf's errors did not happen)."""
    for secret in [*secrets, KEY, "PRIVATE KEY", "BEGIN CERTIFICATE"]:
        assert secret not in output, f"{secret[:12]}… leaked into the output"
    assert "PEM lib" not in output, output[-3000:]
    # A refused request, as keyroute's client or kopf would log it (not any "401" in a timestamp).
    assert not re.search(r"\b401\b(?!\d)(?<!\.401)|Unauthorized", output), output[-3000:]


async def wait_exit(p: KeyrouteProcess, timeout: float = 30) -> int:  # noqa: ASYNC109
    await eventually(lambda: not p.running, timeout=timeout, interval=0.1)
    assert p.returncode is not None
    return p.returncode


# --- the operator with each form ----------------------------------------------------------------------


async def test_operator_with_an_inline_client_certificate(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process
):
    """Issue 9, bug 1: kind's, minikube's and kubeadm's kubeconfig broke every reconcile (PEM lib)."""
    assert control_plane.admin is not None
    admin_key = control_plane.admin.key.decode()
    await operator_reconciles(
        keyroute_process, api, namespace, kubeconfig=control_plane.admin_kubeconfig, secrets=[admin_key], flag=True
    )


async def test_operator_with_client_certificate_files(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process, tmp_path: Path
):
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("admin.crt", "admin.key", "ca.crt"):
        shutil.copy(control_plane.pki / name, pki / name)
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user={"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"}
    )
    # Relative to the kubeconfig, as kubectl reads them; the CA from a file too.
    doc = kubeconfig.read_text().replace(
        f"certificate-authority-data: {kubeconfig.read_text().split('certificate-authority-data: ')[1].split()[0]}",
        "certificate-authority: pki/ca.crt",
    )
    kubeconfig.write_text(doc)
    await operator_reconciles(
        keyroute_process, api, namespace, kubeconfig=kubeconfig, secrets=[(pki / "admin.key").read_text()]
    )


async def test_operator_with_a_bearer_token(
    control_plane: ControlPlane, api: Api, namespace: str, service_account, keyroute_process, tmp_path: Path
):
    service_account()
    token = control_plane.create_token(namespace, "operator")
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kubeconfig", user={"token": token})
    await operator_reconciles(keyroute_process, api, namespace, kubeconfig=kubeconfig, secrets=[token])


async def test_operator_with_a_token_file(
    control_plane: ControlPlane, api: Api, namespace: str, service_account, keyroute_process, tmp_path: Path
):
    service_account()
    token = control_plane.create_token(namespace, "operator")
    (tmp_path / "token").write_text(token + "\n")  # with the newline most tools write
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kubeconfig", user={"tokenFile": "token"})
    await operator_reconciles(keyroute_process, api, namespace, kubeconfig=kubeconfig, secrets=[token], flag=True)


async def test_operator_with_an_exec_plugin(
    control_plane: ControlPlane, api: Api, namespace: str, service_account, keyroute_process, tmp_path: Path
):
    service_account()
    token = control_plane.create_token(namespace, "operator")
    script = write_plugin(tmp_path / "plugin", [token])
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kubeconfig", user=exec_user(script))
    await operator_reconciles(keyroute_process, api, namespace, kubeconfig=kubeconfig, secrets=[token])
    assert plugin_calls(tmp_path / "plugin") >= 1


async def test_operator_renews_expiring_exec_tokens_before_the_old_one_is_revoked(
    control_plane: ControlPlane, api: Api, namespace: str, service_account, keyroute_process, tmp_path: Path
):
    """Tokens that live 4 s; the first one is then revoked by the server: only an operator that ran
    the plugin again (kopf's login and keyroute's own client alike) reconciles the second pool."""
    service_account()
    tokens = [bound_token(control_plane, namespace, f"token-{i}") for i in range(3)]
    plugin = tmp_path / "plugin"
    script = write_plugin(plugin, tokens)
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kubeconfig", user=exec_user(script, lifetime=4))
    await create_pool(api, namespace, "first")
    # Debug logs: not even kopf's and the kubernetes client's own chatter may show a token.
    op = keyroute_process.start(
        "operator", "-n", namespace, *OPERATOR_FLAGS, "--log-level", "debug", kubeconfig=kubeconfig, name="operator"
    )
    await wait_ready(api, namespace, "first", op)

    await eventually(lambda: plugin_calls(plugin) >= 1)
    await api.delete("v1", "secrets", namespace, "token-0")  # the first token is revoked
    await eventually(lambda: not token_works(control_plane, tokens[0]), timeout=10)
    assert token_works(control_plane, tokens[1])

    await create_pool(api, namespace, "second")
    await wait_ready(api, namespace, "second", op)
    assert plugin_calls(plugin) >= 2, (plugin / "calls.log").read_text()
    assert "Kubernetes credentials renewed" in op.output
    await op.terminate()
    assert op.returncode == 0
    assert_clean(op.output.replace('"status": 401', ""), tokens)


# --- in a pod: the ServiceAccount --------------------------------------------------------------------


async def test_in_cluster_service_account(
    control_plane: ControlPlane, namespace: str, service_account, tmp_path: Path
):
    """What a pod has: KUBERNETES_SERVICE_HOST/PORT and a mounted token, CA and namespace."""
    service_account("agent")
    sa_dir = tmp_path / "serviceaccount"
    env = fake_service_account(control_plane, namespace, "agent", sa_dir)

    creds = Credentials.resolve(env=env, sa_dir=sa_dir, home_config=str(tmp_path / "none"))
    assert creds.describe == f"token file {sa_dir / 'token'}"
    kube = Kube(creds)
    try:
        review = await kube.create(
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
        assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:agent"
        assert creds.connection().namespace == namespace
        # What the operator's kopf gets from the same credentials, used the way kopf uses it.
        info = login.connection_info(creds.connection())
        async with aiohttp.ClientSession(headers=info.as_http_headers()) as session, session.get(
            f"{info.server}/api/v1/namespaces/{namespace}", ssl=info.as_ssl_context()
        ) as resp:
            assert resp.status == 200 and info.default_namespace == namespace
        # The kubelet rotates the projected token: the file is read again, here after a refusal.
        (sa_dir / "token").write_text("not-a-token")
        creds._loaded_at -= 60  # a minute later
        with pytest.raises(Exception, match="401"):
            await kube.get(f"/api/v1/namespaces/{namespace}")
        (sa_dir / "token").write_text(control_plane.create_token(namespace, "agent"))
        creds._loaded_at -= 60
        assert await kube.get(f"/api/v1/namespaces/{namespace}")
    finally:
        await kube.close()


def fake_service_account(cp: ControlPlane, namespace: str, sa: str, folder: Path) -> dict[str, str]:
    """A pod's ServiceAccount mount with a real TokenRequest token for ``sa``, and its environment."""
    return cp.service_account_mount(folder, cp.create_token(namespace, sa), namespace)


async def test_operator_in_a_pod_on_its_service_account_without_the_kubernetes_client(
    control_plane: ControlPlane, api: Api, namespace: str, service_account, keyroute_process, tmp_path: Path
):
    service_account()
    sa_dir = tmp_path / "serviceaccount"
    env = fake_service_account(control_plane, namespace, "operator", sa_dir)
    await create_pool(api, namespace)
    procs: Processes = keyroute_process
    env = {**{k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "HOME")}, **env, "PYTHONUNBUFFERED": "1"}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config to fall back on
    op = KeyrouteProcess(
        "operator",
        [sys.executable, "-c", IN_POD, str(sa_dir), "operator", "-n", namespace, *OPERATOR_FLAGS],
        env,
        tmp_path / "operator.log",
    )
    procs.started.append(op)
    op.start()
    await wait_ready(api, namespace, "openai", op)
    assert f'"source": "token file {sa_dir / "token"}"' in op.output
    await op.terminate()
    assert op.returncode == 0, op.output[-3000:]
    assert "kubernetes client imported: False" in op.output
    assert_clean(op.output, [(sa_dir / "token").read_text()])


# --- the sidecar --------------------------------------------------------------------------------------


async def test_sidecar_reports_through_an_exec_plugin_renewing_its_tokens(
    control_plane: ControlPlane, api: Api, namespace: str, service_account, keyroute_process, tmp_path: Path
):
    """The sidecar has no kopf: its own client renews. Tokens live 4 s; the one it started with is
    revoked before the sidecar has anything to report, so the 429's Event arrives only through a
    token it fetched again (the plugin ran twice)."""
    service_account("agent")
    tokens = [bound_token(control_plane, namespace, f"token-{i}", sa="agent") for i in range(2)]
    plugin = tmp_path / "plugin"
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user=exec_user(write_plugin(plugin, tokens), lifetime=4), namespace=namespace
    )
    async with FakeProvider("openai", keys=[KEY]) as provider:
        provider.set(Behaviour.rate_limited(retry_after="30"))
        manifests = tmp_path / "manifests.yaml"
        manifests.write_text(textwrap.dedent(f"""
            apiVersion: v1
            kind: Secret
            metadata: {{name: keys, namespace: {namespace}}}
            stringData: {{k1: {KEY}}}
            ---
            apiVersion: {API}
            kind: CredentialPool
            metadata: {{name: openai, namespace: {namespace}}}
            spec:
              provider: openai
              credentials: [{{name: openai-1, secretRef: {{name: keys, key: k1}}}}]
            ---
            apiVersion: {API}
            kind: ProviderChain
            metadata: {{name: agents, namespace: {namespace}}}
            spec:
              providers: [{{provider: openai, baseURL: "{provider.base_url}", credentialPoolRef: {{name: openai}}}}]
        """))
        port = free_port()
        sidecar = keyroute_process.start(
            "sidecar", "--manifests", str(manifests), "--listen", f"127.0.0.1:{port}", "--admin-listen", "off",
            "--report", "on", "--kubeconfig", str(kubeconfig), "--pod-name", "agent-0", name="sidecar",
        )  # fmt: skip
        await sidecar.wait_for("reporting recovery actions as Events")

        async def presence() -> bool:
            return any(e["reason"] == "SidecarReporting" for e in await api.events(namespace))

        await eventually(presence, timeout=15)  # reported with the first token
        await api.delete("v1", "secrets", namespace, "token-0")
        await eventually(lambda: not token_works(control_plane, tokens[0]), timeout=10)
        await asyncio.sleep(4)  # the first token's expiration passes (what a real plugin's token does)

        async with aiohttp.ClientSession() as client, client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            assert resp.status == 503  # its only key cooling down, the chain is exhausted

        async def rate_limited_reported() -> bool:
            return any(e["reason"] == "CredentialCoolingDown" for e in await api.events(namespace))

        await eventually(rate_limited_reported, timeout=15)
    assert plugin_calls(plugin) >= 2
    await sidecar.terminate()
    assert sidecar.returncode == 0, sidecar.output[-3000:]
    assert "refused a report" not in sidecar.output and "watch failed" not in sidecar.output, sidecar.output[-3000:]
    assert_clean(sidecar.output, tokens)


# --- bad kubeconfigs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["operator", "sidecar"])
async def test_bad_kubeconfigs_stop_with_the_problem_named(
    control_plane: ControlPlane, keyroute_process, tmp_path: Path, role: str
):
    secret = "SECRET-token-of-the-failing-plugin"
    failing = tmp_path / "aws"
    failing.write_text(
        f"#!{sys.executable}\nimport sys\nprint('error: the SSO session has expired', file=sys.stderr)\nsys.exit(1)\n"
    )
    failing.chmod(0o755)
    good = control_plane.write_kubeconfig(tmp_path / "good", user={"token": secret})
    cases = [
        (["--kubeconfig", str(tmp_path / "missing")], "no such file"),
        (["--kubeconfig", str(good), "--context", "prod"], "no context named 'prod'"),
        (
            ["--kubeconfig", str(control_plane.write_kubeconfig(
                tmp_path / "exec", user={**exec_user(failing), "token-not-used": secret}))],
            "the exec credential plugin 'aws' failed: exec: process returned 1. error: the SSO session has expired",
        ),
    ]  # fmt: skip
    for args, message in cases:
        if role == "operator":
            p = keyroute_process.start("operator", *OPERATOR_FLAGS, *args, name="operator")
        else:
            p = keyroute_process.start(
                "sidecar", "--manifests", "examples/", "--admin-listen", "off", "--listen", "127.0.0.1:0",
                *args, name="sidecar",
            )  # fmt: skip
        assert await wait_exit(p) == 2, p.output[-2000:]
        assert message in p.output, p.output[-2000:]
        assert secret not in p.output and "Traceback" not in p.output


def test_credential_errors_are_value_errors() -> None:
    """The sidecar's CLI reports any ValueError from its reporting set-up as 'misconfigured', exit 2."""
    assert issubclass(KubeconfigError, ValueError)

