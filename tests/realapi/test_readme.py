"""The README's install commands, run as written against the real API server, so the README can't drift.

The ``kubectl`` and ``helm`` lines of the README's "Install in a cluster" section are extracted and run
by ``bash`` from the repository root, with these substitutions only:

- the agents' namespace ``agents`` becomes the test's namespace (``-n agents``, ``agents:default``);
- ``helm install`` gets ``--set injection.mode=container``: this API server is Kubernetes 1.28, and
  the README says to add exactly that there;
- ``kubectl rollout status`` is not run: there is no kubelet, the operator's pod never starts. In its
  place ``keyroute operator`` runs as a process with the installed chart's own ServiceAccount (a
  TokenRequest token), its own args, its injection settings from the installed ConfigMap, and the
  installed webhook configuration pointed at it (``clientConfig.url``: a Service cannot reach
  127.0.0.1) with a certificate of the test's;
- the user's own things the README assumes exist: the namespace and a Deployment ``my-agent``; the
  keys (``$OPENAI_KEY_1``, …) are fake values in the environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from keyroute.core import inject as core
from tests.polling import eventually
from tests.realapi.chart import ROOT, ChartRbac, Helm, WebhookTls, run_operator, stop, wait_serving
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane, free_port
from tests.realapi.objects import API, cond
from tests.realapi.processes import Processes

README = ROOT / "README.md"
EXAMPLE_POOLS = ("openai", "openrouter", "anthropic")  # examples/pools.yaml
KEY_VARIABLES = (
    "OPENAI_KEY_1",
    "OPENAI_KEY_2",
    "OPENAI_KEY_3",
    "OPENROUTER_KEY_1",
    "OPENROUTER_KEY_2",
    "ANTHROPIC_KEY_1",
)


def readme_commands(heading: str = "## Install in a cluster") -> list[str]:
    """Every ``kubectl``/``helm`` command of a README section, continuation lines joined."""
    section = README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.strip())
            if line.startswith(("kubectl ", "helm ")):
                commands.append(line)
    return commands


def substitute(command: str, namespace: str) -> str | None:
    """The command as this test runs it (see the module docstring); ``None``: not run here."""
    if " rollout status " in command:
        return None
    command = command.replace("-n agents ", f"-n {namespace} ").replace(
        "--serviceaccount=agents:", f"--serviceaccount={namespace}:"
    )
    if command.startswith("helm install "):
        command += " --set injection.mode=container"
    return command


def test_the_readme_commands_are_the_ones_this_test_knows() -> None:
    """If the README's install section changes shape, this test (and the next) must be looked at."""
    commands = readme_commands()
    verbs = [" ".join(c.split()[:2]) if c.startswith("helm") else c.split()[3] for c in commands]
    assert verbs == [
        "helm install", "rollout", "create", "create", "create", "apply", "create", "patch", "get", "describe",
    ], commands  # fmt: skip
    assert any("apply -f examples/pools.yaml -f examples/chain.yaml" in c for c in commands)


@pytest.mark.timeout(240)
async def test_the_readme_install_commands_work_verbatim(
    control_plane: ControlPlane,
    api: Api,
    helm: Helm,
    namespace: str,
    keyroute_process: Processes,
    tmp_path: Path,
) -> None:
    env = {
        **{k: v for k, v in helm.env.items()},
        "PATH": f"{helm.binary.parent}{os.pathsep}{os.environ['PATH']}",
        **{name: f"sk-test-README-{name}-0000" for name in KEY_VARIABLES},
    }
    # The user's agent, unlabelled, as it runs before keyroute.
    control_plane.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "my-agent"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "my-agent"}},
                "template": {
                    "metadata": {"labels": {"app": "my-agent"}},
                    "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}]},
                },
            },
        },
        namespace=namespace,
    )
    commands = [c for c in (substitute(c, namespace) for c in readme_commands()) if c]
    operator = None
    outputs: dict[str, str] = {}
    try:
        for command in commands:
            if command.startswith("kubectl") and operator is None:
                operator = start_installed_operator(control_plane, keyroute_process, tmp_path)
            result = run_line(command, env)
            assert result.returncode == 0, f"README command failed: {command}\n{result.stderr}"
            outputs[command] = result.stdout

        # The operator made everything Ready; the README's `kubectl get` line shows it.
        await eventually(lambda: _examples_ready(api, namespace), timeout=30)
        get = next(c for c in commands if " get cpool,pchain" in c)
        table = run_line(get, env)
        for name in (*EXAMPLE_POOLS, "agents"):
            assert re.search(rf"\b{name}\b.*\bTrue\b", table.stdout), table.stdout

        # The label patch rolled the Deployment: its new pods got the sidecar from the installed webhook.
        async def injected() -> list[dict]:
            pods = await api.list("v1", "pods", namespace, labelSelector="keyroute.dev/chain=agents")
            return [p for p in pods if any(c["name"] == core.SIDECAR_NAME for c in p["spec"]["containers"])]

        pods = await eventually(injected, timeout=30)
        assert pods[0]["spec"]["serviceAccountName"] == "default"  # the one the README's rolebinding binds
        assert operator is not None and "sk-test-README" not in operator.output
    finally:
        if operator is not None:
            stop(operator)
        helm.run("uninstall", "keyroute", "-n", "keyroute-system", "--wait", check=False)
        control_plane.kubectl("delete", "namespace", "keyroute-system", "--wait=false", check=False)


