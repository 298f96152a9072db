"""``keyroute demo``: the sidecar in local mode in front of two fake providers that misbehave on cue.

No cluster and no real keys: the demo writes the same ProviderChain, CredentialPool and Secret
manifests a user would ``kubectl apply`` (pointing at the fakes on 127.0.0.1), starts the sidecar on
them, sends a steady stream of chat requests, and prints which provider and key served each one and
every recovery action as it happens. The script, on the primary ``acme`` (keys ``acme-1``, ``acme-2``):

1. ``acme-1`` is rate limited (429, ``Retry-After``): the pool moves to ``acme-2``, then back;
2. ``acme-1`` runs out of credit (402): it is benched for the billing period;
3. the whole provider fails (500): traffic falls back to ``backup``; an agent request probes the
   primary every ``restoreAfter`` (2 s) and fails over again;
4. the provider recovers: the next probe succeeds and traffic returns to the primary, by itself,
   within about ``restoreAfter`` of the recovery (the restore wait grows only with the outage's
   length: see :mod:`keyroute.core.chains`).

The run ends with a summary that says whether rotation, fallback and the return to the primary were
all shown; the exit status is non-zero if one was not, or if an agent request went unanswered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import aiohttp

from keyroute.core.actions import Action, ActionKind
from keyroute.fakeprovider import Behaviour, FakeProvider
from keyroute.sidecar.app import Address, Sidecar
from keyroute.sidecar.sources import ManifestSource

# Obviously fake keys: the demo shows that only names and fingerprints ever reach the terminal.
DEMO_KEYS = {"acme-1": "demo-acme-key-ONE-not-a-real-key", "acme-2": "demo-acme-key-TWO-not-a-real-key"}
BACKUP_KEY = "demo-backup-key-not-a-real-key"
#: The chain's restoreAfter: how often, at most, an agent request probes the failed primary.
RESTORE_AFTER = 2.0
#: When (fractions of the run) the primary fails for every key, and when it recovers: the recovery
#: leaves a quarter of the run for the return to the primary to show.
OUTAGE_STARTS, OUTAGE_ENDS = 0.48, 0.75
#: The default length of a run (``keyroute demo --duration``).
DEFAULT_DURATION = 24.0


def demo_manifests(primary_url: str, backup_url: str) -> str:
    """The manifests the demo runs on (a user could apply the same shape to a cluster)."""
    return f"""\
apiVersion: v1
kind: Secret
metadata: {{name: demo-keys, namespace: demo}}
stringData:
  acme-1: {DEMO_KEYS["acme-1"]}
  acme-2: {DEMO_KEYS["acme-2"]}
  backup: {BACKUP_KEY}
---
apiVersion: keyroute.dev/v1alpha1
kind: CredentialPool
metadata: {{name: acme-keys, namespace: demo}}
spec:
  provider: acme
  strategy: FillFirst
  cooldowns: {{rateLimited: 2s, billing: 1h}}
  credentials:
    - {{name: acme-1, secretRef: {{name: demo-keys, key: acme-1}}}}
    - {{name: acme-2, secretRef: {{name: demo-keys, key: acme-2}}}}
---
apiVersion: keyroute.dev/v1alpha1
kind: CredentialPool
metadata: {{name: backup-keys, namespace: demo}}
spec:
  provider: backup
  credentials:
    - {{name: backup-1, secretRef: {{name: demo-keys, key: backup}}}}
---
apiVersion: keyroute.dev/v1alpha1
kind: ProviderChain
metadata: {{name: demo-chain, namespace: demo}}
spec:
  providers:
    - {{provider: acme, baseURL: "{primary_url}", credentialPoolRef: {{name: acme-keys}}}}
    - provider: backup
      baseURL: "{backup_url}"
      credentialPoolRef: {{name: backup-keys}}
      models: {{"*": backup-large}}
  fallback: {{restoreAfter: {RESTORE_AFTER:g}s, maxWait: 1s}}
  timeouts: {{firstByte: 5s, request: 20s}}
