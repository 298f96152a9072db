"""The sidecar's reporter against a real API server, as the agent pod's ServiceAccount with the README's
Role: a burst of new transitions leaves at once, repeats wait behind it and keep the reserve, and a new
transition offered while repeats wait goes at once.

The reporter is the real one (its task, its token bucket, keyroute's API client); only the client is
wrapped, to record when each request left (no request is changed or answered by the test).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.reports import REPEAT_RESERVE, REPORT_BURST, REPORT_LABEL, Origin
from keyroute.kube import SIDECAR_AGENT, Kube, from_kubeconfig
from keyroute.sidecar.metrics import Metrics
from keyroute.sidecar.reporter import Reporter
from tests.builders import config, cred, entry, pool
from tests.polling import eventually
from tests.realapi.client import Api
from tests.realapi.controlplane import ControlPlane

N_KEYS = 50


class RecordingKube(Kube):
    """keyroute's client, noting (method, Event name, monotonic time) of each write that succeeded."""

    writes: list[tuple[str, str, float]]

    async def request(self, method: str, url_path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        answer = await super().request(method, url_path, body, **kwargs)
        if "/events" in url_path and method in ("POST", "PATCH"):
            self.writes.append((method, str(answer["metadata"]["name"]), time.monotonic()))
        return answer


def sidecar_client(cp: ControlPlane, namespace: str, tmp_path: Path) -> RecordingKube:
    """The namespace's default ServiceAccount, bound to the README's sidecar Role, in a kubeconfig."""
    meta = {"name": "keyroute-sidecar", "namespace": namespace}
    cp.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": [
                    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
                    {"apiGroups": ["keyroute.dev"], "resources": ["credentialpools"], "verbs": ["list", "watch"]},
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "keyroute-sidecar"},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
            },
        ]
    )
    token = cp.create_token(namespace, "default")
    kubeconfig = cp.write_kubeconfig(tmp_path / "sidecar.kubeconfig", user={"token": token})
    kube = RecordingKube.from_connection(from_kubeconfig(kubeconfig), user_agent=SIDECAR_AGENT)
    assert isinstance(kube, RecordingKube)
    kube.writes = []
    return kube


def cooldown(namespace: str, i: int, at: float) -> Action:
    return Action(
        kind=ActionKind.COOLED_DOWN,
        at=at,
        namespace=namespace,
        object_name="openai",
        error_class=ErrorClass.RATE_LIMITED,
        credential=f"k{i:02d}",
        fingerprint="sha256:0123456789ab",
        until=at + 600,
        status=429,
    )


async def test_a_burst_of_new_cooldowns_leaves_at_once_and_repeats_wait_behind_it(
    control_plane: ControlPlane, namespace: str, api: Api, tmp_path: Path
) -> None:
    kube = sidecar_client(control_plane, namespace, tmp_path)
    cfg = config(
        [entry("openai", "openai", "http://127.0.0.1:9/v1", "openai")],
        [pool("openai", "openai", *[cred(f"k{i:02d}") for i in range(N_KEYS)])],
        chain={"name": "agents", "namespace": namespace},
    )
    reporter = Reporter(kube, Origin("agent-0", namespace), lambda: cfg, Metrics(), presence_interval=3600)
    task = asyncio.create_task(reporter.run())
    try:
        # Five cooldowns the operator will know: the heartbeat and five Events (6 of 50 tokens).
        now = time.time()
        for i in range(5):
            reporter.offer(cooldown(namespace, i, now))
        await eventually(lambda: reporter.pending == 0 and len(kube.writes) == 6, timeout=10)

        # The same five again (repeats), then 40 new cooldowns, all offered before the sender runs.
        now = time.time()
        for i in range(5):
            reporter.offer(cooldown(namespace, i, now))
        offered = time.monotonic()
        for i in range(5, 45):
            reporter.offer(cooldown(namespace, i, now))
        await eventually(lambda: sum(1 for m, _, _ in kube.writes if m == "POST") == 46, timeout=10)
        creates = [t for m, _, t in kube.writes[6:] if m == "POST"]
        # All 40 at once (no waiting for the bucket): only the API server's round trips, one at a time.
        assert max(creates) - offered < 2.0, max(creates) - offered
        # None of the repeats went before them; with 50 - 46 tokens left, below the reserve, they wait.
        assert all(m == "POST" for m, _, _ in kube.writes[6:])
        assert reporter.bucket.tokens < REPEAT_RESERVE + 1 <= REPORT_BURST
        await asyncio.sleep(0.5)
        assert reporter.pending == 5 and not any(m == "PATCH" for m, _, _ in kube.writes)

        # A new transition while the repeats wait for the reserve goes at once.
        offered = time.monotonic()
        reporter.offer(cooldown(namespace, 45, time.time()))
        await eventually(lambda: sum(1 for m, _, _ in kube.writes if m == "POST") == 47, timeout=5)
        assert kube.writes[-1][2] - offered < 1.0
        assert reporter.pending == 5

        events = await api.list("v1", "events", namespace, labelSelector=f"{REPORT_LABEL}=sidecar")
        cooling = sorted(e["metadata"]["annotations"]["keyroute.dev/credential"] for e in events if e["reason"] == "CredentialCoolingDown")
        assert cooling == [f"k{i:02d}" for i in range(46)]
        assert all(e["count"] == 1 for e in events)  # the repeats' count patches have not gone yet
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()
