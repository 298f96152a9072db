"""Local mode, the pure part: the YAML a user would ``kubectl apply``, read without a cluster (docs/sidecar.md).

``keyroute sidecar --manifests PATH`` (and ``keyroute check`` / ``keyroute render``) must route exactly
as the operator would, so this module only turns manifest text into the same typed objects the
operator reads from the API server, and then calls the same :func:`keyroute.core.render.render`.
File access lives in :mod:`keyroute.sidecar.manifest_files`; nothing here touches the filesystem.

What is read, and decisions where kubectl and local mode could differ:

- ``ProviderChain`` and ``CredentialPool`` (``apiVersion`` absent or ``keyroute.dev/v1alpha1``) and core
  ``Secret`` (``apiVersion`` absent or ``v1``); any other kind (a Deployment next to them, say) is
  ignored. ``List`` (and ``<Kind>List``) documents are expanded, as ``kubectl get -o yaml`` writes them.
- A ``kind: ProviderChain`` with another ``apiVersion`` is an error, not ignored: it is far more
  likely a typo than another API's kind of the same name, and ignoring it would hide the chain.
- A document without ``metadata.namespace`` (or with an empty one) is in ``default``: there is no
  kubeconfig context here.
- A Secret's ``data`` value that is not valid base64 is an error, as on the API server; plain-text
  values belong under ``stringData`` (which wins over ``data`` for the same key, as on the server).
- The same object (kind, namespace, name) defined twice is an error rather than "last one wins":
  two files disagreeing about a key is something to fix, not to guess about.

Secret hygiene (docs/README.md): no message raised here contains a Secret's value. Validation errors are
summarised by location and message only (:func:`describe_validation_error`), and for a Secret the
location stops at its maps (``data``, ``stringData``, labels, annotations): a key mistakenly written
as a map key (``stringData: {sk-...: }``) would otherwise be echoed as part of the location. YAML syntax errors are
described by line and column without yaml's snippet of the offending text, and object names are only
echoed when they are valid Kubernetes names (they are identifiers, shown in status and Events too).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.reader import ReaderError

from keyroute.core.config import describe_validation_error
from keyroute.core.render import RenderResult, render
from keyroute.core.resources import API_VERSION, CredentialPool, ProviderChain, Secret

#: ``(namespace, name)``
ObjectKey = tuple[str, str]

_KEYROUTE_KINDS: dict[str, type[ProviderChain] | type[CredentialPool]] = {
    "ProviderChain": ProviderChain,
    "CredentialPool": CredentialPool,
}
# A Kubernetes object name (DNS subdomain). Only names of this shape are echoed in messages: anything
# else (a key pasted into the wrong field, say) is described by its location only.
_SAFE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_MAX_PROBLEM = 160
_QUOTED = re.compile(r"'[^']{5,}'|\"[^\"]{5,}\"")
# Free-form maps of a Secret: their keys are input, so an error location stops at the map's name.
_SECRET_MAPS = frozenset({"data", "stringData", "labels", "annotations"})


class ManifestError(ValueError):
    """Manifests that cannot be read as keyroute objects. The message never contains a Secret value."""


@dataclass(frozen=True)
class Manifests:
    """The keyroute objects found in a set of manifests, each keyed by ``(namespace, name)``."""

    chains: dict[ObjectKey, ProviderChain] = field(default_factory=dict)
    pools: dict[ObjectKey, CredentialPool] = field(default_factory=dict)
    secrets: dict[ObjectKey, Secret] = field(default_factory=dict)

    def pools_in(self, namespace: str) -> dict[str, CredentialPool]:
        """The CredentialPools of ``namespace``, keyed by name (what :func:`render` takes)."""
        return {name: p for (ns, name), p in self.pools.items() if ns == namespace}

    def secrets_in(self, namespace: str) -> dict[str, Secret]:
        """The Secrets of ``namespace``, keyed by name (what :func:`render` takes)."""
        return {name: s for (ns, name), s in self.secrets.items() if ns == namespace}


def parse_manifests(texts: Iterable[tuple[str, str]]) -> Manifests:
    """Parse ``(source name, YAML text)`` pairs into :class:`Manifests`.

    The source name is only used in error messages (a file path, usually). Raises
    :class:`ManifestError` for YAML that does not parse, a keyroute object or Secret that does not
    validate, or an object defined twice.
    """
    chains: dict[ObjectKey, ProviderChain] = {}
    pools: dict[ObjectKey, CredentialPool] = {}
    secrets: dict[ObjectKey, Secret] = {}
    seen: dict[tuple[str, str, str], str] = {}
    for source, text in texts:
        for where, doc in _documents(source, text):
            obj = _parse_object(where, doc)
            if obj is None:
                continue
            ident = (obj.kind, obj.namespace, obj.name)
            if ident in seen:
                raise ManifestError(
                    f"{where}: {obj.kind} {obj.namespace}/{obj.name} is defined twice (also at {seen[ident]})"
                )
            seen[ident] = where
            key = (obj.namespace, obj.name)
            if isinstance(obj, ProviderChain):
                chains[key] = obj
            elif isinstance(obj, CredentialPool):
                pools[key] = obj
            else:
                secrets[key] = obj
    return Manifests(chains=chains, pools=pools, secrets=secrets)


def select_chain(manifests: Manifests, name: str | None, namespace: str | None = None) -> ProviderChain:
    """The chain to render: the one named ``name`` (in ``namespace`` if given), or the only one.

    Raises :class:`ManifestError` listing the available chains when there is none or the choice is
    ambiguous.
    """
    chains = sorted(manifests.chains.items())
    available = ", ".join(f"{ns}/{n}" for (ns, n), _ in chains) or "none"
    matches = [
        chain
        for (ns, n), chain in chains
        if (namespace is None or ns == namespace) and (name is None or n == name)
    ]
    if len(matches) == 1:
        return matches[0]
    in_ns = f" in namespace {namespace}" if namespace is not None else ""
    if not chains:
        raise ManifestError("the manifests hold no ProviderChain")
    if not matches:
        what = f"ProviderChain {name}" if name is not None else "ProviderChain"
        raise ManifestError(f"no {what}{in_ns} in the manifests; available: {available}")
    listed = ", ".join(f"{c.namespace}/{c.name}" for c in matches)
    if name is None:
        raise ManifestError(
            f"the manifests hold {len(matches)} ProviderChains{in_ns}; choose one by name (--chain): {listed}"
        )
    raise ManifestError(
        f"ProviderChain {name} exists in several namespaces ({listed}); choose one (--namespace)"
    )


def render_manifests(
    manifests: Manifests, chain_name: str | None = None, namespace: str | None = None
) -> RenderResult:
    """Render the selected chain with the pools and Secrets of its own namespace, as the operator does."""
    chain = select_chain(manifests, chain_name, namespace)
    return render(chain, manifests.pools_in(chain.namespace), manifests.secrets_in(chain.namespace))


# --- documents --------------------------------------------------------------------------------------


def _documents(source: str, text: str) -> Iterator[tuple[str, Any]]:
    """``(location, document)`` for every non-empty document of ``text``, with Lists expanded."""
    loaded: list[Any] = []
    try:
        for doc in yaml.safe_load_all(text):
            loaded.append(doc)
    except yaml.YAMLError as e:
        raise ManifestError(
            f"{source}: document {len(loaded) + 1}: invalid YAML{_describe_yaml_error(e, text)}"
        ) from None
    for index, doc in enumerate(loaded, start=1):
        if doc is not None:  # an empty document: a leading or trailing ``---``
            yield from _expand(f"{source}: document {index}", doc)


def _describe_yaml_error(err: yaml.YAMLError, text: str) -> str:
    """Where and what, never yaml's own ``str()``: that quotes the offending line, which may hold a key."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = (err.problem or err.context or "").strip()
        # yaml's problem texts are fixed wording plus a quoted character, tag or alias name; a name
        # (``*sk-...`` reads as an alias) could be a value, so only short quoted text is kept.
        problem = _QUOTED.sub("'…'", problem.splitlines()[0] if problem else "")[:_MAX_PROBLEM]
        return f"{where}: {problem or 'syntax error'}"
    if isinstance(err, ReaderError):
        line = text.count("\n", 0, err.position) + 1
        return f" at line {line}: unacceptable character ({err.reason})"
    return f": {type(err).__name__}"


