"""The sidecar's config: watched and reloaded live; unchanged keys keep their state, a changed key
starts healthy, an invalid config is rejected and the last good one kept."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from keyroute.core.config import ConfigError
from keyroute.core.resources import CredentialState
from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.sidecar.sources import ManifestSource, RenderedConfigFile
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def eventually(predicate, within: float = 3.0) -> None:
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def write(path, fp: FakeProvider, keys: dict[str, str]) -> None:
    cfg = config(
        [entry("acme", "acme", fp.base_url, "acme-keys")],
        [pool("acme-keys", "acme", *[cred(n, k, priority=i) for i, (n, k) in enumerate(keys.items())])],
    )
    path.write_text(cfg.to_json())


async def test_live_reload_keeps_unchanged_keys_and_resets_a_changed_one(
    fake_provider, start_sidecar, agent, tmp_path
):
    fp: FakeProvider = await fake_provider("acme")
    fp.set(Behaviour.billing(), key=key("k1"))
    fp.set(Behaviour.billing(), key=key("k2"))
    write(tmp_path / "config.json", fp, {"k1": key("k1"), "k2": key("k2"), "k3": key("k3")})
    sidecar = await start_sidecar(RenderedConfigFile(tmp_path))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.headers["X-Keyroute-Credential"] == "k3"
    pool_state = sidecar.chain.pools["acme-keys"]
    assert pool_state.state("k1", 0)[0] is pool_state.state("k2", 0)[0] is CredentialState.EXHAUSTED

    # k1's Secret value rotates; k2 and k3 are unchanged.
    write(
        tmp_path / "config.json",
        fp,
        {"k1": "sk-test-k1-NEW-VALUE-000000000", "k2": key("k2"), "k3": key("k3")},
    )
    await eventually(
        lambda: sidecar.chain.pools["acme-keys"].credentials[0].key.endswith("NEW-VALUE-000000000")
    )
    pool_state = sidecar.chain.pools["acme-keys"]
    assert pool_state.state("k1", 0)[0] is CredentialState.AVAILABLE
    assert pool_state.state("k2", 0)[0] is CredentialState.EXHAUSTED
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.headers["X-Keyroute-Credential"] == "k1"
    assert fp.received[-1].key == "sk-test-k1-NEW-VALUE-000000000"


@pytest.mark.parametrize(
    "garbage",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"version": 1}',
        b'{"version": 99, "chain": {"name": "x"}, "entries": [], "pools": []}',
    ],
)
async def test_invalid_config_is_rejected_and_the_last_good_one_kept(
    fake_provider, start_sidecar, agent, tmp_path, caplog, garbage
):
    fp: FakeProvider = await fake_provider("acme")
    write(tmp_path / "config.json", fp, {"k1": key("k1")})
    sidecar = await start_sidecar(RenderedConfigFile(tmp_path))
    good = sidecar.config
    caplog.set_level(logging.ERROR, logger="keyroute")
    (tmp_path / "config.json").write_bytes(garbage)
    await eventually(lambda: any("config rejected" in r.getMessage() for r in caplog.records))
    assert sidecar.config is good
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    rejected = sidecar.metrics.registry.get_sample_value(
        "keyroute_config_reloads_total", {"result": "rejected"}
    )
    assert rejected and rejected >= 1


async def test_config_binding_another_providers_pool_is_rejected(tmp_path):
    data = json.loads(
        config(
            [entry("a", "acme", "http://127.0.0.1:9/v1", "p")], [pool("p", "acme", cred("k1", key("k1")))]
        ).to_json()
    )
    data["pools"][0]["provider"] = "other"  # a hand-edited or corrupted file
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="bound to provider other"):
        RenderedConfigFile(tmp_path).load()


async def test_local_mode_manifests_reload(fake_provider, start_sidecar, agent, tmp_path):
    fp: FakeProvider = await fake_provider(
        "acme", keys=["manifest-key-one-000000", "manifest-key-two-000000"]
    )
    manifest = """\
apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{k: {key}}}
---
apiVersion: keyroute.dev/v1alpha1
kind: CredentialPool
metadata: {{name: acme-keys}}
spec:
  provider: acme
  credentials: [{{name: k1, secretRef: {{name: keys, key: k}}}}]
---
apiVersion: keyroute.dev/v1alpha1
kind: ProviderChain
metadata: {{name: local}}
spec:
  providers: [{{provider: acme, baseURL: "{url}", credentialPoolRef: {{name: acme-keys}}}}]
"""
    path = tmp_path / "keyroute.yaml"
    path.write_text(manifest.format(key="manifest-key-one-000000", url=fp.base_url))
    sidecar = await start_sidecar(ManifestSource(path))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    path.write_text(manifest.format(key="manifest-key-two-000000", url=fp.base_url))
    await eventually(lambda: sidecar.chain.pools["acme-keys"].credentials[0].key == "manifest-key-two-000000")
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    assert fp.keys_seen() == ["manifest-key-one-000000", "manifest-key-two-000000"]
    # A broken edit keeps the running config: once the sidecar read it (and rejected it), not after
    # a guessed 0.3 s, which passed as well when the watcher had not looked at the file yet.
    path.write_text("kind: ProviderChain\nspec: [")
    await eventually(
        lambda: sidecar.metrics.registry.get_sample_value("keyroute_config_reloads_total", {"result": "rejected"})
    )
    assert sidecar.chain.pools["acme-keys"].credentials[0].key == "manifest-key-two-000000"
