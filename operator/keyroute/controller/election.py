"""Leader election: the thin shell that reads and writes the Lease (decisions: :mod:`keyroute.core.election`).

:class:`LeaderElector` tries every ``retry_period`` to create, take over or renew the Lease, and calls
``on_started`` / ``on_stopped`` when leadership changes. :meth:`LeaderElector.is_leader` is the
fence every write of the operator checks: it turns false as soon as ``renew_deadline`` passed since
the last successful renewal began, even if the election loop has not run since (a process frozen by
SIGSTOP or a long GC pause wakes up fenced, before it can write anything).

Writes use ``PUT`` with the ``resourceVersion`` read just before: two replicas racing for the same
Lease cannot both win (the second gets 409 Conflict). RBAC: ``get``, ``create`` and ``update`` on
``leases`` in the Lease's namespace (:data:`VERBS`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from keyroute import kube as _kube
from keyroute.core import election as core
from keyroute.kube import ApiError, Kube, path

log = logging.getLogger("keyroute.election")

LEASES = ("coordination.k8s.io", "v1", "leases")
VERBS = ("get", "create", "update")
"""What the election sends (the chart's Lease Role grants exactly these)."""


@dataclass(frozen=True)
class ElectionConfig:
    """``--leader-election-*`` flags, resolved."""

    name: str = "keyroute-operator"
    namespace: str = "default"
    identity: str = field(default_factory=lambda: default_identity())
    timings: core.Timings = field(default_factory=core.Timings)


def default_identity(environ: dict[str, str] | None = None) -> str:
    """``$POD_NAME``, else ``<hostname>_<pid>`` (unique per process, readable in ``kubectl get lease``)."""
    env = os.environ if environ is None else environ
    return env.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


def default_namespace(environ: dict[str, str] | None = None, sa_file: Path | None = None) -> str | None:
    """``$POD_NAMESPACE``, else the in-cluster ServiceAccount's namespace, else ``None``."""
    env = os.environ if environ is None else environ
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    if sa_file is None:  # read at call time, as keyroute.kube does: one ServiceAccount folder
        sa_file = _kube.SERVICE_ACCOUNT_DIR / "namespace"
    try:
        return sa_file.read_text().strip() or None
    except OSError:
        return None


class LeaderElector:
    """Holds (or waits for) one Lease; see the module docstring."""

    def __init__(
        self,
        kube: Kube,
        config: ElectionConfig,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.kube = kube
        self.config = config
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.wall = wall
        self.monotonic = monotonic
        self.url = path(*LEASES, config.namespace, config.name)
        self._observed: core.Observed | None = None
        self._version: str | None = None  # resourceVersion of the Lease as last read or written
        self._renewed_at: float | None = None  # monotonic start of the last successful create/renew
        self._leading = False
        self._last_wait: str | None = None
        # One try at a time: a release waits for the renewal in flight, whose answer carries the
        # resourceVersion the release must replace (else 409, and the Lease stays held until it expires).
        self._lock = asyncio.Lock()
        self._stopping = False  # set by release(): no try writes the Lease again

    @property
    def timings(self) -> core.Timings:
        return self.config.timings

    def is_leader(self) -> bool:
        """True while this replica holds the Lease and its last renewal is recent enough to act on."""
        return self._leading and core.still_leading(self._renewed_at, self.monotonic(), self.timings)

    async def run(self) -> None:
        """Elect until cancelled: acquire, then renew; after losing the Lease, try to acquire again."""
        log.info(
            "leader election started",
            extra={
                "kr": {
                    "lease": f"{self.config.namespace}/{self.config.name}",
                    "identity": self.config.identity,
                    "leaseDuration": self.timings.lease_duration,
                    "renewDeadline": self.timings.renew_deadline,
                    "retryPeriod": self.timings.retry_period,
                }
            },
        )
        try:
            while True:
                started = self.monotonic()
                await self.attempt()
                if self._leading and not self.is_leader():
                    self._lose("the lease could not be renewed within the renew deadline")
                # The next try: one retry period after this one began (a slow API does not add up).
                await asyncio.sleep(max(0.0, self.timings.retry_period - (self.monotonic() - started)))
        finally:
            if self._leading:
                self._lose("the election stopped")

    async def attempt(self) -> bool:
        """One try to create, take over or renew the Lease; whether it is held now."""
        began = self.monotonic()
        # A try never outlives the renew deadline: a hung request must not hide a lost Lease.
        budget = self.timings.renew_deadline
        if self._leading and self._renewed_at is not None:
            budget = max(0.1, self._renewed_at + budget - began)
        try:
            async with asyncio.timeout(budget), self._lock:
                return await self._attempt(began)
        except (TimeoutError, ApiError, aiohttp.ClientError, OSError, ValueError) as e:
            log.log(
                logging.WARNING if self._leading else logging.DEBUG,
                "lease request failed",
                extra={"kr": {"lease": self.config.name, "error": str(e) or type(e).__name__}},
            )
            return False

    async def _attempt(self, began: float) -> bool:
        if self._stopping:
            return False
        body = await self.kube.get(self.url)
        # Seen at the answer, not the request: a standby errs on the late side (client-go does the same);
        # the leader's renewal counts from ``began``, the early side.
        seen = self.monotonic()
        record = core.parse_lease(body)
        if record is not None and body is not None:
            self._observed = core.observe(self._observed, record, seen)
            self._version = (body.get("metadata") or {}).get("resourceVersion")
        else:
            self._observed = None
        decision = core.decide(self._observed, self.config.identity, seen)
        if decision.action is core.Action.WAIT:
            if self._leading:
                self._lose(f"the lease was taken: {decision.reason}")
            if self._last_wait != (record.holder if record else None):
                self._last_wait = record.holder if record else None
                log.info("standing by", extra={"kr": {"lease": self.config.name, "reason": decision.reason}})
            return False
        if self._stopping:  # released while the read was in flight: take nothing back
            return False
        spec = core.held_spec(record, self.config.identity, self.wall(), self.timings)
        try:
            if decision.action is core.Action.CREATE:
                written = await self.kube.create(
                    path(*LEASES, self.config.namespace),
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                        "spec": spec,
                    },
                )
            else:
                written = await self.kube.request("PUT", self.url, self._replacement(spec))
        except ApiError as e:
            if e.status == 409:  # another replica wrote first: read again next time
                if self._leading:
                    self._lose("another replica updated the lease")
                return False
            raise
        self._version = (written.get("metadata") or {}).get("resourceVersion")
        self._observed = core.observe(self._observed, core.parse_lease(written) or core.LeaseRecord(), began)
        if self._stopping:  # the release waits for this answer; it gives up what was just written
            return False
        self._renewed_at = began
        if not self._leading:
            self._leading = True
            self._last_wait = None
            log.info(
                "became the leader",
                extra={"kr": {"lease": self.config.name, "identity": self.config.identity, "reason": decision.reason}},
            )
            self.on_started()
        return True

    def _replacement(self, spec: dict[str, object]) -> dict[str, object]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.config.name,
                "namespace": self.config.namespace,
                "resourceVersion": self._version,
            },
            "spec": spec,
        }

    def _lose(self, why: str) -> None:
        self._leading = False
        self._renewed_at = None
        log.warning("stopped leading", extra={"kr": {"lease": self.config.name, "reason": why}})
        self.on_stopped()

    async def release(self, within: float = 1.0) -> None:
        """Give the Lease up (graceful shutdown), so a standby takes over at its next try. Never raises.

        The fence closes first: nothing is written as leader once a release began. A renewal in flight
        is waited for (bounded by ``within``), so the release replaces the Lease as that renewal left
        it; a release that still meets a newer Lease (409) reads it again and gives it up if this
        replica holds it. A Lease somebody else took meanwhile is left alone."""
        self._stopping = True
        if self._leading:
            self._leading = False
            self._renewed_at = None
            self.on_stopped()
        try:
            async with asyncio.timeout(within), self._lock:
                released = await self._give_up()
        except (TimeoutError, ApiError, aiohttp.ClientError, OSError, ValueError) as e:
            log.warning(
                "could not release the lease",
                extra={"kr": {"lease": self.config.name, "error": str(e) or type(e).__name__}},
            )
        else:
            if released:
                log.info("lease released", extra={"kr": {"lease": self.config.name}})

    async def _give_up(self) -> bool:
        for _ in range(2):  # the second time with the Lease as read after a 409
            record = self._observed.record if self._observed is not None else None
            if record is None or record.holder != self.config.identity:
                return False
            try:
                await self.kube.request("PUT", self.url, self._replacement(core.released_spec(record, self.wall())))
            except ApiError as e:
                if e.status != 409:
                    raise
                body = await self.kube.get(self.url)
                latest = core.parse_lease(body)
                self._observed = None if latest is None else core.Observed(latest, self.monotonic())
                self._version = ((body or {}).get("metadata") or {}).get("resourceVersion")
            else:
                return True
        return False
