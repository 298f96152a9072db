"""A request's walk along the chain, decided by the pure core (no HTTP, time as a parameter)."""

from __future__ import annotations

import random

import pytest

from keyroute.core.actions import ActionKind
from keyroute.core.chains import Chain
from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.routing import Attempt, Exhausted, Route, Verdict, Wait
from tests.builders import config, cred, entry, pool, two_providers

T0 = 1_800_000_000.0
M = "gpt-4o"


def chain_of(**kw) -> Chain:
    return Chain(two_providers(**kw), rng=random.Random(1))


def step(route: Route, now: float = T0) -> Attempt:
    a = route.next(now)
    assert isinstance(a, Attempt), a
    return a


def failure(cls: ErrorClass, status: int | None = None, **kw) -> Classification:
    return Classification(cls, status=status, **kw)


def where(a: Attempt) -> tuple[str, str, str]:
    return a.entry.name, a.credential_name, a.base_url


def test_primary_first_with_its_own_key_and_host():
    a = step(Route(chain_of(), M, T0))
    assert where(a) == ("acme", "acme-1", "http://primary.test/v1")


@pytest.mark.parametrize(
    "cls",
    [
        ErrorClass.RATE_LIMITED,
        ErrorClass.USAGE_LIMIT,
        ErrorClass.BILLING,
        ErrorClass.AUTH_FAILED,
        ErrorClass.REVOKED,
    ],
)
def test_credential_classes_rotate_to_the_next_key_of_the_same_provider(cls):
    route = Route(chain_of(), M, T0)
    a = step(route)
    assert route.report(a, failure(cls, 429), T0) is Verdict.CONTINUE
    assert where(step(route)) == ("acme", "acme-2", "http://primary.test/v1")


def test_pool_empty_falls_back_and_the_fallback_uses_its_own_pool_and_host():
    chain = chain_of()
    route = Route(chain, M, T0)
    for _ in range(2):
        route.report(step(route), failure(ErrorClass.RATE_LIMITED, 429), T0)
    a = step(route)
    assert where(a) == ("backup", "backup-1", "http://fallback.test/v1")
    assert route.report(a, None, T0) is Verdict.RETURN
    assert [x.kind for x in route.actions if x.kind is ActionKind.FALLBACK_ACTIVATED]
    assert chain.on_fallback(M)


def test_seed_fallback_429s_rotate_only_the_fallbacks_pool():
    chain = chain_of(fallback_keys=3)
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.SERVER_ERROR, 500), T0)
    route.report(step(route), failure(ErrorClass.SERVER_ERROR, 500), T0)  # retried once, then fallback
    primary_before = {n: dict(h.blocks) for n, h in chain.pools["acme-keys"].health.items()}
    seen = []
    for _ in range(3):
        a = step(route)
        seen.append(where(a))
        route.report(a, failure(ErrorClass.RATE_LIMITED, 429), T0)
    assert seen == [
        ("backup", "backup-1", "http://fallback.test/v1"),
        ("backup", "backup-2", "http://fallback.test/v1"),
        ("backup", "backup-3", "http://fallback.test/v1"),
    ]
    assert {n: dict(h.blocks) for n, h in chain.pools["acme-keys"].health.items()} == primary_before
    assert all(not h.blocks for h in chain.pools["acme-keys"].health.values())


def test_server_error_retries_once_on_the_same_provider_then_falls_back():
    route = Route(chain_of(), M, T0)
    first = step(route)
    route.report(first, failure(ErrorClass.SERVER_ERROR, 500), T0)
    second = step(route)
    assert second.entry.name == "acme" and second.credential_name == "acme-2"
    route.report(second, failure(ErrorClass.SERVER_ERROR, 502), T0)
    assert step(route).entry.name == "backup"


def test_connection_error_retry_reuses_the_only_key():
    route = Route(chain_of(primary_keys=1), M, T0)
    route.report(step(route), failure(ErrorClass.CONNECTION_ERROR), T0)
    assert where(step(route))[:2] == ("acme", "acme-1")


