"""The CustomResourceDefinitions of ``CredentialPool`` and ``ProviderChain``, generated from the models.

Why generated: :mod:`keyroute.core.resources` is the single source of the resource schemas. The
operator, the sidecar's local mode and ``keyroute check`` parse manifests with those pydantic models;
if the CRD were written by hand, the API server would sooner or later accept what the models reject
(or prune a status field the operator writes: a real API server silently drops undeclared fields). So
the ``openAPIV3Schema`` is converted from ``Model.model_json_schema(by_alias=True, mode="validation")``
and ``crds/*.yaml`` are only ever written by ``python -m keyroute.crdgen --write crds/``; a unit test
fails on drift.

The conversion makes the schema *structural* (what ``apiextensions.k8s.io/v1`` requires):

- every ``$ref`` / ``$defs`` is inlined; ``anyOf: [X, {type: null}]`` (an optional field) becomes ``X``;
  an optional field is simply not ``required``. No ``nullable``: the API server prunes a ``null`` given
  for a non-nullable field, which is what the models do with ``None`` too;
- pydantic's ``additionalProperties: false`` (``extra="forbid"``) is dropped: structural schemas prune
  unknown fields instead (and ``kubectl`` rejects them with its default strict field validation);
  ``dict[str, str]`` becomes ``type: object`` with ``additionalProperties: {type: string}``;
- titles are dropped; constant scalar defaults are kept; list and object defaults (``[]``, ``{}``,
  a whole ``cooldowns`` object) are left out: a default for a whole object would hide the per-field
  defaults, and empty lists/maps mean the same as absent ones to the models;
- an unknown JSON-schema keyword or a real union raises: nothing is silently dropped.

What a schema cannot say is added per field path in :data:`_KINDS` (``_Kind.extras``), and every
array must be given a list type there (generation fails otherwise), so a new list in a model forces a
decision:

- ``spec.credentials``, ``status.credentials`` are list-maps keyed by ``name``; ``status.conditions``
  is a list-map keyed by ``type`` (the API server rejects duplicate keys, server-side apply merges by
  key).
- ``spec.providers`` is ``atomic``, not a list-map: an entry's ``name`` is optional (it defaults to the
  entry's ``provider``), and Kubernetes requires list-map keys to be required or to have a constant
  default. The chain is ordered anyway (first = primary), so it is replaced whole; unique *effective*
  names (``has(p.name) ? p.name : p.provider``) are enforced with a CEL rule instead.
- ``spec.fallback.triggers`` is a ``set`` (an error class listed twice means nothing);
  ``spec.fallback.contextLength`` is ``atomic`` (its order is the order of the tries).
- CEL rules (``x-kubernetes-validations``) cover what the schema cannot: unique effective entry names,
  at least one entry (also ``minItems``), ``fallback.contextLength`` naming entries of the chain, and,
  at the schema root (the only node whose rules may read ``self.metadata.name``), the names keyroute
  can use (:mod:`keyroute.core.names`: a chain's name is a label value, a DNS-1123 label of at most
  63 characters; a pool's is at most 63 characters). The API server itself accepts any DNS subdomain.
  Every spec list has ``maxItems`` so the API server's CEL cost estimate stays small (the nested
  loops run over at most 16 by 16 entries). Unique credential names need no rule: the list-map
  already rejects duplicates, and a rule would be an O(n²) loop over 256 items.

:func:`validate` checks an object (or just a status) against the generated schema with ``jsonschema``
and approximates what the API server adds on top: pruning (reported here as an error: a field the
schema does not declare would be lost), list-map/set uniqueness and, when ``cel-python`` is installed,
the CEL rules. Tests use it to check every status shape the operator writes, because the in-memory API
server the end-to-end tests run against (kmock) validates nothing.

Pure: no I/O. ``jsonschema`` and ``celpy`` are imported only when :func:`validate` is called (they are
test-time dependencies); writing files is :mod:`keyroute.crdgen`'s job.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from keyroute.core.names import CHAIN_NAME_MESSAGE, CHAIN_NAME_RULE, POOL_NAME_MESSAGE, POOL_NAME_RULE
from keyroute.core.resources import (
    API_VERSION,
    GROUP,
    VERSION,
    CredentialPoolSpec,
    CredentialPoolStatus,
    ProviderChainSpec,
    ProviderChainStatus,
)

Kind = Literal["CredentialPool", "ProviderChain"]
KINDS: tuple[Kind, ...] = ("CredentialPool", "ProviderChain")

HEADER = "# Generated from keyroute.core.resources by python -m keyroute.crdgen; do not edit.\n"

JSON = dict[str, Any]

# The effective name of a chain entry, as CEL: ProviderEntry.entry_name.
_ENTRY_NAME_P = "(has(p.name) ? p.name : p.provider)"
_ENTRY_NAME_Q = "(has(q.name) ? q.name : q.provider)"


@dataclass(frozen=True)
class _Kind:
    kind: Kind
    plural: str
    short_name: str
    spec: type[BaseModel]
    status: type[BaseModel]
    # Extra keys merged into the schema node at a path ("spec.credentials", "status.conditions", ...).
    extras: Mapping[str, JSON]
    printer_columns: tuple[JSON, ...]
    description: str = ""

    @property
    def singular(self) -> str:
        return self.kind.lower()


def _list_map(*keys: str) -> JSON:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


_ATOMIC: JSON = {"x-kubernetes-list-type": "atomic"}
_SET: JSON = {"x-kubernetes-list-type": "set"}


def _ready_column(name: str, condition: str, description: str, *, wide: bool = False) -> JSON:
    column: JSON = {
        "name": name,
        "type": "string",
        "description": description,
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].status',
    }
    if wide:
        column["priority"] = 1  # kubectl shows it with -o wide only
    return column


_AGE: JSON = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

_KINDS: dict[str, _Kind] = {
    "CredentialPool": _Kind(
        kind="CredentialPool",
        plural="credentialpools",
        short_name="cpool",
        spec=CredentialPoolSpec,
        status=CredentialPoolStatus,
        description=(
            "The API keys of one provider. A pool is bound to its provider: its keys are only ever "
            "sent to, and only ever blamed by, that provider."
        ),
        extras={
            "": {"x-kubernetes-validations": [{"rule": POOL_NAME_RULE, "message": POOL_NAME_MESSAGE}]},
            "spec.credentials": _list_map("name"),
            "status.conditions": _list_map("type"),
            "status.credentials": _list_map("name"),
        },
        printer_columns=(
            {"name": "Provider", "type": "string", "jsonPath": ".spec.provider"},
            {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy"},
            {
                "name": "Available",
                "type": "integer",
                "description": "Credentials usable now",
                "jsonPath": ".status.available",
            },
            {"name": "Total", "type": "integer", "jsonPath": ".status.total"},
            _ready_column("Ready", "Ready", "At least one credential is usable"),
            {
                "name": "Next Available",
                "type": "string",
                "description": "Soonest time a benched credential comes back (empty: none is benched)",
                "jsonPath": ".status.nextAvailableAt",
            },
            _AGE,
            # -o wide: why keys are out, and whether all of them are.
            {
                "name": "Degraded",
                "type": "string",
                "priority": 1,
                "description": "Why a credential is unavailable (AllCredentialsAvailable when none is)",
                "jsonPath": '.status.conditions[?(@.type=="Degraded")].reason',
            },
            _ready_column("Exhausted", "Exhausted", "Every credential is benched: chains fall back", wide=True),
        ),
    ),
    "ProviderChain": _Kind(
        kind="ProviderChain",
        plural="providerchains",
        short_name="pchain",
        spec=ProviderChainSpec,
        status=ProviderChainStatus,
        description=(
            "The ordered providers an agent's LLM calls go through: the first is the primary, the "
            "others are tried in order when it fails."
        ),
        extras={
            "": {"x-kubernetes-validations": [{"rule": CHAIN_NAME_RULE, "message": CHAIN_NAME_MESSAGE}]},
            "spec": {
                "x-kubernetes-validations": [
                    {
                        "rule": (
                            "!has(self.fallback) || !has(self.fallback.contextLength) || "
                            "self.fallback.contextLength.all(n, self.providers.exists(p, "
                            f"{_ENTRY_NAME_P} == n))"
                        ),
                        "message": (
                            "fallback.contextLength must name entries of spec.providers "
                            "(an entry's name defaults to its provider)"
                        ),
                    }
                ]
            },
            "spec.providers": {
                **_ATOMIC,
                "x-kubernetes-validations": [
                    {
                        "rule": "size(self) >= 1",
                        "message": "at least one provider entry is required (the first is the primary)",
                    },
                    {
                        "rule": f"self.all(p, self.exists_one(q, {_ENTRY_NAME_Q} == {_ENTRY_NAME_P}))",
                        "message": (
                            "provider entry names must be unique (an entry's name defaults to its "
                            "provider: set name to tell two entries of one provider apart)"
                        ),
                    },
                ],
            },
            "spec.fallback.triggers": _SET,
            "spec.fallback.contextLength": _ATOMIC,
            "status.conditions": _list_map("type"),
        },
        printer_columns=(
            {"name": "Primary", "type": "string", "jsonPath": ".spec.providers[0].provider"},
            {
                "name": "Active",
                "type": "string",
                "description": "Provider most sidecars are serving from",
                "jsonPath": ".status.activeProvider",
            },
            _ready_column("Ready", "Ready", "Every entry has a pool bound to its provider"),
            _ready_column("Fallback", "FallbackActive", "Some sidecar is serving from a fallback entry"),
            {
                "name": "Sidecars",
                "type": "integer",
                "description": "Sidecars reporting on this chain (each refreshes its report every 5 minutes)",
                "jsonPath": ".status.sidecars",
            },
            _AGE,
            # -o wide: how many pods are on a fallback, and the latest move.
            {
                "name": "On Fallback",
                "type": "integer",
                "priority": 1,
                "description": "Reporting sidecars serving some model from a fallback entry",
                "jsonPath": ".status.sidecarsOnFallback",
            },
            {
                "name": "Last Fallback",
                "type": "date",
                "priority": 1,
                "description": "When the latest fallback still reported happened",
                "jsonPath": ".status.lastFallback.time",
            },
            {
                "name": "Reason",
                "type": "string",
                "priority": 1,
                "description": "The error class that caused the latest fallback",
                "jsonPath": ".status.lastFallback.reason",
            },
            {
                "name": "Config",
                "type": "string",
                "priority": 1,
                "description": "Hash of the rendered sidecar config",
                "jsonPath": ".status.config.hash",
            },
        ),
    ),
}


# --- JSON schema -> structural schema --------------------------------------------------------------

# Keywords copied as they are (after the node's type), in this order.
_CONSTRAINTS = (
    "enum",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)
_HANDLED = frozenset(
    {
        *_CONSTRAINTS,
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "default",
        "description",
        "title",
        "const",
        "$ref",
        "anyOf",
        "allOf",
        "$defs",
    }
)
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean"})


class SchemaConversionError(ValueError):
    """A model uses a JSON-schema construct that has no structural-schema equivalent here."""


def _clean_description(text: str) -> str:
    # Sphinx ``literal`` -> `literal`; collapse the docstring's line breaks.
    return " ".join(text.replace("``", "`").split())


def _resolve(node: JSON, defs: Mapping[str, JSON], where: str) -> JSON:
    """Inline ``$ref``/``allOf: [one]`` and strip ``anyOf: [X, null]``; siblings override the target."""
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref")
        prefix = "#/$defs/"
        if not isinstance(ref, str) or not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
            raise SchemaConversionError(f"{where}: unresolvable $ref {ref!r}")
        return _resolve({**defs[ref[len(prefix) :]], **node}, defs, where)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaConversionError(f"{where}: allOf with {len(parts)} parts")
        return _resolve({**parts[0], **node}, defs, where)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
        if len(options) != 1:
            raise SchemaConversionError(f"{where}: a union of {len(options)} types has no structural form")
        return _resolve({**options[0], **node}, defs, where)
    return node


def _convert(raw: JSON, defs: Mapping[str, JSON], where: str) -> JSON:
    node = _resolve(raw, defs, where)
    unknown = set(node) - _HANDLED
    if unknown:
        raise SchemaConversionError(f"{where}: unsupported JSON-schema keywords {sorted(unknown)}")
    if "const" in node:
        node.setdefault("enum", [node.pop("const")])
        if "type" not in node:
            node["type"] = _json_type(node["enum"][0], where)
    typ = node.get("type")
    if typ not in _TYPES:
        raise SchemaConversionError(f"{where}: no single type ({typ!r})")

    out: JSON = {}
    if node.get("description"):
        out["description"] = _clean_description(str(node["description"]))
    out["type"] = typ
    for key in _CONSTRAINTS:
        if key in node:
            out[key] = node[key]
    default = node.get("default")
    if default is not None and not isinstance(default, list | dict):
        out["default"] = default

    if typ == "object":
        props: Mapping[str, JSON] = node.get("properties", {})
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: _convert(v, defs, f"{where}.{k}") for k, v in props.items()}
            required = [k for k in node.get("required", []) if k in props]
            if required:
                out["required"] = required
            if isinstance(extra, dict):
                raise SchemaConversionError(f"{where}: both properties and additionalProperties")
        elif isinstance(extra, dict):
            out["additionalProperties"] = _convert(extra, defs, f"{where}.*")
        else:
            raise SchemaConversionError(f"{where}: an object with neither properties nor a value type")
    elif typ == "array":
        if "items" not in node:
            raise SchemaConversionError(f"{where}: an array without items")
        out["items"] = _convert(node["items"], defs, f"{where}[]")
    return out


def _json_type(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    raise SchemaConversionError(f"{where}: constant {value!r} has no scalar type")


def _model_schema(model: type[BaseModel], where: str) -> JSON:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, JSON] = raw.pop("$defs", {})
    return _convert(raw, defs, where)


def _nodes(schema: JSON, path: str) -> Iterator[tuple[str, JSON]]:
    """Every schema node with its dotted path (``spec.credentials``; array items add ``[]``)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")
    if "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")


