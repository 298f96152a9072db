"""The credential pool state machine: strategies, cooldowns, attribution through leases."""

from __future__ import annotations

import random

import pytest

from keyroute.core.actions import ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.config import PoolConfig
from keyroute.core.pools import SOLE_KEY_CAP, Pool
from keyroute.core.resources import CredentialState
from tests.builders import cred, pool

T0 = 1_800_000_000.0
M = "gpt-4o"


def make(n: int = 3, strategy: str = "FillFirst", **cooldowns: float) -> Pool:
    cfg = pool("p", "acme", *[cred(f"k{i}", priority=i) for i in range(1, n + 1)], strategy=strategy)
    if cooldowns:
        cfg["cooldowns"] = cooldowns
    return Pool(PoolConfig.parse(cfg), rng=random.Random(7))


def fail(
    p: Pool,
    cls: ErrorClass,
    now: float = T0,
    *,
    model: str = M,
    reset_at: float | None = None,
    status: int = 429,
):
    lease = p.acquire(model, now)
    assert lease is not None
    p.release(lease)
    actions = p.record_failure(lease, Classification(cls, status=status, reset_at=reset_at), now)
    return lease, actions


def names(p: Pool, model: str = M, now: float = T0, n: int = 6) -> list[str]:
    out = []
    for _ in range(n):
        lease = p.acquire(model, now)
        assert lease is not None
        p.release(lease)
        out.append(lease.credential.name)
    return out


def test_fill_first_stays_on_first_key():
    assert names(make()) == ["k1"] * 6


def test_round_robin_rotates():
    assert names(make(strategy="RoundRobin")) == ["k1", "k2", "k3", "k1", "k2", "k3"]


def test_least_used_counts_leases_in_flight():
    p = make(strategy="LeastUsed")
    held = [p.acquire(M, T0) for _ in range(3)]
    assert sorted(lease.credential.name for lease in held if lease) == ["k1", "k2", "k3"]


def test_random_picks_only_usable_keys():
    p = make(strategy="Random")
    fail(p, ErrorClass.BILLING, status=402)  # k? exhausted: whichever was picked
    blocked = [c.name for c in p.credentials if not p.usable(c, M, T0)]
    assert len(blocked) == 1
    assert blocked[0] not in names(p, n=30)


def test_rate_limit_without_reset_uses_default_then_doubles_capped_by_max():
    p = make(rate_limited=60, max=200)
    _, actions = fail(p, ErrorClass.RATE_LIMITED)
    assert actions[0].kind is ActionKind.COOLED_DOWN and actions[0].until == T0 + 60
    # k1 comes back, is limited again: 120 s, then 200 (cap), then 200.
    expected = [120, 200, 200]
    now = T0
    for want in expected:
        now = p.health["k1"].blocks[M].until  # type: ignore[assignment]
        p.expire(now)
        lease = p.acquire(M, now)
        assert lease and lease.credential.name == "k1"
        actions = p.record_failure(lease, Classification(ErrorClass.RATE_LIMITED, status=429), now)
        assert actions[0].until == pytest.approx(now + want)


def test_success_ends_the_rate_limit_streak():
    p = make(rate_limited=10)
    fail(p, ErrorClass.RATE_LIMITED)
    now = T0 + 10
    lease = p.acquire(M, now)
    assert lease
    p.record_success(lease, now)
    _, actions = fail(p, ErrorClass.RATE_LIMITED, now)
    assert actions[0].until == now + 10


def test_provider_reset_wins_over_defaults():
    p = make(rate_limited=60)
    _, actions = fail(p, ErrorClass.RATE_LIMITED, reset_at=T0 + 7)
    assert actions[0].until == T0 + 7


def test_rate_limit_is_scoped_to_the_model():
    p = make(n=1)
    fail(p, ErrorClass.RATE_LIMITED, model="gpt-4o")
    assert p.acquire("gpt-4o", T0 + 1) is None
    other = p.acquire("gpt-4o-mini", T0 + 1)
    assert other is not None and other.credential.name == "k1"


@pytest.mark.parametrize(
    "cls", [ErrorClass.USAGE_LIMIT, ErrorClass.BILLING, ErrorClass.AUTH_FAILED, ErrorClass.REVOKED]
)
def test_other_credential_classes_block_every_model(cls):
    p = make(n=2)
    fail(p, cls, status=401)
    assert p.acquire("another-model", T0 + 1).credential.name == "k2"  # type: ignore[union-attr]


def test_billing_is_exhausted_for_billing_period_and_never_shortened():
    p = make(billing=3600)
    _, actions = fail(p, ErrorClass.BILLING, reset_at=T0 + 5, status=402)
    assert actions[0].kind is ActionKind.EXHAUSTED and actions[0].until == T0 + 3600
    assert p.state("k1", T0)[0] is CredentialState.EXHAUSTED


def test_billing_takes_a_later_provider_reset():
    p = make(billing=3600)
    _, actions = fail(p, ErrorClass.BILLING, reset_at=T0 + 7200, status=402)
    assert actions[0].until == T0 + 7200


def test_revoked_is_rejected_without_end():
    p = make()
    _, actions = fail(p, ErrorClass.REVOKED, status=401)
    assert actions[0].kind is ActionKind.REJECTED and actions[0].until is None
    assert p.state("k1", T0 + 10**6)[0] is CredentialState.REJECTED
    assert p.expire(T0 + 10**6) == []


