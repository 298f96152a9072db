"""Local mode: manifests as a user would ``kubectl apply`` them, parsed and rendered without a cluster."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from keyroute.core.manifests import (
    ManifestError,
    Manifests,
    parse_manifests,
    render_manifests,
    select_chain,
)
from keyroute.core.render import POOL_NOT_FOUND
from keyroute.core.resources import ApiStyle, Strategy
from keyroute.sidecar.manifest_files import manifest_files, read_manifest_texts

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

KEY_1 = "sk-test-KEYROUTE-SECRET-0001"
KEY_2 = "sk-test-KEYROUTE-SECRET-0002"
KEY_3 = "sk-or-test-KEYROUTE-SECRET-0003"
ALL_KEYS = (KEY_1, KEY_2, KEY_3)

CHAIN = """\
apiVersion: keyroute.dev/v1alpha1
kind: ProviderChain
metadata:
  name: agents
spec:
  providers:
    - provider: openai
      baseURL: https://api.openai.example/v1
      credentialPoolRef: {name: openai}
    - provider: openrouter
      baseURL: https://openrouter.example/api/v1
      credentialPoolRef: {name: openrouter}
      models: {gpt-4o: openai/gpt-4o}
"""

POOLS = """\
apiVersion: keyroute.dev/v1alpha1
kind: CredentialPool
metadata: {name: openai}
spec:
  provider: openai
  credentials:
    - {name: a1, secretRef: {name: openai-keys, key: key-1}}
    - {name: a2, secretRef: {name: openai-keys, key: key-2}}
---
apiVersion: keyroute.dev/v1alpha1
kind: CredentialPool
metadata: {name: openrouter}
spec:
  provider: openrouter
  strategy: RoundRobin
  credentials:
    - {name: b1, secretRef: {name: openrouter-keys, key: key-1}}
"""

SECRETS = f"""\
apiVersion: v1
kind: Secret
metadata: {{name: openai-keys}}
type: Opaque
stringData:
  key-1: {KEY_1}
data:
  key-2: {base64.b64encode(KEY_2.encode()).decode()}
---
apiVersion: v1
kind: Secret
metadata: {{name: openrouter-keys}}
stringData:
  key-1: {KEY_3}
"""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: agent, labels: {keyroute.dev/chain: agents}}
spec:
  replicas: 1
  template:
    spec:
      containers: [{name: agent, image: agent:latest}]
"""


def parse(*texts: str) -> Manifests:
    return parse_manifests((f"file{i}.yaml", t) for i, t in enumerate(texts, start=1))


def error_of(*texts: str) -> str:
    with pytest.raises(ManifestError) as info:
        parse(*texts)
    return str(info.value)


def assert_no_key(text: str) -> None:
    for key in ALL_KEYS:
        assert key not in text
        assert base64.b64encode(key.encode()).decode() not in text


# --- parsing ----------------------------------------------------------------------------------------


def test_multi_document_yaml_is_read() -> None:
    text = "---\n" + CHAIN + "---\n" + POOLS + "\n---\n" + SECRETS + "---\n"
    m = parse(text)
    assert list(m.chains) == [("default", "agents")]
    assert sorted(m.pools) == [("default", "openai"), ("default", "openrouter")]
    assert sorted(m.secrets) == [("default", "openai-keys"), ("default", "openrouter-keys")]
    assert m.pools["default", "openrouter"].spec.strategy is Strategy.ROUND_ROBIN


def test_objects_from_several_sources_are_merged() -> None:
    m = parse(CHAIN, POOLS, SECRETS)
    assert (len(m.chains), len(m.pools), len(m.secrets)) == (1, 2, 2)


def test_secret_data_is_base64_and_string_data_is_plain() -> None:
    m = parse(SECRETS)
    assert m.secrets["default", "openai-keys"].values() == {"key-1": KEY_1, "key-2": KEY_2}
    assert m.secrets["default", "openrouter-keys"].values() == {"key-1": KEY_3}


def test_other_kinds_are_ignored() -> None:
    other = (
        DEPLOYMENT
        + "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: agents}\ndata: {a: b}\n"
        + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n"
    )
    m = parse(CHAIN, other, POOLS, SECRETS)
    assert (len(m.chains), len(m.pools), len(m.secrets)) == (1, 2, 2)