def test_overloaded_tries_next_key_once_then_falls_back():
    route = Route(chain_of(primary_keys=3), M, T0)
    route.report(step(route), failure(ErrorClass.OVERLOADED, 529), T0)
    a = step(route)
    assert where(a)[:2] == ("acme", "acme-2")
    route.report(a, failure(ErrorClass.OVERLOADED, 529), T0)
    assert step(route).entry.name == "backup"


def test_overloaded_with_a_single_key_falls_back_at_once():
    route = Route(chain_of(primary_keys=1), M, T0)
    route.report(step(route), failure(ErrorClass.OVERLOADED, 503), T0)
    assert step(route).entry.name == "backup"


@pytest.mark.parametrize(
    "cls", [ErrorClass.TIMEOUT, ErrorClass.MODEL_NOT_FOUND, ErrorClass.UPSTREAM_RATE_LIMITED]
)
def test_fall_back_at_once(cls):
    route = Route(chain_of(), M, T0)
    route.report(step(route), failure(cls, 404), T0)
    assert step(route).entry.name == "backup"


def test_client_error_goes_to_the_agent():
    route = Route(chain_of(), M, T0)
    assert route.report(step(route), failure(ErrorClass.CLIENT_ERROR, 400), T0) is Verdict.RETURN


def test_fallback_triggers_narrows_the_classes_that_leave_an_entry():
    chain = Chain(two_providers(fallback={"triggers": ["RateLimited"]}))
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.SERVER_ERROR, 500), T0)
    assert route.report(step(route), failure(ErrorClass.SERVER_ERROR, 500), T0) is Verdict.RETURN


def test_a_key_class_not_in_triggers_rotates_then_hands_the_last_answer_to_the_agent():
    chain = Chain(two_providers(fallback={"triggers": ["ServerError"]}), rng=random.Random(1))
    limited = failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 30)
    route = Route(chain, M, T0)
    assert route.report(step(route), limited, T0) is Verdict.CONTINUE  # the next key is not leaving
    a = step(route)
    assert where(a)[:2] == ("acme", "acme-2")
    assert route.report(a, limited, T0) is Verdict.RETURN  # nothing left on the entry
    # A later request finds every key of the entry benched by that class: it does not leave either.
    later = Route(chain, M, T0 + 1)
    done = later.next(T0 + 1)
    assert isinstance(done, Exhausted) and done.retry_after == pytest.approx(29)  # the entry's key
    assert later.reason is ErrorClass.RATE_LIMITED
    assert not chain.on_fallback(M) and M not in chain.models


def test_a_short_reset_is_waited_out_before_a_key_class_not_in_triggers_returns():
    chain = Chain(two_providers(primary_keys=1, fallback={"triggers": ["Timeout"]}), rng=random.Random(1))
    route = Route(chain, M, T0)
    short = failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 2)
    assert route.report(step(route), short, T0) is Verdict.CONTINUE
    w = route.next(T0)
    assert isinstance(w, Wait)
    assert route.report(step(route, w.until), short, w.until) is Verdict.RETURN  # waited once already


def test_keys_rejected_for_good_on_an_entry_that_may_not_be_left_say_restore_after():
    chain = Chain(two_providers(primary_keys=1, fallback={"triggers": ["Timeout"], "restoreAfter": 60}))
    route = Route(chain, M, T0)
    assert route.report(step(route), failure(ErrorClass.REVOKED, 401), T0) is Verdict.RETURN
    done = Route(chain, M, T0).next(T0)
    # Not "1 s" (the fallback is usable now, but this request may not go there), not forever.
    assert isinstance(done, Exhausted) and done.retry_after == 60


def test_a_key_class_not_in_triggers_returns_when_the_attempt_budget_is_spent():
    chain = Chain(two_providers(primary_keys=3, fallback={"triggers": ["Timeout"], "maxAttempts": 2}))
    route = Route(chain, M, T0)
    limited = failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 30)
    assert route.report(step(route), limited, T0) is Verdict.CONTINUE
    assert route.report(step(route), limited, T0) is Verdict.RETURN  # a third key, but no third attempt


