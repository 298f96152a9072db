"""The sidecar config: what the operator renders into the ``<chain>-keyroute`` Secret, and what the
sidecar's local mode renders from manifests. Both go through :func:`keyroute.core.render.render`.

Everything here is resolved: durations are seconds, defaults are applied, keys are inline, and
every entry's pool is bound to the entry's provider (validated here too, so a hand-edited or
corrupt config can never route a key to another provider's host).

Plain frozen dataclasses with a small validator of their own rather than pydantic models (issue 13):
the sidecar reads only this file, and pydantic with the resource models is ~11 MiB of its idle
memory. pydantic stays where manifests and resources are validated (the operator, local mode), and
is imported only there. The validator checks what the old models checked and words its errors the
same way (``location: message``, never an input value).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

from keyroute.core.classes import ErrorClass
from keyroute.core.enums import ApiStyle, RateLimitScope, Strategy

if TYPE_CHECKING:
    from pydantic import ValidationError

CONFIG_VERSION = 1
CONFIG_FILENAME = "config.json"


def _meta(alias: str | None = None, *, ge: float | None = None, gt: float | None = None) -> dict[str, Any]:
    """A field's name in the JSON file (if not its own) and its numeric bounds, checked on parse."""
    return {"alias": alias, "ge": ge, "gt": gt}


class _Config:
    """The JSON side of every config dataclass: parse (with validation) and dump, by alias."""

    __slots__ = ()
    # Fields holding a list that must not be empty, and the string fields that must not be empty.
    _non_empty: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        # A float field given an int (60 for 60.0) holds a float, as it would after a parse, so a
        # rendered config and the same config read back dump (and hash) alike.
        for f in _fields(type(self)):
            if f.kind is float and type(getattr(self, f.name)) is int:
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        """Checks across fields; raise ``ValueError`` with a key-free message."""

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate ``data`` (the decoded JSON) into this class; raise :class:`ConfigError` naming
        every invalid place (``pools.0.credentials.0.key: String should have at least 1 character``)."""
        errors: list[tuple[tuple[str | int, ...], str]] = []
        value = _parse_object(cls, data, (), errors)
        if errors:
            shown = "; ".join(f"{'.'.join(map(str, loc)) or '(root)'}: {msg}" for loc, msg in errors)
            # from None: as for a JSON error, nothing chained can carry the input.
            raise ConfigError(f"config is invalid: {shown}") from None
        return typing.cast(Self, value)

    def dump(self) -> dict[str, Any]:
        """The JSON object (aliases, enum values) this config is written as."""
        return {f.alias: _dump(getattr(self, f.name)) for f in _fields(type(self))}


@dataclass(frozen=True, slots=True)
class CredentialConfig(_Config):
    _non_empty = frozenset({"key"})
    name: str
    # repr=False: the key must never reach a log line through a repr of this object.
    key: str = field(repr=False)
    fingerprint: str
    priority: int
    base_url: str | None = field(default=None, metadata=_meta("baseURL"))


@dataclass(frozen=True, slots=True)
class CooldownConfig(_Config):
    rate_limited: float = field(default=60.0, metadata=_meta("rateLimited", ge=0))
    billing: float = field(default=3600.0, metadata=_meta(ge=0))
    auth_failed: float = field(default=300.0, metadata=_meta("authFailed", ge=0))
    max: float = field(default=3600.0, metadata=_meta(ge=0))


@dataclass(frozen=True, slots=True)
class PoolConfig(_Config):
    _non_empty = frozenset({"credentials"})
    name: str
    provider: str
    credentials: list[CredentialConfig]
    namespace: str = "default"
    # The CredentialPool's uid: the sidecar's Events name it, so `kubectl describe` finds them.
    uid: str | None = None
    strategy: Strategy = Strategy.FILL_FIRST
    cooldowns: CooldownConfig = field(default_factory=CooldownConfig)
    share_cooldowns: bool = field(default=True, metadata=_meta("shareCooldowns"))
    rate_limit_scope: RateLimitScope = field(default=RateLimitScope.CREDENTIAL, metadata=_meta("rateLimitScope"))

    def _check(self) -> None:
        names = [c.name for c in self.credentials]
        if len(set(names)) != len(names):
            raise ValueError(f"pool {self.name}: duplicate credential names")


@dataclass(frozen=True, slots=True)
class TimeoutConfig(_Config):
    connect: float = field(default=5.0, metadata=_meta(gt=0))
    first_byte: float = field(default=30.0, metadata=_meta("firstByte", gt=0))
    idle: float = field(default=30.0, metadata=_meta(gt=0))
    # None: off (the default); see keyroute.core.resources.Timeouts.
    first_token: float | None = field(default=None, metadata=_meta("firstToken", gt=0))


@dataclass(frozen=True, slots=True)
class EntryConfig(_Config):
    name: str
    provider: str
    base_url: str = field(metadata=_meta("baseURL"))
    pool: str
    api: ApiStyle = ApiStyle.OPENAI
    models: dict[str, str] = field(default_factory=dict)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)


@dataclass(frozen=True, slots=True)
class FallbackConfig(_Config):
    restore_after: float = field(default=60.0, metadata=_meta("restoreAfter", ge=0))
    restore_max: float = field(default=90.0, metadata=_meta("restoreMax", ge=0))
    triggers: list[ErrorClass] | None = None
    max_wait: float = field(default=5.0, metadata=_meta("maxWait", ge=0))
    context_length: list[str] = field(default_factory=list, metadata=_meta("contextLength"))
    max_attempts: int = field(default=8, metadata=_meta("maxAttempts", ge=1))


@dataclass(frozen=True, slots=True)
class ObjectRef(_Config):
    name: str
    namespace: str = "default"
    uid: str | None = None


@dataclass(frozen=True, slots=True)
class Exclusion(_Config):
    """A chain entry or credential left out of the config, and why (machine-readable ``reason``)."""

    reason: str
    message: str
    entry: str | None = None
    pool: str | None = None
    credential: str | None = None


@dataclass(frozen=True, slots=True)
class SidecarConfig(_Config):
    chain: ObjectRef
    entries: list[EntryConfig]
    pools: list[PoolConfig]
    version: int = CONFIG_VERSION
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    request_timeout: float = field(default=600.0, metadata=_meta("requestTimeout", gt=0))
    excluded: list[Exclusion] = field(default_factory=list)

    def _check(self) -> None:
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

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) so equal configs hash equally."""
        return json.dumps(self.dump(), sort_keys=True, indent=1)

    def content_hash(self) -> str:
        """Short content hash; it covers key values, so a rotated key changes it."""
        return content_hash(self.to_json())


