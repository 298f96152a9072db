"""The custom resources users apply: ``CredentialPool`` and ``ProviderChain`` (docs/resources.md), and the Secret
shape they point at.

These pydantic models are the single source of the resource schemas: the CRD YAML in ``crds/`` is
generated from them. Specs forbid unknown fields, so a typo in a hand-written manifest is an error
with a path, not a silently ignored setting.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from keyroute.core.classes import ErrorClass
from keyroute.core.durations import DURATION_PATTERN, parse_duration

# The enums and API names live in a module without pydantic, so the sidecar imports them without it;
# re-exported here, where the resources that use them are.
from keyroute.core.enums import API_VERSION as API_VERSION
from keyroute.core.enums import GROUP as GROUP
from keyroute.core.enums import VERSION as VERSION
from keyroute.core.enums import ApiStyle as ApiStyle
from keyroute.core.enums import CredentialState as CredentialState
from keyroute.core.enums import RateLimitScope as RateLimitScope
from keyroute.core.enums import Strategy as Strategy
from keyroute.core.names import CHAIN_NAME_MESSAGE, is_chain_name

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
URL_PATTERN = r"^https?://[^\s/$.?#][^\s]*$"


def _check_duration(value: str) -> str:
    parse_duration(value)
    return value


def _check_url(value: str) -> str:
    if not re.match(URL_PATTERN, value):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32), AfterValidator(_check_duration)]
URL = Annotated[str, Field(pattern=URL_PATTERN, max_length=2048), AfterValidator(_check_url)]
Name = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=63)]
# Secrets are DNS subdomains: longer than the DNS labels used for keyroute's own names.
SecretName = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=253)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class _Status(BaseModel):
    # Status is written by the operator; tolerate fields from newer versions rather than fail a read.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# --- CredentialPool ---------------------------------------------------------------------------------


class SecretKeyRef(_Spec):
    name: SecretName
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]


class CredentialSpec(_Spec):
    name: Name
    secret_ref: SecretKeyRef = Field(alias="secretRef")
    priority: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    base_url: URL | None = Field(default=None, alias="baseURL")


class Cooldowns(_Spec):
    rate_limited: Duration = Field(default="60s", alias="rateLimited")
    billing: Duration = "1h"
    auth_failed: Duration = Field(default="5m", alias="authFailed")
    max: Duration = "1h"


class CredentialPoolSpec(_Spec):
    provider: Name
    strategy: Strategy = Strategy.FILL_FIRST
    credentials: Annotated[list[CredentialSpec], Field(min_length=1, max_length=256)]
    cooldowns: Cooldowns = Cooldowns()
    share_cooldowns: bool = Field(default=True, alias="shareCooldowns")
    # Pool: a 429 cools the limited model for every key of the pool, and a short reset is waited out
    # on the same route instead of spending the other keys on the same exhausted budget.
    rate_limit_scope: RateLimitScope = Field(default=RateLimitScope.CREDENTIAL, alias="rateLimitScope")

    @field_validator("credentials")
    @classmethod
    def _unique_names(cls, value: list[CredentialSpec]) -> list[CredentialSpec]:
        _require_unique([c.name for c in value], "credential")
        return value


class Condition(_Status):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str = Field(alias="lastTransitionTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")


class CredentialStatus(_Status):
    name: str
    state: CredentialState
    reason: str | None = None
    until: str | None = None
    last_error_code: int | None = Field(default=None, alias="lastErrorCode")
    fingerprint: str | None = None
    last_transition_time: str | None = Field(default=None, alias="lastTransitionTime")
    reported_by: str | None = Field(default=None, alias="reportedBy")
    # Set when a sidecar benched the key for one model only (a per-model rate limit).
    model: str | None = None
    # "Pool" when the state comes from a rate limit the pool's keys share (rateLimitScope: Pool).
    scope: RateLimitScope | None = None


class CredentialPoolStatus(_Status):
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    available: int | None = None
    total: int | None = None
    # The soonest `until` of a benched credential: when the pool next gets a key back (kubectl column).
    next_available_at: str | None = Field(default=None, alias="nextAvailableAt")
    credentials: Annotated[list[CredentialStatus], Field(max_length=256)] = []


# --- ProviderChain ----------------------------------------------------------------------------------


class PoolRef(_Spec):
    name: Name


class Timeouts(_Spec):
    """Unset fields inherit from the chain's timeouts, then from the defaults (connect 5s, firstByte 30s,
    idle 30s, request 10m, firstToken off). ``request`` is per chain only: the deadline of a whole call.

    ``firstToken`` bounds a streamed answer from its response headers to its first data event (comments
    and pings do not count); ``0s`` turns it off for one entry when the chain sets it. Off by default:
    reasoning models can think for minutes before their first token, and failing them over would only
    pay for the same thinking again on the next provider."""

    connect: Duration | None = None
    first_byte: Duration | None = Field(default=None, alias="firstByte")
    first_token: Duration | None = Field(default=None, alias="firstToken")
    idle: Duration | None = None
    request: Duration | None = None


DEFAULT_TIMEOUTS = {"connect": "5s", "first_byte": "30s", "idle": "30s", "request": "10m"}


class ProviderEntry(_Spec):
    name: Name | None = None
    provider: Name
    base_url: URL = Field(alias="baseURL")
    credential_pool_ref: PoolRef = Field(alias="credentialPoolRef")
    api: ApiStyle = ApiStyle.OPENAI
    models: Annotated[dict[str, Annotated[str, Field(min_length=1)]], Field(max_length=256)] = {}
    timeouts: Timeouts | None = None

    @model_validator(mode="after")
    def _request_is_per_chain(self) -> ProviderEntry:
        if self.timeouts is not None and self.timeouts.request is not None:
            raise ValueError(
                "timeouts.request is a deadline for the whole call: set it on the chain, not on an entry"
            )
        return self

    @property
    def entry_name(self) -> str:
        """The entry's name: ``name`` if given, else its provider."""
        return self.name or self.provider


