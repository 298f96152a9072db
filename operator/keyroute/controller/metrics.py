"""The operator's Prometheus metrics.

Besides its own work (reconciles, writes, reports read), the operator exports what it wrote into
status, per object: it is the single writer of status and folds every sidecar's reports, so its view
of a pool or chain is the cluster's (a sidecar's own gauges only say what that one pod saw). The
chart's alerts and dashboard read these. Label values are object and credential names, never keys.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STATES = ("Available", "CoolingDown", "Exhausted", "Rejected", "Missing")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "keyroute_operator_reconciles", "Reconciles by kind and result.", ["kind", "result"], registry=r
        )
        self.duration = Histogram(
            "keyroute_operator_reconcile_seconds", "Time per reconcile.", ["kind"], registry=r
        )
        self.writes = Counter(
            "keyroute_operator_writes", "API writes by what was written.", ["what"], registry=r
        )
        self.events_dropped = Counter(
            "keyroute_operator_events_dropped",
            "Events not posted because the operator's Event queue was full (status was written).",
            registry=r,
        )
        self.pools = Gauge("keyroute_operator_pools", "CredentialPools by readiness.", ["ready"], registry=r)
        self.credentials = Gauge(
            "keyroute_operator_credentials", "Credentials of all pools by state.", ["state"], registry=r
        )
        self.reports = Counter(
            "keyroute_operator_reports",
            "Sidecar reports read, by result: folded (status may change), unchanged, invalid.",
            ["result"],
            registry=r,
        )
        self.credential_state = Gauge(
            "keyroute_operator_credential_state",
            "1 for the state each credential of each pool has in the pool's status, else 0.",
            ["namespace", "pool", "credential", "state"],
            registry=r,
        )
        self.chain_fallback = Gauge(
            "keyroute_operator_chain_fallback_active",
            "1 while the chain's FallbackActive condition is True (some sidecar serves from a fallback).",
            ["namespace", "chain"],
            registry=r,
        )
        self.chain_sidecars = Gauge(
            "keyroute_operator_chain_sidecars",
            "Sidecars reporting on the chain (status.sidecars).",
            ["namespace", "chain"],
            registry=r,
        )
        # controller-runtime's leader_election_master_status: which replica leads, without reading the Lease.
        self.leader = Gauge(
            "keyroute_operator_leader",
            "1 while this replica leads (reconciles and writes), 0 while it stands by; 1 without leader election.",
            registry=r,
        )
        self.admissions = Counter(
            "keyroute_webhook_admissions",
            "Pods seen by the injection webhook, by result (injected, skipped: already injected, "
            "refused) and reason (the refusal's, or Injected / AlreadyInjected / ChainNotVerified).",
            ["result", "reason"],
            registry=r,
        )
        self._pool_ready: dict[tuple[str, str], str] = {}
        self._pool_states: dict[tuple[str, str], Mapping[str, int]] = {}
        self._pool_credentials: dict[tuple[str, str], Mapping[str, str]] = {}
        self._ready_totals: collections.Counter[str] = collections.Counter()
        self._state_totals: collections.Counter[str] = collections.Counter()
        self._totals: list[tuple[Any, collections.Counter[str], str]] = []

    def pool_seen(
        self,
        key: tuple[str, str],
        ready: str,
        states: Mapping[str, int],
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        """Record one pool's readiness and credential states (``credentials``: name -> state, as
        written in its status); the totals are updated by this pool's difference."""
        self._forget_totals(key)
        self._pool_ready[key] = ready
        self._pool_states[key] = dict(states)
        self._ready_totals[ready] += 1
        self._state_totals.update(states)
        self._set_credentials(key, credentials or {})
        self._refresh()

    def pool_gone(self, key: tuple[str, str]) -> None:
        self._forget_totals(key)
        self._pool_ready.pop(key, None)
        self._pool_states.pop(key, None)
        self._set_credentials(key, {})
        self._refresh()

    def forget_objects(self) -> None:
        """Drop every pool's and chain's series and zero the totals: a replica that stopped leading
        no longer knows their state. The new leader's series are the current ones; a stale copy here
        would keep KeyrouteCredentialRejected or KeyrouteFallbackActiveTooLong firing after the leader
        resolved them (they take the max over replicas). Leading again repopulates them."""
        self._pool_ready.clear()
        self._pool_states.clear()
        self._pool_credentials.clear()
        self._ready_totals.clear()
        self._state_totals.clear()
        for gauge in (self.credential_state, self.chain_fallback, self.chain_sidecars):
            gauge.clear()
        self._refresh()

    def _forget_totals(self, key: tuple[str, str]) -> None:
        # Incremental: recomputing the totals from every pool on each reconcile made a start-up
        # quadratic (a sixth of the operator's CPU at 1,000 pools, issue 11).
        ready = self._pool_ready.get(key)
        if ready is not None:
            self._ready_totals[ready] -= 1
        self._state_totals.subtract(self._pool_states.get(key, {}))

    def chain_seen(self, key: tuple[str, str], fallback_active: bool, sidecars: int) -> None:
        """Record one chain's FallbackActive condition and its count of reporting sidecars."""
        self.chain_fallback.labels(*key).set(1 if fallback_active else 0)
        self.chain_sidecars.labels(*key).set(sidecars)

    def chain_gone(self, key: tuple[str, str]) -> None:
        for gauge in (self.chain_fallback, self.chain_sidecars):
            with contextlib.suppress(KeyError):  # never seen
                gauge.remove(*key)

    def _set_credentials(self, key: tuple[str, str], credentials: Mapping[str, str]) -> None:
        before = self._pool_credentials.pop(key, {})
        for name in before.keys() - credentials.keys():
            # A credential removed from the spec (or the pool deleted) must not keep alerting.
            for state in STATES:
                self.credential_state.remove(*key, name, state)
        for name, current in credentials.items():
            if before.get(name) == current:
                continue  # its five series say so already (most reconciles change nothing)
            for state in STATES:
                self.credential_state.labels(*key, name, state).set(1 if state == current else 0)
        if credentials:
            self._pool_credentials[key] = dict(credentials)

    def _refresh(self) -> None:
        # The children looked up once: ``labels()`` checks and locks on every call (once per reconcile).
        if not self._totals:
            self._totals = [
                *((self.pools.labels(v), self._ready_totals, v) for v in ("True", "False", "Unknown")),
                *((self.credentials.labels(s), self._state_totals, s) for s in STATES),
            ]
        for child, totals, value in self._totals:
            child.set(totals[value])


_SHARED: list[OperatorMetrics] = []


def shared() -> OperatorMetrics:
    """The process's operator metrics: the handlers and the webhook count into one registry, the one
    ``keyroute operator`` serves on its metrics port."""
    if not _SHARED:
        _SHARED.append(OperatorMetrics())
    return _SHARED[0]
