"""keyroute run the way a user runs it: the ``keyroute`` command in a process of its own.

The operator and the sidecars under test are real processes with their own kubeconfigs, so
authentication, RBAC, signals and shutdown are exercised as they are in a pod::

    op = procs.start("operator", "-n", ns, kubeconfig=kc, name="operator")
    await op.wait_for("watching", timeout=20)          # a substring of its log
    seconds = await op.terminate()                     # SIGTERM → exit, timed
    assert op.returncode == 0 and "sk-" not in op.output
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.polling import eventually

# ``keyroute`` as it runs in a pod, for ``python -c IN_POD <folder> <args>``: the ServiceAccount folder
# pointed at ``<folder>`` (the real one is /var/run/secrets/...; keyroute.kube reads it at call time).
# At exit it says whether the kubernetes client was ever imported (a pod's operator should not).
IN_POD = """
import atexit, pathlib, sys
import keyroute.kube
keyroute.kube.SERVICE_ACCOUNT_DIR = pathlib.Path(sys.argv[1])
atexit.register(lambda: print("kubernetes client imported:", sys.modules.get("kubernetes") is not None, flush=True))
from keyroute.cli import main
sys.exit(main(sys.argv[2:]))
"""


def keyroute_command() -> list[str]:
    """The installed ``keyroute`` console script beside this interpreter (as a user runs it)."""
    script = Path(sys.executable).with_name("keyroute")
    if script.exists():
        return [str(script)]
    found = shutil.which("keyroute")
    return [found] if found else [sys.executable, "-m", "keyroute.cli"]


class KeyrouteProcess:
    """One ``keyroute`` process; its stdout and stderr go to ``log_path``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> KeyrouteProcess:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def output(self) -> str:
        """Everything it wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    async def wait_for(self, text: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Wait until ``text`` appears in its output; fail at once if it exits meanwhile."""

        def seen() -> bool:
            if text in self.output:
                return True
            if not self.running:
                raise RuntimeError(f"{self.name} exited ({self.returncode}) before {text!r}:\n{self.output[-3000:]}")
            return False

        await eventually(seen, timeout=timeout, interval=0.1)

    async def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:  # noqa: ASYNC109
        """Send ``sig`` and wait for the exit; the seconds it took. SIGKILL if still alive at ``timeout``."""
        assert self.popen is not None
        began = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            await asyncio.to_thread(self.popen.wait, timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        return time.monotonic() - began

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


class Processes:
    """The ``keyroute_process`` fixture: starts ``keyroute`` processes, kills what is left at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[KeyrouteProcess] = []

    def start(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> KeyrouteProcess:
        """``keyroute ARGS...`` with ``KUBECONFIG`` set to ``kubeconfig`` (and no inherited one)."""
        name = name or f"{args[0]}-{len(self.started)}"
        full_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        full_env["PYTHONUNBUFFERED"] = "1"
        if kubeconfig is not None:
            full_env["KUBECONFIG"] = str(kubeconfig)
        full_env.update(env or {})
        process = KeyrouteProcess(
            name, [*keyroute_command(), *args], full_env, self.workdir / f"{name}-{len(self.started)}.log"
        )
        self.started.append(process)
        return process.start()

    def close(self) -> None:
        for process in self.started:
            process.kill()
