"""How long a failing reconcile waits before its next try.

Per object, the wait doubles from a first delay up to a cap and falls back to the first delay once
the object reconciles: client-go's per-item exponential failure rate limiter (its work queue's
default), without the global token bucket it pairs it with, since the operator already bounds its
reconciles in flight. A flat delay retried an object that fails for good (an immutable Secret in
the config's way, RBAC taken away) every 5 s forever, a log line with a traceback each time; the
doubling keeps a transient failure's first retry quick and a lasting one's cost small.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# 2**64 times any first delay is past every cap: the exponent stops there instead of growing an int.
_MAX_DOUBLINGS = 64


class Backoff(Generic[K]):
    """Consecutive failures per key, and the delay each one earns: ``first * 2**(n-1)``, at most ``cap``."""

    def __init__(self, first: float, cap: float):
        if first <= 0:
            raise ValueError(f"the first retry delay must be > 0, not {first:g}")
        if cap < first:
            raise ValueError(f"the longest retry delay ({cap:g}) must be at least the first ({first:g})")
        self.first = first
        self.cap = cap
        self._failures: dict[K, int] = {}

    def failed(self, key: K) -> float:
        """Count one more failure of ``key``; return how long to wait before trying it again."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return min(self.first * 2.0 ** min(n, _MAX_DOUBLINGS), self.cap)

    def succeeded(self, key: K) -> None:
        """``key`` reconciled (or is gone): its next failure waits the first delay again."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        """Consecutive failures of ``key`` since it last succeeded."""
        return self._failures.get(key, 0)

    def clear(self) -> None:
        """Forget every key (leadership lost: the next leader starts afresh)."""
        self._failures.clear()
