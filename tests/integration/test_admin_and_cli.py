"""The sidecar as a user runs it: the CLI in local mode, the admin endpoints, and ``keyroute demo``."""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import time

import aiohttp
import pytest

from keyroute.demo import run_demo
from keyroute.fakeprovider import FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat


async def test_metrics_health_and_readiness(fake_provider, start_sidecar, agent):
    fp: FakeProvider = await fake_provider("acme")
    sidecar = await start_sidecar(
        config([entry("acme", "acme", fp.base_url, "k")], [pool("k", "acme", cred("k1"))])
    )
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    admin = f"http://127.0.0.1:{sidecar.admin_port}"
    async with agent.get(admin + "/healthz") as resp:
        assert resp.status == 200
    async with agent.get(admin + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["entries"] == ["acme"]
    async with agent.get(admin + "/metrics") as resp:
        text = await resp.text()
    assert 'keyroute_requests_total{chain="agents",class="OK",provider="acme"} 1.0' in text
    assert (
        'keyroute_upstream_attempts_total{chain="agents",class="OK",credential="k1",provider="acme"} 1.0'
        in text
    )
    assert 'keyroute_credential_state{credential="k1",pool="k",state="Available"} 1.0' in text
    assert "keyroute_sidecar_overhead_seconds_count 1.0" in text
    assert "keyroute_upstream_latency_seconds_bucket" in text


async def test_readyz_is_503_when_no_entry_is_routable(start_sidecar, agent):
    from keyroute.core.config import SidecarConfig

    cfg = SidecarConfig.parse(
        {
            "chain": {"name": "empty"},
            "entries": [],
            "pools": [],
            "excluded": [{"entry": "a", "reason": "PoolNotFound", "message": "x"}],
        }
    )
    sidecar = await start_sidecar(cfg)
    async with agent.get(f"http://127.0.0.1:{sidecar.admin_port}/readyz") as resp:
        assert resp.status == 503
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        assert resp.status == 503 and (await resp.json())["error"]["type"] == "no_providers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("token_metrics", ["on", "off"])
async def test_cli_sidecar_in_local_mode(fake_provider, tmp_path, token_metrics):
    """The CLI's local mode end to end, in its own process; ``--token-metrics`` reaches the metrics."""
    fp: FakeProvider = await fake_provider("acme", keys=["cli-key-0000000000000000"])
    (tmp_path / "all.yaml").write_text(f"""\
apiVersion: v1
kind: Secret
metadata: {{name: keys, namespace: team}}
data: {{k: Y2xpLWtleS0wMDAwMDAwMDAwMDAwMDAw}}
---
apiVersion: keyroute.dev/v1alpha1
kind: CredentialPool
metadata: {{name: acme-keys, namespace: team}}
spec:
  provider: acme
  credentials: [{{name: k1, secretRef: {{name: keys, key: k}}}}]
---
apiVersion: keyroute.dev/v1alpha1
kind: ProviderChain
metadata: {{name: local, namespace: team}}
spec:
  providers: [{{provider: acme, baseURL: "{fp.base_url}", credentialPoolRef: {{name: acme-keys}}}}]
""")
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyroute.cli",
        "sidecar",
        "--manifests",
        str(tmp_path),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--token-metrics",
        token_metrics,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with client.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "sidecar did not become ready"
                await asyncio.sleep(0.1)
            async with client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 200 and resp.headers["X-Keyroute-Credential"] == "k1"
                assert (await resp.json())["usage"]["prompt_tokens"] > 0  # there were tokens to count
            async with client.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                metrics = await resp.text()
        # Served requests are counted either way; tokens only with --token-metrics on (the default).
        assert 'keyroute_requests_total{chain="local"' in metrics
        counted = [line for line in metrics.splitlines() if line.startswith("keyroute_tokens_total{")]
        assert bool(counted) == (token_metrics == "on"), counted
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert fp.keys_seen() == ["cli-key-0000000000000000"]
    assert b'"msg": "config loaded"' in stderr and b"cli-key-0000" not in stderr


async def test_cli_sidecar_refuses_an_invalid_start(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "kind: CredentialPool\nmetadata: {name: x}\nspec: {provider: a, strategy: Fastest}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyroute.cli",
        "sidecar",
        "--manifests",
        str(tmp_path / "bad.yaml"),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"cannot start" in stderr and b"strategy" in stderr


async def test_demo_runs_and_nothing_is_lost():
    out = io.StringIO()
    assert await run_demo(duration=6.0, rate=15.0, out=out) == 0
    text = out.getvalue()
    assert "keys sent to the wrong provider: 0" in text
    for kind in ("CredentialCoolingDown", "CredentialExhausted", "FallbackActivated", "PrimaryRestored"):
        assert kind in text, kind
    assert "not-a-real-key" not in text
    assert "shown: rotation yes, fallback yes, return to the primary yes" in text


def test_cli_check_and_render_on_the_examples(tmp_path, capsys):
    from keyroute.cli import main

    assert main(["check", "--manifests", "examples"]) == 0
    shown = capsys.readouterr().out
    assert "route  openai" in shown and "sha256:" in shown and "REPLACE-ME" not in shown
    out = tmp_path / "config.json"
    assert main(["render", "--manifests", "examples", "-o", str(out)]) == 0
    assert "REPLACE-ME" not in capsys.readouterr().out
    assert "REPLACE-ME" in out.read_text() and (out.stat().st_mode & 0o777) == 0o600
    assert main(["check", "--manifests", str(tmp_path / "missing.yaml")]) == 2
    assert "error:" in capsys.readouterr().err
