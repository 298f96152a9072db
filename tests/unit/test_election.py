"""The leader election's decisions (keyroute.core.election), time as a parameter."""

from __future__ import annotations

import pytest

from keyroute.core.election import (
    Action,
    ElectionError,
    LeaseRecord,
    Observed,
    Timings,
    decide,
    held_spec,
    micro_time,
    observe,
    parse_lease,
    released_spec,
    still_leading,
)

T = Timings()  # 15 s / 10 s / 2 s


def lease(holder: str | None, duration: int = 15, transitions: int = 0, renew: str = "r1") -> dict[str, object]:
    return {
        "metadata": {"name": "keyroute-operator", "resourceVersion": "7"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "acquireTime": "2026-12-06T07:00:00.000000Z",
            "renewTime": renew,
            "leaseTransitions": transitions,
        },
    }


def record(holder: str | None, **kw: object) -> LeaseRecord:
    parsed = parse_lease(lease(holder, **kw))  # type: ignore[arg-type]
    assert parsed is not None
    return parsed


def test_the_defaults_are_controller_runtimes() -> None:
    assert (T.lease_duration, T.renew_deadline, T.retry_period) == (15.0, 10.0, 2.0)


@pytest.mark.parametrize(
    ("lease_duration", "renew_deadline", "retry_period", "message"),
    [
        (10, 10, 2, "must be longer than the renew deadline"),
        (15, 2, 2, "1.2 x the retry period"),
        (15, 10, 0, "must be > 0"),
    ],
)
def test_timings_that_allow_two_leaders_are_refused(
    lease_duration: float, renew_deadline: float, retry_period: float, message: str
) -> None:
    with pytest.raises(ElectionError, match=message):
        Timings(lease_duration, renew_deadline, retry_period)


def test_no_lease_is_created() -> None:
    assert decide(None, "a", now=0).action is Action.CREATE


def test_our_own_lease_is_renewed() -> None:
    assert decide(Observed(record("a"), at=0), "a", now=100).action is Action.RENEW


def test_a_released_lease_is_taken_at_once() -> None:
    assert decide(Observed(record(None), at=5), "b", now=5).action is Action.ACQUIRE
    assert parse_lease(lease(None)) == parse_lease(lease(""))


def test_another_holders_lease_is_waited_for_until_it_expires_on_our_own_clock() -> None:
    seen = observe(None, record("a"), now=100.0)
    assert decide(seen, "b", now=100.0).action is Action.WAIT
    assert decide(seen, "b", now=114.9).action is Action.WAIT
    taken = decide(seen, "b", now=115.0)
    assert taken.action is Action.ACQUIRE and "a stopped renewing" in taken.reason


def test_a_renewal_seen_restarts_the_wait() -> None:
    seen = observe(None, record("a", renew="r1"), now=100.0)
    assert observe(seen, record("a", renew="r1"), now=110.0) is seen  # unchanged: the first sighting counts
    renewed = observe(seen, record("a", renew="r2"), now=110.0)
    assert renewed.at == 110.0
    assert decide(renewed, "b", now=120.0).action is Action.WAIT
    assert decide(renewed, "b", now=125.0).action is Action.ACQUIRE


def test_the_wait_uses_the_holders_lease_duration() -> None:
    seen = observe(None, record("a", duration=60), now=0.0)
    assert decide(seen, "b", now=59.0).action is Action.WAIT
    assert decide(seen, "b", now=60.0).action is Action.ACQUIRE


def test_a_leader_stops_acting_at_the_renew_deadline_before_anyone_may_take_over() -> None:
    assert still_leading(100.0, 109.9, T)
    assert not still_leading(100.0, 110.0, T)
    assert not still_leading(None, 0.0, T)
    # Whoever saw the last renewal no earlier than it started waits the whole lease duration: 5 s of margin.
    seen = observe(None, record("a"), now=100.0)
    assert decide(seen, "b", now=110.0).action is Action.WAIT


def test_held_spec_counts_transitions_and_keeps_the_acquire_time() -> None:
    first = held_spec(None, "a", 0.0, T)
    assert first == {
        "holderIdentity": "a",
        "leaseDurationSeconds": 15,
        "acquireTime": "1970-01-01T00:00:00.000000Z",
        "renewTime": "1970-01-01T00:00:00.000000Z",
        "leaseTransitions": 0,
    }
    renewed = held_spec(record("a", transitions=3), "a", 1.5, T)
    assert renewed["acquireTime"] == "2026-12-06T07:00:00.000000Z" and renewed["leaseTransitions"] == 3
    assert renewed["renewTime"] == "1970-01-01T00:00:01.500000Z"
    taken = held_spec(record("a", transitions=3), "b", 2.0, T)
    assert taken["acquireTime"] == taken["renewTime"] and taken["leaseTransitions"] == 4
    after_release = held_spec(record(None, transitions=4), "b", 2.0, T)
    assert after_release["leaseTransitions"] == 4  # a released Lease taken is not a transition


def test_a_released_lease_has_no_holder() -> None:
    spec = released_spec(record("a", transitions=2), 3.0)
    assert spec["holderIdentity"] is None and spec["leaseTransitions"] == 2 and spec["leaseDurationSeconds"] == 1


def test_odd_lease_bodies_read_as_empty() -> None:
    assert parse_lease(None) is None
    assert parse_lease({"spec": None}) == LeaseRecord()
    assert parse_lease({"spec": {"holderIdentity": 5, "leaseDurationSeconds": "x"}}) == LeaseRecord()
    assert micro_time(1.25) == "1970-01-01T00:00:01.250000Z"