def test_list_kind_is_expanded() -> None:
    # What `kubectl get cpool,secret -o yaml` writes.
    items = [yaml.safe_load(doc) for doc in (POOLS.split("---\n") + SECRETS.split("---\n"))]
    text = json.dumps(
        {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}
    )
    m = parse(CHAIN, text)
    assert sorted(m.pools) == [("default", "openai"), ("default", "openrouter")]
    assert sorted(m.secrets) == [("default", "openai-keys"), ("default", "openrouter-keys")]


def test_typed_list_kind_and_empty_list() -> None:
    text = (
        "apiVersion: v1\nkind: SecretList\nitems:\n"
        "  - {apiVersion: v1, kind: Secret, metadata: {name: s1}, stringData: {k: v}}\n"
        "---\napiVersion: v1\nkind: List\nitems: []\n"
    )
    assert list(parse(text).secrets) == [("default", "s1")]


def test_namespaces_default_and_are_kept() -> None:
    text = CHAIN.replace("name: agents", "name: agents\n  namespace: team-a")
    m = parse(CHAIN, text)
    assert sorted(m.chains) == [("default", "agents"), ("team-a", "agents")]


def test_empty_namespace_means_default() -> None:
    m = parse(
        CHAIN.replace("name: agents", "name: agents\n  namespace:"),
        POOLS.replace("{name: openai}", '{name: openai, namespace: ""}'),
    )
    assert list(m.chains) == [("default", "agents")]
    assert ("default", "openai") in m.pools


def test_json_manifests_are_read() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "json-keys", "namespace": "team-a"},
        "stringData": {"k": KEY_1},
    }
    assert parse(json.dumps(doc)).secrets["team-a", "json-keys"].values() == {"k": KEY_1}


def test_empty_input_gives_empty_manifests() -> None:
    m = parse("", "---\n---\n", "# only a comment\n")
    assert (m.chains, m.pools, m.secrets) == ({}, {}, {})