"""


class _Narrator:
    def __init__(self, out: TextIO, start: float):
        self.out = out
        self.start = start
        self.served: Counter[tuple[str, str]] = Counter()
        self.failed = 0
        self.actions: Counter[str] = Counter()
        self.color = out.isatty()

    def _t(self) -> str:
        return f"{time.monotonic() - self.start:5.1f}s"

    def _c(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def phase(self, text: str) -> None:
        print(self._c(f"{self._t()}  ── {text}", "1"), file=self.out, flush=True)

    def request(self, n: int, status: int, provider: str, credential: str, ms: float) -> None:
        if status == 200:
            self.served[(provider, credential)] += 1
        else:
            self.failed += 1
        tone = "32" if provider == "acme" and status == 200 else "33" if status == 200 else "31"
        print(
            f"{self._t()}  #{n:<4} {self._c(str(status), tone)}  {provider:<7} {credential:<9} {ms:6.1f} ms",
            file=self.out,
            flush=True,
        )

    def action(self, a: Action) -> None:
        self.actions[str(a.kind)] += 1
        what = {
            ActionKind.COOLED_DOWN: f"{a.object_name}/{a.credential} cooling down ({a.error_class})",
            ActionKind.EXHAUSTED: f"{a.object_name}/{a.credential} exhausted ({a.error_class})",
            ActionKind.REJECTED: f"{a.object_name}/{a.credential} rejected ({a.error_class})",
            ActionKind.RESTORED: (
                # A per-model cooldown ending says just that: the key may still be benched otherwise.
                f"{a.object_name}/{a.credential} {a.error_class} over for model {a.model}"
                if a.model
                else f"{a.object_name}/{a.credential} available again"
            ),
            ActionKind.FALLBACK_ACTIVATED: f"fallback {a.from_entry} → {a.to_entry} ({a.error_class})",
            ActionKind.PRIMARY_RESTORED: f"primary restored: {a.from_entry} → {a.to_entry}",
            ActionKind.CHAIN_EXHAUSTED: f"chain exhausted ({a.error_class})",
        }[a.kind]
        if a.until is not None and a.kind is not ActionKind.CHAIN_EXHAUSTED:
            what += f", for {a.until - a.at:.0f}s"
        print(self._c(f"{self._t()}  ⚑ {what}", "36"), file=self.out, flush=True)

    def shown(self) -> dict[str, bool]:
        """Whether the run showed each part of the story."""
        return {
            "rotation": self.served[("acme", "acme-2")] > 0 and self.actions["CredentialCoolingDown"] > 0,
            "fallback": self.actions["FallbackActivated"] > 0,
            "return to the primary": self.actions["PrimaryRestored"] > 0,
        }

    def summary(self, primary: FakeProvider, backup: FakeProvider) -> None:
        total = sum(self.served.values()) + self.failed
        print(self._c("\nsummary", "1"), file=self.out)
        print(f"  requests sent by the agent: {total}, answered 200: {total - self.failed}", file=self.out)
        for (provider, cred), n in sorted(self.served.items()):
            print(f"    served by {provider:<7} {cred:<9} {n:>4}", file=self.out)
        print(f"  upstream calls: acme {len(primary.received)}, backup {len(backup.received)}", file=self.out)
        wrong = [r for r in backup.received if r.key != BACKUP_KEY] + [
            r for r in primary.received if r.key not in DEMO_KEYS.values()
        ]
        print(f"  keys sent to the wrong provider: {len(wrong)}", file=self.out)
        for kind, n in sorted(self.actions.items()):
            print(f"  {kind}: {n}", file=self.out)
        shown = self.shown()
        print(
            "  shown: " + ", ".join(f"{what} {'yes' if ok else 'NO'}" for what, ok in shown.items()),
            file=self.out,
        )
        print(
            "  (the same actions become Events and status on the CredentialPool/ProviderChain in a cluster)",
            file=self.out,
        )


async def run_demo(duration: float = DEFAULT_DURATION, rate: float = 8.0, out: TextIO | None = None) -> int:
    """Run the scripted demo; returns 0 if every agent request was answered and the run showed
    rotation, fallback and the return to the primary."""
    out = out or sys.stdout
    primary = FakeProvider("acme", keys=DEMO_KEYS.values())
    backup = FakeProvider("backup", keys=[BACKUP_KEY])
    await primary.start()
    await backup.start()
    with tempfile.TemporaryDirectory(prefix="keyroute-demo-") as tmp:
        path = Path(tmp) / "demo.yaml"
        path.write_text(demo_manifests(primary.base_url, backup.base_url))
        sidecar = Sidecar(ManifestSource(path), listen=Address("127.0.0.1", 0), admin_listen=None)
        start = time.monotonic()
        narrator = _Narrator(out, start)
        sidecar.listeners.append(narrator.action)
        await sidecar.start()
        print(
            f"keyroute demo: sidecar on {sidecar.base_url} (local mode, {path.name}); "
            f"primary acme {primary.base_url}, fallback backup {backup.base_url}\n",
            file=out,
        )
        k1 = DEMO_KEYS["acme-1"]
        # (fraction of the run, what the narrator says, what changes)
        timeline: list[tuple[float, str, Callable[[], None]]] = [
            (
                0.12,
                "acme-1 starts answering 429 (Retry-After: 3)",
                lambda: primary.set(Behaviour.rate_limited(retry_after=3), key=k1),
            ),
            (0.30, "acme-1's rate limit lifts", lambda: primary.reset_rules()),
            (0.36, "acme-1 runs out of credit (402)", lambda: primary.set(Behaviour.billing(), key=k1)),
            (
                OUTAGE_STARTS,
                "acme fails for every key (500)",
                lambda: primary.set(Behaviour.server_error(500)),
            ),
            (OUTAGE_ENDS, "acme recovers (acme-1 still has no credit)", lambda: recover()),
        ]

        def recover() -> None:
            primary.reset_rules()
            primary.set(Behaviour.billing(), key=k1)

        try:
            async with aiohttp.ClientSession() as client:
                await _drive(client, sidecar.base_url, narrator, duration, rate, timeline, start)
        finally:
            await sidecar.stop()
            narrator.summary(primary, backup)
            await primary.stop()
            await backup.stop()
    return 0 if narrator.failed == 0 and all(narrator.shown().values()) else 1


async def _drive(
    client: aiohttp.ClientSession,
    base_url: str,
    narrator: _Narrator,
    duration: float,
    rate: float,
    timeline: list[tuple[float, str, Callable[[], None]]],
    start: float,
) -> None:
    pending = list(timeline)
    interval = 1.0 / rate
    n = 0
    tasks: set[asyncio.Task[None]] = set()
    body = json.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "hello"}]})

    async def one(i: int) -> None:
        t = time.monotonic()
        async with client.post(
            base_url + "/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer agent-does-not-need-a-key"},
        ) as resp:
            await resp.read()
            narrator.request(
                i,
                resp.status,
                resp.headers.get("X-Keyroute-Provider", "-"),
                resp.headers.get("X-Keyroute-Credential", "-"),
                (time.monotonic() - t) * 1000,
            )

    while (elapsed := time.monotonic() - start) < duration:
        while pending and elapsed >= pending[0][0] * duration:
            _, text, change = pending.pop(0)
            narrator.phase(text)
            change()
        n += 1
        task = asyncio.create_task(one(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
