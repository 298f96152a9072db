"""The webhook's ProviderChain lookup failing in ways an API error does not cover (issue 9, bug 1).

The README promises: when the chain cannot be looked up, a labelled pod is injected with a warning
rather than blocked. With a kind kubeconfig the lookup's client could not even be built
(``ssl.SSLError: PEM lib``) and every labelled pod was refused with that exception. Here the real
handler runs with credentials that cannot make a TLS context, and against a port where nothing
listens; the missing-chain policy is ``Reject``, so only the "unknown" path can inject.
"""

from __future__ import annotations

import socket
from typing import Any

import kopf
import pytest

import keyroute.controller.login as login
import keyroute.controller.webhook as webhook
from keyroute.core.inject import CHAIN_LABEL, InjectionSettings, MissingChain

SECRET = "SECRET-not-a-pem-key-do-not-leak"


@pytest.fixture
async def logged_in(monkeypatch: pytest.MonkeyPatch):
    """Log the webhook in with ``info`` (as kopf's login handler would) and configure injection."""

    def use(info: kopf.ConnectionInfo) -> None:
        monkeypatch.setattr(login, "OVERRIDE", info)
        monkeypatch.setattr(login, "CURRENT", [info])

    monkeypatch.setitem(
        webhook.STATE, "injection", InjectionSettings(image="keyroute:test", missing_chain=MissingChain.REJECT)
    )
    monkeypatch.delitem(webhook.STATE, "kube", raising=False)
    yield use
    await webhook.cleanup()  # closes the client the lookup made


async def admit(namespace: str = "agents") -> tuple[kopf.Patch, list[str]]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent", "namespace": namespace, "labels": {CHAIN_LABEL: "agents"}},
        "spec": {"containers": [{"name": "app", "image": "agent:1"}]},
    }
    patch, warnings = kopf.Patch(), []
    await webhook.inject_sidecar(
        body=kopf.Body(pod),
        patch=patch,
        labels=pod["metadata"]["labels"],
        namespace=namespace,
        warnings=warnings,
        dryrun=False,
        operation="CREATE",
    )
    return patch, warnings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_credentials_that_cannot_make_a_client_inject_with_a_warning(logged_in, caplog):
    logged_in(
        kopf.ConnectionInfo(
            server="https://127.0.0.1:1", certificate_data=SECRET, private_key_data=SECRET
        )
    )
    patch, warnings = await admit()
    assert patch.spec["containers"] or patch.spec["initContainers"]  # injected
    assert len(warnings) == 1 and "could not check that ProviderChain" in warnings[0]
    assert "KubeconfigError" in warnings[0]  # the kind of failure, not its material
    assert SECRET not in warnings[0] and SECRET not in caplog.text


async def test_an_unreachable_api_server_injects_with_a_warning(logged_in):
    logged_in(kopf.ConnectionInfo(server=f"http://127.0.0.1:{closed_port()}", token=SECRET))
    patch, warnings = await admit()
    assert patch.spec
    assert len(warnings) == 1 and "ClientConnectorError" in warnings[0]
    assert SECRET not in warnings[0]
