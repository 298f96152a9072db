"""Leader election over a ``coordination.k8s.io/v1`` Lease: the decisions, with time as a parameter.

The same algorithm as client-go's ``leaderelection`` package (what controller-runtime, cert-manager
and external-secrets use), so an SRE's expectations carry over:

- a Lease is *held* by ``spec.holderIdentity`` for ``spec.leaseDurationSeconds`` after the moment this
  replica last **saw the record change** (its own clock: clocks of two nodes are never compared, and
  ``renewTime`` written by another node is not trusted);
- the holder renews it every ``retry_period``; if no renewal succeeded for ``renew_deadline`` it stops
  acting as leader at once, before anybody else may take over (``renew_deadline < lease_duration``:
  the difference is the margin against a slow write or a slow clock);
- an empty holder (a Lease released by a graceful shutdown) may be taken at once;
- taking over a Lease from another holder counts a ``leaseTransitions``.

Pure: no I/O and no clock; the shell (:mod:`keyroute.controller.election`) does the API calls.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


class ElectionError(ValueError):
    """Bad election settings; the message names the flag."""


@dataclass(frozen=True)
class Timings:
    """controller-runtime's defaults: 15 s lease, 10 s renew deadline, 2 s retry period."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        # The same rules as client-go's NewLeaderElector (its JitterFactor is 1.2).
        if min(self.lease_duration, self.renew_deadline, self.retry_period) <= 0:
            raise ElectionError("--leader-election-lease-duration, -renew-deadline and -retry-period must be > 0")
        if self.lease_duration <= self.renew_deadline:
            raise ElectionError(
                f"the lease duration ({self.lease_duration:g}s) must be longer than the renew deadline "
                f"({self.renew_deadline:g}s): the difference keeps two leaders from overlapping"
            )
        if self.renew_deadline <= 1.2 * self.retry_period:
            raise ElectionError(
                f"the renew deadline ({self.renew_deadline:g}s) must be longer than 1.2 x the retry period "
                f"({self.retry_period:g}s): a leader needs more than one try to renew"
            )


@dataclass(frozen=True)
class LeaseRecord:
    """The parts of a Lease's spec the election reads (``holder`` ``""``: released or never held)."""

    holder: str = ""
    duration: float = 0.0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


@dataclass(frozen=True)
class Observed:
    """A record and when (this replica's monotonic clock) it was first seen as it is."""

    record: LeaseRecord
    at: float


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet: create it, holding it
    ACQUIRE = "acquire"  # released or expired: take it over (an update)
    RENEW = "renew"  # ours: renew it (an update)
    WAIT = "wait"  # somebody else holds it


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def parse_lease(body: Mapping[str, Any] | None) -> LeaseRecord | None:
    """The record of a Lease object (``None`` for no Lease). Missing fields read as empty."""
    if body is None:
        return None
    spec = body.get("spec") or {}
    if not isinstance(spec, Mapping):
        spec = {}
    holder = spec.get("holderIdentity")
    duration = spec.get("leaseDurationSeconds")
    transitions = spec.get("leaseTransitions")
    return LeaseRecord(
        holder=holder if isinstance(holder, str) else "",
        duration=float(duration) if isinstance(duration, int | float) else 0.0,
        acquire_time=_str(spec.get("acquireTime")),
        renew_time=_str(spec.get("renewTime")),
        transitions=transitions if isinstance(transitions, int) else 0,
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def observe(previous: Observed | None, record: LeaseRecord, now: float) -> Observed:
    """Remember when the record last changed: a record seen unchanged keeps its first sighting."""
    if previous is not None and previous.record == record:
        return previous
    return Observed(record, now)


def decide(observed: Observed | None, me: str, now: float) -> Decision:
    """What to do with the Lease as last read (``observed`` ``None``: there is none) at ``now``."""
    if observed is None:
        return Decision(Action.CREATE, "no lease yet")
    record = observed.record
    if record.holder == me:
        return Decision(Action.RENEW, "held by this replica")
    if not record.holder:
        return Decision(Action.ACQUIRE, "released")
    expires = observed.at + record.duration
    if now >= expires:
        return Decision(Action.ACQUIRE, f"{record.holder} stopped renewing {now - observed.at:.1f}s ago")
    return Decision(Action.WAIT, f"held by {record.holder} for {expires - now:.1f}s more unless renewed")


def still_leading(renewed_at: float | None, now: float, timings: Timings) -> bool:
    """Whether a leader whose last successful renewal *started* at ``renewed_at`` may still write."""
    return renewed_at is not None and now - renewed_at < timings.renew_deadline


def micro_time(ts: float) -> str:
    """A Kubernetes ``MicroTime``: RFC 3339 in UTC with microseconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def held_spec(previous: LeaseRecord | None, me: str, wall: float, timings: Timings) -> dict[str, Any]:
    """The Lease spec that says ``me`` holds it, renewed at wall-clock time ``wall``."""
    now = micro_time(wall)
    acquired, transitions = now, 0
    if previous is not None:
        transitions = previous.transitions
        if previous.holder == me:
            acquired = previous.acquire_time or now
        elif previous.holder:
            transitions += 1  # taken over from another holder (a released Lease is not a transition)
    return {
        "holderIdentity": me,
        # A whole number of seconds, at least 1 (the API field is an integer).
        "leaseDurationSeconds": max(1, round(timings.lease_duration)),
        "acquireTime": acquired,
        "renewTime": now,
        "leaseTransitions": transitions,
    }


def released_spec(previous: LeaseRecord, wall: float) -> dict[str, Any]:
    """The spec a graceful shutdown leaves: no holder, so a standby takes over at its next try
    (client-go's ``ReleaseOnCancel`` writes the same)."""
    now = micro_time(wall)
    return {
        "holderIdentity": None,
        "leaseDurationSeconds": 1,
        "acquireTime": now,
        "renewTime": now,
        "leaseTransitions": previous.transitions,
    }
