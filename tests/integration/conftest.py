"""Fixtures for running real sidecars in front of fake providers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from keyroute.core.actions import Action
from keyroute.core.config import SidecarConfig
from keyroute.sidecar.app import Address, Sidecar
from keyroute.sidecar.sources import ConfigSource, StaticConfig

StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """``await start_sidecar(config_or_source)`` → a started sidecar on a free port, stopped at teardown.

    Every recovery action it emits is collected in ``sidecar.seen``.
    """
    started: list[Sidecar] = []

    async def start(source: SidecarConfig | ConfigSource, **kwargs: Any) -> Sidecar:
        if isinstance(source, SidecarConfig):
            source = StaticConfig(source)
        kwargs.setdefault("listen", Address("127.0.0.1", 0))
        kwargs.setdefault("admin_listen", Address("127.0.0.1", 0))
        kwargs.setdefault("tick_interval", 0.05)
        kwargs.setdefault("reload_interval", 0.05)
        sidecar = Sidecar(source, **kwargs)
        seen: list[Action] = []
        sidecar.listeners.append(seen.append)
        sidecar.seen = seen  # type: ignore[attr-defined]
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for s in started:
        await s.stop()


@pytest.fixture
async def agent() -> AsyncIterator[aiohttp.ClientSession]:
    """The agent's HTTP client (it sends its own dummy key, which must never reach a provider)."""
    async with aiohttp.ClientSession(
        headers={"Authorization": "Bearer sk-agent-placeholder"}, timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        yield session


def chat(model: str = "gpt-4o", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def assert_served_not_broken(sidecar: Sidecar, credential: str = "p1") -> None:
    """The one attempt of chain ``agents`` on ``acme`` (``credential``) counted as served (``OK``),
    not as a broken stream: what an agent that leaves a stream leaves behind."""
    labels = {"chain": "agents", "provider": "acme", "credential": credential}
    registry = sidecar.metrics.registry
    assert registry.get_sample_value("keyroute_upstream_attempts_total", {**labels, "class": "OK"}) == 1
    assert registry.get_sample_value("keyroute_upstream_attempts_total", {**labels, "class": "StreamBroken"}) is None