def test_chain_exhausted_reports_retry_after_from_the_soonest_key():
    chain = chain_of(primary_keys=1, fallback_keys=1)
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 30), T0)
    route.report(step(route), failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 20), T0)
    done = route.next(T0)
    assert isinstance(done, Exhausted)
    assert done.retry_after == pytest.approx(20)
    assert [r.provider for r in route.records] == ["acme", "backup"]
    assert any(a.kind is ActionKind.CHAIN_EXHAUSTED for a in route.actions)


def test_attempt_budget_bounds_a_request():
    chain = Chain(two_providers(primary_keys=5, fallback_keys=5, fallback={"maxAttempts": 3}))
    route = Route(chain, M, T0)
    for _ in range(3):
        route.report(step(route), failure(ErrorClass.RATE_LIMITED, 429), T0)
    assert isinstance(route.next(T0), Exhausted)


def test_request_deadline_bounds_a_request():
    chain = Chain(two_providers(requestTimeout=10))
    route = Route(chain, M, T0)
    assert isinstance(route.next(T0 + 11), Exhausted)


def test_short_reset_on_a_single_key_is_waited_out_on_that_key():
    chain = chain_of(primary_keys=1)
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 2), T0)
    w = route.next(T0)
    assert isinstance(w, Wait) and T0 + 2 <= w.until <= T0 + 2.2
    assert where(step(route, w.until))[:2] == ("acme", "acme-1")


def test_long_reset_is_not_waited_out():
    route = Route(chain_of(primary_keys=1), M, T0)
    route.report(step(route), failure(ErrorClass.RATE_LIMITED, 429, reset_at=T0 + 30), T0)
    assert step(route).entry.name == "backup"


def test_restore_after_cooldown_probes_primary_and_waits_again_on_failure():
    chain = Chain(two_providers(fallback={"restoreAfter": 60}), rng=random.Random(1))
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.TIMEOUT), T0)
    route.report(step(route), None, T0)
    due = chain.models[M].restores["acme"].restore_at
    assert T0 + 54 <= due <= T0 + 66  # restoreAfter ± 10 %
    # Within the restore wait, new requests start on the fallback (a silent primary is not a last resort).
    assert Route(chain, M, due - 0.01).order[0].name == "backup"
    # At the restore time, the next request probes the primary; a concurrent one does not.
    probe = Route(chain, M, due)
    assert probe.order[0].name == "acme"
    other = Route(chain, M, due)
    assert other.order[0].name == "backup"
    pa = step(probe, due)
    assert pa.probe
    probe.report(pa, failure(ErrorClass.SERVER_ERROR, 500), due)
    probe.report(step(probe, due), failure(ErrorClass.SERVER_ERROR, 500), due)
    r = chain.models[M].restores["acme"]
    assert r.wait == 60 and due + 54 <= r.restore_at <= due + 66  # a short outage: restoreAfter again
    # Succeeds at the next probe: traffic returns to the primary and the restore state is cleared.
    back = Route(chain, M, r.restore_at)
    a = step(back, r.restore_at)
    assert a.entry.name == "acme"
    back.report(a, None, r.restore_at)
    assert any(x.kind is ActionKind.PRIMARY_RESTORED for x in back.actions)
    assert M not in chain.models  # back on the primary with nothing waiting: no state kept
    assert not chain.on_fallback(M)


def test_restore_wait_grows_with_the_outage_and_is_capped():
    chain = Chain(two_providers(fallback={"restoreAfter": 10, "restoreMax": 90}), rng=random.Random(3))
    assert [chain.restore_wait(age) for age in (0, 60, 80, 160, 720, 86400)] == [10, 10, 10, 20, 90, 90]
    now, gaps = T0, []
    for _ in range(60):
        r = Route(chain, M, now)
        a = step(r, now)
        if a.entry.name == "acme":
            r.report(a, failure(ErrorClass.MODEL_NOT_FOUND, 404), now)
        r.abandon()
        due = chain.models[M].restores["acme"].restore_at
        gaps.append(due - now)
        now = due
    restore = chain.models[M].restores["acme"]
    assert restore.since == T0 and restore.wait == 90
    assert 9 <= gaps[0] <= 11 and all(81 <= g <= 99 for g in gaps[-10:])  # bounded, symmetric jitter
    assert max(gaps) <= 99


