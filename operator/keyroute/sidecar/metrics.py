"""Prometheus metrics of one sidecar, labelled in the docs/errors.md vocabulary.

The series every request updates are plain numbers exposed at scrape time (:class:`_HotSeries`); the
rest (state gauges, recovery actions, reloads, reports) are prometheus_client's own objects. Each
sidecar owns a registry, so several can run in one process (tests, the demo).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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
        # The (chain, model) of every fallback_active series shown: one per model the chain keeps a
        # state for (see refresh_state).
        self._fallback_shown: set[tuple[str, str]] = set()
        self.state_refusals = Counter(
            "keyroute_model_state_refusals",
            "Failures and fallbacks of a model not remembered: every per-model state the chain keeps "
            "was taken by a model on a fallback (docs/errors.md, Scope).",
            ["chain"],
            registry=r,
        )
        self._refusals_seen: dict[str, int] = {}
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
        # The series every request updates: plain numbers, exposed at scrape time (see _HotSeries).
        self._hot = _HotSeries()
        r.register(self._hot)
        self.overhead = self._hot.overhead

    def request(self, chain: str, provider: str, cls: str) -> None:
        """One agent request answered (``provider``: the entry that answered, empty if none)."""
        _count(self._hot.requests, (chain, provider, cls), 1)

    def attempt(self, chain: str, provider: str, credential: str, cls: str, latency: float | None) -> None:
        """One upstream attempt and, if it got response headers, their latency."""
        _count(self._hot.attempts, (chain, provider, credential, cls), 1)
        if latency is not None:
            _observe(self._hot.latency, provider, latency)

    def served(self, chain: str, provider: str, credential: str, latency: float) -> None:
        """A successful attempt whose answer the agent gets: :meth:`attempt` and :meth:`request` with
        class OK, in one call (every successful request makes it)."""
        hot = self._hot
        _count(hot.attempts, (chain, provider, credential, OK), 1)
        _count(hot.requests, (chain, provider, OK), 1)
        _observe(hot.latency, provider, latency)

    def tokens_used(
        self, chain: str, provider: str, credential: str, model: str, counts: dict[str, int]
    ) -> None:
        """Count the tokens one answer reported (kinds as in :mod:`keyroute.core.usage`)."""
        series = self._hot.tokens
        model = model or "-"
        for kind, n in counts.items():
            _count(series, (chain, provider, credential, model, kind), n)

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
        # The chain keeps state only for models that left an entry (at most MAX_MODEL_STATES); one back
        # on its primary is forgotten there, and its series removed here: series for every model that
        # ever fell back would grow with the agent's model names. Removed, not left at 0 or 1: an
        # alert on the series resolves when it goes.
        shown = self._fallback_shown
        for model in chain.models:
            self.fallback_active.labels(chain.name, model or "-").set(1 if chain.on_fallback(model) else 0)
            shown.add((chain.name, model))
        gone = [key for key in shown if key[0] == chain.name and key[1] not in chain.models]
        for key in gone:
            shown.discard(key)
            self.fallback_active.remove(key[0], key[1] or "-")
        seen = self._refusals_seen.get(chain.name, 0)
        if chain.state_refusals > seen:
            self.state_refusals.labels(chain.name).inc(chain.state_refusals - seen)
        self._refusals_seen[chain.name] = chain.state_refusals


class _Histogram:
    """One histogram series as plain numbers: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # Prometheus buckets are "value <= le": the first bound not below the value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def _count(series: dict[tuple[str, ...], list[float]], labels: tuple[str, ...], n: float) -> None:
    """Add ``n`` to a counter series (value, created) of :class:`_HotSeries`."""
    entry = series.get(labels)
    if entry is None:
        entry = series[labels] = [0, time.time()]
    entry[0] += n


def _observe(histograms: dict[str, _Histogram], provider: str, latency: float) -> None:
    """Observe an attempt's latency in its provider's histogram (made on first use)."""
    h = histograms.get(provider)
    if h is None:
        h = histograms[provider] = _Histogram(_LATENCY_BUCKETS)
    h.observe(latency)


class _HotSeries(Collector):
    """The metrics every request updates, kept as plain numbers and turned into Prometheus samples
    only when scraped.

    prometheus_client's Counter and Histogram take a lock for every increment and walk the buckets in
    Python: with the latency and overhead histograms, 36k of the sidecar's ~830k instructions per
    request (valgrind, 2026-12-06), more than key selection. The sidecar updates and scrapes these on
    its event loop's thread only, so no lock is needed. The exposition is the one those classes gave:
    same names, labels, buckets and ``_created`` series.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], list[float]] = {}
        self.attempts: dict[tuple[str, ...], list[float]] = {}
        self.tokens: dict[tuple[str, ...], list[float]] = {}
        self.latency: dict[str, _Histogram] = {}
        self.overhead = _Histogram(_OVERHEAD_BUCKETS)

    def describe(self) -> Iterator[Metric]:
        # Names only, so that the registry refuses a second metric of the same name.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        requests, attempts, tokens, latency, overhead = self._families()
        for family, series in ((requests, self.requests), (attempts, self.attempts), (tokens, self.tokens)):
            for labels, (value, created) in list(series.items()):
                family.add_metric(labels, value, created=created)
            yield family
        for provider, h in list(self.latency.items()):
            _add_histogram(latency, {"provider": provider}, h)
        yield latency
        _add_histogram(overhead, {}, self.overhead)
        yield overhead

    @staticmethod
    def _families() -> tuple[
        CounterMetricFamily, CounterMetricFamily, CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily
    ]:
        return (
            CounterMetricFamily(
                "keyroute_requests",
                "Agent requests by the entry that answered and the outcome class.",
                labels=["chain", "provider", "class"],
            ),
            CounterMetricFamily(
                "keyroute_upstream_attempts",
                "Upstream attempts by entry, credential name and outcome class.",
                labels=["chain", "provider", "credential", "class"],
            ),
            CounterMetricFamily(
                "keyroute_tokens",
                "Tokens the provider reported in its answers, by entry, credential name, upstream model and "
                "kind: input, output, cached (cache reads), cache_write, reasoning. Requests served per "
                "credential are keyroute_upstream_attempts_total{class=\"OK\"}.",
                labels=["chain", "provider", "credential", "model", "kind"],
            ),
            HistogramMetricFamily(
                "keyroute_upstream_latency_seconds",
                "Time from sending an attempt to its response headers.",
                labels=["provider"],
            ),
            HistogramMetricFamily(
                "keyroute_sidecar_overhead_seconds",
                "Time a request spent in the sidecar itself, not waiting upstream.",
            ),
        )


def _add_histogram(family: HistogramMetricFamily, labels: dict[str, str], h: _Histogram) -> None:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip((*h.bounds, math.inf), h.counts, strict=True):
        cumulative += n
        buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
    family.add_metric(list(labels.values()), buckets, h.sum)
    family.samples.append(Sample(family.name + "_created", labels, h.created))
