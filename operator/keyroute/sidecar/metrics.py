"""Prometheus metrics of one sidecar, labelled in the docs/errors.md vocabulary.

Label children are cached: ``labels()`` takes a lock and hashes its arguments, and this runs on every
request. Each sidecar owns a registry, so several can run in one process (tests, the demo).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from keyroute.core.actions import POOL_ACTIONS, Action, ActionKind
from keyroute.core.chains import Chain
from keyroute.core.enums import CredentialState, RateLimitScope

OK = "OK"  # the class label of a successful request or attempt

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "keyroute_requests",
            "Agent requests by the entry that answered and the outcome class.",
            ["chain", "provider", "class"],
            registry=r,
        )
        self.attempts = Counter(
            "keyroute_upstream_attempts",
            "Upstream attempts by entry, credential name and outcome class.",
            ["chain", "provider", "credential", "class"],
            registry=r,
        )
        self.credential_state = Gauge(
            "keyroute_credential_state",
            "1 for the state each credential is in.",
            ["pool", "credential", "state"],
            registry=r,
        )
        self.fallback_active = Gauge(
            "keyroute_fallback_active",
            "1 while a model of the chain is served by a fallback entry.",
            ["chain", "model"],
            registry=r,
        )
        self.fallbacks = Counter(
            "keyroute_fallback_activations",
            "Times traffic moved to a fallback entry.",
            ["chain", "from_provider", "to_provider", "class"],
            registry=r,
        )
        self.actions = Counter(
            "keyroute_recovery_actions",
            "Recovery actions by kind, class and scope (credential actions: Credential, or Pool for a "
            "rate limit the pool's keys share; empty for chain actions).",
            ["kind", "class", "scope"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "keyroute_upstream_latency_seconds",
            "Time from sending an attempt to its response headers.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "keyroute_sidecar_overhead_seconds",
            "Time a request spent in the sidecar itself, not waiting upstream.",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "keyroute_config_reloads",
            "Config reload attempts by result.",
            ["result"],
            registry=r,
        )
        self.reports = Counter(
            "keyroute_reports",
            "Recovery reports by outcome: sent (new Event), merged (a repeat folded into a queued or "
            "existing Event), dropped (buffer full), rejected (the API refused it for good), retried.",
            ["result"],
            registry=r,
        )
        self.reports_pending = Gauge(
            "keyroute_reports_pending", "Reports buffered, waiting to be sent.", registry=r
        )
        self.shared_blocks = Counter(
            "keyroute_shared_cooldowns_applied",
            "Credential states reported by other pods and honoured here (fleet cooldowns).",
            ["pool"],
            registry=r,
        )
        self.tokens = Counter(
            "keyroute_tokens",
            "Tokens the provider reported in its answers, by entry, credential name, upstream model and "
            "kind: input, output, cached (cache reads), cache_write, reasoning. Requests served per "
            "credential are keyroute_upstream_attempts_total{class=\"OK\"}.",
            ["chain", "provider", "credential", "model", "kind"],
            registry=r,
        )
        self._children: dict[tuple[str, ...], object] = {}

    def request(self, chain: str, provider: str, cls: str) -> None:
        key = ("r", chain, provider, cls)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(chain, provider, cls)
        child.inc()  # type: ignore[attr-defined]

    def attempt(self, chain: str, provider: str, credential: str, cls: str, latency: float | None) -> None:
        key = ("a", chain, provider, credential, cls)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.attempts.labels(chain, provider, credential, cls)
        child.inc()  # type: ignore[attr-defined]
        if latency is not None:
            hkey = ("l", provider)
            h = self._children.get(hkey)
            if h is None:
                h = self._children[hkey] = self.upstream_latency.labels(provider)
            h.observe(latency)  # type: ignore[attr-defined]

    def tokens_used(
        self, chain: str, provider: str, credential: str, model: str, counts: dict[str, int]
    ) -> None:
        """Count the tokens one answer reported (kinds as in :mod:`keyroute.core.usage`)."""
        for kind, n in counts.items():
            key = ("t", chain, provider, credential, model, kind)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.tokens.labels(chain, provider, credential, model or "-", kind)
            child.inc(n)  # type: ignore[attr-defined]

    def action(self, action: Action) -> None:
        if action.scope is not None:
            scope = str(action.scope)
        else:
            scope = str(RateLimitScope.CREDENTIAL) if action.kind in POOL_ACTIONS else ""
        self.actions.labels(str(action.kind), str(action.error_class or ""), scope).inc()
        if action.kind is ActionKind.FALLBACK_ACTIVATED:
            self.fallbacks.labels(
                action.object_name,
                action.from_entry or "",
                action.to_entry or "",
                str(action.error_class or ""),
            ).inc()

    def refresh_state(self, chain: Chain, now: float) -> None:
        """Set the state gauges from the chain (called on a timer, not per request)."""
        for pool in chain.pools.values():
            for cred, state, _ in pool.snapshot(now):
                for s in CredentialState:
                    if s is CredentialState.MISSING:
                        continue
                    self.credential_state.labels(pool.name, cred.name, str(s)).set(1 if s is state else 0)
        for model in chain.models:
            self.fallback_active.labels(chain.name, model or "-").set(1 if chain.on_fallback(model) else 0)
