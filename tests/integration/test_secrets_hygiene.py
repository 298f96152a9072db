"""Secrets hygiene (docs/README.md): key values live only in Secrets and the sidecar's memory. Run the recovery scenarios with
recognisable keys and look for them everywhere else: logs, metrics, response headers, error bodies."""

from __future__ import annotations

import logging

from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.logs import REDACTOR, JsonFormatter
from tests.builders import config, cred, entry, pool
from tests.integration.conftest import chat

KEYS = {
    "p1": "sk-test-KEYROUTE-SECRET-PRIMARY-0001",
    "p2": "sk-test-KEYROUTE-SECRET-PRIMARY-0002",
    "b1": "sk-test-KEYROUTE-SECRET-BACKUP-0001",
}
MARKER = "KEYROUTE-SECRET"


async def test_keys_never_leave_the_sidecar(fake_provider, start_sidecar, agent, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(REDACTOR)
    primary: FakeProvider = await fake_provider("acme", keys=[KEYS["p1"], KEYS["p2"]])
    backup: FakeProvider = await fake_provider("backup", keys=[KEYS["b1"]])
    # Providers that echo the key back in their error message, as real ones do.
    echo = {"error": {"message": f"Incorrect API key provided: {KEYS['p1']}", "code": "invalid_api_key"}}
    primary.set(Behaviour.status(401, body=echo), key=KEYS["p1"])
    primary.set(Behaviour.rate_limited(), key=KEYS["p2"])
    cfg = config(
        [
            entry("acme", "acme", primary.base_url, "acme-keys"),
            entry("backup", "backup", backup.base_url, "backup-keys"),
        ],
        [
            pool("acme-keys", "acme", cred("p1", KEYS["p1"]), cred("p2", KEYS["p2"], priority=1)),
            pool("backup-keys", "backup", cred("b1", KEYS["b1"])),
        ],
    )
    sidecar = await start_sidecar(cfg)
    seen: list[str] = []
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        seen += [f"{k}: {v}" for k, v in resp.headers.items()] + [(await resp.read()).decode()]
        assert resp.headers["X-Keyroute-Provider"] == "backup"
    # Now everything fails: the agent gets the exhaustion body; a stream breaks after its first byte.
    backup.set(Behaviour.status(401, body={"error": {"message": f"bad key {KEYS['b1']}"}}))
    async with agent.post(sidecar.base_url + "/chat/completions", json=chat()) as resp:
        seen += [f"{k}: {v}" for k, v in resp.headers.items()] + [(await resp.read()).decode()]
        assert resp.status == 503
    async with agent.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
        seen.append((await resp.read()).decode())
    formatter = JsonFormatter()
    seen += [formatter.format(r) for r in caplog.records]
    seen += [repr(a) for a in sidecar.seen] + [str(a.fields()) for a in sidecar.seen]
    seen += [repr(sidecar.chain.pools[p].credentials) for p in sidecar.chain.pools]
    seen.append(repr(sidecar.config))
    text = "\n".join(seen)
    assert "keyroute_upstream_attempts_total" in text and "credential cooling down" in text  # we did look
    for value in KEYS.values():
        assert value not in text
    assert MARKER not in text


def test_redactor_masks_known_keys_in_any_log_line():
    REDACTOR.set_keys(KEYS.values())
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed with %s", (KEYS["p1"],), None)
    record.kr = {"detail": f"key={KEYS['b1']}"}
    assert REDACTOR.filter(record)
    out = JsonFormatter().format(record)
    assert MARKER not in out and "[redacted]" in out
