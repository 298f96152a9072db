"""The operator's Prometheus metrics."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self._pool_ready: dict[tuple[str, str], str] = {}
        self._pool_states: dict[tuple[str, str], Mapping[str, int]] = {}

    def pool_seen(self, key: tuple[str, str], ready: str, states: Mapping[str, int]) -> None:
        """Record one pool's readiness and credential states; gauges are recomputed from all pools."""
        self._pool_ready[key] = ready
        self._pool_states[key] = states
        self._refresh()

    def pool_gone(self, key: tuple[str, str]) -> None:
        self._pool_ready.pop(key, None)
        self._pool_states.pop(key, None)
        self._refresh()

    def _refresh(self) -> None:
        for value in ("True", "False", "Unknown"):
            self.pools.labels(value).set(sum(1 for v in self._pool_ready.values() if v == value))
        totals: dict[str, int] = {}
        for states in self._pool_states.values():
            for state, n in states.items():
                totals[state] = totals.get(state, 0) + n
        for state in ("Available", "CoolingDown", "Exhausted", "Rejected", "Missing"):
            self.credentials.labels(state).set(totals.get(state, 0))
