"""The sidecar reporter's queue, without a network: new transitions before repeats before the
heartbeat, merging repeats, dropping (a repeat first) when full, putting a failed send back, and the
token bucket that paces sending, with the sender's decision (``send_wait``) run on a simulated clock.
``run()`` is never called.
"""

from __future__ import annotations

import bisect

import pytest

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.reports import (
    DEDUP_WINDOW,
    PRESENCE_KEY,
    REPEAT_RESERVE,
    REPORT_BURST,
    REPORT_RATE,
    Origin,
    Priority,
    ReportQueue,
    dedup_key,
    report_slot,
    send_wait,
)
from keyroute.kube import Connection, Kube
from keyroute.sidecar.metrics import Metrics
from keyroute.sidecar.reporter import Reporter, TokenBucket

T0 = 1_800_000_000.0


def make_reporter(capacity: int = 3) -> tuple[Reporter, Metrics]:
    metrics = Metrics()
    reporter = Reporter(
        kube=Kube.from_connection(Connection(server="http://127.0.0.1:9")),
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
    return [(p.action.credential if p.action else None, p.count) for _, p in reporter.queue.items()]


# --- offer ------------------------------------------------------------------------------------------


def test_offer_queues_without_sending():
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1"))
    assert reporter.pending == 1 and queued(reporter) == [("k1", 1)]
    assert pending_gauge(metrics) == 1
    assert reports(metrics, "sent") == 0
    assert not reporter.delivered.is_set()


def test_repeat_of_a_queued_transition_is_merged_and_keeps_its_place():
    # Keeping the place: a transition that keeps happening is not pushed back behind later ones.
    reporter, metrics = make_reporter()
    reporter.offer(cooldown("k1", T0))
    reporter.offer(cooldown("k2", T0 + 1))
    later = cooldown("k1", T0 + 5, until=T0 + 300)
    reporter.offer(later)
    assert queued(reporter) == [("k1", 2), ("k2", 1)]
    item = dict(reporter.queue.items())[dedup_key(later)]
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
    assert queued(reporter) == [("k1", 2), ("k2", 1), ("k3", 1)]
    assert reporter.dropped == 0 and reports(metrics, "dropped") == 0
    assert reports(metrics, "merged") == 1 and pending_gauge(metrics) == 3


def test_a_merged_new_transition_is_still_the_oldest_when_dropping():
    reporter, metrics = make_reporter(capacity=2)
    reporter.offer(cooldown("k1", T0))
    reporter.offer(cooldown("k2", T0 + 1))
    reporter.offer(cooldown("k1", T0 + 2))  # merged: k1 stays the oldest
    reporter.offer(cooldown("k3", T0 + 3))
    assert queued(reporter) == [("k2", 1), ("k3", 1)]
    assert reporter.dropped == 1 and reports(metrics, "dropped") == 1


def test_offer_sets_the_wake_event_and_clears_delivered():
    reporter, _ = make_reporter()
    reporter.delivered.set()
    reporter.offer(cooldown("k1"))
    assert reporter._wake.is_set() and not reporter.delivered.is_set()


# --- requeue after a failed send --------------------------------------------------------------------


def pop_first(reporter: Reporter):
    """What run() does before sending: take the next item off the queue."""
    return reporter.queue.pop()


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
    # Counts add up; the operator has heard of neither, so the merged one goes first again.
    assert queued(reporter) == [("k1", 3), ("k2", 1)]
    merged = dict(reporter.queue.items())[key]
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
    reporter._offer_presence(T0)
    reporter._offer_presence(T0 + 300)
    assert queued(reporter) == [(None, 2)]
    assert dict(reporter.queue.items())[PRESENCE_KEY].first_at == T0
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


def test_reporter_defaults_are_the_readmes_budget():
    reporter, _ = make_reporter()
    assert (reporter.bucket.rate, reporter.bucket.burst, reporter.bucket.tokens) == (1.0, 50, 50.0)
    assert reporter.reserve == 25
    assert (REPORT_RATE, REPORT_BURST, REPEAT_RESERVE) == (1.0, 50, 25)


def test_token_bucket_reserve_holds_back_the_last_tokens():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=4, clock=clock)
    assert bucket.wait_time(reserve=2) == 0.0
    bucket.take()
    bucket.take()  # 2 left: a reserve of 2 must wait for a third
    assert bucket.wait_time(reserve=2) == 1.0
    assert bucket.wait_time() == 0.0  # without a reserve, the last tokens are there to take
    clock.now += 0.5
    assert bucket.wait_time(reserve=2) == 0.5


