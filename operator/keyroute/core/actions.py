"""Recovery actions: what the state machines decided, for the shells to log, count and report.

Each pool or chain transition returns a list of these instead of doing anything itself, so the same
decision is a log line in the sidecar, a metric, a line in ``keyroute demo`` and (via the reporter) a
Kubernetes Event, and a unit test can assert on it directly.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from keyroute.core.classes import ErrorClass
from keyroute.core.enums import RateLimitScope


class ActionKind(enum.StrEnum):
    COOLED_DOWN = "CredentialCoolingDown"
    EXHAUSTED = "CredentialExhausted"
    REJECTED = "CredentialRejected"
    RESTORED = "CredentialRestored"
    FALLBACK_ACTIVATED = "FallbackActivated"
    PRIMARY_RESTORED = "PrimaryRestored"
    CHAIN_EXHAUSTED = "ChainExhausted"


POOL_ACTIONS = frozenset(
    {ActionKind.COOLED_DOWN, ActionKind.EXHAUSTED, ActionKind.REJECTED, ActionKind.RESTORED}
)


@dataclass(frozen=True, slots=True)
class Action:
    """One recovery action. Identifies credentials by name and fingerprint only, never by value."""

    kind: ActionKind
    at: float
    namespace: str
    # The CredentialPool (pool actions) or ProviderChain (chain actions) the action concerns.
    object_name: str
    error_class: ErrorClass | None = None
    credential: str | None = None
    fingerprint: str | None = None
    until: float | None = None
    model: str | None = None
    from_entry: str | None = None
    to_entry: str | None = None
    status: int | None = None
    message: str = ""
    # Set on credential actions: POOL when a rate limit the pool's keys share benched all of them
    # (``credential`` then names the key that got the 429, or none for the end of the limit).
    scope: RateLimitScope | None = None

    @property
    def object_kind(self) -> str:
        return "CredentialPool" if self.kind in POOL_ACTIONS else "ProviderChain"

    def fields(self) -> dict[str, Any]:
        """Non-empty fields, for structured logs: named as every other sidecar log line names them
        (``class``, not the attribute's ``error_class``: one name to filter on, docs/sidecar.md "Logs")."""
        out: dict[str, Any] = {"action": str(self.kind), self.object_kind_key: self.object_name}
        for name, field in _LOG_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "until":
                value = rfc3339(value)
            out[field] = str(value) if isinstance(value, enum.Enum) else value
        if self.message:
            out["detail"] = self.message
        return out

    @property
    def object_kind_key(self) -> str:
        return "pool" if self.kind in POOL_ACTIONS else "chain"


# (attribute, log field) in the order they are logged.
_LOG_FIELDS = (
    ("error_class", "class"),
    ("credential", "credential"),
    ("fingerprint", "fingerprint"),
    ("until", "until"),
    ("model", "model"),
    ("from_entry", "from_entry"),
    ("to_entry", "to_entry"),
    ("status", "status"),
    ("scope", "scope"),
)


def rfc3339(ts: float) -> str:
    """``2026-11-24T23:08:31Z``: how Kubernetes status and Events write times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