def test_restore_max_below_restore_after_keeps_restore_after():
    chain = Chain(two_providers(fallback={"restoreAfter": 30, "restoreMax": 5}))
    assert chain.restore_wait(3600) == 30


def test_abandoned_probe_is_released():
    chain = Chain(two_providers(fallback={"restoreAfter": 10}))
    r = Route(chain, M, T0)
    r.report(step(r), failure(ErrorClass.MODEL_NOT_FOUND, 404), T0)
    r.report(step(r), None, T0)
    due = chain.models[M].restores["acme"].restore_at
    probe = Route(chain, M, due)
    probe.abandon()
    assert Route(chain, M, due).order[0].name == "acme"


def test_fallback_state_is_per_model():
    chain = chain_of()
    r = Route(chain, "gpt-4o", T0)
    r.report(step(r), failure(ErrorClass.MODEL_NOT_FOUND, 404), T0)
    r.report(step(r), None, T0)
    assert chain.on_fallback("gpt-4o")
    other = Route(chain, "gpt-4o-mini", T0)
    assert step(other).entry.name == "acme"


def test_context_length_moves_to_bigger_context_entries():
    cfg = config(
        [
            entry("small", "acme", "http://a.test/v1", "acme-keys"),
            entry("backup", "backup", "http://b.test/v1", "backup-keys"),
            entry("big", "acme", "http://a.test/v1", "acme-keys", models={"*": "acme-long"}),
        ],
        [pool("acme-keys", "acme", cred("a1")), pool("backup-keys", "backup", cred("b1"))],
        fallback={"contextLength": ["big"]},
    )
    chain = Chain(cfg)
    route = Route(chain, M, T0)
    a = step(route)
    assert route.report(a, failure(ErrorClass.CLIENT_ERROR, 400, context_length=True), T0) is Verdict.CONTINUE
    b = step(route)
    assert b.entry.name == "big" and b.model == "acme-long" and b.credential_name == "a1"
    route.report(b, None, T0)
    assert not chain.on_fallback(M)  # a long prompt is not an outage


def test_context_length_without_configured_entries_goes_to_the_agent():
    route = Route(chain_of(), M, T0)
    assert (
        route.report(step(route), failure(ErrorClass.CLIENT_ERROR, 400, context_length=True), T0)
        is Verdict.RETURN
    )


def test_same_provider_entries_share_the_pool():
    cfg = config(
        [
            entry("acme-main", "acme", "http://a.test/v1", "acme-keys"),
            entry("acme-mini", "acme", "http://a.test/v1", "acme-keys", models={"*": "mini"}),
        ],
        [pool("acme-keys", "acme", cred("a1"), cred("a2", priority=1))],
    )
    chain = Chain(cfg)
    assert chain.entries[0].pool is chain.entries[1].pool
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.MODEL_NOT_FOUND, 404), T0)
    b = step(route)
    assert (b.entry.name, b.credential_name, b.model) == ("acme-mini", "a1", "mini")


def test_entry_refuses_a_pool_of_another_provider():
    cfg = two_providers()
    chain = Chain(cfg)
    from keyroute.core.chains import Entry

    with pytest.raises(ValueError, match="belongs to"):
        Entry(0, "x", "acme", chain.entries[0].api, "http://x/v1", chain.pools["backup-keys"], {}, 1, 1, 1)


def test_credential_base_url_override_is_used_for_that_credential_only():
    cfg = config(
        [entry("acme", "acme", "http://a.test/v1", "k")],
        [pool("k", "acme", cred("eu", baseURL="http://eu.a.test/v1"), cred("us", priority=1))],
    )
    chain = Chain(cfg)
    route = Route(chain, M, T0)
    a = step(route)
    assert where(a) == ("acme", "eu", "http://eu.a.test/v1")
    route.report(a, failure(ErrorClass.RATE_LIMITED, 429), T0)
    assert where(step(route)) == ("acme", "us", "http://a.test/v1")


