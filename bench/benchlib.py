"""Small helpers shared by the bench scripts: event loop choice, percentiles, /proc readings, CPU pinning.

Not a test module and not part of the package: the bench scripts are run by hand
(``python bench/run.py``), each as its own process, and import this file from their own directory.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Coroutine, Sequence
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def run(coro: Coroutine[Any, Any, Any], loop: str = "uvloop") -> Any:
    """Run ``coro`` on uvloop (default, falls back to asyncio if uvloop is missing) or plain asyncio."""
    if loop == "uvloop":
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def percentiles(values_ns: Sequence[int]) -> dict[str, float]:
    """Nearest-rank percentiles of nanosecond samples, in milliseconds."""
    if not values_ns:
        return {}
    v = sorted(values_ns)
    n = len(v)

    def pick(q: float) -> float:
        i = min(n - 1, max(0, math.ceil(q * n) - 1))
        return v[i] / 1e6

    return {
        "min": v[0] / 1e6,
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "p999": pick(0.999),
        "max": v[-1] / 1e6,
        "mean": sum(v) / n / 1e6,
        "n": n,
    }


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(cpu_times(pid))


def core_ticks(core: int) -> list[int]:
    """user nice system idle iowait irq softirq steal of one core, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                return [int(x) for x in line.split()[1:9]]
    return [0] * 8


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM ...) in KiB; -1 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cores: set[int] | None) -> None:
    """Pin the calling process (used as a ``preexec_fn``) to ``cores``; no-op for ``None``."""
    if cores:
        os.sched_setaffinity(0, cores)


def audited_control_plane(policy: dict[str, Any]) -> Any:
    """The realapi tier's ``ControlPlane`` (``tests/realapi/controlplane.py``) with the API server
    writing an audit log (``cp.audit_log``) under ``policy``: the benches' request record. Needs the
    repository root on ``sys.path``."""
    import json
    from pathlib import Path

    from tests.realapi.controlplane import ControlPlane

    class AuditedControlPlane(ControlPlane):
        @property
        def audit_log(self) -> Path:
            return Path(self.workdir) / "audit.log"

        def _apiserver_argv(self, etcd_url: str, port: int) -> list[str]:
            path = Path(self.workdir) / "audit-policy.yaml"
            path.write_text(json.dumps(policy))  # JSON is YAML
            return [
                *super()._apiserver_argv(etcd_url, port),
                "--audit-policy-file", str(path),
                "--audit-log-path", str(self.audit_log),
                "--audit-log-mode", "blocking",  # written as each request completes: nothing left buffered
                "--audit-log-maxsize", "0",
            ]  # fmt: skip

    return AuditedControlPlane