def test_token_bucket_rejects_a_rate_or_burst_that_can_never_send():
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0.0, burst=10)
    with pytest.raises(ValueError, match="burst >= 1"):
        TokenBucket(rate=1.0, burst=0)


def test_reporter_rejects_a_reserve_that_would_starve_repeats():
    with pytest.raises(ValueError, match="reserve"):
        Reporter(
            kube=Kube.from_connection(Connection(server="http://127.0.0.1:9")),
            origin=Origin("pod-a", "default"),
            config=lambda: None,
            metrics=Metrics(),
            burst=10,
            reserve=10,
        )


# --- ReportQueue: what goes first --------------------------------------------------------------------


def restored(cred: str, at: float) -> Action:
    return Action(
        kind=ActionKind.RESTORED,
        at=at,
        namespace="default",
        object_name="openai",
        error_class=ErrorClass.RATE_LIMITED,
        credential=cred,
        fingerprint="sha256:0123456789ab",
    )


def chain_action(kind: ActionKind, at: float, *, model: str | None = None) -> Action:
    entries = {
        ActionKind.FALLBACK_ACTIVATED: ("openai", "anthropic"),
        ActionKind.PRIMARY_RESTORED: ("anthropic", "openai"),
    }.get(kind, (None, None))
    return Action(
        kind=kind,
        at=at,
        namespace="default",
        object_name="agents",
        error_class=ErrorClass.SERVER_ERROR if kind is not ActionKind.PRIMARY_RESTORED else None,
        model=model,
        from_entry=entries[0],
        to_entry=entries[1],
    )


def order(queue: ReportQueue) -> list[tuple[str, Priority, int]]:
    """(what, priority, count) in the order the sender takes them."""
    out = []
    for key, p in queue.items():
        what = "presence" if key == PRESENCE_KEY else (p.action.credential or str(p.action.kind))
        out.append((what, p.priority, p.count))
    return out


def sent(queue: ReportQueue, n: int = 1) -> None:
    """What the sender does with the next ``n`` reports when sending works."""
    for _ in range(n):
        queue.pop()


def test_first_report_of_each_transition_is_new():
    q = ReportQueue(capacity=10)
    q.offer(cooldown("k1", T0))
    q.offer(chain_action(ActionKind.CHAIN_EXHAUSTED, T0))
    q.offer(chain_action(ActionKind.FALLBACK_ACTIVATED, T0))
    assert [p for _, p, _ in order(q)] == [Priority.NEW] * 3


def test_new_transitions_go_before_repeats_and_repeats_before_the_heartbeat():
    q = ReportQueue(capacity=100)
    q.offer(chain_action(ActionKind.CHAIN_EXHAUSTED, T0))
    q.offer(cooldown("k1", T0, until=T0 + 600))
    sent(q, 2)  # the operator knows both
    q.offer_presence(T0 + 1)
    q.offer(chain_action(ActionKind.CHAIN_EXHAUSTED, T0 + 2))  # again: a repeat
    q.offer(cooldown("k1", T0 + 3, until=T0 + 600))  # still cooling: a repeat
    for i in range(2, 42):  # a burst of 40 new cooldowns
        q.offer(cooldown(f"k{i}", T0 + 4 + i * 0.01, until=T0 + 600))
    got = order(q)
    assert [w for w, _, _ in got[:40]] == [f"k{i}" for i in range(2, 42)]
    assert all(p is Priority.NEW for _, p, _ in got[:40])
    assert got[40:] == [
        ("ChainExhausted", Priority.REPEAT, 1),
        ("k1", Priority.REPEAT, 1),
        ("presence", Priority.PRESENCE, 1),
    ]


def test_a_cooldown_again_after_a_restore_is_new():
    # The operator shows the key available again: the next cooldown is news (other pods adopt it).
    q = ReportQueue(capacity=10)
    q.offer(cooldown("k1", T0, until=T0 + 600))
    q.offer(restored("k1", T0 + 10))
    sent(q, 2)
    q.offer(cooldown("k1", T0 + 20, until=T0 + 600))
    assert order(q) == [("k1", Priority.NEW, 1)]