def test_model_mapping():
    cfg = two_providers()
    chain = Chain(cfg)
    e = chain.entries[0]
    object.__setattr__(e, "models", {"gpt-4o": "openai/gpt-4o", "*": "default-model"})
    assert e.upstream_model("gpt-4o") == "openai/gpt-4o"
    assert e.upstream_model("other") == "default-model"
    object.__setattr__(e, "models", {"gpt-4o": "x"})
    assert e.upstream_model("other") == "other"


def test_first_token_reaches_the_attempt_capped_by_the_deadline():
    cfg = config(
        [
            entry("acme", "acme", "http://a.test/v1", "a", timeouts={"firstToken": 20}),
            entry("backup", "backup", "http://b.test/v1", "b"),
        ],
        [pool("a", "acme", cred("a1")), pool("b", "backup", cred("b1"))],
        requestTimeout=30,
    )
    route = Route(Chain(cfg), M, T0)
    assert step(route).first_token == 20
    assert step(route, T0 + 25).first_token == pytest.approx(5)  # the same route, 25 s later
    route.report(step(route, T0 + 25), failure(ErrorClass.TIMEOUT), T0 + 25)
    assert step(route, T0 + 25).first_token is None  # off on the entry that does not set it


def test_models_served_where_they_always_were_leave_no_state():
    # The model is the agent's string: a state per model ever asked for would grow without bound.
    chain = chain_of()
    for i in range(1000):
        route = Route(chain, f"model-{i}", T0)
        route.report(step(route), None, T0)
        assert not route.actions
    assert chain.models == {}


def test_a_model_keeps_its_state_while_on_the_fallback_and_loses_it_back_on_the_primary():
    chain = Chain(two_providers(fallback={"restoreAfter": 60}), rng=random.Random(1))
    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.SERVER_ERROR, 500), T0)
    route.report(step(route), failure(ErrorClass.SERVER_ERROR, 500), T0)
    served = step(route)
    assert served.entry.name == "backup"
    route.report(served, None, T0)
    assert [a.kind for a in route.actions if a.kind is ActionKind.FALLBACK_ACTIVATED]
    assert chain.on_fallback(M) and list(chain.models) == [M]
    # While the primary waits, the next request starts on the fallback: the state is what says so.
    assert Route(chain, M, T0 + 1).order[0].name == "backup"
    due = chain.models[M].restores["acme"].restore_at
    back = Route(chain, M, due)
    a = step(back, due)
    assert a.entry.name == "acme" and a.probe
    back.report(a, None, due)
    assert any(x.kind is ActionKind.PRIMARY_RESTORED for x in back.actions)
    assert chain.models == {} and not chain.on_fallback(M)
    # And it is as if nothing had happened: the next failure starts a new, short wait.
    again = Route(chain, M, due + 1)
    again.report(step(again, due + 1), failure(ErrorClass.SERVER_ERROR, 500), due + 1)
    again.report(step(again, due + 1), failure(ErrorClass.SERVER_ERROR, 500), due + 1)
    assert chain.models[M].restores["acme"].wait == 60


def test_the_fallback_gauge_is_removed_when_the_chain_forgets_the_model():
    from keyroute.sidecar.metrics import Metrics

    metrics = Metrics()
    chain = Chain(two_providers(fallback={"restoreAfter": 60}), rng=random.Random(1))

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("keyroute_fallback_active", {"chain": chain.name, "model": M})

    route = Route(chain, M, T0)
    route.report(step(route), failure(ErrorClass.TIMEOUT), T0)
    route.report(step(route), None, T0)
    metrics.refresh_state(chain, T0)
    assert gauge() == 1
    due = chain.models[M].restores["acme"].restore_at
    back = Route(chain, M, due)
    back.report(step(back, due), None, due)
    assert M not in chain.models
    metrics.refresh_state(chain, due)
    assert gauge() is None  # removed, not left at 1 (an alert would fire on it) nor kept at 0 for ever
    other = Route(chain, "never-failed", due)
    other.report(step(other, due), None, due)
    metrics.refresh_state(chain, due)
    assert metrics.registry.get_sample_value("keyroute_fallback_active", {"chain": chain.name, "model": "never-failed"}) is None


