"""Sidecar injection, the pure part (docs/injection.md): what the mutating webhook adds to a pod, and when.

A pod opts in with the label ``keyroute.dev/chain: <chain>``. :func:`inject` returns the changes
(:class:`Mutation`); the kopf shell (:mod:`keyroute.controller.webhook`) only looks the chain up and
writes the changes into its patch. Nothing here does I/O.

What an injected pod gets, and why:

- **The sidecar** ``keyroute-sidecar``. In ``native`` mode (the default) it is an init container with
  ``restartPolicy: Always`` (a native sidecar, Kubernetes ≥ 1.29), put *first* in ``initContainers``:
  the kubelet starts init containers in order and, for a native sidecar, waits for its startup probe
  before starting the next one, so every later init container and every app container already finds
  the proxy listening. Native sidecars also end with the pod, so Jobs complete. ``container`` mode
  appends an ordinary container instead, for clusters without native sidecars (there, the app may
  start before the proxy, and a Job's pod never completes while the sidecar runs).
- **Its probes**: startup and readiness on ``/readyz`` (a config with at least one usable provider is
  loaded), liveness on ``/healthz`` (the process answers), all on the admin port (``kr-admin``). The
  startup probe polls every second for up to two minutes: app containers start within a second of the
  proxy being able to route; a chain with no usable provider at all holds the pod visibly
  (``Startup probe failed … 503``) instead of letting the agent start against a dead end.
- **Its arguments**: ``sidecar --config /etc/keyroute/config --listen 127.0.0.1:<proxyPort>
  --admin-listen 0.0.0.0:<adminPort> --log-level <logLevel>`` (the image's entrypoint is
  ``keyroute``), plus ``--report off`` when the pod sets ``automountServiceAccountToken: false``:
  without a token the sidecar cannot report recovery actions to the API server (docs/reporting.md), and saying
  so up front beats a stream of 401s. Otherwise the sidecar's own default (``auto``) applies.
- **``POD_NAME`` / ``POD_NAMESPACE``** from the downward API, so reports name the pod.
- **A restricted security context** (non-root, no privilege escalation, read-only root filesystem,
  all capabilities dropped, ``RuntimeDefault`` seccomp), so a pod under the ``restricted`` Pod
  Security Standard stays admissible. ``runAsUser``/``runAsGroup`` are set to 65532 so the kubelet
  can verify ``runAsNonRoot`` whatever ``USER`` line the image has.
- **The config volume** ``keyroute-config``: the chain's rendered Secret ``<chain>-keyroute``
  (docs/injection.md), ``optional: false``, mounted read-only *as a directory* at ``/etc/keyroute/config`` and
  never with ``subPath`` (a ``subPath`` mount is a copy that key rotation never reaches). Mounted into
  the sidecar only: the app containers never see key material.
  ``defaultMode`` is 0444, not 0400: the kubelet writes Secret files owned by root, so a 0400 file is
  unreadable by the non-root sidecar unless the pod sets ``fsGroup``, which the webhook must not
  impose on the app. Only the sidecar mounts the volume, so "world" here is the sidecar alone.
- **App containers** (each entry of ``containers``; never init containers, never the sidecar) get
  ``OPENAI_BASE_URL`` and ``OPENAI_API_BASE`` = ``http://127.0.0.1:<proxyPort>/v1`` and
  ``ANTHROPIC_BASE_URL`` = ``http://127.0.0.1:<proxyPort>``, each only if that container does not
  already set that name in ``env`` (what the user wrote wins; ``envFrom`` cannot be inspected here,
  and an explicit ``env`` entry wins over ``envFrom`` anyway).
- **The annotation** ``keyroute.dev/injected-chain: <chain>``, so ``kubectl get pod -o yaml`` says what
  happened and with which chain.

Idempotence: a pod that already has a container named ``keyroute-sidecar`` (init or regular) is left
exactly as it is — an empty :class:`Mutation`, hence no patch. A pod that declares its own volume named
``keyroute-config`` is an error rather than silently re-pointed.

A missing chain (:func:`decide`): with ``missingChain: Reject`` (the default) the pod is refused with a
message naming the chain, the namespace and the fix. A labelled pod whose chain does not exist would
otherwise hang in ``ContainerCreating`` on an opaque "secret not found" (or, worse, someone removes the
sidecar to make it start, and the agent runs without routing). ``Inject`` injects anyway, for setups
that create pods and chains in any order: the pod waits until the operator renders the Secret. When
the lookup itself failed (the answer is unknown), the pod is injected with a warning: the pod asked
for keyroute, and the Secret mount is the final check.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keyroute.core.config import describe_validation_error
from keyroute.core.names import CHAIN_LABEL as CHAIN_LABEL
from keyroute.core.names import CHAIN_NAME_MAX, is_chain_name

INJECTED_ANNOTATION = "keyroute.dev/injected-chain"
SIDECAR_NAME = "keyroute-sidecar"
CONFIG_VOLUME = "keyroute-config"
CONFIG_DIR = "/etc/keyroute/config"
ADMIN_PORT_NAME = "kr-admin"
CONFIG_FILE_MODE = 0o444  # see the module docstring: 0400 would be unreadable by the non-root sidecar
SIDECAR_UID = 65532
CHAIN_SECRET_SUFFIX = "-keyroute"
#: The webhook's ProviderChain lookup deadline when the settings name none: half the chart's default
#: ``webhook.timeoutSeconds`` (5), so a slow API server ends in "inject with a warning" first.
LOOKUP_TIMEOUT = 2.5


class InjectionError(ValueError):
    """The pod cannot be injected as asked; the message is meant for the user creating the pod."""


class SettingsError(ValueError):
    """The injection settings file is invalid; the message names the field."""


class Mode(enum.StrEnum):
    """``native``: init container with ``restartPolicy: Always``; ``container``: an ordinary container."""

    NATIVE = "native"
    CONTAINER = "container"


class MissingChain(enum.StrEnum):
    """What to do with a labelled pod whose ProviderChain does not exist."""

    REJECT = "Reject"
    INJECT = "Inject"


def _default_resources() -> dict[str, Any]:
    # No CPU limit: a throttled proxy adds latency to every LLM call; memory is bounded.
    return {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


class InjectionSettings(BaseModel):
    """The operator's injection settings (the Helm chart's ConfigMap key ``injection.yaml``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    image: str = Field(min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", alias="imagePullPolicy"
    )
    mode: Mode = Mode.NATIVE
    missing_chain: MissingChain = Field(default=MissingChain.REJECT, alias="missingChain")
    # A Kubernetes ResourceRequirements, passed through as written (the API server validates it).
    resources: dict[str, Any] = Field(default_factory=_default_resources)
    proxy_port: int = Field(default=8411, ge=1, le=65535, alias="proxyPort")
    admin_port: int = Field(default=8412, ge=1, le=65535, alias="adminPort")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", alias="logLevel"
    )
    # How long the webhook waits for the ProviderChain lookup before injecting with a warning. It must
    # end well before the API server gives up on the webhook (its ``timeoutSeconds``, 5 by default):
    # otherwise a slow API server makes the webhook call time out and, with ``failurePolicy: Fail``,
    # refuses the pod the docs promise to inject. The chart renders half of ``webhook.timeoutSeconds``.
    lookup_timeout: float = Field(default=LOOKUP_TIMEOUT, gt=0, le=30, alias="lookupTimeoutSeconds")

    @field_validator("image")
    @classmethod
    def _no_blank_image(cls, value: str) -> str:
        if value != value.strip() or not value:
            raise ValueError("must be an image reference without surrounding spaces")
        return value

    @field_validator("resources")
    @classmethod
    def _resource_requirements(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Free-form below, but a misspelt top-level key (``limit``) would silently mean "no limits".
        unknown = sorted(set(value) - {"requests", "limits", "claims"})
        if unknown:
            raise ValueError(f"unknown keys {unknown}: expected requests, limits, claims")
        for key in ("requests", "limits"):
            if key in value and not isinstance(value[key], dict):
                raise ValueError(f"{key} must be a mapping of resource name to quantity")
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> InjectionSettings:
        if self.proxy_port == self.admin_port:
            raise ValueError("proxyPort and adminPort must differ")
        return self


def load_settings(text: str) -> InjectionSettings:
    """Parse injection settings from YAML (or JSON, a subset of it); raise :class:`SettingsError`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SettingsError(f"injection settings: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError("injection settings: expected a mapping with at least `image`")
    try:
        return InjectionSettings.model_validate(data)
    except ValidationError as e:
        # No secrets in these settings: field names are exactly what the user needs to see.
        raise SettingsError(f"injection settings: {describe_validation_error(e, input_names=True)}") from None


def check_chain_name(chain: str) -> str:
    """Return ``chain`` if it can name a ProviderChain; raise :class:`InjectionError` otherwise."""
    if not chain:
        raise InjectionError(f"label {CHAIN_LABEL} is empty: set it to the name of a ProviderChain")
    # The rule of keyroute.core.names, which the CRD enforces too: such a chain cannot exist (unless
    # it was stored before the CRD said so, and then it renders nothing). Checked before the name
    # becomes part of an API path and of the Secret name.
    if not is_chain_name(chain):
        raise InjectionError(
            f"label {CHAIN_LABEL}={chain!r} is not a ProviderChain name: lowercase letters, digits "
            f"and '-', starting and ending with a letter or digit, at most {CHAIN_NAME_MAX} characters"
        )
    return chain


def config_secret_name(chain: str) -> str:
    """The rendered config Secret of a chain (docs/injection.md)."""
    return f"{chain}{CHAIN_SECRET_SUFFIX}"


def is_injected(pod: dict[str, Any]) -> bool:
    """Whether the pod already has the sidecar (as an init container or a container)."""
    spec = pod.get("spec") or {}
    return any(
        isinstance(c, dict) and c.get("name") == SIDECAR_NAME
        for key in ("initContainers", "containers")
        for c in spec.get(key) or []
    )


# --- the missing-chain policy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Inject or reject; ``message`` is the rejection reason, or a warning to show when injecting."""

    inject: bool
    message: str = ""


def decide(
    chain: str, namespace: str, chain_exists: bool | None, policy: MissingChain, lookup_error: str = ""
) -> Decision:
    """Apply the missing-chain policy. ``chain_exists`` is ``None`` when the lookup failed.

    See the module docstring for why ``Reject`` is the default and why an unknown answer injects.
    """
    if chain_exists:
        return Decision(inject=True)
    if chain_exists is None:
        why = f" ({lookup_error})" if lookup_error else ""
        return Decision(
            inject=True,
            message=f'keyroute: could not check that ProviderChain "{chain}" exists in namespace '
            f'"{namespace}"{why}; injected anyway: the pod starts once Secret '
            f'"{config_secret_name(chain)}" exists',
        )
    if policy is MissingChain.REJECT:
        return Decision(
            inject=False,
            message=f'ProviderChain "{chain}" not found in namespace "{namespace}": create it first, '
            f"or remove the {CHAIN_LABEL} label",
        )
    return Decision(
        inject=True,
        message=f'keyroute: ProviderChain "{chain}" not found in namespace "{namespace}"; the pod waits '
        f'in ContainerCreating until it exists and the operator renders Secret "{config_secret_name(chain)}"',
    )


# --- the mutation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """What injection changes: whole ``spec`` fields to replace, and annotations to set.

    Lists are given whole because a merge patch replaces lists wholesale. Empty means "leave the pod
    as it is" (it is already injected).
    """

    spec: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.spec or self.annotations)

    def apply(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod with the mutation applied (a new object; ``pod`` is not modified)."""
        out = copy.deepcopy(pod)
        if not self:
            return out
        spec = out.setdefault("spec", {})
        spec.update(copy.deepcopy(self.spec))
        meta = out.setdefault("metadata", {})
        meta["annotations"] = {**(meta.get("annotations") or {}), **self.annotations}
        return out


def sidecar_container(settings: InjectionSettings, *, report: bool = True) -> dict[str, Any]:
    """The sidecar container (without ``restartPolicy``; native mode adds it)."""
    args = [
        "sidecar",
        "--config",
        CONFIG_DIR,
        "--listen",
        f"127.0.0.1:{settings.proxy_port}",
        "--admin-listen",
        f"0.0.0.0:{settings.admin_port}",
        "--log-level",
        settings.log_level,
    ]
    if not report:
        args += ["--report", "off"]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": settings.admin_port},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        }

    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": settings.admin_port, "protocol": "TCP"}],
        "startupProbe": probe("/readyz", period=1, failures=120),
        "readinessProbe": probe("/readyz", period=5, failures=2),
        "livenessProbe": probe("/healthz", period=10, failures=3),
        "resources": copy.deepcopy(settings.resources),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def config_volume(chain: str) -> dict[str, Any]:
    """The volume holding the chain's rendered config Secret, mounted as a directory."""
    return {
        "name": CONFIG_VOLUME,
        "secret": {
            "secretName": config_secret_name(chain),
            "optional": False,
            "defaultMode": CONFIG_FILE_MODE,
        },
    }


def app_env(settings: InjectionSettings) -> list[dict[str, str]]:
    """The environment that points OpenAI- and Anthropic-style SDKs at the sidecar."""
    base = f"http://127.0.0.1:{settings.proxy_port}"
    return [
        {"name": "OPENAI_BASE_URL", "value": f"{base}/v1"},
        {"name": "OPENAI_API_BASE", "value": f"{base}/v1"},
        {"name": "ANTHROPIC_BASE_URL", "value": base},
    ]


def _with_env(container: dict[str, Any], extra: list[dict[str, str]]) -> dict[str, Any]:
    env = list(container.get("env") or [])
    present = {e.get("name") for e in env if isinstance(e, dict)}
    missing = [dict(e) for e in extra if e["name"] not in present]
    if not missing:
        return container
    return {**container, "env": env + missing}


def inject(pod: dict[str, Any], chain: str, settings: InjectionSettings) -> Mutation:
    """What to change in ``pod`` to route it through ``chain``; empty if it is already injected.

    Raises :class:`InjectionError` (a message for the user) if the chain name is invalid or the pod
    already declares a volume named ``keyroute-config``. See the module docstring for the details.
    """
    check_chain_name(chain)
    if is_injected(pod):
        return Mutation()
    spec = pod.get("spec") or {}
    volumes = [copy.deepcopy(v) for v in spec.get("volumes") or []]
    if any(isinstance(v, dict) and v.get("name") == CONFIG_VOLUME for v in volumes):
        raise InjectionError(
            f"the pod already has a volume named {CONFIG_VOLUME!r}, which keyroute needs for the "
            f"sidecar's config: rename it, or remove the {CHAIN_LABEL} label"
        )

    # Without a service-account token the sidecar has nothing to authenticate its reports with.
    report = spec.get("automountServiceAccountToken") is not False
    sidecar = sidecar_container(settings, report=report)
    env = app_env(settings)
    containers = [_with_env(copy.deepcopy(c), env) for c in spec.get("containers") or []]
    changes: dict[str, Any] = {"volumes": [*volumes, config_volume(chain)]}
    if settings.mode is Mode.NATIVE:
        init = [copy.deepcopy(c) for c in spec.get("initContainers") or []]
        changes["initContainers"] = [{**sidecar, "restartPolicy": "Always"}, *init]
        changes["containers"] = containers
    else:
        changes["containers"] = [*containers, sidecar]
    return Mutation(spec=changes, annotations={INJECTED_ANNOTATION: chain})