def _apply_extras(schema: JSON, extras: Mapping[str, JSON], kind: str) -> None:
    nodes = dict(_nodes(schema, ""))
    for path, extra in extras.items():
        if path not in nodes:
            raise SchemaConversionError(f"{kind}: extras for {path!r}, which is not in the schema")
        nodes[path].update(copy.deepcopy(extra))
    untyped = [p for p, n in nodes.items() if n["type"] == "array" and "x-kubernetes-list-type" not in n]
    if untyped:
        raise SchemaConversionError(
            f"{kind}: give these lists an x-kubernetes-list-type in keyroute.core.crds: {', '.join(untyped)}"
        )


def _open_api_schema(info: _Kind) -> JSON:
    schema: JSON = {
        "description": info.description,
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _model_schema(info.spec, "spec"),
            "status": _model_schema(info.status, "status"),
        },
        "required": ["spec"],
    }
    _apply_extras(schema, info.extras, info.kind)
    return schema


def _info(kind: str) -> _Kind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"not a keyroute kind: {kind!r} (expected one of {', '.join(KINDS)})") from None


@functools.cache
def _crd(kind: Kind) -> str:
    info = _KINDS[kind]
    crd: JSON = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": info.plural,
                "singular": info.singular,
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "shortNames": [info.short_name],
                "categories": ["keyroute"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in info.printer_columns],
                    "schema": {"openAPIV3Schema": _open_api_schema(info)},
                }
            ],
        },
    }
    # Cached as JSON text so every caller gets its own mutable copy.
    return json.dumps(crd)


