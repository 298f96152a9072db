"""SIGTERM on ``keyroute sidecar``, as a process in front of a streaming fake provider.

What Kubernetes does to a pod going away: SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``.
The sidecar refuses new connections at once, lets requests and streams in flight finish for up to
``--shutdown-grace`` seconds, then exits 0. Times are measured from the signal.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.integration.conftest import chat
from tests.integration.test_admin_and_cli import free_port

KEY = "sk-test-shutdown-0123456789abcdef"
# The sidecar's own shutdown (its "sidecar stopped" log line: from the signal to the end of its
# teardown) ends within the grace plus this.
TEARDOWN = 0.5
# The process's exit as this test sees it also holds the interpreter's exit and the scheduling of a
# loaded machine (2 shared cores: over a second seen); still well inside Kubernetes' 30 s.
MARGIN = 3.0


class SidecarProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, admin: int):
        self.proc, self.port, self.admin = proc, port, admin
        self.url = f"http://127.0.0.1:{port}/v1"
        self.signalled = 0.0

    def terminate(self) -> None:
        self.signalled = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)

    async def exited(self, within: float) -> tuple[int, float, dict[str, Any]]:
        """Exit code, seconds from SIGTERM to exit, and the sidecar's "sidecar stopped" log line."""
        _, stderr = await asyncio.wait_for(self.proc.communicate(), within)
        took = time.monotonic() - self.signalled
        assert self.proc.returncode is not None
        assert KEY not in stderr.decode()
        logs = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
        stopped = next(entry for entry in logs if entry["msg"] == "sidecar stopped")
        stopped["cut_logged"] = any(
            e["msg"] == "grace period over: requests still in flight were cut" for e in logs
        )
        # Shown with -s: the measured times.
        print(f"exit {self.proc.returncode}: {took:.3f} s after SIGTERM, shutdown {stopped['seconds']} s")
        return self.proc.returncode, took, stopped


def manifests(tmp_path: Path, base_url: str) -> Path:
    (tmp_path / "all.yaml").write_text(f"""\
apiVersion: v1
kind: Secret
metadata: {{name: keys, namespace: team}}
stringData: {{k: {KEY}}}
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
  providers: [{{provider: acme, baseURL: "{base_url}", credentialPoolRef: {{name: acme-keys}}}}]
""")
    return tmp_path


@pytest.fixture
async def provider(fake_provider) -> FakeProvider:
    fp: FakeProvider = await fake_provider("acme", keys=[KEY])
    return fp


@pytest.fixture
async def sidecar_process(provider, tmp_path) -> AsyncIterator[Any]:
    started: list[SidecarProcess] = []

    async def start(grace: float) -> SidecarProcess:
        port, admin = free_port(), free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keyroute.cli",
            "sidecar",
            "--manifests",
            str(manifests(tmp_path, provider.base_url)),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--report",
            "off",
            "--shutdown-grace",
            str(grace),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        sidecar = SidecarProcess(proc, port, admin)
        started.append(sidecar)
        async with aiohttp.ClientSession() as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with client.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            return sidecar
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "sidecar did not become ready"
                await asyncio.sleep(0.05)

    yield start
    for s in started:
        if s.proc.returncode is None:
            s.proc.kill()
            await s.proc.wait()


async def refused(port: int, within: float = 2.0) -> bool:
    """Whether a new connection to ``port`` is refused (polled: the signal is handled asynchronously)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # Queued in the backlog of the listener as it closed: the next attempt says for sure.
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await asyncio.sleep(0.02)
    return False


async def test_a_stream_in_flight_completes_after_sigterm_and_new_connections_are_refused(
    provider, sidecar_process
):
    provider.set(Behaviour.stream(chunks=8, interval=0.25))  # about 2 s of stream
    sidecar = await sidecar_process(grace=10)
    async with (
        aiohttp.ClientSession() as client,
        client.post(sidecar.url + "/chat/completions", json=chat(stream=True)) as resp,
    ):
        assert resp.status == 200
        received = await resp.content.readany()
        sidecar.terminate()
        assert await refused(sidecar.port)
        async with client.get(f"http://127.0.0.1:{sidecar.admin}/readyz") as ready:
            assert ready.status == 503 and (await ready.json())["reason"] == "shutting down"
        received += await resp.content.read()
    code, took, stopped = await sidecar.exited(within=10 + MARGIN + 5)
    events = [line for line in received.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) == 9  # all 8 chunks, then the end
    assert '"error"' not in received.decode()
    assert code == 0 and stopped["cut"] == 0
    assert stopped["seconds"] < 10  # it left once the stream was done, not at the end of the grace
    assert took < 10 + MARGIN


async def test_a_stream_longer_than_the_grace_is_cut_at_the_grace(provider, sidecar_process):
    provider.set(Behaviour.stream(chunks=40, interval=0.25))  # 10 s: longer than the grace
    sidecar = await sidecar_process(grace=1.5)
    async with (
        aiohttp.ClientSession() as client,
        client.post(sidecar.url + "/chat/completions", json=chat(stream=True)) as resp,
    ):
        assert resp.status == 200
        received = await resp.content.readany()
        sidecar.terminate()
        received += await resp.content.read()  # cut, and ended with an error event: no truncated body
    events = received.decode().rstrip("\n").split("\n\n")
    assert "data: [DONE]" not in events
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["class"] == "ConnectionError" and "shutting down" in error["message"], error
    assert len(events) < 40  # the stream did not run to its end
    code, took, stopped = await sidecar.exited(within=1.5 + MARGIN + 5)
    assert code == 0 and stopped["cut"] == 1 and stopped["cut_logged"]
    assert 1.5 <= stopped["seconds"] <= 1.5 + TEARDOWN
    assert 1.5 <= took <= 1.5 + MARGIN


async def test_an_idle_sidecar_exits_at_once(sidecar_process):
    sidecar = await sidecar_process(grace=20)
    async with (
        aiohttp.ClientSession() as client,
        client.post(sidecar.url + "/chat/completions", json=chat()) as resp,
    ):
        assert resp.status == 200  # its keep-alive connection stays open, idle
        sidecar.terminate()
        code, took, stopped = await sidecar.exited(within=MARGIN + 5)
    assert code == 0 and stopped["seconds"] <= TEARDOWN and took <= MARGIN  # not the 20 s grace
