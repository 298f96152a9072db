"""The fixture itself: a real API server, not something that merely answers like one.

Each test here would pass on nothing less: RBAC refusing a ServiceAccount, the CRD's own schema
refusing a bad pool with the message a user sees, garbage collection removing an owned object.
"""

from __future__ import annotations

import pytest

from tests.polling import eventually
from tests.realapi.client import Api, ApiStatusError
from tests.realapi.controlplane import ControlPlane

API = "keyroute.dev/v1alpha1"


def test_rbac_is_the_api_servers_own(control_plane: ControlPlane, namespace: str, tmp_path) -> None:
    token = control_plane.create_token(namespace, "default")
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "sa.kubeconfig", user={"token": token})
    whoami = control_plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kubeconfig)
    assert whoami.stdout == f"system:serviceaccount:{namespace}:default"
    denied = control_plane.kubectl("get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


async def test_the_crd_schema_rejects_a_bad_pool_with_the_servers_message(api: Api, namespace: str) -> None:
    bad = {
        "apiVersion": API,
        "kind": "CredentialPool",
        "metadata": {"name": "bad"},
        "spec": {"provider": "openai", "strategy": "Sometimes", "credentials": []},
    }
    with pytest.raises(ApiStatusError) as caught:
        await api.create(bad, namespace)
    assert caught.value.status == 422
    assert "spec.strategy" in str(caught.value)


async def test_garbage_collection_removes_what_an_object_owns(api: Api, namespace: str) -> None:
    owner = await api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}, "data": {}}, namespace
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    await api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owned", "ownerReferences": [ref]}},
        namespace,
    )
    await api.delete("v1", "configmaps", namespace, "owner")

    async def owned_gone() -> bool:
        return await api.get("v1", "configmaps", namespace, "owned") is None

    await eventually(owned_gone, timeout=15)


async def test_the_operator_runs_as_a_process_and_reconciles(
    control_plane: ControlPlane, api: Api, namespace: str, keyroute_process
) -> None:
    """The smoke test of the tier: `keyroute operator` as a user runs it, on the examples."""
    control_plane.kubectl("apply", "-n", namespace, "-f", "examples/")
    op = keyroute_process.start(
        "operator", "-n", namespace, "--metrics-port", "0", "--health-port", "0",
        kubeconfig=control_plane.admin_token_kubeconfig, name="operator",
    )  # fmt: skip

    async def ready() -> bool:
        pool = await api.get(API, "credentialpools", namespace, "openai")
        conditions = {c["type"]: c["status"] for c in ((pool or {}).get("status") or {}).get("conditions", [])}
        return conditions.get("Ready") == "True"

    await eventually(ready, timeout=30)
    assert await eventually(lambda: api.get("v1", "secrets", namespace, "agents-keyroute"), timeout=10)
    took = await op.terminate()
    assert op.returncode == 0, op.output[-3000:]
    assert "REPLACE-ME" not in op.output
    print(f"operator stopped in {took:.2f}s")
