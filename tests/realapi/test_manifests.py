"""Bad manifests rejected by the API server itself, with the message ``kubectl apply`` shows the user.

The CRDs are generated from the same models the operator validates with (``keyroute.crdgen``): their
OpenAPI schemas (enums, patterns, list-map keys, no unknown fields) and CEL rules are enforced here by
the real API server, before any operator sees the object. No operator runs in this module.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from keyroute.core.names import CHAIN_NAME_MESSAGE, POOL_NAME_MESSAGE
from tests.realapi.client import Api, ApiStatusError
from tests.realapi.controlplane import ControlPlane
from tests.realapi.objects import API, chain, pool

OPENAI = ("openai", "openai", "https://api.openai.com/v1", "openai")


def with_spec(obj: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**obj, "spec": {**obj["spec"], **spec}}


def entry(**fields: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "baseURL": "https://api.openai.com/v1",
        "credentialPoolRef": {"name": "openai"},
    } | fields


CASES = [
    pytest.param(
        pool("bad", "openai", ("k", "s", "k"), strategy="Fastest"),
        ['spec.strategy: Unsupported value: "Fastest"', '"FillFirst"', '"RoundRobin"'],
        id="unknown-strategy",
    ),
    pytest.param(
        pool("bad", "openai", ("k", "s", "a"), ("k", "s", "b")),
        ['spec.credentials[1]: Duplicate value: map[string]interface {}{"name":"k"}'],
        id="duplicate-credential-names",
    ),
    pytest.param(
        pool("bad", "openai", ("k", "s", "k"), cooldowns={"rateLimited": "1 minute"}),
        ["spec.cooldowns.rateLimited in body should match"],
        id="duration-in-words",
    ),
    pytest.param(
        chain("bad", OPENAI, OPENAI),
        ["provider entry names must be unique"],
        id="duplicate-entries",
    ),
    pytest.param(
        with_spec(chain("bad", OPENAI), providers=[]),
        ["at least one provider entry is required"],
        id="no-entries",
    ),
    pytest.param(
        with_spec(
            chain("bad", OPENAI),
            providers=[entry(credentialPoolRef={"name": "openai", "namespace": "elsewhere"})],
        ),
        ['unknown field "spec.providers[0].credentialPoolRef.namespace"'],
        id="pool-in-another-namespace",
    ),
    pytest.param(
        with_spec(chain("bad", OPENAI), providers=[entry(baseURL="api.openai.com/v1")]),
        ["spec.providers[0].baseURL in body should match"],
        id="base-url-without-scheme",
    ),
    pytest.param(
        with_spec(chain("bad", OPENAI), fallback={"contextLength": ["anthropic"]}),
        ["fallback.contextLength must name entries of spec.providers"],
        id="context-length-names-no-entry",
    ),
]


@pytest.mark.parametrize(("manifest", "messages"), CASES)
def test_kubectl_apply_of_a_bad_manifest_is_refused_with_a_message_naming_the_field(
    control_plane: ControlPlane, namespace: str, manifest: dict[str, Any], messages: list[str]
) -> None:
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0, result.stdout
    for message in messages:
        assert message in result.stderr, result.stderr
    plural = "credentialpools" if manifest["kind"] == "CredentialPool" else "providerchains"
    status, _ = control_plane.request("GET", f"/apis/{API}/namespaces/{namespace}/{plural}/bad")
    assert status == 404  # nothing was stored


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        pytest.param(chain("agents-" + "x" * 57, OPENAI), CHAIN_NAME_MESSAGE, id="chain-64-characters"),
        pytest.param(chain("agents.v1", OPENAI), CHAIN_NAME_MESSAGE, id="chain-dotted"),
        pytest.param(pool("p" * 64, "openai", ("k", "s", "k")), POOL_NAME_MESSAGE, id="pool-64-characters"),
    ],
)
async def test_a_name_that_cannot_work_is_refused_when_applied_with_the_reason(
    control_plane: ControlPlane, api: Api, namespace: str, manifest: dict[str, Any], message: str
) -> None:
    """The API server alone accepts any DNS subdomain (253 characters, dots) for a custom resource;
    the CRDs' root rules refuse what keyroute could never use (keyroute.core.names)."""
    name = manifest["metadata"]["name"]
    result = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert result.returncode != 0, result.stdout
    assert f'"{name}" is invalid' in result.stderr and message in result.stderr, result.stderr
    # Created through the API, as a GitOps tool or a client library does: the same 422.
    with pytest.raises(ApiStatusError) as caught:
        await api.create(manifest, namespace)
    assert caught.value.status == 422 and message in str(caught.value)
    plural = "credentialpools" if manifest["kind"] == "CredentialPool" else "providerchains"
    assert await api.get(API, plural, namespace, name) is None  # nothing was stored