def test_manifests_are_frozen_and_their_repr_shows_no_key() -> None:
    m = parse(CHAIN, POOLS, SECRETS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.chains = {}  # type: ignore[misc]
    assert_no_key(repr(m))
    assert_no_key(str(m))


# --- errors -----------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line_without_echoing_the_text() -> None:
    bad = f"apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\nstringData:\n  key-1: {KEY_1}: oops\n"
    with pytest.raises(ManifestError) as info:
        parse_manifests([("secrets/openai.yaml", bad)])
    text = str(info.value)
    assert "secrets/openai.yaml" in text
    assert "line 5" in text
    assert "invalid YAML" in text
    assert "oops" not in text
    assert_no_key(text)


def test_yaml_syntax_error_in_a_later_document_names_it() -> None:
    text = error_of(CHAIN + "---\nkind: Secret\nmetadata: {name: [unclosed\n")
    assert "file1.yaml: document 2" in text
    assert "line 17" in text


@pytest.mark.parametrize(
    "bad",
    [
        f"stringData:\n  api-key: *{KEY_1}\n",  # reads as an undefined alias
        f"stringData:\n  api-key: {KEY_1}\n\t  other: x\n",  # a tab
        f"stringData:\n  api-key: !{KEY_1} x\n",  # reads as an unknown tag
        f'stringData:\n  api-key: "{KEY_1}\n',  # unclosed quote
        f"stringData:\n  api-key: {KEY_1}\x07\n",  # a control character
    ],
)
def test_yaml_errors_never_echo_a_key(bad: str) -> None:
    text = error_of("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n" + bad)
    assert "file1.yaml" in text
    assert "line" in text
    assert_no_key(text)


def test_validation_error_names_source_document_kind_and_name() -> None:
    bad = POOLS.replace("strategy: RoundRobin", "strategy: Sticky")
    text = error_of(CHAIN, bad)
    assert text.startswith("file2.yaml: document 2: CredentialPool openrouter is invalid:")
    assert "spec.strategy" in text


def test_validation_error_with_namespace_in_the_label() -> None:
    bad = CHAIN.replace("name: agents", "name: agents\n  namespace: team-a").replace(
        "baseURL: https", "baseURL: h"
    )
    text = error_of(bad)
    assert "ProviderChain team-a/agents is invalid" in text
    assert "spec.providers.0.baseURL" in text


@pytest.mark.parametrize(
    "secret",
    [
        # A value that is not a string.
        f"metadata: {{name: s}}\nstringData:\n  api-key: [{KEY_1}]\n",
        f"metadata: {{name: s}}\nstringData:\n  api-key: {{value: {KEY_1}}}\n",
        # A key written where a key *name* belongs.
        f"metadata: {{name: s}}\nstringData:\n  {KEY_1}:\n",
        f"metadata: {{name: s}}\ndata:\n  {KEY_1}: 12\n",
        # Plain text under data.
        f"metadata: {{name: s}}\ndata:\n  api-key: {KEY_1}\n",
        f"metadata: {{name: s}}\ndata:\n  {KEY_1}: {KEY_1}\n",
        # The key pasted as the name, or as the whole of stringData.
        f"metadata: {{name: {KEY_1}}}\nstringData:\n  api-key: {KEY_1}\n",
        f"metadata: {{name: s}}\nstringData: {KEY_1}\n",
        f"metadata: {{name: s, labels: {{{KEY_1}: 1}}}}\n",
        # Wrong apiVersion.
        f"apiVersion: {KEY_1}\nmetadata: {{name: s}}\n",
        f"metadata:\n  name: s\n  namespace: [{KEY_1}]\nstringData:\n  api-key: {KEY_1}\n",
    ],
)
def test_bad_secret_errors_never_contain_a_key(secret: str) -> None:
    doc = secret if secret.startswith("apiVersion") else "apiVersion: v1\n" + secret
    text = error_of(CHAIN, "kind: Secret\n" + doc)
    assert text.startswith("file2.yaml: document 1: Secret")
    assert_no_key(text)


def test_plain_text_under_data_is_reported() -> None:
    text = error_of(f"apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\ndata:\n  a: YQ==\n  b: {KEY_1}\n")
    assert "Secret s: data value 2 of 2 is not valid base64" in text
    assert "stringData" in text


def test_non_string_secret_value_names_the_map_not_the_key() -> None:
    text = error_of("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData:\n  api-key: [x]\n")
    assert "stringData.<key>: Input should be a valid string" in text


def test_duplicate_objects_are_rejected() -> None:
    text = error_of(CHAIN, POOLS, CHAIN)
    assert "ProviderChain default/agents is defined twice" in text
    assert "file3.yaml: document 1" in text
    assert "file1.yaml: document 1" in text


def test_duplicate_secret_in_one_file_is_rejected() -> None:
    text = error_of(SECRETS + "---\n" + SECRETS.split("---\n")[1])
    assert "Secret default/openrouter-keys is defined twice" in text
    assert_no_key(text)


def test_same_name_in_other_kinds_or_namespaces_is_not_a_duplicate() -> None:
    same_name_secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: agents}\nstringData: {k: v}\n"
    other_ns = CHAIN.replace("name: agents", "name: agents\n  namespace: team-b")
    m = parse(CHAIN, same_name_secret, other_ns)
    assert len(m.chains) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", "expected a Kubernetes object \\(a mapping\\), found a list"),
        ("just text\n", "found a string"),
        ("metadata: {name: x}\n", "has no kind"),
        ("kind: List\nitems: {a: b}\n", "items must be a list"),
        ("kind: List\nitems: [42]\n", "item 1: expected a Kubernetes object"),
        (
            CHAIN.replace("keyroute.dev/v1alpha1", "keyroute.dev/v1beta1"),
            "ProviderChain agents: apiVersion must be keyroute.dev/v1alpha1",
        ),
        (
            POOLS.replace("keyroute.dev/v1alpha1", "keyroute.io/v1"),
            "CredentialPool openai: apiVersion must be keyroute.dev/v1alpha1",
        ),
    ],
)
def test_malformed_documents_are_rejected(text: str, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        parse(text)


def test_manifest_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse("- a\n")


def test_unquoted_on_key_gets_a_hint() -> None:
    # YAML 1.1 reads `on:` as the boolean true (the field is named `triggers` for that reason, but a
    # user may still write `on:` somewhere, e.g. from another tool's habits).
    bad = CHAIN + "  fallback:\n    on: [RateLimited]\n"
    text = error_of(bad)
    assert "spec.fallback.1: Keys should be strings" in text  # pydantic's words for a key `True`
    assert 'quote it, e.g. "on":' in text
    good = CHAIN + "  fallback:\n    triggers: [RateLimited]\n"
    assert parse(good).chains["default", "agents"].spec.fallback.triggers == ["RateLimited"]


# --- choosing and rendering a chain -----------------------------------------------------------------


def _chain(name: str, namespace: str = "default") -> str:
    return CHAIN.replace("name: agents", f"name: {name}\n  namespace: {namespace}")


def test_the_only_chain_is_chosen() -> None:
    assert select_chain(parse(CHAIN, POOLS), None).name == "agents"
    assert select_chain(parse(CHAIN), "agents", "default").name == "agents"


def test_no_chain_is_an_error() -> None:
    with pytest.raises(ManifestError, match="hold no ProviderChain"):
        select_chain(parse(POOLS, SECRETS), None)


def test_several_chains_need_a_name() -> None:
    m = parse(_chain("agents"), _chain("batch"), _chain("agents", "team-a"))
    with pytest.raises(ManifestError) as info:
        select_chain(m, None)
    text = str(info.value)
    assert "3 ProviderChains" in text
    assert "default/agents, default/batch, team-a/agents" in text
    assert select_chain(m, "batch").name == "batch"
    assert select_chain(m, "agents", "team-a").namespace == "team-a"
    assert select_chain(m, None, "team-a").namespace == "team-a"


def test_unknown_chain_lists_the_available_ones() -> None:
    m = parse(_chain("agents"), _chain("batch"))
    with pytest.raises(
        ManifestError,
        match="no ProviderChain nightly in the manifests; available: default/agents, default/batch",
    ):
        select_chain(m, "nightly")
    with pytest.raises(ManifestError, match=r"in namespace team-a.*available: default/agents"):
        select_chain(m, "agents", "team-a")
    with pytest.raises(
        ManifestError,
        match=r"^no ProviderChain in namespace team-a in the manifests; available: default/agents, default/batch$",
    ):
        select_chain(m, None, "team-a")


def test_same_chain_name_in_two_namespaces_needs_a_namespace() -> None:
    m = parse(_chain("agents"), _chain("agents", "team-a"))
    with pytest.raises(ManifestError, match="several namespaces \\(default/agents, team-a/agents\\)"):
        select_chain(m, "agents")
    assert select_chain(m, "agents", "default").namespace == "default"


def test_render_manifests_renders_the_chain() -> None:
    result = render_manifests(parse(CHAIN, POOLS, SECRETS + "---\n" + DEPLOYMENT))
    cfg = result.config
    assert [e.name for e in cfg.entries] == ["openai", "openrouter"]
    pools = {p.name: p for p in cfg.pools}
    assert [c.key for c in pools["openai"].credentials] == [KEY_1, KEY_2]
    assert [c.key for c in pools["openrouter"].credentials] == [KEY_3]
    assert cfg.excluded == []


def test_render_manifests_only_uses_the_chains_namespace() -> None:
    # The chain is in team-a; the only pools and Secrets are in default: nothing is borrowed across.
    m = parse(_chain("agents", "team-a"), POOLS, SECRETS)
    result = render_manifests(m, "agents")
    assert result.config.entries == []
    assert [x.reason for x in result.excluded_entries] == [POOL_NOT_FOUND, POOL_NOT_FOUND]
    moved = POOLS.replace("metadata: {name: openai}", "metadata: {name: openai, namespace: team-a}")
    secrets = SECRETS.replace(
        "metadata: {name: openai-keys}", "metadata: {name: openai-keys, namespace: team-a}"
    )
    result = render_manifests(parse(_chain("agents", "team-a"), moved, secrets), None, "team-a")
    assert [e.name for e in result.config.entries] == ["openai"]


def test_render_manifests_passes_selection_errors_on() -> None:
    with pytest.raises(ManifestError, match="available: default/agents"):
        render_manifests(parse(CHAIN), "batch")


# --- files ------------------------------------------------------------------------------------------


def test_directory_is_read_in_name_order_non_recursively(tmp_path: Path) -> None:
    (tmp_path / "30-secrets.yml").write_text(SECRETS)
    (tmp_path / "10-chain.yaml").write_text(CHAIN)
    (tmp_path / "20-pools.JSON").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": []}))
    (tmp_path / "25-pools.yaml").write_text(POOLS)
    (tmp_path / "README.md").write_text("# not a manifest: kind: ProviderChain")
    (tmp_path / ".10-chain.yaml.swp.yaml").write_text("{{ not yaml")  # an editor's file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "chain.yaml").write_text(CHAIN)  # would be a duplicate if read
    (tmp_path / "dir.yaml").mkdir()
    names = [p.name for p in manifest_files(tmp_path)]
    assert names == ["10-chain.yaml", "20-pools.JSON", "25-pools.yaml", "30-secrets.yml"]
    texts = read_manifest_texts(tmp_path)
    assert [Path(name).name for name, _ in texts] == names
    result = render_manifests(parse_manifests(texts))
    assert [e.name for e in result.config.entries] == ["openai", "openrouter"]


def test_a_single_file_is_read_whatever_its_name(tmp_path: Path) -> None:
    f = tmp_path / "all-in-one.txt"
    f.write_text(CHAIN + "---\n" + POOLS + "---\n" + SECRETS)
    assert manifest_files(f) == [f]
    ((name, text),) = read_manifest_texts(f)
    assert name == str(f)
    assert len(parse_manifests([(name, text)]).pools) == 2


def test_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "chain.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + CHAIN.encode())
    ((_, text),) = read_manifest_texts(f)
    assert not text.startswith("\ufeff")
    assert list(parse_manifests(read_manifest_texts(f)).chains) == [("default", "agents")]


def test_missing_path_is_an_error_but_still_watched(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ManifestError, match="nope: no such file or directory"):
        read_manifest_texts(missing)
    assert manifest_files(missing) == [missing]


def test_directory_without_manifests_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match=re.escape("no *.yaml, *.yml or *.json files")):
        read_manifest_texts(tmp_path)
    assert manifest_files(tmp_path) == []


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_bytes(b"stringData:\n  k: \xff\xfe" + KEY_1.encode())
    with pytest.raises(ManifestError, match=r"keys\.yaml: not UTF-8 text") as info:
        read_manifest_texts(f)
    assert_no_key(str(info.value))


