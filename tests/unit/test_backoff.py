"""A failing reconcile's retry delays (keyroute.core.backoff): doubling per object, capped, reset."""

from __future__ import annotations

import pytest

from keyroute.core.backoff import Backoff


def test_the_delay_doubles_per_consecutive_failure_up_to_the_cap() -> None:
    b: Backoff[str] = Backoff(5.0, 300.0)
    assert [b.failed("a") for _ in range(9)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert b.failures("a") == 9


def test_each_object_has_its_own_streak() -> None:
    b: Backoff[str] = Backoff(1.0, 60.0)
    b.failed("a")
    b.failed("a")
    assert (b.failed("b"), b.failed("a")) == (1.0, 4.0)


def test_a_success_starts_the_streak_over_and_clear_forgets_every_object() -> None:
    b: Backoff[str] = Backoff(5.0, 300.0)
    for _ in range(4):
        b.failed("a")
    b.failed("b")
    b.succeeded("a")
    b.succeeded("never-failed")
    assert (b.failures("a"), b.failed("a")) == (0, 5.0)
    b.clear()
    assert (b.failures("a"), b.failures("b"), b.failed("b")) == (0, 0, 5.0)


def test_a_streak_of_any_length_stays_at_the_cap() -> None:
    """The exponent stops growing: a failure a year in still costs one multiplication, not a huge int."""
    b: Backoff[str] = Backoff(0.5, 300.0)
    for _ in range(10_000):
        delay = b.failed("a")
    assert delay == 300.0


@pytest.mark.parametrize(
    ("first", "cap", "message"),
    [
        (0.0, 300.0, "first retry delay must be > 0"),
        (-1.0, 300.0, "first retry delay must be > 0"),
        (10.0, 5.0, "must be at least the first"),
    ],
)
def test_nonsense_delays_are_refused(first: float, cap: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(first, cap)
