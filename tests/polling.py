"""Waiting for something to become true, without fixed sleeps (shared by the e2e and realapi tiers)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 5.0,  # noqa: ASYNC109 -- a polling deadline, not a cancellation scope
    interval: float = 0.05,
) -> Any:
    """Call ``predicate`` (sync or async) until it returns something truthy; return that.

    ``AssertionError`` and ``LookupError`` (a key not there yet) count as "not yet". On timeout,
    raise ``AssertionError`` naming the last result, chained to the last such error.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    result: Any = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
        except (AssertionError, LookupError) as e:
            last_error, result = e, None
        else:
            last_error = None
            if result:
                return result
        if time.monotonic() >= deadline:
            name = getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(
                f"not true within {timeout}s: {name} (last result: {result!r})"
            ) from last_error
        await asyncio.sleep(interval)