def test_a_cooldown_again_after_its_until_passed_is_new():
    # No restoration report came, but the operator flipped the row back at until by itself.
    q = ReportQueue(capacity=10)
    q.offer(cooldown("k1", T0, until=T0 + 1))
    sent(q)
    q.offer(cooldown("k1", T0 + 0.5, until=T0 + 1.5))
    assert q.classify(cooldown("k1", T0 + 0.9, until=T0 + 2)) is Priority.REPEAT
    assert order(q) == [("k1", Priority.REPEAT, 1)]
    q.offer(cooldown("k1", T0 + 1.6, until=T0 + 2.6))  # after the last told until: news again
    assert order(q) == [("k1", Priority.NEW, 2)]  # merged, and raised


def test_a_repeat_after_the_dedup_window_is_new():
    q = ReportQueue(capacity=10)
    q.offer(cooldown("k1", T0, until=T0 + 4 * DEDUP_WINDOW))
    sent(q)
    assert q.classify(cooldown("k1", T0 + DEDUP_WINDOW - 1, until=T0 + 4 * DEDUP_WINDOW)) is Priority.REPEAT
    assert q.classify(cooldown("k1", T0 + DEDUP_WINDOW, until=T0 + 4 * DEDUP_WINDOW)) is Priority.NEW


def test_each_model_and_credential_is_its_own_slot():
    q = ReportQueue(capacity=10)
    q.offer(cooldown("k1", T0, model="m1", until=T0 + 600))
    sent(q)
    assert q.classify(cooldown("k1", T0 + 1, model="m1", until=T0 + 600)) is Priority.REPEAT
    assert q.classify(cooldown("k1", T0 + 1, model="m2", until=T0 + 600)) is Priority.NEW
    assert q.classify(cooldown("k2", T0 + 1, model="m1", until=T0 + 600)) is Priority.NEW


def test_fallback_and_primary_restored_share_the_chains_fallback_slot():
    q = ReportQueue(capacity=10)
    fallback = chain_action(ActionKind.FALLBACK_ACTIVATED, T0)
    back = chain_action(ActionKind.PRIMARY_RESTORED, T0 + 5)
    assert report_slot(fallback) == report_slot(back)
    assert report_slot(fallback) != report_slot(chain_action(ActionKind.FALLBACK_ACTIVATED, T0, model="m"))
    q.offer(fallback)
    q.offer(back)
    sent(q, 2)
    assert q.classify(chain_action(ActionKind.FALLBACK_ACTIVATED, T0 + 9)) is Priority.NEW
    assert q.classify(chain_action(ActionKind.PRIMARY_RESTORED, T0 + 9)) is Priority.REPEAT


def test_a_repeat_of_a_queued_new_transition_merges_into_it_and_stays_new():
    q = ReportQueue(capacity=10)
    assert q.offer(cooldown("k1", T0, until=T0 + 600)) == (False, 0)
    assert q.offer(cooldown("k1", T0 + 1, until=T0 + 600)) == (True, 0)
    assert order(q) == [("k1", Priority.NEW, 2)]


# --- ReportQueue: what a full buffer drops ----------------------------------------------------------


def test_a_full_buffer_drops_the_oldest_repeat_before_any_new_transition():
    q = ReportQueue(capacity=3)
    q.offer(cooldown("k1", T0, until=T0 + 600))
    q.offer(cooldown("k2", T0, until=T0 + 600))
    sent(q, 2)
    q.offer(cooldown("k1", T0 + 1, until=T0 + 600))  # repeat
    q.offer(cooldown("k2", T0 + 2, until=T0 + 600))  # repeat
    q.offer(cooldown("k3", T0 + 3, until=T0 + 600))  # new
    assert q.offer(cooldown("k4", T0 + 4, until=T0 + 600)) == (False, 1)
    assert order(q) == [("k3", Priority.NEW, 1), ("k4", Priority.NEW, 1), ("k2", Priority.REPEAT, 1)]
    assert q.dropped == 1


def test_a_full_buffer_drops_the_heartbeat_before_a_new_transition():
    q = ReportQueue(capacity=2)
    q.offer_presence(T0)
    q.offer(cooldown("k1", T0 + 1))
    q.offer(cooldown("k2", T0 + 2))
    assert [w for w, _, _ in order(q)] == ["k1", "k2"] and q.dropped == 1


def test_dropping_a_new_transition_makes_its_next_report_new_again():
    q = ReportQueue(capacity=1)
    q.offer(cooldown("k1", T0, until=T0 + 600))
    q.offer(cooldown("k2", T0 + 1, until=T0 + 600))  # k1 dropped: the operator never heard of it
    assert q.classify(cooldown("k1", T0 + 2, until=T0 + 600)) is Priority.NEW