def crd_for(kind: str) -> JSON:
    """The ``apiextensions.k8s.io/v1`` CustomResourceDefinition of ``kind`` (a fresh dict)."""
    result: JSON = json.loads(_crd(_info(kind).kind))
    return result


def all_crds() -> list[JSON]:
    """Both CRDs, in :data:`KINDS` order."""
    return [crd_for(k) for k in KINDS]


def open_api_schema(kind: str) -> JSON:
    """The ``openAPIV3Schema`` of ``kind``'s only version."""
    schema: JSON = crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def render_yaml(crd: Mapping[str, Any]) -> str:
    """The CRD as the YAML file in ``crds/``: the generated-file header, then the document."""
    body = yaml.safe_dump(
        dict(crd), sort_keys=False, allow_unicode=True, width=10_000, default_flow_style=False
    )
    return HEADER + body


def file_name(crd: Mapping[str, Any]) -> str:
    """``<plural>.<group>.yaml``, the CRD's name as a file name."""
    return f"{crd['metadata']['name']}.yaml"


def rendered_files() -> dict[str, str]:
    """File name → content of every generated CRD file."""
    return {file_name(crd): render_yaml(crd) for crd in all_crds()}


# --- Validation ------------------------------------------------------------------------------------

Part = Literal["spec", "status"]


