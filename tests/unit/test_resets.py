"""Reset-time parsing (docs/errors.md): every header dialect, body fields, and garbage that must not raise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from keyroute.core.resets import MAX_AHEAD, reset_from_body, reset_from_headers

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class _CaseKeepingHeaders(Mapping[str, str]):
    """A non-dict Mapping with provider-style capitalisation, standing in for aiohttp's proxy."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # Retry-After: integer, float, zero (retry now) and HTTP-date.
        ({"Retry-After": "30"}, NOW + 30),
        ({"retry-after": "1.5"}, NOW + 1.5),
        ({"RETRY-AFTER": "0"}, NOW),
        ({"Retry-After": "Fri, 15 Jan 2027 08:02:00 GMT"}, NOW + 120),
        ({"Retry-After": "Fri, 15 Jan 2027 08:02:00 -0000"}, NOW + 120),
        # OpenAI's millisecond variant.
        ({"retry-after-ms": "250"}, NOW + 0.25),
        # OpenAI / Groq Go-style durations.
        ({"x-ratelimit-reset-requests": "6m0s"}, NOW + 360),
        ({"x-ratelimit-reset-tokens": "1.5s"}, NOW + 1.5),
        ({"x-ratelimit-reset-tokens": "20ms"}, NOW + 0.02),
        ({"X-RateLimit-Reset-Requests": "2m59.56s"}, NOW + 179.56),
        ({"x-ratelimit-reset-requests": "1h30m"}, NOW + 5400),
        # Anthropic RFC 3339 timestamps (Z, offset, fractional seconds).
        ({"anthropic-ratelimit-requests-reset": "2027-01-15T08:00:45Z"}, NOW + 45),
        ({"anthropic-ratelimit-tokens-reset": "2027-01-15T09:00:45+01:00"}, NOW + 45),
        ({"anthropic-ratelimit-input-tokens-reset": "2027-01-15T08:00:10.500Z"}, NOW + 10.5),
        ({"Anthropic-RateLimit-Output-Tokens-Reset": "2027-01-15T08:01:00Z"}, NOW + 60),
        ({"anthropic-ratelimit-unified-reset": str(int(NOW) + 3600)}, NOW + 3600),
        # x-ratelimit-reset: delta seconds, epoch seconds, epoch milliseconds, duration text.
        ({"x-ratelimit-reset": "42"}, NOW + 42),
        ({"x-ratelimit-reset": str(int(NOW) + 600)}, NOW + 600),
        ({"X-RateLimit-Reset": str(int(NOW * 1000) + 90_000)}, NOW + 90),
        ({"x-ratelimit-reset": "30s"}, NOW + 30),
    ],
)
def test_each_header_dialect(headers: dict[str, str], expected: float) -> None:
    assert reset_from_headers(headers, NOW) == pytest.approx(expected)


def test_latest_of_several_wins() -> None:
    # The request limit resets in 1s, but the exhausted token limit only in 6 minutes.
    headers = {
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "6m0s",
        "retry-after": "2",
    }
    assert reset_from_headers(headers, NOW) == pytest.approx(NOW + 360)


def test_anthropic_latest_of_the_four() -> None:
    headers = {
        "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:05Z",
        "anthropic-ratelimit-tokens-reset": "2027-01-15T08:00:40Z",
        "anthropic-ratelimit-input-tokens-reset": "2027-01-15T08:00:30Z",
        "anthropic-ratelimit-output-tokens-reset": "2027-01-15T08:00:20Z",
        "retry-after": "5",
    }
    assert reset_from_headers(headers, NOW) == pytest.approx(NOW + 40)


def test_per_window_anthropic_resets_are_not_read() -> None:
    # A 5-hour window was hit; the 7-day window's reset must not bench the key for days.
    headers = {"anthropic-ratelimit-unified-7d-reset": str(int(NOW) + 5 * 86400)}
    assert reset_from_headers(headers, NOW) is None


def test_case_insensitive_for_any_mapping() -> None:
    headers = _CaseKeepingHeaders({"Retry-After": "7", "Content-Type": "application/json"})
    assert reset_from_headers(headers, NOW) == pytest.approx(NOW + 7)


