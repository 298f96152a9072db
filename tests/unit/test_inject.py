"""Sidecar injection, the pure part: what a labelled pod becomes, checked against the real Pod schema."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from keyroute.core import inject as core
from keyroute.core.inject import (
    InjectionError,
    InjectionSettings,
    MissingChain,
    Mode,
    SettingsError,
    decide,
    inject,
    load_settings,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")

IMAGE = "ghcr.io/example/keyroute:0.1.0"
NATIVE = InjectionSettings(image=IMAGE)
CONTAINER = InjectionSettings(image=IMAGE, mode=Mode.CONTAINER)


def pod(*containers: dict[str, Any], init: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "agent-", "labels": {core.CHAIN_LABEL: "agents"}},
        "spec": {"containers": list(containers) or [{"name": "agent", "image": "agent:1"}], **spec},
    }
    if init is not None:
        body["spec"]["initContainers"] = init
    return body


def injected(
    p: dict[str, Any], settings: InjectionSettings = NATIVE, chain: str = "agents"
) -> dict[str, Any]:
    return inject(p, chain, settings).apply(p)


def sidecar_of(p: dict[str, Any]) -> dict[str, Any]:
    spec = p["spec"]
    found = [
        c
        for key in ("initContainers", "containers")
        for c in spec.get(key) or []
        if c["name"] == core.SIDECAR_NAME
    ]
    assert len(found) == 1, found
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def assert_valid_pod(p: dict[str, Any]) -> None:
    # The real OpenAPI schemas of the API server: 1.29 is the first with native sidecars on by default.
    for version in ("1.29.0", "1.37.0"):
        kubernetes_validate.validate(
            copy.deepcopy({**p, "metadata": {**p["metadata"], "name": "agent-x"}}), version, strict=True
        )


# --- native and container mode --------------------------------------------------------------------


def test_native_mode_adds_a_restartable_init_container_first() -> None:
    before = pod(init=[{"name": "migrate", "image": "migrate:1"}])
    after = injected(before)
    inits = after["spec"]["initContainers"]
    # First, so later init containers (and the app) find the proxy already up.
    assert [c["name"] for c in inits] == [core.SIDECAR_NAME, "migrate"]
    assert inits[0]["restartPolicy"] == "Always"
    assert "restartPolicy" not in inits[1]
    assert [c["name"] for c in after["spec"]["containers"]] == ["agent"]
    assert after["metadata"]["annotations"] == {core.INJECTED_ANNOTATION: "agents"}
    assert before == pod(init=[{"name": "migrate", "image": "migrate:1"}])  # the input is not modified
    assert_valid_pod(after)


def test_container_mode_appends_an_ordinary_container() -> None:
    after = injected(pod(init=[{"name": "migrate", "image": "migrate:1"}]), CONTAINER)
    assert [c["name"] for c in after["spec"]["containers"]] == ["agent", core.SIDECAR_NAME]
    assert [c["name"] for c in after["spec"]["initContainers"]] == ["migrate"]
    assert "restartPolicy" not in sidecar_of(after)
    # The sidecar itself does not get the app's environment.
    assert "OPENAI_BASE_URL" not in env_of(sidecar_of(after))
    assert_valid_pod(after)


def test_sidecar_container_shape() -> None:
    settings = InjectionSettings(
        image=IMAGE, proxyPort=9000, adminPort=9001, logLevel="debug", imagePullPolicy="Always"
    )
    sidecar = sidecar_of(injected(pod(), settings))
    assert sidecar["image"] == IMAGE and sidecar["imagePullPolicy"] == "Always"
    assert sidecar["args"] == [
        "sidecar", "--config", "/etc/keyroute/config", "--listen", "127.0.0.1:9000",
        "--admin-listen", "0.0.0.0:9001", "--log-level", "debug",
    ]  # fmt: skip
    assert env_of(sidecar) == {
        "POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        "POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }
    assert sidecar["ports"] == [{"name": "kr-admin", "containerPort": 9001, "protocol": "TCP"}]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9001}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9001}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9001}
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }


def test_sidecar_security_context_is_restricted() -> None:
    ctx = sidecar_of(injected(pod()))["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] != 0
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}


def test_config_secret_is_mounted_as_a_directory_never_subpath() -> None:
    after = injected(pod(volumes=[{"name": "data", "emptyDir": {}}]), chain="team-a")
    assert after["spec"]["volumes"] == [
        {"name": "data", "emptyDir": {}},
        {
            "name": "keyroute-config",
            "secret": {"secretName": "team-a-keyroute", "optional": False, "defaultMode": 0o444},
        },
    ]
    assert sidecar_of(after)["volumeMounts"] == [
        {"name": "keyroute-config", "mountPath": "/etc/keyroute/config", "readOnly": True}
    ]
    assert "subPath" not in json.dumps(after)  # not subPath, not subPathExpr: rotation must reach the file
    # Key material stays in the sidecar: no app container mounts the config.
    assert all("volumeMounts" not in c for c in after["spec"]["containers"])


# --- idempotence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [NATIVE, CONTAINER], ids=["native", "container"])
def test_injecting_twice_is_injecting_once(settings: InjectionSettings) -> None:
    once = injected(pod(init=[{"name": "migrate", "image": "migrate:1"}]), settings)
    again = inject(once, "agents", settings)
    assert not again and again.spec == {} and again.annotations == {}
    assert again.apply(once) == once


def test_a_pod_with_the_sidecar_in_either_place_is_left_alone() -> None:
    # Injected in native mode, then the settings changed to container mode: still not injected twice.
    native = injected(pod())
    assert not inject(native, "agents", CONTAINER)
    assert not inject(native, "other-chain", NATIVE)


def test_a_pod_volume_named_like_the_config_volume_is_refused() -> None:
    with pytest.raises(InjectionError, match="keyroute-config"):
        inject(pod(volumes=[{"name": "keyroute-config", "emptyDir": {}}]), "agents", NATIVE)


# --- the app containers' environment ---------------------------------------------------------------


def test_every_app_container_is_pointed_at_the_sidecar_unless_it_says_otherwise() -> None:
    custom = {"name": "OPENAI_BASE_URL", "value": "https://proxy.internal/v1"}
    from_secret = {"name": "ANTHROPIC_BASE_URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    before = pod(
        {"name": "agent", "image": "agent:1", "env": [custom]},
        {
            "name": "helper",
            "image": "helper:1",
            "env": [from_secret],
            "envFrom": [{"secretRef": {"name": "x"}}],
        },
        {"name": "plain", "image": "plain:1"},
        init=[{"name": "migrate", "image": "migrate:1"}],
    )
    after = injected(before, InjectionSettings(image=IMAGE, proxyPort=8500))
    agent, helper, plain = after["spec"]["containers"]
    assert env_of(agent) == {
        "OPENAI_BASE_URL": "https://proxy.internal/v1",  # the user's own value wins
        "OPENAI_API_BASE": "http://127.0.0.1:8500/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8500",
    }
    assert env_of(helper) == {
        "ANTHROPIC_BASE_URL": from_secret["valueFrom"],  # checked per name, per container
        "OPENAI_BASE_URL": "http://127.0.0.1:8500/v1",
        "OPENAI_API_BASE": "http://127.0.0.1:8500/v1",
    }
    assert helper["envFrom"] == [{"secretRef": {"name": "x"}}]
    assert env_of(plain) == {
        "OPENAI_BASE_URL": "http://127.0.0.1:8500/v1",
        "OPENAI_API_BASE": "http://127.0.0.1:8500/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8500",
    }
    # Init containers run before (or beside) the proxy and are not agents: left alone.
    migrate = next(c for c in after["spec"]["initContainers"] if c["name"] == "migrate")
    assert "env" not in migrate
    assert agent["env"][0]["name"] == "OPENAI_BASE_URL"  # existing entries keep their order
    assert_valid_pod(after)


# --- reporting -------------------------------------------------------------------------------------


def test_without_a_service_account_token_the_sidecar_does_not_report() -> None:
    args = sidecar_of(injected(pod(automountServiceAccountToken=False)))["args"]
    assert args[-2:] == ["--report", "off"]
    for spec in ({}, {"automountServiceAccountToken": True}):
        assert "--report" not in sidecar_of(injected(pod(**spec)))["args"]  # the sidecar's default: auto


# --- the chain label ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chain", ["", "Agents", "agents_1", "-agents", "agents.v1", "a" * 64, "agents/../../secrets"]
)
def test_a_bad_chain_label_is_refused_with_a_clear_message(chain: str) -> None:
    with pytest.raises(InjectionError, match=core.CHAIN_LABEL):
        inject(pod(), chain, NATIVE)


def test_a_valid_chain_label() -> None:
    assert core.check_chain_name("a" * 63) == "a" * 63
    assert sidecar_of(injected(pod(), chain="a1-b2"))


# --- settings --------------------------------------------------------------------------------------


def test_settings_defaults_and_aliases() -> None:
    s = load_settings(f"image: {IMAGE}\n")
    assert s.model_dump(by_alias=True) == {
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "mode": "native",
        "missingChain": "Reject",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "proxyPort": 8411,
        "adminPort": 8412,
        "logLevel": "info",
        "lookupTimeoutSeconds": 2.5,  # the chart's: half of its default webhook timeoutSeconds (5)
    }
    # JSON is YAML too, and what the chart renders round-trips.
    assert load_settings(json.dumps(s.model_dump(mode="json", by_alias=True))) == s


def test_settings_from_yaml_as_the_chart_renders_them() -> None:
    s = load_settings(
        """
        image: registry.local/keyroute:1.2.3
        imagePullPolicy: Always
        mode: container
        missingChain: Inject
        resources:
          requests: {cpu: 10m, memory: 32Mi}
          limits: {cpu: 1, memory: 128Mi}
        proxyPort: 18411
        adminPort: 18412
        logLevel: debug
        """
    )
    assert (s.mode, s.missing_chain, s.proxy_port, s.admin_port) == (
        Mode.CONTAINER,
        MissingChain.INJECT,
        18411,
        18412,
    )
    assert sidecar_of(injected(pod(), s))["resources"]["limits"] == {"cpu": 1, "memory": "128Mi"}
    assert_valid_pod(injected(pod(), s))


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("image: x\nimagePulPolicy: Always\n", "imagePulPolicy"),  # unknown field
        ("image: x\nmode: sidecar\n", "mode"),
        ("image: x\nmissingChain: reject\n", "missingChain"),
        ("image: x\nimagePullPolicy: Sometimes\n", "imagePullPolicy"),
        ("image: x\nproxyPort: 70000\n", "proxyPort"),
        ("image: x\nproxyPort: 8412\n", "must differ"),
        ("image: x\nlogLevel: loud\n", "logLevel"),
        ("image: x\nresources: {limit: {memory: 1Gi}}\n", "limit"),
        ("mode: native\n", "image"),
        ("image: ''\n", "image"),
        ("", "mapping"),
        ("- image: x\n", "mapping"),
        ("image: [unclosed\n", "YAML"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(text: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        load_settings(text)


# --- the missing-chain policy ----------------------------------------------------------------------


def test_an_existing_chain_is_injected_silently() -> None:
    for policy in MissingChain:
        assert decide("agents", "team-a", True, policy) == core.Decision(inject=True, message="")


def test_a_missing_chain_is_refused_by_default() -> None:
    d = decide("agents", "team-a", False, NATIVE.missing_chain)
    assert not d.inject
    assert d.message == (
        'ProviderChain "agents" not found in namespace "team-a": create it first, '
        "or remove the keyroute.dev/chain label"
    )


def test_a_missing_chain_is_injected_with_a_warning_when_asked() -> None:
    d = decide("agents", "team-a", False, MissingChain.INJECT)
    assert d.inject
    assert 'ProviderChain "agents" not found' in d.message and '"agents-keyroute"' in d.message


def test_an_unknown_answer_injects_with_a_warning_whatever_the_policy() -> None:
    for policy in MissingChain:
        d = decide("agents", "team-a", None, policy, lookup_error="GET ...: 503 Service Unavailable")
        assert d.inject and "could not check" in d.message and "503" in d.message


@pytest.mark.parametrize("automount", [None, False])
def test_the_sidecar_args_are_what_keyroute_sidecar_accepts(automount: bool | None) -> None:
    # The contract with the image's entrypoint (`keyroute`): the real parser, not a copy of it.
    from keyroute.cli import build_parser

    spec = {} if automount is None else {"automountServiceAccountToken": automount}
    args = build_parser().parse_args(sidecar_of(injected(pod(**spec)))["args"])
    assert (args.command, args.config, args.listen, args.admin_listen, args.log_level) == (
        "sidecar",
        core.CONFIG_DIR,
        "127.0.0.1:8411",
        "0.0.0.0:8412",
        "info",
    )
    assert args.report == ("off" if automount is False else "auto")