class Fallback(_Spec):
    restore_after: Duration = Field(default="60s", alias="restoreAfter")
    # The longest wait between two probes of an entry that keeps failing (the waits grow with the
    # outage, see keyroute.core.chains): bounds how long traffic stays on a fallback once the entry
    # has recovered. Envoy caps its ejections at 300 s; probes here cost only an extra round trip.
    restore_max: Duration = Field(default="90s", alias="restoreMax")
    # Not `on`: YAML 1.1 (kubectl included) reads an unquoted `on:` key as the boolean true.
    triggers: Annotated[list[ErrorClass], Field(max_length=16)] | None = None

    @field_validator("triggers")
    @classmethod
    def _unique_triggers(cls, value: list[ErrorClass] | None) -> list[ErrorClass] | None:
        if value is not None:
            _require_unique([str(v) for v in value], "fallback trigger")
        return value

    max_wait: Duration = Field(default="5s", alias="maxWait")
    context_length: Annotated[list[Name], Field(max_length=16)] = Field(default=[], alias="contextLength")
    max_attempts: Annotated[int, Field(ge=1, le=32)] = Field(default=8, alias="maxAttempts")


class ProviderChainSpec(_Spec):
    providers: Annotated[list[ProviderEntry], Field(min_length=1, max_length=16)]
    fallback: Fallback = Fallback()
    timeouts: Timeouts = Timeouts()

    @model_validator(mode="after")
    def _names(self) -> ProviderChainSpec:
        names = [p.entry_name for p in self.providers]
        _require_unique(names, "provider entry")
        unknown = [n for n in self.fallback.context_length if n not in names]
        if unknown:
            raise ValueError(f"fallback.contextLength names unknown entries: {', '.join(unknown)}")
        return self


class LastFallback(_Status):
    from_: str = Field(alias="from")
    to: str
    reason: str
    time: str
    pod: str | None = None


class RenderedConfigRef(_Status):
    name: str
    hash: str


class ProviderChainStatus(_Status):
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    active_provider: str | None = Field(default=None, alias="activeProvider")
    sidecars: int | None = None
    sidecars_on_fallback: int | None = Field(default=None, alias="sidecarsOnFallback")
    last_fallback: LastFallback | None = Field(default=None, alias="lastFallback")
    config: RenderedConfigRef | None = None


# --- Objects ----------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: Name
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


def _check_chain_name(value: str) -> str:
    if not is_chain_name(value):
        raise ValueError(CHAIN_NAME_MESSAGE)
    return value


class ChainMeta(ObjectMeta):
    """A ProviderChain's metadata: its name is a label value (keyroute.core.names), so the rule is
    tighter than :data:`Name`'s, and the error says why."""

    name: Annotated[str, AfterValidator(_check_chain_name)]


class SecretMeta(ObjectMeta):
    """A Secret's metadata: a Secret's name is a DNS subdomain (up to 253 characters), as
    :class:`SecretKeyRef` allows, not one of keyroute's 63-character names."""

    name: SecretName


class _Object(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


class CredentialPool(_Object):
    kind: Literal["CredentialPool"] = "CredentialPool"
    spec: CredentialPoolSpec
    status: CredentialPoolStatus | None = None


class ProviderChain(_Object):
    kind: Literal["ProviderChain"] = "ProviderChain"
    metadata: ChainMeta
    spec: ProviderChainSpec
    status: ProviderChainStatus | None = None


class Secret(_Object):
    """A core v1 Secret, reduced to what keyroute reads."""

    api_version: str = Field(default="v1", alias="apiVersion")
    kind: Literal["Secret"] = "Secret"
    metadata: SecretMeta
    data: dict[str, str] = Field(default={}, repr=False)
    string_data: dict[str, str] = Field(default={}, alias="stringData", repr=False)

    def __repr__(self) -> str:
        # Never show values, even base64-encoded ones.
        return f"Secret({self.namespace}/{self.name}, keys={sorted(self.values())})"

    __str__ = __repr__

    def values(self) -> dict[str, str]:
        """Decoded values; ``stringData`` wins over ``data`` as on the API server.

        A ``data`` value that is not valid base64 maps to ``None``-like absence: it is left out.
        """
        out: dict[str, str] = {}
        for k, v in self.data.items():
            try:
                out[k] = base64.b64decode(v, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue
        out.update(self.string_data)
        return out


def _require_unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"duplicate {what} names: {', '.join(dupes)}")


def parse_object(doc: dict[str, Any]) -> CredentialPool | ProviderChain | Secret | None:
    """Parse one manifest document; ``None`` for kinds keyroute does not read."""
    kind = doc.get("kind")
    if kind == "CredentialPool":
        return CredentialPool.model_validate(doc)
    if kind == "ProviderChain":
        return ProviderChain.model_validate(doc)
    if kind == "Secret":
        return Secret.model_validate(doc)
    return None
