"""An agent that invents model names, through real HTTP: what the sidecar keeps per model, and what its
/metrics shows, stays bounded (docs/errors.md, "Scope"). The cap is lowered here to keep the tests short;
the unit tests run the real one."""

from __future__ import annotations

import re

import pytest

from keyroute.core import chains
from keyroute.core.actions import ActionKind
from keyroute.fakeprovider import Behaviour
from tests.integration.test_recovery_http import ask, setup

CAP = 5


@pytest.fixture(autouse=True)
def small_cap(monkeypatch):
    monkeypatch.setattr(chains, "MAX_MODEL_STATES", CAP)


async def fallback_series(agent, sidecar) -> dict[str, str]:
    async with agent.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
        text = await resp.text()
    return dict(re.findall(r'keyroute_fallback_active\{chain="[^"]*",model="([^"]*)"\} (\S+)', text))


async def refusals(agent, sidecar) -> str | None:
    async with agent.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
        text = await resp.text()
    m = re.search(r"keyroute_model_state_refusals_total\{[^}]*\} (\S+)", text)
    return m.group(1) if m else None


async def test_names_every_provider_refuses_keep_at_most_the_cap(fake_provider, start_sidecar, agent):
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.model_not_found())
    backup.set(Behaviour.model_not_found())
    names = [f"made-up-{i}" for i in range(3 * CAP)]
    for name in names:
        status, _, _ = await ask(agent, sidecar, model=name)
        assert status == 503  # the chain exhausted (docs/errors.md)
        # Scraped after each request, as Prometheus would over time: the name's series appears...
        assert name in await fallback_series(agent, sidecar)
    # Each name was asked of both providers once: no state made either of them skip a new name.
    assert len(primary.received) == len(backup.received) == len(names)
    assert list(sidecar.chain.models) == names[-CAP:]
    # ...and goes with its state: a series only for the states kept, none of them on a fallback.
    assert await fallback_series(agent, sidecar) == dict.fromkeys(names[-CAP:], "0.0")
    assert await refusals(agent, sidecar) is None
    assert not [a for a in sidecar.seen if a.kind is ActionKind.FALLBACK_ACTIVATED]


async def test_models_on_a_fallback_are_kept_and_the_rest_counted(fake_provider, start_sidecar, agent):
    # The primary knows none of these names, the fallback serves any: each one falls back, which is
    # reported, so its state is never given up for room.
    primary, backup, sidecar = await setup(fake_provider, start_sidecar)
    primary.set(Behaviour.model_not_found())
    kept = [f"fell-back-{i}" for i in range(CAP)]
    for name in kept:
        status, headers, _ = await ask(agent, sidecar, model=name)
        assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    reported = [a.model for a in sidecar.seen if a.kind is ActionKind.FALLBACK_ACTIVATED]
    assert reported == kept
    # One more name: still served by the fallback, but with no room left it is neither remembered nor
    # reported, and the metric says what was left out (the primary's refusal and the fallback).
    status, headers, _ = await ask(agent, sidecar, model="one-too-many")
    assert status == 200 and headers["X-Keyroute-Provider"] == "backup"
    assert [a.model for a in sidecar.seen if a.kind is ActionKind.FALLBACK_ACTIVATED] == kept
    assert list(sidecar.chain.models) == kept
    assert await fallback_series(agent, sidecar) == dict.fromkeys(kept, "1.0")
    assert await refusals(agent, sidecar) == "2.0"
    # Its next request starts at the primary again; a kept model's starts at the fallback.
    before = len(primary.received)
    await ask(agent, sidecar, model="one-too-many")
    await ask(agent, sidecar, model=kept[0])
    assert len(primary.received) == before + 1
