"""The sidecar config: what the operator renders into the ``<chain>-keyroute`` Secret, and what the
sidecar's local mode renders from manifests. Both go through :func:`keyroute.core.render.render`.

Everything here is resolved: durations are seconds, defaults are applied, keys are inline, and
every entry's pool is bound to the entry's provider (validated here too, so a hand-edited or
corrupt config can never route a key to another provider's host).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keyroute.core.classes import ErrorClass
from keyroute.core.resources import ApiStyle, RateLimitScope, Strategy

CONFIG_VERSION = 1
CONFIG_FILENAME = "config.json"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class CredentialConfig(_Config):
    name: str
    # repr=False: the key must never reach a log line through a repr of this model.
    key: Annotated[str, Field(min_length=1, repr=False)]
    fingerprint: str
    priority: int
    base_url: str | None = Field(default=None, alias="baseURL")


class CooldownConfig(_Config):
    rate_limited: float = Field(default=60.0, alias="rateLimited", ge=0)
    billing: float = Field(default=3600.0, ge=0)
    auth_failed: float = Field(default=300.0, alias="authFailed", ge=0)
    max: float = Field(default=3600.0, ge=0)


class PoolConfig(_Config):
    name: str
    namespace: str = "default"
    # The CredentialPool's uid: the sidecar's Events name it, so `kubectl describe` finds them.
    uid: str | None = None
    provider: str
    strategy: Strategy = Strategy.FILL_FIRST
    cooldowns: CooldownConfig = CooldownConfig()
    share_cooldowns: bool = Field(default=True, alias="shareCooldowns")
    rate_limit_scope: RateLimitScope = Field(default=RateLimitScope.CREDENTIAL, alias="rateLimitScope")
    credentials: Annotated[list[CredentialConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> PoolConfig:
        names = [c.name for c in self.credentials]
        if len(set(names)) != len(names):
            raise ValueError(f"pool {self.name}: duplicate credential names")
        return self


class TimeoutConfig(_Config):
    connect: float = Field(default=5.0, gt=0)
    first_byte: float = Field(default=30.0, alias="firstByte", gt=0)
    idle: float = Field(default=30.0, gt=0)
    # None: off (the default); see keyroute.core.resources.Timeouts.
    first_token: float | None = Field(default=None, alias="firstToken", gt=0)


class EntryConfig(_Config):
    name: str
    provider: str
    api: ApiStyle = ApiStyle.OPENAI
    base_url: str = Field(alias="baseURL")
    pool: str
    models: dict[str, str] = {}
    timeouts: TimeoutConfig = TimeoutConfig()


class FallbackConfig(_Config):
    restore_after: float = Field(default=60.0, alias="restoreAfter", ge=0)
    restore_max: float = Field(default=90.0, alias="restoreMax", ge=0)
    triggers: list[ErrorClass] | None = None
    max_wait: float = Field(default=5.0, alias="maxWait", ge=0)
    context_length: list[str] = Field(default=[], alias="contextLength")
    max_attempts: int = Field(default=8, alias="maxAttempts", ge=1)


class ObjectRef(_Config):
    name: str
    namespace: str = "default"
    uid: str | None = None


class Exclusion(_Config):
    """A chain entry or credential left out of the config, and why (machine-readable ``reason``)."""

    entry: str | None = None
    pool: str | None = None
    credential: str | None = None
    reason: str
    message: str


class SidecarConfig(_Config):
    version: int = CONFIG_VERSION
    chain: ObjectRef
    entries: list[EntryConfig]
    pools: list[PoolConfig]
    fallback: FallbackConfig = FallbackConfig()
    request_timeout: float = Field(default=600.0, alias="requestTimeout", gt=0)
    excluded: list[Exclusion] = []

    @model_validator(mode="after")
    def _bound(self) -> SidecarConfig:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"unsupported config version {self.version} (expected {CONFIG_VERSION})")
        pools = {p.name: p for p in self.pools}
        if len(pools) != len(self.pools):
            raise ValueError("duplicate pool names")
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate entry names")
        for e in self.entries:
            pool = pools.get(e.pool)
            if pool is None:
                raise ValueError(f"entry {e.name}: pool {e.pool} is not in the config")
            if pool.provider != e.provider:
                # the invariant (docs/README.md): a credential is only ever used for the provider whose pool it belongs to.
                raise ValueError(
                    f"entry {e.name} (provider {e.provider}) names pool {e.pool} "
                    f"bound to provider {pool.provider}"
                )
        missing = [n for n in self.fallback.context_length if n not in names]
        if missing:
            raise ValueError(f"fallback.contextLength names entries not in the config: {missing}")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) so equal configs hash equally."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, indent=1)

    def content_hash(self) -> str:
        """Short content hash; it covers key values, so a rotated key changes it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that does not parse or validate. The message never contains input values."""


def describe_validation_error(err: ValidationError, *, input_names: bool = False) -> str:
    """Summarise a pydantic error by location and message only.

    pydantic's own ``str()`` includes the offending input, which for a config is a key value. Even a
    location can carry input (a map key, an unknown field's name), so by default only list indexes
    and the models' own field names are shown and anything else becomes ``<key>``. Objects that hold
    no key values (CredentialPool, ProviderChain specs) pass ``input_names=True``: there, the name
    of a misspelt field is exactly what the user needs to see.
    """
    known = _field_names()
    parts = []
    for e in err.errors(include_input=False, include_url=False, include_context=False):
        loc = (
            ".".join(
                str(x) if input_names or isinstance(x, int) or x in known else "<key>"
                for x in e.get("loc", ())
            )
            or "(root)"
        )
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


@functools.cache
def _field_names() -> frozenset[str]:
    """Every field name and alias of keyroute's models (the locations an error may show)."""
    names: set[str] = set()
    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not cls.__module__.startswith("keyroute."):
            continue
        for name, info in cls.model_fields.items():
            names.add(name)
            if info.alias:
                names.add(info.alias)
    return frozenset(names)


def parse_config(text: str | bytes) -> SidecarConfig:
    """Parse and validate a rendered config; raise :class:`ConfigError` with a key-free message."""
    try:
        data: Any = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"config is not valid JSON: {type(e).__name__} at position {getattr(e, 'pos', '?')}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("config must be a JSON object")
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"config is invalid: {describe_validation_error(e)}") from None


def fingerprint(key: str) -> str:
    """A short, stable identifier of a key value (secrets hygiene (docs/README.md)): never the key, never reversible in practice."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]