def _expand(where: str, doc: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a Kubernetes object (a mapping), found a {_type_name(doc)}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ManifestError(f"{where}: the object has no kind")
    if kind == "List" or (kind.endswith("List") and "items" in doc):
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise ManifestError(f"{where}: items must be a list, found a {_type_name(items)}")
        for index, item in enumerate(items, start=1):
            yield from _expand(f"{where}, item {index}", item)
        return
    yield where, doc


def _parse_object(where: str, doc: dict[str, Any]) -> ProviderChain | CredentialPool | Secret | None:
    """The keyroute object (or Secret) in ``doc``; ``None`` for kinds keyroute does not read."""
    kind: str = doc["kind"]
    model: type[ProviderChain] | type[CredentialPool] | type[Secret]
    if kind in _KEYROUTE_KINDS:
        model, expected = _KEYROUTE_KINDS[kind], API_VERSION
    elif kind == "Secret":
        model, expected = Secret, "v1"
    else:
        return None
    label = _label(kind, doc)
    api_version = doc.get("apiVersion")
    if api_version is not None and api_version != expected:
        raise ManifestError(f"{where}: {label}: apiVersion must be {expected}")
    meta = doc.get("metadata")
    if isinstance(meta, dict) and "namespace" in meta and meta["namespace"] in (None, ""):
        # `namespace:` left empty means "unset" to kubectl; do not reject it as a non-string.
        doc = {**doc, "metadata": {k: v for k, v in meta.items() if k != "namespace"}}
    try:
        obj = model.model_validate(doc)
    except ValidationError as e:
        raise ManifestError(
            f"{where}: {label} is invalid: {_describe(e, model)}{_bool_key_hint(doc)}"
        ) from None
    if isinstance(obj, Secret):
        for index, value in enumerate(obj.data.values(), start=1):
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                # Counted, not named: see _describe on why a Secret's map keys are not shown.
                raise ManifestError(
                    f"{where}: {label}: data value {index} of {len(obj.data)} is not valid base64 "
                    "(put plain text under stringData)"
                ) from None
    return obj


def _describe(err: ValidationError, model: type[Any]) -> str:
    """:func:`describe_validation_error`, with a Secret's map keys left out of the locations."""
    if model is not Secret:
        return describe_validation_error(err, input_names=True)
    parts = []
    for e in err.errors(include_input=False, include_url=False, include_context=False):
        loc: list[str] = []
        for part in e.get("loc", ()):
            if loc and loc[-1] in _SECRET_MAPS:
                loc.append("<key>")  # which key is not shown: it may be a value written as a key
                break
            loc.append(str(part))
        parts.append(f"{'.'.join(loc) or '(root)'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _label(kind: str, doc: dict[str, Any]) -> str:
    """``Kind namespace/name`` as far as known and safe to show."""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    if not (isinstance(name, str) and _SAFE_NAME.fullmatch(name)):
        return kind
    if isinstance(namespace, str) and _SAFE_NAME.fullmatch(namespace):
        return f"{kind} {namespace}/{name}"
    return f"{kind} {name}"


def _bool_key_hint(doc: Any) -> str:
    """YAML 1.1 reads an unquoted ``on:`` (or ``yes:``, ``off:``) key as a boolean; say so when it happened."""
    if _has_bool_key(doc):
        return ' (YAML reads an unquoted on/off/yes/no key as true/false: quote it, e.g. "on":)'
    return ""


def _has_bool_key(node: Any) -> bool:
    if isinstance(node, dict):
        return any(isinstance(k, bool) or _has_bool_key(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_has_bool_key(v) for v in node)
    return False


def _type_name(value: object) -> str:
    """A YAML-ish name of a value's type (never the value itself)."""
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, str):
        return "string"
    return type(value).__name__