def test_auth_failed_cools_for_auth_failed():
    p = make(auth_failed=300)
    _, actions = fail(p, ErrorClass.AUTH_FAILED, status=401)
    assert actions[0].until == T0 + 300


def test_sole_key_caps_non_billing_cooldowns_at_60s():
    p = make(n=1, auth_failed=300)
    _, actions = fail(p, ErrorClass.RATE_LIMITED, reset_at=T0 + 3600)
    assert actions[0].until == T0 + SOLE_KEY_CAP
    p2 = make(n=1, auth_failed=300)
    assert fail(p2, ErrorClass.AUTH_FAILED, status=401)[1][0].until == T0 + SOLE_KEY_CAP
    p3 = make(n=1, billing=3600)
    assert fail(p3, ErrorClass.BILLING, status=402)[1][0].until == T0 + 3600


def test_sole_usable_key_counts_keys_that_are_not_exhausted():
    p = make(n=2)
    fail(p, ErrorClass.BILLING, status=402)  # k1 exhausted, k2 is the only usable key left
    _, actions = fail(p, ErrorClass.RATE_LIMITED, reset_at=T0 + 3600)
    assert actions[0].credential == "k2" and actions[0].until == T0 + SOLE_KEY_CAP


def test_failure_is_attributed_to_the_leased_credential_not_the_current_one():
    p = make(strategy="RoundRobin")
    first = p.acquire(M, T0)
    second = p.acquire(M, T0)
    assert first and second and first.credential.name == "k1" and second.credential.name == "k2"
    p.release(first)
    p.record_failure(first, Classification(ErrorClass.RATE_LIMITED, status=429), T0)
    assert not p.usable(p.credentials[0], M, T0)
    assert p.usable(p.credentials[1], M, T0)


def test_concurrent_429s_on_one_key_are_one_incident():
    p = make(rate_limited=60)
    leases = [p.acquire(M, T0) for _ in range(20)]  # FillFirst: all on k1
    assert {lease.credential.name for lease in leases if lease} == {"k1"}
    cooldowns = [
        p.record_failure(lease, Classification(ErrorClass.RATE_LIMITED, status=429), T0)  # type: ignore[arg-type]
        for lease in leases
    ]
    assert sum(len(a) for a in cooldowns) == 1
    assert p.health["k1"].blocks[M].until == T0 + 60  # not doubled 19 times
    assert p.health["k1"].strikes[M] == 1


def test_expire_restores_and_reports():
    p = make(rate_limited=10)
    fail(p, ErrorClass.RATE_LIMITED)
    assert p.expire(T0 + 9) == []
    actions = p.expire(T0 + 10)
    assert [(a.kind, a.credential) for a in actions] == [(ActionKind.RESTORED, "k1")]
    assert p.state("k1", T0 + 10)[0] is CredentialState.AVAILABLE


def test_earliest_available_and_none_when_all_rejected():
    p = make(n=2, rate_limited=10)
    fail(p, ErrorClass.RATE_LIMITED)
    assert p.earliest_available(M, T0) == T0  # k2 is usable now
    fail(p, ErrorClass.RATE_LIMITED, reset_at=T0 + 3)
    assert p.earliest_available(M, T0) == T0 + 3
    q = make(n=1)
    fail(q, ErrorClass.REVOKED, status=401)
    assert q.earliest_available(M, T0) is None


def test_reload_keeps_state_of_unchanged_keys_and_resets_changed_ones():
    old = make(n=2)
    fail(old, ErrorClass.REVOKED, status=401)  # k1 rejected
    fail(old, ErrorClass.BILLING, status=402)  # k2 exhausted
    cfg = pool("p", "acme", cred("k1", key="sk-test-k1-ROTATED-0000000000"), cred("k2", priority=2))
    new = Pool(PoolConfig.parse(cfg), previous=old)
    assert new.state("k1", T0)[0] is CredentialState.AVAILABLE  # new key value starts healthy
    assert new.state("k2", T0)[0] is CredentialState.EXHAUSTED  # same key keeps its state


def test_lease_from_a_replaced_pool_does_not_touch_the_new_one():
    old = make()
    lease = old.acquire(M, T0)
    new = Pool(PoolConfig.parse(pool("p", "acme", cred("k1", priority=1))), previous=old)
    assert new.record_failure(lease, Classification(ErrorClass.REVOKED, status=401), T0) == []  # type: ignore[arg-type]
    assert new.state("k1", T0)[0] is CredentialState.AVAILABLE


def test_provider_level_classes_leave_credentials_alone():
    p = make()
    for cls in (
        ErrorClass.SERVER_ERROR,
        ErrorClass.OVERLOADED,
        ErrorClass.TIMEOUT,
        ErrorClass.MODEL_NOT_FOUND,
    ):
        _, actions = fail(p, cls, status=500)
        assert actions == []
    assert all(p.usable(c, M, T0) for c in p.credentials)


def test_key_is_not_in_repr():
    p = make()
    lease = p.acquire(M, T0)
    assert "sk-test" not in repr(lease) and "sk-test" not in repr(p.credentials)