def validate(kind: str, obj: Mapping[str, Any], part: Part | None = None) -> list[str]:
    """Check ``obj`` against the generated CRD of ``kind`` as the API server would; ``[]`` if valid.

    ``part=None``: ``obj`` is a whole manifest; ``"status"`` / ``"spec"``: ``obj`` is only that part
    (e.g. what the operator patches into status). Errors read ``path: what is wrong``.

    Approximates the API server: ``null`` field values are dropped first (the server prunes them for
    non-nullable fields; in a merge patch they delete); an undeclared field is an error here, because
    the server would silently prune it; list-map keys and set items must be unique; CEL rules run
    when ``cel-python`` is installed (:func:`cel_available`) and the object passed the schema;
    for a whole manifest that includes the root rules on ``metadata.name`` (the names keyroute can
    use), which the API server also evaluates on every update, status writes included.
    Not modelled: defaulting, the API server's own ``metadata`` validation, ratcheting.
    """
    info = _info(kind)
    root = open_api_schema(info.kind)
    data = _drop_nulls(obj)
    if part is None:
        schema, path = root, ""
        errors = []
        if data.get("apiVersion") != API_VERSION:
            errors.append(f"apiVersion: expected {API_VERSION!r}, got {data.get('apiVersion')!r}")
        if data.get("kind") != info.kind:
            errors.append(f"kind: expected {info.kind!r}, got {data.get('kind')!r}")
    else:
        schema, path, errors = root["properties"][part], part, []
    errors += _schema_errors(schema, data, path)
    errors += _list_errors(schema, data, path)
    if not errors and cel_available():
        errors += _cel_errors(schema, data, path)
    return errors


