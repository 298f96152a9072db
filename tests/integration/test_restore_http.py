"""The return to a recovered primary through real HTTP (issue 11, item 1), on a compressed clock.

The issue's case is ``restoreAfter: 10s``, a primary answering 503 for 60 s, a request every 4 s:
traffic must be back within 15 s of the recovery. Here the same shape runs eight times faster
(``restoreAfter`` 0.5 s, 503s for 4 s, a request every 0.1 s); the pure-core measurement at full
scale is ``tests/unit/test_restore.py``. A doubling wait would have probed at about 0.5, 1.5 and
3.5 s, then not before 7.5 s: 3.5 s after the recovery.
"""

from __future__ import annotations

import asyncio
import time

from keyroute.core.actions import ActionKind
from keyroute.fakeprovider import Behaviour, FakeProvider
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat

OUTAGE = 4.0
RESTORE_AFTER = 0.5
GAP = 0.1


def key(name: str) -> str:
    return f"sk-test-{name}-0123456789abcdef"


async def test_traffic_returns_soon_after_a_long_outage(fake_provider, start_sidecar, agent):
    primary: FakeProvider = await fake_provider("acme", keys=[key("p1"), key("p2")])
    backup: FakeProvider = await fake_provider("backup", keys=[key("b1")])
    sidecar = await start_sidecar(
        config(
            [
                entry("acme", "acme", primary.base_url, "acme-keys"),
                entry("backup", "backup", backup.base_url, "backup-keys"),
            ],
            [
                pool("acme-keys", "acme", cred("p1", key("p1")), cred("p2", key("p2"), priority=1)),
                pool("backup-keys", "backup", cred("b1", key("b1"))),
            ],
            fallback={"restoreAfter": RESTORE_AFTER},
            requestTimeout=10,
        )
    )
    primary.set(Behaviour.status(503, body={"error": {"message": "Service Unavailable"}}))
    start = time.monotonic()
    recovered_at: float | None = None
    served_again: float | None = None
    probes_during_outage = 0
    while time.monotonic() - start < OUTAGE + 5:
        if recovered_at is None and time.monotonic() - start >= OUTAGE:
            probes_during_outage = len(primary.received)
            primary.reset_rules()
            recovered_at = time.monotonic()
        async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
            assert resp.status == 200
            provider = resp.headers["X-Keyroute-Provider"]
            await resp.read()
        if recovered_at is not None and provider == "acme":
            served_again = time.monotonic()
            break
        await asyncio.sleep(GAP)
    assert served_again is not None and recovered_at is not None
    # restoreAfter (+10 % jitter) + one request gap, with room for a loaded machine.
    assert served_again - recovered_at <= 1.5, served_again - recovered_at
    # The primary was probed all along (each probe: one attempt plus one on the other key), not
    # hammered: about one probe per restoreAfter.
    assert 2 * 4 <= probes_during_outage <= 2 * (OUTAGE / (RESTORE_AFTER * 0.9) + 2)
    assert any(a.kind is ActionKind.PRIMARY_RESTORED for a in sidecar.seen)
