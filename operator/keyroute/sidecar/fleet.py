"""Fleet cooldowns (``shareCooldowns``): honour the credential states other pods reported.

The sidecar watches each of its pools (the CredentialPool objects: status only, never a Secret) and
adopts every cooldown, exhaustion or rejection in ``status.credentials`` that another pod reported
for the exact key value it holds (same fingerprint). An adopted block ends at its ``until`` without
a report of its own: restoring it is the reporting pod's business. A pool with
``shareCooldowns: false`` is not watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from keyroute.core.actions import rfc3339
from keyroute.core.chains import Chain
from keyroute.core.reports import Origin, shared_blocks
from keyroute.kube import KEYROUTE, Kube, path, watch_forever
from keyroute.sidecar.metrics import Metrics

log = logging.getLogger("keyroute.sidecar.fleet")


class FleetCooldowns:
    """One list-and-watch per shared pool of the current config, kept in step with reloads."""

    def __init__(
        self,
        kube: Kube,
        origin: Origin,
        chain: Callable[[], Chain | None],
        metrics: Metrics,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.kube = kube
        self.origin = origin
        self.chain = chain
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Until cancelled: watch the shared pools of whatever config is in service."""
        try:
            while True:
                self._sync()
                await asyncio.sleep(self.interval)
        finally:
            for task in self._watches.values():
                task.cancel()
            for task in self._watches.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._watches.clear()

    def _sync(self) -> None:
        chain = self.chain()
        wanted = (
            {(p.namespace, p.name) for p in chain.pools.values() if p.share_cooldowns} if chain else set()
        )
        for key in list(self._watches):
            if key not in wanted:
                self._watches.pop(key).cancel()
        for key in wanted - self._watches.keys():
            ns, name = key
            self._watches[key] = asyncio.create_task(
                watch_forever(
                    self.kube,
                    path(*KEYROUTE, "credentialpools", ns),
                    self._handler(name),
                    params={"fieldSelector": f"metadata.name={name}"},
                    what=f"credentialpool {ns}/{name}",
                ),
                name=f"keyroute-fleet-{ns}-{name}",
            )

    def _handler(self, pool_name: str) -> Callable[[str, dict[str, Any]], None]:
        def handle(kind: str, obj: dict[str, Any]) -> None:
            self.apply(pool_name, kind, obj)

        return handle

    def apply(self, pool_name: str, kind: str, obj: dict[str, Any]) -> int:
        """Adopt the blocks in one pool object's status; the number adopted."""
        if kind == "DELETED" or (obj.get("metadata") or {}).get("name") != pool_name:
            return 0  # the field selector is the API server's; an emulator may send every pool
        chain = self.chain()
        pool = chain.pools.get(pool_name) if chain else None
        if pool is None or not pool.share_cooldowns:
            return 0
        now = self.clock()
        adopted = 0
        for b in shared_blocks(obj.get("status"), pod=self.origin.pod, now=now):
            if pool.apply_block(b.credential, b.fingerprint, b.as_block(now), b.model):
                adopted += 1
                self.metrics.shared_blocks.labels(pool_name).inc()
                log.info(
                    "honouring a credential state another pod reported",
                    extra={
                        "kr": {
                            "pool": pool_name,
                            "credential": b.credential,
                            "state": str(b.state),
                            "class": str(b.error_class),
                            "until": rfc3339(b.until) if b.until is not None else None,
                            "reported_by": b.reported_by,
                            "model": b.model,
                        }
                    },
                )
        return adopted
