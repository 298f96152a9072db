"""Durations (Go-style, as in CRDs and ``x-ratelimit-reset-*`` headers): parsing, formatting, bad input."""

from __future__ import annotations

import math
import re

import pytest

from keyroute.core.durations import DURATION_PATTERN, DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60s", 60.0),
        ("1h", 3600.0),
        ("5m", 300.0),
        ("6m0s", 360.0),
        ("1h30m", 5400.0),
        ("2m59.56s", 179.56),
        ("1.5s", 1.5),
        ("20ms", 0.02),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("100ns", 1e-7),
        ("1d", 86400.0),
        ("1h0m0s", 3600.0),
        ("0s", 0.0),
        (" 30s ", 30.0),
        # Plain numbers are seconds, as headers send them.
        ("30", 30.0),
        ("1.25", 1.25),
        ("0", 0.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "s",
        "5x",
        "1h 30m",
        "-5s",
        "-1",
        "5 s",
        "s5",
        "1.5.5s",
        "1hh",
        "five seconds",
        "nan",
        "5S",
        "1H",
        -3,
        -0.5,
        True,
    ],
)
def test_bad_duration_raises(text: str | float) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_duration_error_is_a_value_error_and_names_the_input() -> None:
    with pytest.raises(ValueError, match="5x"):
        parse_duration("5x")


@pytest.mark.parametrize("text", ["inf", "infinity", float("inf"), float("nan")])
def test_non_finite_numbers_are_not_durations(text: str | float) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "500ms"),
        (0.02, "20ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59, "59s"),
        (60, "1m"),
        (90, "1m30s"),
        (360, "6m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (3661, "1h1m1s"),
        (86400, "24h"),
        (61.25, "1m1.25s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "seconds", [0.001, 0.25, 1, 1.5, 59.5, 60, 61, 90.75, 3599, 3600, 3600.5, 86399, 90061]
)
def test_format_then_parse_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-3)


def test_format_duration_never_uses_exponent_notation() -> None:
    text = format_duration(60.00005)
    assert "e" not in text
    assert parse_duration(text) == pytest.approx(60.0, abs=1e-3)


@pytest.mark.parametrize("text", ["60s", "1h30m", "6m0s", "1.5s", "20ms", "500µs"])
def test_duration_pattern_accepts_what_parse_accepts(text: str) -> None:
    assert re.match(DURATION_PATTERN, text)
    assert math.isfinite(parse_duration(text))


@pytest.mark.parametrize("text", ["30", "-5s", "5x", "1h 30m", ""])
def test_duration_pattern_rejects_what_a_crd_must_not_hold(text: str) -> None:
    # Plain numbers parse (headers send them) but a CRD duration must carry its unit.
    assert not re.match(DURATION_PATTERN, text)
