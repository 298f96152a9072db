"""The sidecar reporter's queue, without a network: merging repeats, dropping the oldest when full,
putting a failed send back, and the token bucket that paces sending. ``run()`` is never called.
"""

from __future__ import annotations

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.reports import Origin, dedup_key
from keyroute.kube import Kube
from keyroute.sidecar.metrics import Metrics
from keyroute.sidecar.reporter import Reporter, TokenBucket

T0 = 1_800_000_000.0


def make_reporter(capacity: int = 3) -> tuple[Reporter, Metrics]:
    metrics = Metrics()
    reporter = Reporter(
        kube=Kube(server="http://127.0.0.1:9", headers={}),
        origin=Origin("pod-a", "default"),
        config=lambda: None,
        metrics=metrics,
        capacity=capacity,
    )
    return reporter, metrics


def cooldown(cred: str, at: float = T0, *, model: str | None = None, until: float | None = None) -> Action:
    return Action(
        kind=ActionKind.COOLED_DOWN,
        at=at,
        namespace="default",
        object_name="openai",
        error_class=ErrorClass.RATE_LIMITED,
        credential=cred,
        fingerprint="sha256:0123456789ab",
        until=until if until is not None else at + 60,
        model=model,
        status=429,
    )


def reports(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("keyroute_reports_total", {"result": result}) or 0.0


def pending_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("keyroute_reports_pending")


def queued(reporter: Reporter) -> list[tuple[str | None, int]]:
    """(credential, count) of each queued item, oldest first."""
    return [(p.action.credential if p.action else None, p.count) for p in reporter._pending.values()]


# --- offer ------------------------------------------------------------------------------------------


def test_offer_queues_without_sending():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1"))
    assert reporter.pending == 1 and queued(reporter) == [("k1", 1)]
    assert pending_gauge(metrics) == 1
    assert reports(metrics, "sent") == 0
    assert not reporter.delivered.is_set()


def test_repeat_of_a_queued_transition_is_merged_and_moved_to_the_end():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1", T0))
    reporter.offer(cooldown("k2", T0 + 1))
    later = cooldown("k1", T0 + 5, until=T0 + 300)
    reporter.offer(later)
    assert queued(reporter) == [("k2", 1), ("k1", 2)]
    item = reporter._pending[dedup_key(later)]
    assert item.action == later  # the newest state (until) is what gets reported
    assert item.first_at == T0  # the Event still says when the streak started
    assert reports(metrics, "merged") == 1
    assert pending_gauge(metrics) == 2 and reports(metrics, "dropped") == 0


def test_different_models_are_different_transitions():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1", model="m1"))
    reporter.offer(cooldown("k1", model="m2"))
    assert reporter.pending == 2 and reports(metrics, "merged") == 0


def test_full_queue_drops_the_oldest_and_counts_it():
    reporter, metrics = make_reporter(capacity=3)
    for i in range(1, 5):
        reporter.offer(cooldown(f"k{i}", T0 + i))
    assert queued(reporter) == [("k2", 1), ("k3", 1), ("k4", 1)]
    assert reporter.dropped == 1
    assert reports(metrics, "dropped") == 1
    assert pending_gauge(metrics) == 3
    reporter.offer(cooldown("k5", T0 + 5))
    reporter.offer(cooldown("k6", T0 + 6))
    assert queued(reporter) == [("k4", 1), ("k5", 1), ("k6", 1)]
    assert reporter.dropped == 3 and reports(metrics, "dropped") == 3


def test_a_repeat_into_a_full_queue_drops_nothing():
    reporter, metrics = make_reporter(capacity=3)
    for i in range(1, 4):
        reporter.offer(cooldown(f"k{i}", T0 + i))
    reporter.offer(cooldown("k1", T0 + 10))
    assert queued(reporter) == [("k2", 1), ("k3", 1), ("k1", 2)]
    assert reporter.dropped == 0 and reports(metrics, "dropped") == 0
    assert reports(metrics, "merged") == 1 and pending_gauge(metrics) == 3


def test_a_merged_item_moved_to_the_end_is_no_longer_the_first_dropped():
    reporter, metrics = make_reporter(capacity=2)
    reporter.offer(cooldown("k1", T0))
    reporter.offer(cooldown("k2", T0 + 1))
    reporter.offer(cooldown("k1", T0 + 2))  # k1 is now the newest
    reporter.offer(cooldown("k3", T0 + 3))
    assert queued(reporter) == [("k1", 2), ("k3", 1)]


def test_offer_sets_the_wake_event_and_clears_delivered():
    reporter, _ = make_reporter()
    reporter.delivered.set()
    reporter.offer(cooldown("k1"))
    assert reporter._wake.is_set() and not reporter.delivered.is_set()


# --- requeue after a failed send --------------------------------------------------------------------


def pop_first(reporter: Reporter):
    """What run() does before sending: take the oldest item off the queue."""
    return reporter._pending.popitem(last=False)


def test_requeue_puts_a_failed_item_back_at_the_front():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1", T0))
    reporter.offer(cooldown("k2", T0 + 1))
    key, item = pop_first(reporter)
    reporter.metrics.reports_pending.set(reporter.pending)
    assert pending_gauge(metrics) == 1
    reporter.offer(cooldown("k3", T0 + 2))
    reporter._requeue(key, item)
    assert queued(reporter) == [("k1", 1), ("k2", 1), ("k3", 1)]
    assert pending_gauge(metrics) == 3


def test_requeue_merges_into_a_newer_item_of_the_same_transition():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1", T0))
    reporter.offer(cooldown("k1", T0 + 1))  # count 2
    reporter.offer(cooldown("k2", T0 + 2))
    key, item = pop_first(reporter)
    assert item.count == 2 and item.first_at == T0
    newer_action = cooldown("k1", T0 + 10, until=T0 + 600)
    reporter.offer(newer_action)  # arrives while the send of the older one fails
    reporter._requeue(key, item)
    assert queued(reporter) == [("k2", 1), ("k1", 3)]  # counts add up; the newer keeps its place
    merged = reporter._pending[key]
    assert merged.action == newer_action and merged.first_at == T0
    assert pending_gauge(metrics) == 2


def test_requeue_of_the_only_item():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1", T0))
    key, item = pop_first(reporter)
    reporter._requeue(key, item)
    assert queued(reporter) == [("k1", 1)] and pending_gauge(metrics) == 1
    assert reports(metrics, "merged") == 0 and reports(metrics, "dropped") == 0


def test_presence_item_is_queued_and_merged_like_a_report():
    reporter, metrics = make_reporter()
    reporter._queue(("presence",), None, T0)
    reporter._queue(("presence",), None, T0 + 300)
    assert queued(reporter) == [(None, 2)]
    assert reporter._pending[("presence",)].first_at == T0
    assert reports(metrics, "merged") == 1


# --- TokenBucket ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        assert bucket.wait_time() == 0.0
        bucket.take()
    assert bucket.wait_time() == 0.5  # one token at 2 per second
    clock.now += 0.25
    assert bucket.wait_time() == 0.25
    clock.now += 0.25
    assert bucket.wait_time() == 0.0
    bucket.take()
    assert bucket.wait_time() == 0.5


def test_token_bucket_refills_no_more_than_the_burst():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    clock.now += 3600
    for _ in range(2):
        assert bucket.wait_time() == 0.0
        bucket.take()
    assert bucket.wait_time() == 1.0


def test_token_bucket_waiting_does_not_consume():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    bucket.take()
    assert bucket.wait_time() == 1.0
    assert bucket.wait_time() == 1.0  # asking again is free
    clock.now += 1.0
    assert bucket.wait_time() == 0.0


def test_reporter_defaults_pace_at_one_per_second_after_a_burst_of_25():
    reporter, _ = make_reporter()
    assert (reporter.bucket.rate, reporter.bucket.burst, reporter.bucket.tokens) == (1.0, 25, 25.0)


def test_a_403_is_final_unless_the_api_server_was_just_unreachable():
    from keyroute.sidecar.reporter import SETTLING, refusal_is_final

    assert refusal_is_final(403, now=1000.0, unreachable_at=None)  # RBAC: dropped, never retried
    assert refusal_is_final(422, now=1000.0, unreachable_at=999.0)  # invalid whatever happened before
    # A restarting API server refuses everything until its RBAC caches are loaded.
    assert not refusal_is_final(403, now=1000.0, unreachable_at=995.0)
    assert not refusal_is_final(401, now=1000.0, unreachable_at=995.0)
    assert refusal_is_final(403, now=1000.0, unreachable_at=1000.0 - SETTLING)
    assert not refusal_is_final(503, now=1000.0, unreachable_at=None)