def _time_out_everywhere(chain: Chain, model: str, now: float) -> None:
    # Both entries time out: the model's state waits on both, and no entry serves it.
    route = Route(chain, model, now)
    route.report(step(route, now), failure(ErrorClass.TIMEOUT), now)
    route.report(step(route, now), failure(ErrorClass.TIMEOUT), now)
    assert isinstance(route.next(now), Exhausted)


def _fall_back(chain: Chain, model: str, now: float) -> Route:
    route = Route(chain, model, now)
    route.report(step(route, now), failure(ErrorClass.TIMEOUT), now)
    served = step(route, now)
    assert served.entry.name == "backup"
    route.report(served, None, now)
    return route


def test_names_that_fail_everywhere_are_kept_up_to_the_cap_oldest_forgotten_first():
    # A made-up model name that every provider refuses leaves state behind; an agent inventing names
    # must not grow it without bound.
    from keyroute.core.chains import MAX_MODEL_STATES

    chain = chain_of()
    for i in range(MAX_MODEL_STATES + 100):
        _time_out_everywhere(chain, f"made-up-{i}", T0 + i)
    assert len(chain.models) == MAX_MODEL_STATES
    assert "made-up-0" not in chain.models and "made-up-99" not in chain.models
    assert f"made-up-{MAX_MODEL_STATES + 99}" in chain.models and chain.state_refusals == 0


def test_a_model_on_a_fallback_is_never_forgotten_for_room(monkeypatch):
    # Its fallback was reported; only the primary serving it again may end that (PrimaryRestored).
    from keyroute.core import chains
    from keyroute.sidecar.metrics import Metrics

    monkeypatch.setattr(chains, "MAX_MODEL_STATES", 3)
    chain = chain_of()
    metrics = Metrics()
    _fall_back(chain, "on-fallback", T0)
    _time_out_everywhere(chain, "nowhere-1", T0)
    _time_out_everywhere(chain, "nowhere-2", T0)
    _fall_back(chain, "also-on-fallback", T0)  # room made by forgetting nowhere-1, the oldest not on one
    assert list(chain.models) == ["on-fallback", "nowhere-2", "also-on-fallback"]
    _fall_back(chain, "third", T0)
    assert list(chain.models) == ["on-fallback", "also-on-fallback", "third"]
    metrics.refresh_state(chain, T0)

    def gauge(model: str) -> float | None:
        labels = {"chain": chain.name, "model": model}
        return metrics.registry.get_sample_value("keyroute_fallback_active", labels)

    assert [gauge(m) for m in ("on-fallback", "also-on-fallback", "third", "nowhere-2")] == [1, 1, 1, None]
    # Every state is on a fallback: a new model is served by the fallback, but neither remembered nor
    # reported, and counted; its next request starts at the primary again.
    route = Route(chain, "one-too-many", T0)
    route.report(step(route), failure(ErrorClass.TIMEOUT), T0)
    served = step(route)
    assert served.entry.name == "backup"
    route.report(served, None, T0)
    assert not [a for a in route.actions if a.kind is ActionKind.FALLBACK_ACTIVATED]
    assert "one-too-many" not in chain.models and chain.state_refusals == 2  # the failure and the fallback
    assert step(Route(chain, "one-too-many", T0 + 1), T0 + 1).entry.name == "acme"
    metrics.refresh_state(chain, T0)
    count = {"chain": chain.name}
    assert metrics.registry.get_sample_value("keyroute_model_state_refusals_total", count) == 2
    metrics.refresh_state(chain, T0)
    assert metrics.registry.get_sample_value("keyroute_model_state_refusals_total", count) == 2
