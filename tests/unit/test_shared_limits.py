"""``rateLimitScope: Pool``: keys that share one rate limit (issue 11, item 2), in the pure core.

The pool benches the limited model on every key at once, the route waits out a short reset on the
same route (once) and falls back on a longer one, and the report, the status and the metrics say that
the pool's scope acted. Time is a parameter throughout.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from prometheus_client import generate_latest

from keyroute.core.actions import ActionKind
from keyroute.core.chains import Chain
from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.config import PoolConfig
from keyroute.core.objects import transitions
from keyroute.core.pools import Block, Pool
from keyroute.core.render import resolve_pool
from keyroute.core.reports import (
    ANN_SCOPE,
    Origin,
    Report,
    ReportBook,
    dedup_key,
    describe,
    event_body,
    parse_report,
    shared_blocks,
)
from keyroute.core.resources import CredentialPool, CredentialState, RateLimitScope, Secret
from keyroute.core.routing import Attempt, Route, Verdict, Wait
from keyroute.core.status import pool_status
from keyroute.sidecar.metrics import Metrics
from tests.builders import config, cred, entry, pool

T0 = 1_800_000_000.0
M = "gpt-4o"
ORIGIN = Origin(pod="agent-1", namespace="default")


def limited(reset_at: float | None = None) -> Classification:
    return Classification(ErrorClass.RATE_LIMITED, status=429, reset_at=reset_at)


def make_pool(scope: str = "Pool", n: int = 3, **cooldowns: float) -> Pool:
    cfg = pool("p", "acme", *[cred(f"k{i}", priority=i) for i in range(1, n + 1)], rateLimitScope=scope)
    if cooldowns:
        cfg["cooldowns"] = cooldowns
    return Pool(PoolConfig.parse(cfg), rng=random.Random(1))


def fail(p: Pool, now: float, verdict: Classification, model: str = M):
    lease = p.acquire(model, now)
    assert lease is not None
    p.release(lease)
    return lease, p.record_failure(lease, verdict, now)


# --- the pool ---------------------------------------------------------------------------------------


def test_a_429_cools_that_model_on_every_key_with_one_action():
    p = make_pool()
    lease, actions = fail(p, T0, limited(T0 + 2))
    assert lease.credential.name == "k1"
    assert p.acquire(M, T0) is None and p.earliest_available(M, T0) == T0 + 2
    assert p.acquire("other-model", T0) is not None  # providers meter per model
    assert [(a.kind, a.credential, a.scope, a.until, a.model) for a in actions] == [
        (ActionKind.COOLED_DOWN, "k1", RateLimitScope.POOL, T0 + 2, M)
    ]
    assert all(st is CredentialState.COOLING_DOWN for _, st, _ in p.snapshot(T0))


def test_credential_scope_is_the_default_and_benches_only_the_key_that_was_sent():
    p = Pool(PoolConfig.parse(pool("p", "acme", cred("k1"), cred("k2", priority=1))))
    assert p.rate_limit_scope is RateLimitScope.CREDENTIAL
    _, actions = fail(p, T0, limited(T0 + 2))
    assert actions[0].scope is None
    lease = p.acquire(M, T0)
    assert lease is not None and lease.credential.name == "k2"


def test_pool_wide_cooldown_doubles_per_consecutive_hit_and_a_success_resets_it():
    p = make_pool(rateLimited=10, max=3600)
    fail(p, T0, limited())
    assert p.earliest_available(M, T0) == T0 + 10
    fail(p, T0 + 10, limited())
    assert p.earliest_available(M, T0 + 10) == T0 + 30
    lease = p.acquire(M, T0 + 30)
    assert lease is not None
    p.record_success(lease, T0 + 30)
    fail(p, T0 + 31, limited())
    assert p.earliest_available(M, T0 + 31) == T0 + 41


def test_concurrent_429s_are_one_incident_and_a_later_reset_extends_it_for_every_key():
    p = make_pool()
    early = [p.acquire(M, T0) for _ in range(3)]
    assert all(x is not None for x in early)
    assert p.record_failure(early[0], limited(T0 + 2), T0)  # type: ignore[arg-type]
    assert p.record_failure(early[1], limited(), T0) == []  # type: ignore[arg-type]
    assert p.record_failure(early[2], limited(T0 + 4), T0) == []  # type: ignore[arg-type]
    assert p.earliest_available(M, T0) == T0 + 4
    assert {b.until for h in p.health.values() for b in h.blocks.values()} == {T0 + 4}


def test_the_end_of_a_pool_wide_limit_is_one_restoration():
    p = make_pool()
    fail(p, T0, limited(T0 + 2))
    restored = p.expire(T0 + 3)
    assert [(a.kind, a.credential, a.scope, a.model) for a in restored] == [
        (ActionKind.RESTORED, None, RateLimitScope.POOL, M)
    ]
    assert p.acquire(M, T0 + 3) is not None


def test_a_longer_block_a_key_already_holds_is_kept():
    p = make_pool(n=2)
    fp2 = p.credentials[1].fingerprint
    adopted = Block(CredentialState.COOLING_DOWN, ErrorClass.RATE_LIMITED, T0, T0 + 900, 429, "agent-2")
    assert p.apply_block("k2", fp2, adopted, model=M)  # another pod benched k2 for longer
    fail(p, T0, limited(T0 + 10))
    assert p.health["k2"].blocks[M].until == T0 + 900 and p.health["k1"].blocks[M].until == T0 + 10
    lease = p.acquire(M, T0 + 11)
    assert lease is not None and lease.credential.name == "k1"


# --- the route --------------------------------------------------------------------------------------


def chain(scope: str, **fallback: float) -> Chain:
    return Chain(
        config(
            [
                entry("acme", "acme", "http://a.test/v1", "a"),
                entry("backup", "backup", "http://b.test/v1", "b"),
            ],
            [
                pool("a", "acme", cred("a1"), cred("a2", priority=1), rateLimitScope=scope),
                pool("b", "backup", cred("b1")),
            ],
            fallback=fallback or {"maxWait": 5},
        ),
        rng=random.Random(2),
    )


def test_a_short_shared_reset_is_waited_out_on_the_same_route_once_then_falls_back():
    route = Route(chain("Pool"), M, T0)
    first = route.next(T0)
    assert isinstance(first, Attempt) and first.credential_name == "a1"
    assert route.report(first, limited(T0 + 2), T0) is Verdict.CONTINUE
    wait = route.next(T0)
    assert isinstance(wait, Wait) and T0 + 2 <= wait.until <= T0 + 2.1  # the other key is not tried
    again = route.next(wait.until)
    assert isinstance(again, Attempt) and (again.entry.name, again.credential_name) == ("acme", "a1")
    route.report(again, limited(wait.until + 2), wait.until)
    last = route.next(wait.until)
    assert isinstance(last, Attempt) and last.entry.name == "backup"  # waited once: now fall back


def test_a_long_shared_reset_falls_back_without_spending_the_other_keys():
    route = Route(chain("Pool"), M, T0)
    first = route.next(T0)
    assert isinstance(first, Attempt)
    route.report(first, limited(T0 + 30), T0)
    nxt = route.next(T0)
    assert isinstance(nxt, Attempt) and nxt.entry.name == "backup"
    assert [r.credential for r in route.records] == ["a1"]


def test_credential_scope_rotates_to_the_next_key_at_once():
    route = Route(chain("Credential"), M, T0)
    first = route.next(T0)
    assert isinstance(first, Attempt)
    route.report(first, limited(T0 + 2), T0)
    nxt = route.next(T0)
    assert isinstance(nxt, Attempt) and (nxt.entry.name, nxt.credential_name) == ("acme", "a2")


# --- reports, status, metrics -----------------------------------------------------------------------


def pool_wide_action(until: float = T0 + 30):
    p = make_pool(n=2)
    p.namespace = "default"
    _, actions = fail(p, T0, limited(until))
    return actions[0], p


def test_the_event_says_the_pool_scope_acted_and_round_trips():
    action, _ = pool_wide_action()
    body = event_body(action, ORIGIN, name="p.x.1", uid=None)
    assert body["metadata"]["annotations"][ANN_SCOPE] == "Pool"
    assert "share one rate limit" in body["message"] and "hit by credential k1" in body["message"]
    _, _, report = parse_report(body)
    assert report.action is not None and report.action.scope is RateLimitScope.POOL


def test_the_end_of_a_pool_wide_limit_parses_without_a_credential():
    _, p = pool_wide_action(T0 + 2)
    (end,) = p.expire(T0 + 3)
    body = event_body(end, ORIGIN, name="p.x.2", uid=None)
    assert "every credential available again" in describe(end, "agent-1")
    _, _, report = parse_report(body)
    assert report.action is not None and report.action.credential is None


def test_pool_wide_limits_hit_through_different_keys_are_one_transition():
    action, _ = pool_wide_action()
    other = dataclasses.replace(action, credential="k2", fingerprint="sha256:other")
    assert dedup_key(action) == dedup_key(other)
    assert dedup_key(action) != dedup_key(dataclasses.replace(action, scope=None))


def pool_obj() -> tuple[CredentialPool, Secret]:
    p = CredentialPool.model_validate(
        {
            "metadata": {"name": "p", "namespace": "default", "generation": 1},
            "spec": {
                "provider": "acme",
                "rateLimitScope": "Pool",
                "credentials": [
                    {"name": n, "secretRef": {"name": "s", "key": n}} for n in ("k1", "k2", "k3")
                ],
            },
        }
    )
    s = Secret.model_validate({"metadata": {"name": "s"}, "stringData": {"k1": "v1", "k2": "v2", "k3": "v3"}})
    return p, s


def test_status_shows_the_pool_wide_limit_on_every_credential_and_ends_it():
    spec, secret = pool_obj()
    resolved = resolve_pool(spec, {"s": secret})
    action, _ = pool_wide_action(T0 + 30)
    book = ReportBook()
    book.add("default", "p", Report(action, "agent-1", T0))
    st = pool_status(spec, resolved, old=None, now=T0 + 1, reported=book.pool_reports("default", "p", T0 + 1))
    rows = st["credentials"]
    assert [(r["state"], r.get("scope"), r.get("model")) for r in rows] == [("CoolingDown", "Pool", M)] * 3
    assert st["available"] == 0
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert "pool-wide rate limit" in degraded["message"]
    notes = transitions(None, st)
    assert any("pool-wide rate limit" in n.message for n in notes)
    # Other sidecars adopt it for each of their keys, from status alone.
    adopted = shared_blocks(st, pod="agent-2", now=T0 + 1)
    assert sorted(b.credential for b in adopted) == ["k1", "k2", "k3"]
    # Its end clears every row.
    (end,) = make_pool_end(action)
    book.add("default", "p", Report(end, "agent-1", T0 + 2))
    st2 = pool_status(spec, resolved, old=st, now=T0 + 2, reported=book.pool_reports("default", "p", T0 + 2))
    assert [r["state"] for r in st2["credentials"]] == ["Available"] * 3


def make_pool_end(action):
    return [
        dataclasses.replace(
            action, kind=ActionKind.RESTORED, at=T0 + 2, credential=None, fingerprint=None, until=None
        )
    ]


def test_metrics_say_which_scope_acted():
    metrics = Metrics()
    action, _ = pool_wide_action()
    metrics.action(action)
    metrics.action(dataclasses.replace(action, scope=None, credential="k2"))
    text = generate_latest(metrics.registry).decode()
    assert 'kind="CredentialCoolingDown",scope="Pool"' in text
    assert 'kind="CredentialCoolingDown",scope="Credential"' in text


@pytest.mark.parametrize("scope", ["Credential", "Pool"])
def test_the_scope_reaches_the_rendered_config(scope):
    from keyroute.core.render import _pool_config

    spec, secret = pool_obj()
    spec = spec.model_copy(update={"spec": spec.spec.model_copy(update={"rate_limit_scope": scope})})
    assert _pool_config(resolve_pool(spec, {"s": secret})).rate_limit_scope == scope
