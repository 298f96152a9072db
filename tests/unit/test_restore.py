"""How soon traffic returns to a recovered primary: the restore cadence, measured with time as a
parameter (issue 11, item 1).

A primary fails from ``t = 0`` to ``t = outage``; the agent sends a request every ``gap`` seconds,
starting at ``phase``; the fallback always answers. What is measured is the time from the primary's
recovery to the first request it serves again, over many jitter seeds and request phases.
"""

from __future__ import annotations

import random
import statistics

import pytest

from keyroute.core.chains import Chain
from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.routing import Attempt, Route
from tests.builders import two_providers

M = "gpt-4o"
FAILURE = {
    ErrorClass.OVERLOADED: 503,
    ErrorClass.SERVER_ERROR: 500,
    ErrorClass.TIMEOUT: None,
    ErrorClass.MODEL_NOT_FOUND: 404,
}


def time_to_restore(
    *, outage: float, gap: float, phase: float, seed: int, cls: ErrorClass, **fallback: float
) -> float:
    """Seconds from the primary's recovery to the first request it serves."""
    chain = Chain(two_providers(fallback=fallback), rng=random.Random(seed))
    t = phase
    while True:
        route = Route(chain, M, t)
        while True:
            step = route.next(t)
            assert isinstance(step, Attempt), step  # the fallback always has a key
            if step.entry.name == "acme" and t < outage:
                route.report(step, Classification(cls, status=FAILURE[cls]), t)
                continue
            route.report(step, None, t)
            break
        if step.entry.name == "acme" and t >= outage:
            return t - outage
        # Requests served by the fallback while the primary waits change nothing for the primary:
        # jump to the first request at or after its restore time (keeps a 24 h outage cheap).
        due = chain.models[M].restores["acme"].restore_at
        t = max(t + gap, phase + gap * -(-(due - phase) // gap))


def measure(
    outage: float, gap: float, cls: ErrorClass, seeds: int = 40, phases: int = 8, **fallback: float
) -> list[float]:
    starts = [gap * i / phases for i in range(phases)]
    return [
        time_to_restore(outage=outage, gap=gap, phase=p, seed=s, cls=cls, **fallback)
        for s in range(seeds)
        for p in starts
    ]


@pytest.mark.parametrize("cls", [ErrorClass.OVERLOADED, ErrorClass.SERVER_ERROR, ErrorClass.TIMEOUT])
def test_restore_after_10s_a_60s_outage_under_a_request_every_4s_returns_within_15s(cls):
    times = measure(60, 4, cls, restoreAfter=10)
    assert max(times) <= 15, (max(times), statistics.median(times))
    # The same with the recovery anywhere in the probe cycle (outages of 60 to 72 s), not only where a
    # 60 s outage puts it against a 4 s request grid.
    shifted = [t for i in range(1, 24) for t in measure(60 + i / 2, 4, cls, seeds=4, restoreAfter=10)]
    assert max(shifted) <= 15, (max(shifted), statistics.median(shifted))


@pytest.mark.parametrize("outage", [60, 600, 3600, 24 * 3600])
@pytest.mark.parametrize("cls", [ErrorClass.SERVER_ERROR, ErrorClass.TIMEOUT])
def test_defaults_return_within_2_minutes_after_an_outage_of_any_length(outage, cls):
    # Fewer samples for the long outages: each is ~1,000 probes, and the waits are at the cap by then.
    times = measure(outage, 5, cls, seeds=10 if outage <= 3600 else 3, phases=8 if outage <= 3600 else 4)
    assert max(times) <= 120, (max(times), statistics.median(times))


def test_a_long_outage_is_probed_less_often_than_a_short_one():
    """The reason for growing waits: fewer agent requests pay for a failing probe as an outage drags on."""
    chain = Chain(two_providers(fallback={"restoreAfter": 10}), rng=random.Random(0))
    t, probes = 0.0, []
    while t < 3600:
        route = Route(chain, M, t)
        a = route.next(t)
        assert isinstance(a, Attempt)
        if a.entry.name == "acme":
            probes.append(t)
            route.report(a, Classification(ErrorClass.MODEL_NOT_FOUND, status=404), t)
        route.abandon()
        t += 1
    first_minute = sum(1 for p in probes if p < 60)
    last_ten_minutes = sum(1 for p in probes if p >= 3000)
    assert first_minute >= 5 and last_ten_minutes <= 8


def test_restore_max_bounds_the_time_on_the_fallback():
    times = measure(2 * 3600, 1, ErrorClass.SERVER_ERROR, seeds=3, phases=2, restoreAfter=5, restoreMax=20)
    assert max(times) <= 20 * 1.1 + 1


def test_the_demo_returns_to_the_primary_before_it_ends():
    """``keyroute demo`` (issue 11, item 6): at its default length and rate, the primary's outage ends
    with a quarter of the run left; the return must fit in it, with room to spare."""
    from keyroute import demo

    outage = (demo.OUTAGE_ENDS - demo.OUTAGE_STARTS) * demo.DEFAULT_DURATION
    left = (1 - demo.OUTAGE_ENDS) * demo.DEFAULT_DURATION
    times = measure(outage, 1 / 8, ErrorClass.SERVER_ERROR, seeds=10, restoreAfter=demo.RESTORE_AFTER)
    assert max(times) <= left / 2, (max(times), left)