def test_garbage_ignored_valid_sibling_kept() -> None:
    headers = {"retry-after": "soon", "x-ratelimit-reset-tokens": "12s"}
    assert reset_from_headers(headers, NOW) == pytest.approx(NOW + 12)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"content-type": "application/json"},
        {"retry-after": ""},
        {"retry-after": "soon"},
        {"retry-after": "-5"},
        {"retry-after": "nan"},
        {"retry-after": "inf"},
        {"retry-after": "1e400"},
        {"retry-after": "Wed, 21 Oct 99999 07:28:00 GMT"},
        {"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"},  # in the past
        {"retry-after": str(MAX_AHEAD + 1)},  # absurd
        {"retry-after-ms": "-1"},
        {"x-ratelimit-reset-requests": "6 minutes"},
        {"x-ratelimit-reset-tokens": "-1s"},
        {"x-ratelimit-reset-tokens": "9" * 400 + "s"},
        {"anthropic-ratelimit-requests-reset": "yesterday"},
        {"anthropic-ratelimit-requests-reset": "2020-01-01T00:00:00Z"},  # in the past
        {"anthropic-ratelimit-requests-reset": "0001-01-01T00:00:00+01:00"},
        {"anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59Z"},
        {"x-ratelimit-reset": "-3"},
        {"x-ratelimit-reset": "5000000"},  # neither a sane delta nor a plausible epoch
        {"x-ratelimit-reset": str(int(NOW) - 60)},  # epoch in the past
        {"x-ratelimit-reset": "\x00\xff"},
        {"retry-after": "1" * 10_000},
    ],
)
def test_garbage_headers_give_none(headers: dict[str, str]) -> None:
    assert reset_from_headers(headers, NOW) is None


def test_non_string_values_tolerated() -> None:
    weird: dict[Any, Any] = {
        "retry-after": 30,
        "x-ratelimit-reset": None,
        5: "x",
        "x-ratelimit-reset-tokens": True,
    }
    assert reset_from_headers(weird, NOW) == pytest.approx(NOW + 30)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Top level.
        ({"resets_at": int(NOW) + 3600}, NOW + 3600),
        ({"resets_at": int(NOW * 1000) + 5000}, NOW + 5),
        ({"resets_at": "2027-01-15T08:00:45Z"}, NOW + 45),
        ({"resets_at": str(int(NOW) + 100)}, NOW + 100),
        ({"resets_in_seconds": 1800}, NOW + 1800),
        ({"resets_in_seconds": "60"}, NOW + 60),
        ({"retry_after": 12}, NOW + 12),
        ({"retry_after": 2.5}, NOW + 2.5),
        ({"retry_after": "30s"}, NOW + 30),
        # Under error (Codex-style usage limit).
        (
            {
                "error": {
                    "type": "usage_limit_reached",
                    "message": "The usage limit has been reached",
                    "plan_type": "plus",
                    "resets_at": int(NOW) + 7200,
                    "resets_in_seconds": 7200,
                }
            },
            NOW + 7200,
        ),
        ({"error": {"retry_after": 9}}, NOW + 9),
        # Under error.metadata and error.details (dict and Google's list with RetryInfo).
        ({"error": {"metadata": {"retry_after": 20}}}, NOW + 20),
        ({"error": {"details": {"resets_in_seconds": 15}}}, NOW + 15),
        (
            {
                "error": {
                    "code": 429,
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [
                        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "38s"},
                    ],
                }
            },
            NOW + 38,
        ),
        # OpenRouter repeats the upstream's headers under metadata.
        (
            {
                "error": {
                    "message": "Rate limit exceeded: free-models-per-day.",
                    "code": 429,
                    "metadata": {
                        "headers": {
                            "X-RateLimit-Limit": "50",
                            "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": str(int(NOW * 1000) + 3_600_000),
                        }
                    },
                }
            },
            NOW + 3600,
        ),
        # Latest of several.
        ({"retry_after": 5, "error": {"resets_in_seconds": 50}}, NOW + 50),
        # A list-wrapped body (some Google endpoints).
        ([{"error": {"retry_after": 3}}], NOW + 3),
    ],
)
def test_body_fields(body: Any, expected: float) -> None:
    assert reset_from_body(body, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "body",
    [
        None,
        "retry later",
        42,
        [],
        [1, 2],
        {},
        {"error": "rate limited"},
        {"error": None},
        {"error": {"metadata": "raw"}},
        {"error": {"details": "nope"}},
        {"error": {"details": [None, 3, "x"]}},
        {"retry_after": -5},
        {"retry_after": True},
        {"retry_after": None},
        {"retry_after": [1]},
        {"retry_after": "soon"},
        {"resets_in_seconds": 10 * 86400},  # absurd
        {"resets_at": int(NOW) - 10},  # in the past
        {"resets_at": "not a date"},
        {"resets_at": {"s": 1}},
        {"resets_at": 10**400},
        {"resets_in_seconds": float("nan")},
        {"resets_in_seconds": float("inf")},
    ],
)
def test_body_garbage_gives_none(body: Any) -> None:
    assert reset_from_body(body, NOW) is None