def content_hash(text: str) -> str:
    """The short hash of a config's canonical JSON (:meth:`SidecarConfig.to_json`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the validator ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Field:
    name: str
    alias: str
    kind: Any  # str, int, float, bool, an enum or _Config class, or ("list", kind), ("dict", kind)
    optional: bool  # None is allowed
    required: bool
    default: Callable[[], Any] | None
    ge: float | None
    gt: float | None
    non_empty: bool


def _kind(tp: Any) -> tuple[Any, bool]:
    """(kind, optional) of a resolved annotation."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    origin = typing.get_origin(tp)
    if origin is list:
        return ("list", _kind(typing.get_args(tp)[0])[0]), optional
    if origin is dict:
        return ("dict", _kind(typing.get_args(tp)[1])[0]), optional
    return tp, optional


_FIELDS: dict[type[_Config], tuple[_Field, ...]] = {}


def _fields(cls: type[_Config]) -> tuple[_Field, ...]:
    """The fields of a config class, worked out once per class (not per parse or per request)."""
    known = _FIELDS.get(cls)
    if known is None:
        known = _FIELDS[cls] = _field_specs(cls)
    return known


def _field_specs(cls: type[_Config]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind, optional = _kind(hints[f.name])
        default: Callable[[], Any] | None = None
        if f.default is not dataclasses.MISSING:
            value = f.default
            default = lambda value=value: value  # noqa: E731
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory
        out.append(
            _Field(
                name=f.name,
                alias=f.metadata.get("alias") or f.name,
                kind=kind,
                optional=optional,
                required=default is None,
                default=default,
                ge=f.metadata.get("ge"),
                gt=f.metadata.get("gt"),
                non_empty=f.name in cls._non_empty,
            )
        )
    return tuple(out)


def _names(cls: type[_Config]) -> frozenset[str]:
    return frozenset(n for f in _fields(cls) for n in (f.name, f.alias))


_INVALID = object()
_Errors = list[tuple[tuple[str | int, ...], str]]


def _parse_object(cls: type[_Config], data: Any, loc: tuple[str | int, ...], errors: _Errors) -> Any:
    if not isinstance(data, dict):
        errors.append((loc, f"Input should be a valid dictionary or instance of {cls.__name__}"))
        return _INVALID
    fields = _fields(cls)
    # Unknown fields first, by position only: a field's name could be a key value (a misplaced
    # line in a hand-edited file), so it is never shown. A field is written by its alias (as the
    # operator writes it) or by its own name (as the old pydantic models also accepted).
    names = _names(cls)
    errors.extend(((*loc, "<key>"), "Extra inputs are not permitted") for k in data if k not in names)
    before = len(errors)
    values: dict[str, Any] = {}
    for f in fields:
        key = f.alias if f.alias in data else f.name
        if key not in data:
            if f.required:
                errors.append(((*loc, f.alias), "Field required"))
            continue
        value = _parse_value(f, f.kind, data[key], (*loc, key), errors, top=True)
        if value is not _INVALID:
            values[f.name] = value
    if len(errors) != before:
        return _INVALID
    try:
        return cls(**values)
    except ValueError as e:
        errors.append((loc, f"Value error, {e}"))
        return _INVALID


def _parse_value(
    f: _Field, kind: Any, value: Any, loc: tuple[str | int, ...], errors: _Errors, *, top: bool = False
) -> Any:
    if value is None and top and f.optional:
        return None
    if isinstance(kind, tuple):
        container, item = kind
        if container == "list":
            if not isinstance(value, list):
                errors.append((loc, "Input should be a valid list"))
                return _INVALID
            if top and f.non_empty and not value:
                errors.append((loc, "List should have at least 1 item after validation, not 0"))
                return _INVALID
            items = [_parse_value(f, item, v, (*loc, i), errors) for i, v in enumerate(value)]
            return _INVALID if _INVALID in items else items
        if not isinstance(value, dict):
            errors.append((loc, "Input should be a valid dictionary"))
            return _INVALID
        # A map's keys are input (a model name could be anything): shown as <key>.
        out = {k: _parse_value(f, item, v, (*loc, "<key>"), errors) for k, v in value.items()}
        return _INVALID if _INVALID in out.values() else out
    if isinstance(kind, type) and issubclass(kind, _Config):
        return _parse_object(kind, value, loc, errors)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            choices = [f"'{m.value}'" for m in kind]
            errors.append((loc, f"Input should be {', '.join(choices[:-1])} or {choices[-1]}"))
            return _INVALID
    if kind is str:
        if not isinstance(value, str):
            errors.append((loc, "Input should be a valid string"))
            return _INVALID
        if top and f.non_empty and not value:
            errors.append((loc, "String should have at least 1 character"))
            return _INVALID
        return value
    if kind is bool:
        if not isinstance(value, bool):
            # pydantic's wording, kept so the messages read as they did before issue 13.
            suffix = ", unable to interpret input" if isinstance(value, str) else ""
            errors.append((loc, "Input should be a valid boolean" + suffix))
            return _INVALID
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            suffix = ", unable to parse string as an integer" if isinstance(value, str) else ""
            errors.append((loc, "Input should be a valid integer" + suffix))
            return _INVALID
    elif kind is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            suffix = ", unable to parse string as a number" if isinstance(value, str) else ""
            errors.append((loc, "Input should be a valid number" + suffix))
            return _INVALID
        value = float(value)
    else:  # pragma: no cover - a field type this validator does not know is a bug here
        raise TypeError(f"config field {f.name}: unsupported type {kind!r}")
    if f.gt is not None and not value > f.gt:
        errors.append((loc, f"Input should be greater than {f.gt}"))
        return _INVALID
    if f.ge is not None and not value >= f.ge:
        errors.append((loc, f"Input should be greater than or equal to {f.ge}"))
        return _INVALID
    return value


def _dump(value: Any) -> Any:
    if isinstance(value, _Config):
        return value.dump()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


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
    known = _field_names() | _config_field_names()
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
def _config_field_names() -> frozenset[str]:
    """Every field name and alias of the config classes."""
    return frozenset(
        n
        for cls in (CredentialConfig, CooldownConfig, PoolConfig, TimeoutConfig, EntryConfig,
                    FallbackConfig, ObjectRef, Exclusion, SidecarConfig)
        for f in _fields(cls)
        for n in (f.name, f.alias)
    )


@functools.cache
def _field_names() -> frozenset[str]:
    """Every field name and alias of keyroute's pydantic models (the locations an error may show)."""
    from pydantic import BaseModel

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
    return SidecarConfig.parse(data)


def fingerprint(key: str) -> str:
    """A short, stable identifier of a key value (secrets hygiene (docs/README.md)): never the key, never reversible in practice."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]