def test_read_failure_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too, where a mode-0 file is still readable (see the test below).
    (tmp_path / "keys.yaml").write_text(SECRETS)

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ManifestError, match=r"^cannot read .*keys\.yaml: Permission denied$"):
        read_manifest_texts(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(SECRETS)
    f.chmod(0)
    try:
        with pytest.raises(ManifestError, match=r"cannot read .*keys\.yaml: Permission denied"):
            read_manifest_texts(tmp_path)
    finally:
        f.chmod(0o600)


def test_yaml_error_names_the_file_on_disk(tmp_path: Path) -> None:
    (tmp_path / "chain.yaml").write_text(CHAIN)
    (tmp_path / "keys.yaml").write_text(f"kind: Secret\nstringData:\n  k: {KEY_1}: x\n")
    with pytest.raises(ManifestError) as info:
        parse_manifests(read_manifest_texts(tmp_path))
    text = str(info.value)
    assert str(tmp_path / "keys.yaml") in text
    assert "line 3" in text
    assert_no_key(text)


# --- the shipped examples ---------------------------------------------------------------------------


def test_examples_render_all_three_providers() -> None:
    texts = read_manifest_texts(EXAMPLES)
    assert sorted(Path(n).name for n, _ in texts) == ["chain.yaml", "pools.yaml", "secrets.yaml"]
    result = render_manifests(parse_manifests(texts))
    cfg = result.config
    assert (cfg.chain.namespace, cfg.chain.name) == ("default", "agents")
    assert [(e.name, e.base_url) for e in cfg.entries] == [
        ("openai", "https://api.openai.com/v1"),
        ("openrouter", "https://openrouter.ai/api/v1"),
        ("anthropic", "https://api.anthropic.com/v1"),
    ]
    assert cfg.excluded == []
    entries = {e.name: e for e in cfg.entries}
    assert entries["openrouter"].models["gpt-4o"] == "openai/gpt-4o"
    assert entries["anthropic"].api is ApiStyle.ANTHROPIC
    assert entries["anthropic"].models
    pools = {p.name: p for p in cfg.pools}
    assert (pools["openai"].strategy, len(pools["openai"].credentials)) == (Strategy.FILL_FIRST, 3)
    assert (pools["openrouter"].strategy, len(pools["openrouter"].credentials)) == (Strategy.ROUND_ROBIN, 2)
    assert len(pools["anthropic"].credentials) == 1
    assert (cfg.fallback.restore_after, cfg.fallback.max_wait) == (60.0, 5.0)
    # The examples hold placeholders only, never anything that looks like a real key.
    for p in cfg.pools:
        for c in p.credentials:
            assert c.key.startswith("REPLACE-ME-")


def test_examples_select_by_name_too() -> None:
    m = parse_manifests(read_manifest_texts(EXAMPLES))
    assert render_manifests(m, "agents", "default").config.chain.name == "agents"