def run_line(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One README line, by bash, from the repository root (as a user pastes it)."""
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def start_installed_operator(control_plane: ControlPlane, processes: Processes, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Stand in for the installed Deployment's pod (see the module docstring)."""
    ns = "keyroute-system"
    deployment = json.loads(
        control_plane.kubectl("-n", ns, "get", "deployment", "keyroute", "-o", "json").stdout
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = list(container["args"])
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "operator.kubeconfig", user={"token": control_plane.create_token(ns, account)}
    )
    injection = json.loads(
        control_plane.kubectl("-n", ns, "get", "configmap", "keyroute-injection", "-o", "json").stdout
    )
    (tmp_path / "injection.yaml").write_text(injection["data"]["injection.yaml"])
    tls = WebhookTls.make(tmp_path / "tls")
    port = free_port()
    replace = {
        "--metrics-port": "0",
        "--health-port": "0",
        "--webhook-port": str(port),
        "--webhook-cert-dir": str(tls.cert_dir),
        "--injection-config": str(tmp_path / "injection.yaml"),
    }
    for flag, value in replace.items():
        args[args.index(flag) + 1] = value
    hook = json.loads(
        control_plane.kubectl("get", "mutatingwebhookconfiguration", "keyroute", "-o", "json").stdout
    )
    path = hook["webhooks"][0]["clientConfig"]["service"]["path"]
    patch = [
        {
            "op": "replace",
            "path": "/webhooks/0/clientConfig",
            "value": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": tls.ca_bundle},
        }
    ]
    # What the Deployment gives the pod through the downward API (the Lease's namespace and holder).
    env = {"POD_NAMESPACE": ns, "POD_NAME": "keyroute-readme-test"}
    process = processes.start(*args, kubeconfig=kubeconfig, name="installed-operator", env=env)
    wait_serving(port, tls.ca.cert)
    control_plane.kubectl(
        "patch", "mutatingwebhookconfiguration", "keyroute", "--type", "json", "-p", json.dumps(patch)
    )
    return process


async def _examples_ready(api: Api, namespace: str) -> bool:
    """The examples' chain and each of its pools say Ready=True. The chain alone is not enough for
    the pools' rows: each object's status is its own reconcile's write (controller/reconcile.py),
    and a chain renders from the pools' specs and Secrets, not from their status, so it can be
    Ready before a pool's status is written."""
    chain = await api.get(API, "providerchains", namespace, "agents")
    pools = [await api.get(API, "credentialpools", namespace, name) for name in EXAMPLE_POOLS]
    return all(cond(obj, "Ready").get("status") == "True" for obj in (chain, *pools))


async def test_the_readme_operator_section_commands_work_verbatim(
    control_plane: ControlPlane,
    api: Api,
    namespace: str,
    chart_rbac: ChartRbac,
    keyroute_process: Processes,
    tmp_path: Path,
) -> None:
    """The "The operator" section's kubectl lines, unchanged, with the test namespace as the
    kubeconfig context's namespace (where they land for a user too); the operator is run as the
    chart's ServiceAccount (its ``keyroute operator`` line is the Deployment's command)."""
    commands = readme_commands("## The operator")
    assert [c.split("#")[0].strip() for c in commands] == [
        "kubectl apply -f crds/ && kubectl wait --for=condition=Established -f crds/",
        "kubectl apply -f examples/",
        "kubectl get cpool",
        "kubectl get pchain",
        "kubectl get cpool,pchain -o wide",
        "kubectl describe cpool openai",
    ]
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "user.kubeconfig", namespace=namespace)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with run_operator(chart_rbac, keyroute_process):
        outputs = []
        for command in commands:
            result = run_line(command, env)
            assert result.returncode == 0, f"README command failed: {command}\n{result.stderr}"
            outputs.append(result.stdout)
        await eventually(lambda: _examples_ready(api, namespace), timeout=30)
        pools = run_line(commands[2], env).stdout
        chains = run_line(commands[3], env).stdout
    for name in EXAMPLE_POOLS:
        assert re.search(rf"^{name}\s.*\bTrue\b", pools, re.M), pools
    assert re.search(r"^agents\s.*\bTrue\b", chains, re.M), chains
    assert "openai-1" in outputs[5]  # describe: the per-credential rows