def test_delivered_counts_down_only_the_drops_the_event_carried():
    q = ReportQueue(capacity=1)
    for i in range(4):
        q.offer(cooldown(f"k{i}", T0 + i))
    assert q.dropped == 3
    carried = q.dropped
    q.offer(cooldown("k9", T0 + 9))  # one more dropped while that Event was on its way
    q.delivered(carried)
    assert q.dropped == 1


# --- ReportQueue: a failed send put back ------------------------------------------------------------


def test_requeue_of_a_new_transition_raises_a_newer_repeat_of_it_to_the_front():
    q = ReportQueue(capacity=10)
    q.offer(cooldown("k1", T0, until=T0 + 600))
    key, item = q.pop()  # being sent...
    q.offer(cooldown("k2", T0 + 1, until=T0 + 600))
    q.offer(cooldown("k1", T0 + 2, until=T0 + 600))  # looks like a repeat while k1 is out
    assert order(q) == [("k2", Priority.NEW, 1), ("k1", Priority.REPEAT, 1)]
    assert q.requeue(key, item)  # ...and the send failed: the operator knows nothing of k1
    assert order(q) == [("k1", Priority.NEW, 2), ("k2", Priority.NEW, 1)]


def test_requeue_into_a_full_buffer_drops_a_repeat_rather_than_the_failed_new_transition():
    q = ReportQueue(capacity=2)
    q.offer(cooldown("k1", T0, until=T0 + 600))
    sent(q)
    q.offer(cooldown("k2", T0 + 1, until=T0 + 600))
    key, item = q.pop()
    q.offer(cooldown("k1", T0 + 2, until=T0 + 600))  # repeat
    q.offer(cooldown("k3", T0 + 3, until=T0 + 600))  # new: full
    assert q.requeue(key, item)
    assert order(q) == [("k2", Priority.NEW, 1), ("k3", Priority.NEW, 1)] and q.dropped == 1


def test_requeue_into_a_buffer_full_of_new_transitions_drops_the_failed_one():
    q = ReportQueue(capacity=2)
    q.offer(cooldown("k1", T0))
    key, item = q.pop()
    q.offer(cooldown("k2", T0 + 1))
    q.offer(cooldown("k3", T0 + 2))
    assert not q.requeue(key, item)
    assert [w for w, _, _ in order(q)] == ["k2", "k3"] and q.dropped == 1
    assert q.classify(cooldown("k1", T0 + 3)) is Priority.NEW


def test_prune_forgets_slots_older_than_the_dedup_window_once_there_are_many():
    q = ReportQueue(capacity=1)
    for i in range(5):
        q.offer(cooldown(f"k{i}", T0, until=T0 + 4 * DEDUP_WINDOW))
    q.offer(cooldown("k9", T0 + DEDUP_WINDOW, until=T0 + 4 * DEDUP_WINDOW))
    q.prune(T0 + DEDUP_WINDOW)
    assert len(q._told) == 1
    assert q.classify(cooldown("k9", T0 + DEDUP_WINDOW + 1, until=T0 + 4 * DEDUP_WINDOW)) is Priority.REPEAT


def test_pop_from_an_empty_queue_raises_and_capacity_must_be_positive():
    q = ReportQueue(capacity=1)
    assert q.head() is None
    with pytest.raises(IndexError):
        q.pop()
    with pytest.raises(ValueError, match="at least one"):
        ReportQueue(capacity=0)


# --- the sender's pace: send_wait on a simulated clock ----------------------------------------------


def drain(
    q: ReportQueue, bucket: TokenBucket, clock: Clock, reserve: float, until: float
) -> list[tuple[float, str]]:
    """What Reporter.run does when every send succeeds at once: (time, what) of each report sent."""
    out: list[tuple[float, str]] = []
    while clock.now <= until:
        wait = send_wait(q, bucket, reserve)
        if wait is None:
            break
        if wait > 0:
            clock.now += wait
            continue
        key, item = q.pop()
        bucket.take()
        what = "presence" if key == PRESENCE_KEY else f"{item.priority.name}:{item.action.credential}"
        out.append((clock.now, what))
    return out