def cel_available() -> bool:
    """Whether :func:`validate` evaluates CEL rules (``cel-python`` is installed)."""
    return _cel_environment() is not None


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _shown(path: str) -> str:
    return path or "<root>"


def _closed(schema: JSON) -> JSON:
    """A copy where declared objects reject undeclared fields (what the API server would prune)."""
    out = copy.deepcopy(schema)
    for _, node in _nodes(out, ""):
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    return out


def _schema_errors(schema: JSON, data: Any, prefix: str) -> list[str]:
    import jsonschema  # type: ignore[import-untyped, unused-ignore]

    validator = jsonschema.Draft202012Validator(_closed(schema))
    errors: list[str] = []
    for err in sorted(
        validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message)
    ):
        path = functools.reduce(_join, err.absolute_path, prefix)
        if err.validator == "additionalProperties":
            declared = set(err.schema.get("properties", {}))
            for name in sorted(set(err.instance) - declared):
                errors.append(f"{_join(path, name)}: unknown field (the API server would prune it)")
        else:
            errors.append(f"{_shown(path)}: {err.message}")
    return errors


def _walk(schema: JSON, data: Any, path: str) -> Iterator[tuple[JSON, Any, str]]:
    """Schema node, value and path of every value present in ``data``."""
    yield schema, data, path
    if isinstance(data, Mapping):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in data.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from _walk(sub, value, _join(path, str(key)))
    elif isinstance(data, list) and "items" in schema:
        for i, item in enumerate(data):
            yield from _walk(schema["items"], item, _join(path, i))


def _list_errors(schema: JSON, data: Any, prefix: str) -> list[str]:
    errors: list[str] = []
    for node, value, path in _walk(schema, data, prefix):
        list_type = node.get("x-kubernetes-list-type")
        if not isinstance(value, list) or list_type not in ("map", "set"):
            continue
        seen: set[str] = set()
        for i, item in enumerate(value):
            if list_type == "map":
                if not isinstance(item, Mapping):
                    continue
                keys = node.get("x-kubernetes-list-map-keys", [])
                shown = ", ".join(f"{k}={json.dumps(item.get(k))}" for k in keys)
                ident = json.dumps([item.get(k) for k in keys])
            else:
                shown = ident = json.dumps(item, sort_keys=True)
            if ident in seen:
                errors.append(f"{_join(path, i)}: Duplicate value: {shown}")
            seen.add(ident)
    return errors


@functools.cache
def _cel_environment() -> Any:
    try:
        import celpy  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return celpy.Environment()


@functools.cache
def _cel_program(rule: str) -> Any:
    env = _cel_environment()
    return env.program(env.compile(rule))


def cel_compiles(rule: str) -> str | None:
    """``None`` if ``rule`` compiles (or no CEL evaluator is installed), else the compiler's message."""
    if _cel_environment() is None:
        return None
    try:
        _cel_program(rule)
    except Exception as exc:  # celpy raises its own parse errors, not a common base of ours
        return str(exc)
    return None


def _cel_errors(schema: JSON, data: Any, prefix: str) -> list[str]:
    from celpy.adapter import json_to_cel  # type: ignore[import-not-found, unused-ignore]
    from celpy.celtypes import BoolType  # type: ignore[import-not-found, unused-ignore]

    errors: list[str] = []
    for node, value, path in _walk(schema, data, prefix):
        for rule in node.get("x-kubernetes-validations", []):
            where = _shown(path)
            try:
                result = _cel_program(rule["rule"]).evaluate({"self": json_to_cel(value)})
            except Exception as exc:  # an evaluation error fails the rule, as on the API server
                errors.append(f"{where}: Invalid value: rule {rule['rule']!r} could not be evaluated: {exc}")
                continue
            if not isinstance(result, BoolType):
                errors.append(f"{where}: Invalid value: rule {rule['rule']!r} returned {result!r}")
            elif not result:
                errors.append(f"{where}: Invalid value: {rule['message']}")
    return errors
