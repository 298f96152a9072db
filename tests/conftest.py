"""Shared pytest fixtures.

Tests run against real HTTP servers on 127.0.0.1 that misbehave on purpose
(:mod:`keyroute.fakeprovider`), never against mocks of our own code paths. Fixtures here only start
and stop those servers; scripting what they answer is the test's business::

    async def test_failover(fake_provider: MakeFakeProvider) -> None:
        primary = await fake_provider("primary", keys=["k1"], default=Behaviour.rate_limited())
        backup = await fake_provider("backup")
        ...

Every provider a test starts is stopped at teardown, even with requests still hanging on it.
Add further shared fixtures below, each with a line saying what it provides.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from keyroute.fakeprovider import FakeProvider
from keyroute.logs import REDACTOR

MakeFakeProvider = Callable[..., Awaitable[FakeProvider]]
"""``await make(name="fake", **FakeProvider kwargs)``: a started :class:`FakeProvider`."""


@pytest.fixture
async def fake_provider() -> AsyncIterator[MakeFakeProvider]:
    """Factory of started fake providers; all of them are stopped at teardown."""
    started: list[FakeProvider] = []

    async def make(name: str = "fake", **kwargs: Any) -> FakeProvider:
        provider = FakeProvider(name, **kwargs)
        await provider.start()
        started.append(provider)
        return provider

    yield make
    for provider in reversed(started):
        await provider.stop()


@pytest.fixture(autouse=True)
def _process_logging_undone() -> Iterator[None]:
    """Undo what a test's in-process ``keyroute`` run (``cli.main``, a sidecar loading keys) did to
    the process-wide logging: its root handler writes to a stream pytest has closed since, and the
    redactor, a filter on that handler, turns a record's ``exc_info`` into text before ``caplog``
    sees it. Left in place, both leaked into every later test (``--- Logging error ---`` noise, and
    a traceback assertion that held alone and failed in the full suite)."""
    root = logging.getLogger()
    level, keys = root.level, REDACTOR._keys
    yield
    for handler in [h for h in root.handlers if REDACTOR in h.filters]:
        root.removeHandler(handler)
    root.setLevel(level)
    REDACTOR.set_keys(keys)