def test_forty_new_cooldowns_leave_at_once_with_the_default_budget():
    clock = Clock(0.0)
    bucket = TokenBucket(REPORT_RATE, REPORT_BURST, clock=clock)
    q = ReportQueue(capacity=1000)
    q.offer_presence(0.0)
    for i in range(40):
        q.offer(cooldown(f"k{i}", T0, until=T0 + 600))
    sent_ = drain(q, bucket, clock, REPEAT_RESERVE, until=20.0)
    assert [t for t, w in sent_ if w.startswith("NEW")] == [0.0] * 40
    # 10 tokens left, below the reserve: the heartbeat waits until the bucket holds 26 again.
    assert sent_[-1] == (16.0, "presence") and len(sent_) == 41


def test_a_storm_of_repeats_leaves_the_reserve_to_new_transitions():
    clock = Clock(0.0)
    bucket = TokenBucket(REPORT_RATE, REPORT_BURST, clock=clock)
    q = ReportQueue(capacity=1000)
    for i in range(100):
        q.offer(cooldown(f"r{i}", T0 - 10, until=T0 + 600))
    sent(q, 100)  # the operator knows these
    for i in range(100):
        q.offer(cooldown(f"r{i}", T0 - 5, until=T0 + 600))  # 100 repeats
    early = drain(q, bucket, clock, REPEAT_RESERVE, until=5.0)
    # Repeats took the burst down to the reserve, then one per second.
    assert len([t for t, _ in early if t == 0.0]) == REPORT_BURST - REPEAT_RESERVE
    assert len(early) == REPORT_BURST - REPEAT_RESERVE + 5
    for i in range(REPEAT_RESERVE):
        q.offer(cooldown(f"k{i}", T0, until=T0 + 600))
    now = clock.now
    burst = drain(q, bucket, clock, REPEAT_RESERVE, until=now)
    assert [w for _, w in burst] == [f"NEW:k{i}" for i in range(REPEAT_RESERVE)]
    assert {t for t, _ in burst} == {now}  # all at once, ahead of the 70 repeats still queued
    assert len(q) == 70


def test_report_writes_never_exceed_the_promised_budget():
    """The README's promise: at most REPORT_BURST writes at once and REPORT_RATE per second after,
    over any window, whatever mix of new transitions, repeats and heartbeats is offered."""
    clock = Clock(0.0)
    bucket = TokenBucket(REPORT_RATE, REPORT_BURST, clock=clock)
    q = ReportQueue(capacity=1000)
    times: list[float] = []
    for step in range(1200):  # 120 s
        now = step / 10
        clock.now = max(clock.now, now)
        for i in range(20):  # 200 actions a second: new keys, repeats, a heartbeat now and then
            q.offer(cooldown(f"k{(step * 20 + i) % 300}", T0 + now, until=T0 + now + 0.5))
        if step % 50 == 0:
            q.offer_presence(T0 + now)
        times += [t for t, _ in drain(q, bucket, clock, REPEAT_RESERVE, until=now + 0.1)]
    assert len(times) >= REPORT_BURST + 100  # the budget was used, not just respected
    for seconds in (0.0, 1.0, 10.0, 60.0, 120.0):
        most = max(bisect.bisect_right(times, t + seconds) - i for i, t in enumerate(times))
        assert most <= REPORT_BURST + REPORT_RATE * seconds, (seconds, most)


def test_a_heartbeat_still_queued_when_the_next_is_due_goes_as_a_new_transition():
    q = ReportQueue(capacity=100)
    q.offer_presence(T0)
    for i in range(3):
        q.offer(cooldown(f"k{i}", T0 + 1, until=T0 + 600))
    assert order(q)[-1] == ("presence", Priority.PRESENCE, 1)
    q.offer_presence(T0 + 300)  # still there five minutes later: new transitions kept it waiting
    assert order(q)[-1] == ("presence", Priority.NEW, 2)
    q.offer(cooldown("k9", T0 + 301, until=T0 + 900))
    assert [w for w, _, _ in order(q)][-2:] == ["presence", "k9"]


def test_a_403_is_final_unless_the_api_server_was_just_unreachable():
    from keyroute.sidecar.reporter import SETTLING, refusal_is_final

    assert refusal_is_final(403, now=1000.0, unreachable_at=None)  # RBAC: dropped, never retried
    assert refusal_is_final(422, now=1000.0, unreachable_at=999.0)  # invalid whatever happened before
    # A restarting API server refuses everything until its RBAC caches are loaded.
    assert not refusal_is_final(403, now=1000.0, unreachable_at=995.0)
    assert not refusal_is_final(401, now=1000.0, unreachable_at=995.0)
    assert refusal_is_final(403, now=1000.0, unreachable_at=1000.0 - SETTLING)
    assert not refusal_is_final(503, now=1000.0, unreachable_at=None)
