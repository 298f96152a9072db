"""The generated CRDs (docs/resources.md): in sync with the models, structural, and as strict as the models.

No cluster runs here, and the in-memory API server of the end-to-end tests validates nothing, so these
tests stand in for the API server: the schema must be one Kubernetes accepts (structural, list-map keys
required, printer columns that point at real fields), and :func:`keyroute.core.crds.validate` must
accept what the models accept and reject what they reject, status shapes included.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ValidationError

from keyroute import crdgen
from keyroute.core import crds
from keyroute.core.durations import DURATION_PATTERN
from keyroute.core.inject import InjectionError, check_chain_name
from keyroute.core.names import (
    CHAIN_NAME_MESSAGE,
    CHAIN_NAME_RULE,
    DNS1123_LABEL,
    LABEL_VALUE_MAX,
    POOL_NAME_MESSAGE,
    POOL_NAME_RULE,
    chain_name_problem,
    pool_name_problem,
)
from keyroute.core.resources import (
    URL_PATTERN,
    CredentialPool,
    CredentialPoolStatus,
    CredentialState,
    ProviderChain,
    ProviderChainStatus,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"

needs_cel = pytest.mark.skipif(not crds.cel_available(), reason="cel-python (celpy) is not installed")

Doc = dict[str, Any]


def schema_nodes(schema: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    """Every schema node with its path; array items add ``[]``, map values ``.*``."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], f"{path}.*")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            yield from schema_nodes(sub, f"{path}<{key}{i}>")
    if isinstance(schema.get("not"), dict):
        yield from schema_nodes(schema["not"], f"{path}<not>")


def all_schemas() -> Iterator[tuple[str, Doc]]:
    for kind in crds.KINDS:
        yield kind, crds.open_api_schema(kind)


# --- generated files -------------------------------------------------------------------------------


def test_crd_files_are_generated_from_the_models() -> None:
    problems = crdgen.drift(CRDS)
    assert not problems, (
        "crds/ is out of date with keyroute.core.resources; regenerate it with\n"
        f"    {crdgen.REGENERATE}\n" + "\n".join(problems)
    )


def test_crd_files_start_with_the_generated_header_and_load_back_to_the_crds() -> None:
    for crd in crds.all_crds():
        text = (CRDS / crds.file_name(crd)).read_text(encoding="utf-8")
        assert text.startswith("# Generated from keyroute.core.resources by python -m keyroute.crdgen;")
        assert yaml.safe_load(text) == crd


