"""``keyroute sidecar`` processes on a chain's rendered config, reporting as an agent's ServiceAccount.

The config is the operator's rendered ``<chain>-keyroute`` Secret, written out the way the kubelet
mounts it (a directory holding ``config.json``); the sidecar reports through a token kubeconfig of
the agent's ServiceAccount, so its Events pass through the API server's RBAC::

    pod_a = await start_sidecar(procs, api, ns, "pod-a", kubeconfig=agent_kubeconfig, folder=tmp_path)
    async with session.post(f"{pod_a.base_url}/chat/completions", json=...) as resp: ...
    await pod_a.metric("keyroute_reports_total", result="sent")
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.polling import eventually
from tests.realapi.client import Api
from tests.realapi.controlplane import free_port
from tests.realapi.processes import KeyrouteProcess, Processes


@dataclass
class SidecarProcess:
    process: KeyrouteProcess
    port: int
    admin_port: int
    config_dir: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on ``/metrics`` (0 when absent)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.admin_port}/metrics") as resp,
        ):
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


async def write_rendered_config(api: Api, namespace: str, chain: str, folder: Path) -> Path:
    """Wait for the chain's config Secret; write it as the kubelet mounts it; the directory."""
    rendered = await eventually(lambda: api.get("v1", "secrets", namespace, f"{chain}-keyroute"), timeout=20)
    write_files(folder, {name: base64.b64decode(value) for name, value in rendered["data"].items()})
    return folder


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Each file, mode 0600 (it holds keys), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)


async def start_sidecar(
    processes: Processes,
    api: Api,
    namespace: str,
    pod: str,
    *,
    kubeconfig: Path | None,
    folder: Path,
    chain: str = "agents",
    extra: tuple[str, ...] = (),
) -> SidecarProcess:
    """``keyroute sidecar --config DIR --kubeconfig K --pod-name POD --pod-namespace NS``, listening."""
    config_dir = await write_rendered_config(api, namespace, chain, folder / pod)
    port, admin = free_port(), free_port()
    args = [
        "sidecar", "--config", str(config_dir),
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
        "--pod-name", pod, "--pod-namespace", namespace, "--reload-interval", "0.2",
    ]  # fmt: skip
    if kubeconfig is not None:
        args += ["--kubeconfig", str(kubeconfig)]
    process = processes.start(*args, *extra, name=pod)
    await process.wait_for("sidecar listening", timeout=20)
    return SidecarProcess(process, port, admin, config_dir)