def test_crdgen_check_fails_on_drift_and_write_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert crdgen.main(["--check", str(tmp_path)]) == 1
    assert "missing" in capsys.readouterr().err

    assert crdgen.main(["--write", str(tmp_path)]) == 0
    assert crdgen.main(["--check", str(tmp_path)]) == 0
    capsys.readouterr()

    edited = tmp_path / "providerchains.keyroute.dev.yaml"
    edited.write_text(edited.read_text(encoding="utf-8").replace("maxItems: 16", "maxItems: 17"))
    stale = tmp_path / "oldthings.keyroute.dev.yaml"
    stale.write_text(crds.HEADER + "kind: CustomResourceDefinition\n")
    unrelated = tmp_path / "kustomization.yaml"
    unrelated.write_text("resources: []\n")

    assert crdgen.main(["--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{edited}: differs" in err
    assert "maxItems: 17" in err
    assert f"{stale}: generated file no kind produces any more" in err
    assert crdgen.REGENERATE in err
    assert "kustomization" not in err

    assert crdgen.main(["--write", str(tmp_path)]) == 0
    assert crdgen.main(["--check", str(tmp_path)]) == 0
    assert not stale.exists() and unrelated.exists()


def test_crds_are_pure_and_fresh_copies() -> None:
    first = crds.crd_for("CredentialPool")
    first["spec"]["group"] = "mutated.example"
    assert crds.crd_for("CredentialPool")["spec"]["group"] == "keyroute.dev"
    assert crds.render_yaml(crds.crd_for("ProviderChain")) == crds.render_yaml(crds.crd_for("ProviderChain"))
    with pytest.raises(ValueError, match="not a keyroute kind"):
        crds.crd_for("Secret")


# --- what Kubernetes requires of a CRD -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "plural", "short"),
    [("CredentialPool", "credentialpools", "cpool"), ("ProviderChain", "providerchains", "pchain")],
)
def test_names_version_and_status_subresource(kind: str, plural: str, short: str) -> None:
    crd = crds.crd_for(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.keyroute.dev"
    spec = crd["spec"]
    assert spec["group"] == "keyroute.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "plural": plural,
        "singular": kind.lower(),
        "kind": kind,
        "listKind": f"{kind}List",
        "shortNames": [short],
        "categories": ["keyroute"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["type"] == "object"
    assert schema["required"] == ["spec"]
    assert list(schema["properties"]) == ["apiVersion", "kind", "metadata", "spec", "status"]
    assert schema["properties"]["metadata"] == {"type": "object"}


_K8S_TYPES = {"object", "array", "string", "integer", "number", "boolean"}
# Inside anyOf/oneOf/allOf/not, Kubernetes allows value validations only.
_FORBIDDEN_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable", "title"}


@pytest.mark.parametrize("kind", crds.KINDS)
def test_schema_is_structural(kind: str) -> None:
    schema = crds.open_api_schema(kind)
    problems: list[str] = []
    for path, node in schema_nodes(schema):
        in_junctor = "<" in path
        if in_junctor:
            problems += [f"{path}: {k} inside a junctor" for k in _FORBIDDEN_IN_JUNCTORS & set(node)]
        elif node.get("type") not in _K8S_TYPES and not (
            node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        ):
            problems.append(f"{path or '<root>'}: no type")
        for key in ("$ref", "$defs", "definitions", "$schema", "id", "uniqueItems", "const", "title"):
            if key in node:
                problems.append(f"{path}: {key}")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties together with additionalProperties")
        if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
            problems.append(f"{path}: additionalProperties must be a schema")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        if "nullable" in node:
            problems.append(f"{path}: nullable (not needed: the API server prunes nulls)")
    assert schema["properties"]["metadata"] == {"type": "object"}, "metadata may only be constrained by type"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", crds.KINDS)
def test_lists_declare_their_type_and_list_map_keys_are_required(kind: str) -> None:
    for path, node in schema_nodes(crds.open_api_schema(kind)):
        if node.get("type") != "array":
            assert "x-kubernetes-list-type" not in node, path
            continue
        list_type = node.get("x-kubernetes-list-type")
        assert list_type in ("atomic", "set", "map"), f"{path}: list type {list_type!r}"
        items = node["items"]
        if list_type == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert items["type"] == "object", path
            for key in keys:
                assert key in items["properties"], f"{path}: map key {key} is not a field"
                assert key in items.get("required", []) or "default" in items["properties"][key], (
                    f"{path}: map key {key} must be required or defaulted"
                )
        else:
            assert "x-kubernetes-list-map-keys" not in node, path
        if list_type == "set":
            assert items["type"] in ("string", "integer", "number", "boolean"), f"{path}: set of objects"


def test_the_list_types_chosen() -> None:
    def lists(kind: str) -> dict[str, tuple[str, list[str] | None]]:
        return {
            path: (node["x-kubernetes-list-type"], node.get("x-kubernetes-list-map-keys"))
            for path, node in schema_nodes(crds.open_api_schema(kind))
            if node.get("type") == "array"
        }

    assert lists("CredentialPool") == {
        "spec.credentials": ("map", ["name"]),
        "status.conditions": ("map", ["type"]),
        "status.credentials": ("map", ["name"]),
    }
    assert lists("ProviderChain") == {
        "spec.providers": ("atomic", None),  # ordered; `name` is optional, so it cannot be a map key
        "spec.fallback.triggers": ("set", None),
        "spec.fallback.contextLength": ("atomic", None),
        "status.conditions": ("map", ["type"]),
    }


@pytest.mark.parametrize("kind", crds.KINDS)
def test_spec_lists_and_maps_are_bounded_for_cel_cost_estimation(kind: str) -> None:
    spec = crds.open_api_schema(kind)["properties"]["spec"]
    for path, node in schema_nodes(spec, "spec"):
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


@pytest.mark.parametrize("kind", crds.KINDS)
def test_defaults_are_scalars_that_satisfy_their_own_schema(kind: str) -> None:
    # The API server rejects a CRD whose defaults do not validate (or would be pruned).
    found = 0
    for path, node in schema_nodes(crds.open_api_schema(kind)):
        if "default" not in node:
            continue
        found += 1
        assert not isinstance(node["default"], list | dict), f"{path}: object/list default"
        bare = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "default"}
        jsonschema.validate(node["default"], bare)
    assert found


def test_constant_defaults_come_from_the_models() -> None:
    pool = crds.open_api_schema("CredentialPool")["properties"]["spec"]["properties"]
    assert pool["strategy"]["default"] == "FillFirst"
    assert pool["shareCooldowns"]["default"] is True
    assert "default" not in pool["cooldowns"]  # per-field defaults, not a whole-object default
    assert {k: v["default"] for k, v in pool["cooldowns"]["properties"].items()} == {
        "rateLimited": "60s",
        "billing": "1h",
        "authFailed": "5m",
        "max": "1h",
    }
    chain = crds.open_api_schema("ProviderChain")["properties"]["spec"]["properties"]
    assert chain["providers"]["items"]["properties"]["api"]["default"] == "openai"
    fallback = chain["fallback"]["properties"]
    assert fallback["restoreAfter"]["default"] == "60s"
    assert fallback["maxWait"]["default"] == "5s"
    assert "default" not in fallback["contextLength"]


def test_patterns_are_the_models_patterns() -> None:
    pool = crds.open_api_schema("CredentialPool")["properties"]["spec"]["properties"]
    assert pool["cooldowns"]["properties"]["billing"]["pattern"] == DURATION_PATTERN
    assert pool["credentials"]["items"]["properties"]["baseURL"]["pattern"] == URL_PATTERN


@pytest.mark.parametrize("kind", crds.KINDS)
def test_cel_rules_are_well_formed(kind: str) -> None:
    rules = [
        (path, rule)
        for path, node in schema_nodes(crds.open_api_schema(kind))
        for rule in node.get("x-kubernetes-validations", [])
    ]
    if kind == "ProviderChain":
        assert [p for p, _ in rules] == ["", "spec", "spec.providers", "spec.providers"]
    else:
        assert [p for p, _ in rules] == [""]  # the name rule: the root is the only node reading metadata
    for path, rule in rules:
        assert set(rule) == {"rule", "message"}, path
        assert rule["message"], path
        assert crds.cel_compiles(rule["rule"]) is None, f"{path}: {rule['rule']}"


# --- printer columns -------------------------------------------------------------------------------

_SEGMENT = re.compile(
    r'\.(?P<field>[A-Za-z0-9_]+)|\[(?P<index>\d+)\]|\[\?\(@\.(?P<filter>[A-Za-z0-9_]+)=="[^"]*"\)\]'
)


def resolve_json_path(schema: Doc, json_path: str) -> Doc:
    """The schema node a printer column's JSONPath selects; fails on a field the schema lacks."""
    node, pos = schema, 0
    while pos < len(json_path):
        m = _SEGMENT.match(json_path, pos)
        assert m, f"{json_path}: cannot parse at {json_path[pos:]!r}"
        pos = m.end()
        if m["field"]:
            if node is schema["properties"]["metadata"]:
                # ObjectMeta is the API server's own; only its well-known fields are printed.
                assert m["field"] in {"creationTimestamp", "name", "namespace"}, json_path
                return {"type": "string", "format": "date-time"}
            assert m["field"] in node.get("properties", {}), f"{json_path}: no field {m['field']}"
            node = node["properties"][m["field"]]
        else:
            assert node["type"] == "array", f"{json_path}: indexing a {node['type']}"
            node = node["items"]
            if m["filter"]:
                assert m["filter"] in node["properties"], f"{json_path}: no field {m['filter']} to filter on"
    return node


@pytest.mark.parametrize(
    ("kind", "columns"),
    [
        (
            "CredentialPool",
            ["Provider", "Strategy", "Available", "Total", "Ready", "Next Available", "Age", "Degraded", "Exhausted"],
        ),
        (
            "ProviderChain",
            ["Primary", "Active", "Ready", "Fallback", "Sidecars", "Age", "On Fallback", "Last Fallback", "Reason", "Config"],
        ),
    ],
)
def test_printer_columns_point_at_fields_of_the_right_type(kind: str, columns: list[str]) -> None:
    version = crds.crd_for(kind)["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    printed = version["additionalPrinterColumns"]
    assert [c["name"] for c in printed] == columns
    for column in printed:
        node = resolve_json_path(schema, column["jsonPath"])
        expected = {"date": "string", "integer": "integer", "string": "string"}[column["type"]]
        assert node["type"] == expected, column


def _cell(doc: Doc, json_path: str) -> str:
    """What kubectl prints for one column of ``doc`` (the JSONPath subset the columns use)."""
    node: Any = doc
    for m in _SEGMENT.finditer(json_path):
        if node is None:
            return "<none>"
        if m["field"]:
            node = node.get(m["field"])
        elif m["index"]:
            node = node[int(m["index"])]
        else:
            wanted = m.group(0).split('"')[1]
            node = next((x for x in node if x.get(m["filter"]) == wanted), None)
    return "<none>" if node is None else str(node)


@pytest.mark.parametrize("kind", ["CredentialPool", "ProviderChain"])
def test_kubectl_get_fits_120_columns_and_wide_adds_the_rest(kind: str) -> None:
    """``kubectl get cpool,pchain`` stays one screen: the default table, as kubectl lays it out (columns
    padded to their widest cell, three spaces apart), fits 120 columns with a 30-character name and a
    16-character provider;
    the priority-1 columns appear with ``-o wide`` only."""
    columns = crds.crd_for(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    doc = (pool_doc if kind == "CredentialPool" else chain_doc)()
    doc["status"] = (pool_status if kind == "CredentialPool" else chain_status)()
    doc["metadata"]["name"] = "agents-production-eu-west" + "x" * 5  # 30 characters
    if kind == "CredentialPool":
        doc["spec"]["provider"] = "anthropic-vertex"  # 16 characters
        doc["spec"]["strategy"] = "RoundRobin"
    else:
        doc["spec"]["providers"][0]["provider"] = "anthropic-vertex"
        doc["status"]["activeProvider"] = "anthropic-backup"

    def width(wide: bool) -> int:
        cells = [("NAME", doc["metadata"]["name"])]
        for c in columns:
            if c.get("priority", 0) and not wide:
                continue
            value = "12d" if c["type"] == "date" else _cell(doc, c["jsonPath"])
            cells.append((c["name"].upper(), value))
        return sum(max(len(h), len(v)) for h, v in cells) + 3 * (len(cells) - 1)

    assert width(wide=False) <= 120
    assert any(c.get("priority") == 1 for c in columns)
    assert width(wide=True) > width(wide=False)


def test_ready_and_fallback_columns_read_condition_status() -> None:
    chain = crds.crd_for("ProviderChain")["spec"]["versions"][0]["additionalPrinterColumns"]
    paths = {c["name"]: c["jsonPath"] for c in chain}
    assert paths["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert paths["Fallback"] == '.status.conditions[?(@.type=="FallbackActive")].status'
    assert paths["Primary"] == ".spec.providers[0].provider"


# --- manifests -------------------------------------------------------------------------------------


def example_docs() -> list[Any]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") in crds.KINDS:
                docs.append(pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"))
    return docs


EXAMPLE_DOCS = example_docs()


def test_examples_include_both_kinds() -> None:
    kinds = {p.values[0]["kind"] for p in EXAMPLE_DOCS}
    assert kinds == set(crds.KINDS)


@pytest.mark.parametrize("doc", EXAMPLE_DOCS)
def test_example_manifests_validate(doc: Doc) -> None:
    assert crds.validate(doc["kind"], doc) == []


def pool_doc() -> Doc:
    return {
        "apiVersion": "keyroute.dev/v1alpha1",
        "kind": "CredentialPool",
        "metadata": {"name": "openai", "namespace": "default"},
        "spec": {
            "provider": "openai",
            "credentials": [
                {"name": "k1", "secretRef": {"name": "openai-keys", "key": "key-1"}},
                {"name": "k2", "secretRef": {"name": "openai-keys", "key": "key-2"}, "priority": 0},
            ],
        },
    }


def entry(provider: str, **extra: Any) -> Doc:
    return {
        "provider": provider,
        "baseURL": f"https://{provider}.example/v1",
        "credentialPoolRef": {"name": provider},
        **extra,
    }


def chain_doc() -> Doc:
    return {
        "apiVersion": "keyroute.dev/v1alpha1",
        "kind": "ProviderChain",
        "metadata": {"name": "agents"},
        "spec": {"providers": [entry("openai"), entry("openrouter")]},
    }


def model_of(doc: Doc) -> type[BaseModel]:
    return CredentialPool if doc["kind"] == "CredentialPool" else ProviderChain


Edit = Callable[[Doc], object]


def _parent(doc: Doc, path: str) -> tuple[Any, str | int]:
    """The container holding ``path`` (dots; ``[n]`` indexes a list) and the last key."""
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = doc
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def _set(path: str, value: Any) -> Edit:
    """An edit setting ``path`` in a document."""

    def edit(doc: Doc) -> None:
        node, key = _parent(doc, path)
        node[key] = value

    return edit


def _del(path: str) -> Edit:
    """An edit deleting ``path`` from a document."""

    def edit(doc: Doc) -> None:
        node, key = _parent(doc, path)
        del node[key]

    return edit


# (base, edit, expected error substring); the models must reject each one too.
BAD = [
    pytest.param(pool_doc, _set("spec.strategy", "Fastest"), "spec.strategy: 'Fastest' is not one of", id="unknown-strategy"),
    pytest.param(pool_doc, _set("spec.credentials[1].name", "k1"), 'spec.credentials[1]: Duplicate value: name="k1"', id="duplicate-credential-names"),
    pytest.param(pool_doc, _set("spec.cooldowns", {"rateLimited": "60 seconds"}), "spec.cooldowns.rateLimited: '60 seconds' does not match", id="bad-duration"),
    pytest.param(pool_doc, _set("spec.credentials[0].baseURL", "api.openai.com/v1"), "spec.credentials[0].baseURL: 'api.openai.com/v1' does not match", id="bad-credential-url"),
    pytest.param(pool_doc, _del("spec.provider"), "spec: 'provider' is a required property", id="pool-without-provider"),
    pytest.param(pool_doc, _set("spec.credentials", []), "spec.credentials: [] should be non-empty", id="pool-without-credentials"),
    pytest.param(pool_doc, _set("spec.credentials[0].name", "Key_1"), "spec.credentials[0].name: 'Key_1' does not match", id="bad-credential-name"),
    pytest.param(pool_doc, _set("spec.credentials[0].priority", -1), "spec.credentials[0].priority: -1 is less than the minimum", id="negative-priority"),
    pytest.param(pool_doc, _set("spec.shareCooldown", False), "spec.shareCooldown: unknown field", id="typo-in-field-name"),
    pytest.param(pool_doc, _del("spec"), "'spec' is a required property", id="no-spec"),
    pytest.param(chain_doc, _set("spec.providers[1].provider", "openai"), "spec.providers: Invalid value: provider entry names must be unique", marks=needs_cel, id="duplicate-default-entry-names"),
    pytest.param(chain_doc, _set("spec.providers[1].name", "openai"), "spec.providers: Invalid value: provider entry names must be unique", marks=needs_cel, id="entry-named-like-another-provider"),
    pytest.param(chain_doc, _set("spec.fallback", {"contextLength": ["openai-long"]}), "spec: Invalid value: fallback.contextLength must name entries", marks=needs_cel, id="context-length-names-unknown-entry"),
    pytest.param(chain_doc, _set("spec.fallback", {"restoreAfter": "soon"}), "spec.fallback.restoreAfter: 'soon' does not match", id="bad-restore-duration"),
    pytest.param(chain_doc, _set("spec.timeouts", {"firstByte": "30"}), "spec.timeouts.firstByte: '30' does not match", id="duration-without-unit"),
    pytest.param(chain_doc, _set("spec.providers[0].baseURL", "ftp://api.openai.com/v1"), "spec.providers[0].baseURL: 'ftp://api.openai.com/v1' does not match", id="bad-entry-url"),
    pytest.param(chain_doc, _del("spec.providers"), "spec: 'providers' is a required property", id="chain-without-providers"),
    pytest.param(chain_doc, _set("spec.providers", []), "spec.providers: [] should be non-empty", id="empty-chain"),
    pytest.param(chain_doc, _set("spec.providers[0]", {"baseURL": "https://x.example", "credentialPoolRef": {"name": "x"}}), "spec.providers[0]: 'provider' is a required property", id="entry-without-provider"),
    pytest.param(chain_doc, _set("spec.providers[0].api", "bearer"), "spec.providers[0].api: 'bearer' is not one of", id="unknown-api-style"),
    pytest.param(chain_doc, _set("spec.fallback", {"triggers": ["Teapot"]}), "spec.fallback.triggers[0]: 'Teapot' is not one of", id="unknown-error-class"),
    pytest.param(chain_doc, _set("spec.providers[0].models", {"gpt-4o": ""}), "spec.providers[0].models.gpt-4o: '' should be non-empty", id="empty-model-mapping"),
    pytest.param(chain_doc, _set("spec.fallback", {"maxAttempts": 0}), "spec.fallback.maxAttempts: 0 is less than the minimum", id="zero-attempts"),
    pytest.param(chain_doc, _set("metadata.name", "agents.v1"), "<root>: Invalid value: a ProviderChain name must be at most 63 characters", marks=needs_cel, id="dotted-chain-name"),
    pytest.param(chain_doc, _set("metadata.name", "a" * 64), "<root>: Invalid value: a ProviderChain name must be at most 63 characters", marks=needs_cel, id="64-character-chain-name"),
    pytest.param(chain_doc, _set("metadata.name", "a" * 253), "(a DNS-1123 label: no dots), because pods select the chain with the label keyroute.dev/chain=<name>", marks=needs_cel, id="253-character-chain-name"),
    pytest.param(pool_doc, _set("metadata.name", "p" * 64), "<root>: Invalid value: a CredentialPool name must be at most 63 characters, because chains refer to it in credentialPoolRef.name", marks=needs_cel, id="64-character-pool-name"),
]  # fmt: skip


@pytest.mark.parametrize(("base", "edit", "expected"), BAD)
def test_bad_manifests_are_rejected_by_the_crd_and_the_models(
    base: Callable[[], Doc], edit: Edit, expected: str
) -> None:
    doc = base()
    edit(doc)
    errors = crds.validate(doc["kind"], doc)
    assert any(expected in e for e in errors), errors
    with pytest.raises(ValidationError):
        model_of(doc).model_validate(doc)


def test_a_trigger_listed_twice_is_rejected_by_the_crd_and_the_model() -> None:
    doc = chain_doc()
    doc["spec"]["fallback"] = {"triggers": ["Timeout", "RateLimited", "Timeout"]}
    assert crds.validate("ProviderChain", doc) == ['spec.fallback.triggers[2]: Duplicate value: "Timeout"']
    with pytest.raises(ValidationError, match="duplicate fallback trigger"):
        ProviderChain.model_validate(doc)


GOOD = [
    pytest.param(pool_doc, _set("spec.cooldowns", {"rateLimited": "1m30s", "max": "2h"}), id="cooldowns"),
    pytest.param(pool_doc, _set("spec.credentials[0].baseURL", "https://eu.api.openai.com/v1"), id="credential-base-url"),
    pytest.param(pool_doc, _set("spec.strategy", "LeastUsed"), id="strategy"),
    pytest.param(chain_doc, _set("spec.providers[1]", entry("openai", name="openai-long")), id="two-entries-of-one-provider"),
    pytest.param(chain_doc, _set("spec.fallback", {"contextLength": ["openrouter"]}), id="context-length-by-provider"),
    pytest.param(chain_doc, _set("spec.providers[1]", entry("openai", name="big", models={"*": "gpt-4.1"})), id="named-entry-map-all"),
    pytest.param(chain_doc, _set("spec.fallback", {"triggers": ["RateLimited", "Timeout"], "maxWait": "500ms"}), id="fallback"),
    pytest.param(chain_doc, _set("spec.providers[0].timeouts", {"firstByte": "45s"}), id="entry-timeouts"),
    pytest.param(chain_doc, _set("spec.providers[0].name", None), id="null-is-pruned"),
    pytest.param(chain_doc, _set("metadata.name", "a" * 62 + "0"), id="63-character-chain-name"),
    pytest.param(pool_doc, _set("metadata.name", "openai.eu-west-1." + "p" * 46), id="63-character-dotted-pool-name"),
]  # fmt: skip


@pytest.mark.parametrize(("base", "edit"), GOOD)
def test_good_manifests_are_accepted_by_the_crd_and_the_models(base: Callable[[], Doc], edit: Edit) -> None:
    doc = base()
    edit(doc)
    model_of(doc).model_validate(doc)
    assert crds.validate(doc["kind"], doc) == []


@needs_cel
def test_context_length_may_name_an_entry_by_its_name() -> None:
    doc = chain_doc()
    doc["spec"]["providers"].append(entry("openai", name="openai-long"))
    doc["spec"]["fallback"] = {"contextLength": ["openai-long", "openrouter"]}
    assert crds.validate("ProviderChain", doc) == []
    doc["spec"]["fallback"] = {"contextLength": ["openai-long", "anthropic"]}
    assert crds.validate("ProviderChain", doc) == [
        "spec: Invalid value: fallback.contextLength must name entries of spec.providers "
        "(an entry's name defaults to its provider)"
    ]


# --- names (keyroute.core.names): one rule, applied by the CRD, the models, the operator, the webhook --

CHAIN_NAMES = [
    ("agents", True),
    ("a", True),
    ("0", True),
    ("a1-b2", True),
    ("a" * 63, True),
    ("a" * 64, False),
    ("a" * 253, False),
    ("agents.v1", False),
    ("x.y.z", False),
    ("Agents", False),
    ("-agents", False),
    ("agents-", False),
    ("agents_1", False),
]


@needs_cel
@pytest.mark.parametrize(("name", "valid"), CHAIN_NAMES)
def test_the_crd_the_models_the_operator_and_the_webhook_apply_one_chain_name_rule(name: str, valid: bool) -> None:
    doc = chain_doc()
    doc["metadata"]["name"] = name
    errors = crds.validate("ProviderChain", doc)
    assert (errors == []) is valid, errors
    if not valid:
        assert errors == [f"<root>: Invalid value: {CHAIN_NAME_MESSAGE}"]
    try:
        ProviderChain.model_validate(doc)
    except ValidationError as e:
        assert not valid and CHAIN_NAME_MESSAGE in str(e)
    else:
        assert valid
    assert (chain_name_problem(name) is None) is valid
    try:
        check_chain_name(name)
    except InjectionError:
        assert not valid
    else:
        assert valid


@needs_cel
@pytest.mark.parametrize(
    ("name", "valid"),
    [("openai", True), ("openai.eu-west-1", True), ("p" * 63, True), ("p" * 64, False), ("p" * 253, False)],
)
def test_a_pool_name_may_have_dots_but_at_most_63_characters(name: str, valid: bool) -> None:
    doc = pool_doc()
    doc["metadata"]["name"] = name
    errors = crds.validate("CredentialPool", doc)
    assert (errors == []) is valid, errors
    if not valid:
        assert errors == [f"<root>: Invalid value: {POOL_NAME_MESSAGE}"]
    try:
        CredentialPool.model_validate(doc)
    except ValidationError:
        assert not valid
    else:
        assert valid
    assert (pool_name_problem(name) is None) is valid


def test_the_name_rules_are_built_from_the_names_module() -> None:
    """One place for the rule: the CEL text carries the same limit and pattern as the Python check."""
    chain_rules = crds.open_api_schema("ProviderChain")["x-kubernetes-validations"]
    assert chain_rules == [{"rule": CHAIN_NAME_RULE, "message": CHAIN_NAME_MESSAGE}]
    assert f"<= {LABEL_VALUE_MAX}" in CHAIN_NAME_RULE and DNS1123_LABEL in CHAIN_NAME_RULE
    pool_rules = crds.open_api_schema("CredentialPool")["x-kubernetes-validations"]
    assert pool_rules == [{"rule": POOL_NAME_RULE, "message": POOL_NAME_MESSAGE}]


def test_whole_manifests_must_name_the_kind_and_api_version() -> None:
    doc = pool_doc()
    doc["apiVersion"] = "keyroute.dev/v1"
    assert crds.validate("CredentialPool", doc) == [
        "apiVersion: expected 'keyroute.dev/v1alpha1', got 'keyroute.dev/v1'"
    ]
    assert "kind: expected 'ProviderChain', got 'CredentialPool'" in crds.validate(
        "ProviderChain", pool_doc()
    )


def test_spec_alone_can_be_validated() -> None:
    assert crds.validate("CredentialPool", pool_doc()["spec"], part="spec") == []
    assert crds.validate("CredentialPool", {"provider": "openai"}, part="spec") == [
        "spec: 'credentials' is a required property"
    ]


# --- status ----------------------------------------------------------------------------------------

T = "2026-01-02T03:04:05Z"


def pool_status() -> Doc:
    """A pool status as the operator writes it, one credential in each state."""
    return {
        "observedGeneration": 4,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "CredentialsAvailable", "message": "1 of 5 credentials available", "lastTransitionTime": T, "observedGeneration": 4},
            {"type": "Degraded", "status": "True", "reason": "RateLimited", "message": "k2: CoolingDown", "lastTransitionTime": T, "observedGeneration": 4},
            {"type": "Exhausted", "status": "False", "reason": "CredentialsAvailable", "message": "", "lastTransitionTime": T, "observedGeneration": 4},
        ],
        "available": 1,
        "total": 5,
        "nextAvailableAt": "2026-01-02T03:05:05Z",
        "credentials": [
            {"name": "k1", "state": "Available", "fingerprint": "3f2a9c1d", "lastTransitionTime": T},
            {"name": "k2", "state": "CoolingDown", "reason": "RateLimited", "until": "2026-01-02T03:05:05Z", "lastErrorCode": 429, "fingerprint": "9b0e44aa", "lastTransitionTime": T, "reportedBy": "agent-7d9f-x2", "model": "gpt-4o", "scope": "Pool"},
            {"name": "k3", "state": "Exhausted", "reason": "Billing", "until": "2026-01-02T04:04:05Z", "lastErrorCode": 402, "fingerprint": "07c1d2e3", "lastTransitionTime": T, "reportedBy": "default/agent-7d9f-x2"},
            {"name": "k4", "state": "Rejected", "reason": "Revoked", "lastErrorCode": 401, "fingerprint": "5e6f7a8b", "lastTransitionTime": T, "reportedBy": "default/agent-7d9f-q8"},
            {"name": "k5", "state": "Missing", "reason": "SecretKeyNotFound", "lastTransitionTime": T},
        ],
    }  # fmt: skip


def chain_status() -> Doc:
    return {
        "observedGeneration": 2,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllEntriesReady", "message": "3 entries", "lastTransitionTime": T, "observedGeneration": 2},
            {"type": "FallbackActive", "status": "True", "reason": "RateLimited", "message": "1 of 4 sidecars on openrouter", "lastTransitionTime": T, "observedGeneration": 2},
        ],
        "activeProvider": "openai",
        "sidecars": 4,
        "sidecarsOnFallback": 1,
        "lastFallback": {"from": "openai", "to": "openrouter", "reason": "RateLimited", "time": T, "pod": "default/agent-7d9f-x2"},
        "config": {"name": "agents-keyroute", "hash": "sha256:0d1e2f3a4b5c"},
    }  # fmt: skip


STATUSES = [
    pytest.param("CredentialPool", pool_status, CredentialPoolStatus, id="pool"),
    pytest.param("ProviderChain", chain_status, ProviderChainStatus, id="chain"),
]


def unset_fields(model: BaseModel) -> list[str]:
    """Fields of ``model``'s type (recursively) that no instance in ``model`` was given a value for."""
    declared: set[str] = set()
    given: set[str] = set()

    def visit(obj: BaseModel, path: str) -> None:
        declared.update(f"{path}{name}" for name in type(obj).model_fields)
        for name in obj.model_fields_set:
            given.add(f"{path}{name}")
            value = getattr(obj, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, BaseModel):
                    visit(item, f"{path}{name}.")

    visit(model, "")
    return sorted(declared - given)


@pytest.mark.parametrize(("kind", "sample", "model"), STATUSES)
def test_status_samples_are_valid_and_cover_every_status_field(
    kind: str, sample: Callable[[], Doc], model: type[BaseModel]
) -> None:
    status = sample()
    assert crds.validate(kind, status, part="status") == []
    parsed = model.model_validate(status)
    # Every field of the status model is exercised, and the model keeps everything the sample says.
    assert unset_fields(parsed) == []
    assert parsed.model_dump(by_alias=True, exclude_none=True) == status
    # As part of a whole object, too.
    doc = (pool_doc if kind == "CredentialPool" else chain_doc)()
    doc["status"] = status
    assert crds.validate(kind, doc) == []


def test_pool_status_sample_has_every_state_and_condition() -> None:
    status = pool_status()
    assert {c["state"] for c in status["credentials"]} == set(CredentialState)
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Degraded", "Exhausted"]


@pytest.mark.parametrize(("kind", "sample", "model"), STATUSES)
def test_status_dumped_with_nulls_is_valid(
    kind: str, sample: Callable[[], Doc], model: type[BaseModel]
) -> None:
    # model_dump() without exclude_none writes nulls; the API server prunes (or, in a merge patch,
    # deletes) them, so they are no error.
    dumped = model.model_validate({"conditions": sample()["conditions"]}).model_dump(by_alias=True)
    assert None in dumped.values()
    assert crds.validate(kind, dumped, part="status") == []
    assert crds.validate(kind, model().model_dump(by_alias=True), part="status") == []


BAD_STATUS = [
    pytest.param("CredentialPool", _set("credentials[1].state", "Benched"), "status.credentials[1].state: 'Benched' is not one of", id="unknown-state"),
    pytest.param("CredentialPool", _set("conditions[1].type", "Ready"), 'status.conditions[1]: Duplicate value: type="Ready"', id="duplicate-pool-condition"),
    pytest.param("CredentialPool", _set("credentials[4].name", "k1"), 'status.credentials[4]: Duplicate value: name="k1"', id="duplicate-credential-row"),
    pytest.param("CredentialPool", _set("available", "1"), "status.available: '1' is not of type 'integer'", id="count-as-string"),
    pytest.param("CredentialPool", _set("credentials[0].cooldownSeconds", 30), "status.credentials[0].cooldownSeconds: unknown field (the API server would prune it)", id="undeclared-credential-field"),
    pytest.param("CredentialPool", _del("credentials[0].state"), "status.credentials[0]: 'state' is a required property", id="row-without-state"),
    pytest.param("ProviderChain", _set("conditions[1].type", "Ready"), 'status.conditions[1]: Duplicate value: type="Ready"', id="duplicate-chain-condition"),
    pytest.param("ProviderChain", _set("conditions[0].status", "Yes"), "status.conditions[0].status: 'Yes' is not one of", id="condition-status-not-true-false-unknown"),
    pytest.param("ProviderChain", _del("conditions[0].lastTransitionTime"), "status.conditions[0]: 'lastTransitionTime' is a required property", id="condition-without-time"),
    pytest.param("ProviderChain", _set("activeEntry", "openai"), "status.activeEntry: unknown field (the API server would prune it)", id="undeclared-chain-field"),
    pytest.param("ProviderChain", _set("lastFallback.attempts", 3), "status.lastFallback.attempts: unknown field", id="undeclared-nested-field"),
    pytest.param("ProviderChain", _del("config.hash"), "status.config: 'hash' is a required property", id="config-without-hash"),
    pytest.param("ProviderChain", _set("sidecars", 1.5), "status.sidecars: 1.5 is not of type 'integer'", id="fractional-count"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "edit", "expected"), BAD_STATUS)
def test_bad_status_is_rejected(kind: str, edit: Edit, expected: str) -> None:
    status = (pool_status if kind == "CredentialPool" else chain_status)()
    edit(status)
    errors = crds.validate(kind, status, part="status")
    assert any(expected in e for e in errors), errors


# --- the generator's own guarantees ----------------------------------------------------------------


def test_unsupported_schema_constructs_fail_generation_instead_of_being_dropped() -> None:
    class Union(BaseModel):
        value: int | str

    class Opaque(BaseModel):
        value: dict[str, Any]

    with pytest.raises(crds.SchemaConversionError, match="union of 2 types"):
        crds._model_schema(Union, "spec")
    with pytest.raises(crds.SchemaConversionError, match="neither properties nor a value type"):
        crds._model_schema(Opaque, "spec")


# --- external checkers (when installed) ------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
def test_kubectl_reads_the_crd_files() -> None:
    # No cluster here: `kubectl create --dry-run=client` needs the server's discovery API, so this
    # only proves kubectl decodes each file into exactly the object we meant (`--local`, no server).
    env = {**os.environ, "KUBECONFIG": os.devnull}
    out = subprocess.run(
        [
            "kubectl",
            "annotate",
            "--local",
            "--dry-run=client",
            "-o",
            "name",
            "-f",
            str(CRDS),
            "keyroute.dev/check=1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        f"customresourcedefinition.apiextensions.k8s.io/{crd['metadata']['name']}" for crd in crds.all_crds()
    ]


@pytest.mark.parametrize("version", ["1.28.0", "1.37.0"])
def test_crds_match_the_kubernetes_crd_schema(version: str) -> None:
    # kubernetes-validate carries the API server's OpenAPI schemas: a misspelt CRD field (say,
    # `jsonpath` in a printer column) fails here instead of on `kubectl apply`.
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed"
    )
    for crd in crds.all_crds():
        kubernetes_validate.validate(copy.deepcopy(crd), version, strict=True)
