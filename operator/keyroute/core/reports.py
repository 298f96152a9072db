"""Recovery actions as Kubernetes Events, and the operator's fold of those Events into status facts.

The sidecar turns each :class:`~keyroute.core.actions.Action` into a core v1 Event regarding the
CredentialPool or ProviderChain it concerns (``involvedObject``), with the pod as ``related``. The
human part (``reason``, ``message``) is what ``kubectl describe`` shows; the machine part rides in
``keyroute.dev/*`` annotations, which the operator reads back with :func:`parse_report`. Only Events
labelled ``keyroute.dev/report=sidecar`` are reports: the operator's own Events and everybody else's
are not, and a real API server filters them out of the operator's watch by that label.

:class:`ReportBook` is the operator's memory of reports: per pool credential the latest state any
pod reported, per chain which pods report and which of them run on a fallback. It is pure: time is a
parameter, and it answers "what should status say now" and "when does that answer next change".

Decisions where the spec is silent:

- A repeat of the same transition (same pod, object, action, credential, model, entries) within
  :data:`DEDUP_WINDOW` updates the existing Event (``count``, ``lastTimestamp``, ``until``) instead of
  creating another, as Kubernetes' own event recorder does: ``kubectl describe`` shows ``x5 over 3m``.
- The latest report wins, by the time the sidecar observed it (annotation ``keyroute.dev/at``), not
  by arrival: buffered reports delivered late cannot undo a newer state.
- Sidecars announce themselves with a ``SidecarReporting`` Event on their chain, refreshed every
  :data:`PRESENCE_INTERVAL`; a pod not heard from for :data:`PRESENCE_TTL` no longer counts in
  ``status.sidecars``. Fallback state is kept per pod and model, so a pod counts as "on a fallback"
  while any model it serves runs on an entry other than the primary.
- Events carry no provider message: a provider's error text can echo part of a key.
- A rate limit the pool's keys share (``rateLimitScope: Pool``) is one report, annotated
  ``keyroute.dev/scope: Pool``, naming the key that got the 429; the book keeps it under
  :data:`POOL_WIDE` and status shows it on every credential row with ``scope: Pool``. Its end is one
  report too, without a credential. A pool-wide state holds whatever key value a credential has now:
  the limit is the organization's, not the key's.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keyroute.core.actions import POOL_ACTIONS, Action, ActionKind, rfc3339
from keyroute.core.classes import ErrorClass
from keyroute.core.enums import API_VERSION, CredentialState, RateLimitScope
from keyroute.core.pools import Block

REPORT_LABEL = "keyroute.dev/report"
REPORT_LABEL_VALUE = "sidecar"
REPORTING_COMPONENT = "keyroute.dev/sidecar"
PRESENCE_REASON = "SidecarReporting"

#: A repeated transition within this window updates the existing Event.
DEDUP_WINDOW = 600.0
#: How often a sidecar refreshes its presence on its chain.
PRESENCE_INTERVAL = 300.0
#: A sidecar not heard from for this long no longer counts as reporting.
PRESENCE_TTL = 2.5 * PRESENCE_INTERVAL
#: How long the operator remembers a ``CredentialRestored`` (to order late deliveries against it).
RESTORED_MEMORY = 3600.0

_A = "keyroute.dev/"
ANN_AT = _A + "at"
ANN_POD = _A + "pod"
ANN_ACTION = _A + "action"
ANN_CREDENTIAL = _A + "credential"
ANN_FINGERPRINT = _A + "fingerprint"
ANN_ERROR_CLASS = _A + "error-class"
ANN_UNTIL = _A + "until"
ANN_STATUS = _A + "status"
ANN_MODEL = _A + "model"
ANN_FROM = _A + "from"
ANN_TO = _A + "to"
ANN_DROPPED = _A + "dropped"
ANN_CONFIG = _A + "config-hash"
ANN_SCOPE = _A + "scope"

#: The book's credential key for a state every credential of the pool shares (rateLimitScope: Pool).
POOL_WIDE = "*"

_STATE_OF = {
    ActionKind.COOLED_DOWN: CredentialState.COOLING_DOWN,
    ActionKind.EXHAUSTED: CredentialState.EXHAUSTED,
    ActionKind.REJECTED: CredentialState.REJECTED,
    ActionKind.RESTORED: CredentialState.AVAILABLE,
}
_NORMAL = frozenset({ActionKind.RESTORED, ActionKind.PRIMARY_RESTORED})


@dataclass(frozen=True, slots=True)
class Origin:
    """The pod a sidecar runs in: who reports."""

    pod: str
    namespace: str


# --- the sidecar's side: actions → Event bodies ----------------------------------------------------


def dedup_key(action: Action) -> tuple[str, ...]:
    """What makes two actions "the same transition" for Event deduplication."""
    pool_wide = action.scope is RateLimitScope.POOL
    return (
        action.namespace,
        action.object_kind,
        action.object_name,
        str(action.kind),
        # A pool-wide limit is one transition whichever key happened to get the 429.
        POOL_WIDE if pool_wide else action.credential or "",
        action.model or "",
        action.from_entry or "",
        action.to_entry or "",
        str(action.scope or ""),
    )


def event_name(object_name: str, origin: Origin, key: tuple[str, ...], at: float) -> str:
    """A unique, valid Event name: the object's name, a hash of pod and transition, and the time."""
    digest = hashlib.sha256("\0".join((origin.pod, *key)).encode()).hexdigest()[:10]
    return f"{object_name[:200].rstrip('-.')}.{digest}.{int(at * 1000):x}"


def presence_name(chain: str, origin: Origin) -> str:
    """The one presence Event per (chain, pod): stable, so a restarted sidecar finds and refreshes it."""
    digest = hashlib.sha256(f"{origin.namespace}/{origin.pod}".encode()).hexdigest()[:10]
    return f"{chain[:200].rstrip('-.')}.{digest}.sidecar"


def describe(action: Action, pod: str) -> str:
    """The Event message: what happened, in words, with the pod. Never a key or a provider's text."""
    k = action.kind
    detail = _detail(action)
    if action.scope is RateLimitScope.POOL and k in (ActionKind.COOLED_DOWN, ActionKind.RESTORED):
        model = f" for model {action.model}" if action.model else ""
        if k is ActionKind.COOLED_DOWN:
            until = f" until {rfc3339(math.ceil(action.until))}" if action.until is not None else ""
            text = (
                f"every credential cooling down{model}{until}: the pool's keys share one rate limit "
                f"(rateLimitScope: Pool){detail}; hit by credential {action.credential}"
            )
        else:
            text = f"pool-wide rate limit ended: every credential available again{model}"
        return f"{text}; reported by pod {pod}"
    if k in (ActionKind.COOLED_DOWN, ActionKind.EXHAUSTED):
        what = "cooling down" if k is ActionKind.COOLED_DOWN else "exhausted"
        until = f" until {rfc3339(math.ceil(action.until))}" if action.until is not None else ""
        text = f"credential {action.credential} {what}{until}{detail}"
    elif k is ActionKind.REJECTED:
        text = f"credential {action.credential} rejected until its Secret value changes{detail}"
    elif k is ActionKind.RESTORED:
        was = f" (was {action.error_class})" if action.error_class else ""
        model = f" for model {action.model}" if action.model else ""
        text = f"credential {action.credential} available again{model}{was}"
    elif k is ActionKind.FALLBACK_ACTIVATED:
        text = f"fallback {action.from_entry} → {action.to_entry}{detail}"
    elif k is ActionKind.PRIMARY_RESTORED:
        model = f" for model {action.model}" if action.model else ""
        text = f"primary restored: {action.from_entry} → {action.to_entry}{model}"
    else:
        text = f"every provider of the chain failed{detail}"
    return f"{text}; reported by pod {pod}"


def _detail(action: Action) -> str:
    parts = [str(action.error_class)] if action.error_class else []
    if action.status:
        parts.append(f"HTTP {action.status}")
    if action.model:
        parts.append(f"model {action.model}")
    return f" ({', '.join(parts)})" if parts else ""


def event_body(
    action: Action,
    origin: Origin,
    *,
    name: str,
    uid: str | None,
    count: int = 1,
    first_at: float | None = None,
    dropped: int = 0,
) -> dict[str, Any]:
    """The core v1 Event for ``action`` as ``origin`` reports it (also the body of a repeat's patch)."""
    annotations = {ANN_AT: _precise(action.at), ANN_POD: origin.pod, ANN_ACTION: str(action.kind)}
    optional = {
        ANN_CREDENTIAL: action.credential,
        ANN_FINGERPRINT: action.fingerprint,
        ANN_ERROR_CLASS: str(action.error_class) if action.error_class else None,
        # Rounded up: a cooldown must never end early because the API's time format has no fraction.
        ANN_UNTIL: rfc3339(math.ceil(action.until)) if action.until is not None else None,
        ANN_STATUS: str(action.status) if action.status else None,
        ANN_MODEL: action.model,
        ANN_FROM: action.from_entry,
        ANN_TO: action.to_entry,
        ANN_DROPPED: str(dropped) if dropped else None,
        ANN_SCOPE: str(action.scope) if action.scope else None,
    }
    annotations.update({k: v for k, v in optional.items() if v})
    message = describe(action, origin.pod)
    if dropped:
        message += f" ({dropped} earlier reports were dropped while the API server was unreachable)"
    return _event(
        name=name,
        namespace=action.namespace,
        kind=action.object_kind,
        object_name=action.object_name,
        uid=uid,
        origin=origin,
        reason=str(action.kind),
        message=message,
        warning=action.kind not in _NORMAL,
        annotations=annotations,
        count=count,
        first_at=first_at if first_at is not None else action.at,
        last_at=action.at,
    )


def presence_body(
    chain: str, namespace: str, uid: str | None, origin: Origin, *, at: float, config_hash: str, count: int = 1
) -> dict[str, Any]:
    """The ``SidecarReporting`` Event: this pod serves ``chain`` and reports on it."""
    return _event(
        name=presence_name(chain, origin),
        namespace=namespace,
        kind="ProviderChain",
        object_name=chain,
        uid=uid,
        origin=origin,
        reason=PRESENCE_REASON,
        message=f"sidecar in pod {origin.pod} serves this chain (config {config_hash})",
        warning=False,
        annotations={ANN_AT: _precise(at), ANN_POD: origin.pod, ANN_ACTION: PRESENCE_REASON, ANN_CONFIG: config_hash},
        count=count,
        first_at=at,
        last_at=at,
    )


def _event(
    *,
    name: str,
    namespace: str,
    kind: str,
    object_name: str,
    uid: str | None,
    origin: Origin,
    reason: str,
    message: str,
    warning: bool,
    annotations: dict[str, str],
    count: int,
    first_at: float,
    last_at: float,
) -> dict[str, Any]:
    involved: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": object_name,
        "namespace": namespace,
    }
    if uid:
        # kubectl describe finds an object's Events by uid: without it they would not show there.
        involved["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {REPORT_LABEL: REPORT_LABEL_VALUE},
            "annotations": annotations,
        },
        "involvedObject": involved,
        "related": {"apiVersion": "v1", "kind": "Pod", "name": origin.pod, "namespace": origin.namespace},
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "count": count,
        "firstTimestamp": rfc3339(first_at),
        "lastTimestamp": rfc3339(last_at),
        "source": {"component": REPORTING_COMPONENT},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": origin.pod[:128],
    }


def _precise(ts: float) -> str:
    return f"{ts:.6f}"


# --- the sidecar's side: what to send first, and how fast ------------------------------------------

#: Report writes (Event creates, count patches, the heartbeat) one sidecar may make at once...
REPORT_BURST = 50
#: ...and per second after that, on average: the API-server budget the README promises per pod.
REPORT_RATE = 1.0
#: Tokens repeats and the heartbeat leave in the bucket for new transitions: a storm of repeats can
#: never use more than ``REPORT_BURST - REPEAT_RESERVE`` of a burst, so that many new transitions still
#: leave at once during it.
REPEAT_RESERVE = 25


class Priority(enum.IntEnum):
    """Which queued report goes first; lower first."""

    #: A change of state the operator has not heard from this pod: a new cooldown, a restoration, a
    #: fallback. What other pods (shared cooldowns) and status wait for.
    NEW = 0
    #: The same transition again while the operator already shows it: only the Event's ``count``,
    #: ``lastTimestamp`` (and ``until``) change.
    REPEAT = 1
    #: The ``SidecarReporting`` heartbeat (5 min apart; the operator forgets a pod after 12.5).
    PRESENCE = 2


PRESENCE_KEY: tuple[str, ...] = ("presence",)
#: Which report a full buffer drops first: a repeat only adds to a count, a missed heartbeat is sent
#: again 5 minutes later, a new transition is news.
_DROP_ORDER = (Priority.REPEAT, Priority.PRESENCE, Priority.NEW)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second. Time is a parameter, for tests."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got rate={rate}, burst={burst})")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def wait_time(self, reserve: float = 0.0) -> float:
        """Seconds until a token can be taken with ``reserve`` tokens left in the bucket (0: now)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = 1.0 + reserve
        # A hair of slack: a refill computed as 0.9999999999 tokens is a whole one (no spin on dust).
        return 0.0 if self.tokens >= need - 1e-9 else (need - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


def send_wait(queue: ReportQueue, bucket: TokenBucket, reserve: float) -> float | None:
    """The sender's decision: ``None`` when nothing is queued, else seconds until the next report may
    go (0: now). New transitions may take the bucket's last token; repeats and the heartbeat leave
    ``reserve`` tokens for them."""
    head = queue.head()
    if head is None:
        return None
    return bucket.wait_time(0.0 if head is Priority.NEW else reserve)


@dataclass(slots=True)
class Pending:
    """One queued report: the newest action of its transition, and how many it stands for."""

    action: Action | None  # None: the presence report
    count: int
    first_at: float
    priority: Priority


@dataclass(frozen=True, slots=True)
class _Told:
    """The last transition this pod queued for a slot (see :func:`report_slot`)."""

    key: tuple[str, ...]
    at: float
    until: float | None


def report_slot(action: Action) -> tuple[str, ...]:
    """The piece of state an action sets, as the operator folds it: a credential (per model) of a
    pool, the fallback state of a chain (per model), or the chain's exhaustion (per model)."""
    if action.kind in POOL_ACTIONS:
        what = action.credential or ""
    elif action.kind in (ActionKind.FALLBACK_ACTIVATED, ActionKind.PRIMARY_RESTORED):
        what = "fallback"
    else:
        what = str(action.kind)
    return (action.namespace, action.object_kind, action.object_name, what, action.model or "")


class ReportQueue:
    """The reporter's bounded buffer, pure (time is the actions' ``at``).

    Three FIFO queues by :class:`Priority`; :meth:`pop` takes from the highest non-empty one. An action
    is :attr:`Priority.NEW` unless it repeats the last transition this pod queued for the same slot,
    that transition's ``until`` has not passed (else the operator has already flipped the row back by
    itself and the repeat is news again) and it is younger than :data:`DEDUP_WINDOW`. A repeat of a
    transition still queued is merged into it (``count``, newest action) and keeps its place. When
    ``capacity`` reports are queued, one is dropped to make room: the oldest repeat, else the
    heartbeat, else the oldest new transition; :attr:`dropped` counts them until :meth:`delivered`.
    Repeats wait as long as new transitions are queued (they merge meanwhile, so they cannot pile up);
    the heartbeat waits one interval at most (:meth:`offer_presence`).

    Delivery order across priorities is safe because the operator orders reports by the time the
    sidecar saw them (``keyroute.dev/at``), not by arrival. Every method is O(1) but :meth:`prune`.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the report buffer needs room for at least one report (got {capacity})")
        self.capacity = capacity
        self.dropped = 0  # dropped since the last report that got through
        self._queues = tuple(OrderedDict[tuple[str, ...], Pending]() for _ in Priority)
        self._where: dict[tuple[str, ...], Priority] = {}
        self._told: dict[tuple[str, ...], _Told] = {}

    def __len__(self) -> int:
        return len(self._where)

    def classify(self, action: Action) -> Priority:
        """How urgent ``action`` is, given what this pod already queued (see the class docstring)."""
        told = self._told.get(report_slot(action))
        if (
            told is None
            or told.key != dedup_key(action)
            or action.at - told.at >= DEDUP_WINDOW
            or (told.until is not None and action.at >= told.until)
        ):
            return Priority.NEW
        return Priority.REPEAT

    def offer(self, action: Action) -> tuple[bool, int]:
        """Queue ``action``: ``(merged into a queued report, reports dropped to make room)``."""
        key = dedup_key(action)
        priority = self.classify(action)
        self._told[report_slot(action)] = _Told(key, action.at, action.until)
        return self._put(key, action, action.at, priority)

    def offer_presence(self, at: float) -> tuple[bool, int]:
        """Queue the heartbeat (one at most: a second merges into the first). A heartbeat still queued
        when the next one is due has waited a whole interval behind new transitions (a storm of keys
        flapping every second keeps that queue busy for as long as it lasts): it then goes as a new
        transition, so the operator does not stop counting a pod for being busy."""
        waiting = PRESENCE_KEY in self._where
        return self._put(PRESENCE_KEY, None, at, Priority.NEW if waiting else Priority.PRESENCE)

    def _put(
        self, key: tuple[str, ...], action: Action | None, at: float, priority: Priority
    ) -> tuple[bool, int]:
        where = self._where.get(key)
        if where is not None:
            # The same transition again before the first got out: one Event, counted. It keeps its
            # place (its priority may rise: a NEW never waits behind the repeat it merged into).
            queue = self._queues[where]
            pending = queue[key]
            pending.count += 1
            pending.action = action
            if priority < where:
                del queue[key]
                pending.priority = priority
                self._queues[priority][key] = pending
                self._where[key] = priority
            return True, 0
        dropped = 0
        if len(self._where) >= self.capacity:
            dropped = self._drop_one()
        self._queues[priority][key] = Pending(action, 1, at, priority)
        self._where[key] = priority
        return False, dropped

    def _victim(self) -> Priority | None:
        """The queue :meth:`_drop_one` takes from: what the operator misses least goes first."""
        return next((p for p in _DROP_ORDER if self._queues[p]), None)

    def _drop_one(self) -> int:
        victim = self._victim()
        if victim is None:
            return 0
        key, item = self._queues[victim].popitem(last=False)
        del self._where[key]
        self._forget(key, item)
        return 1

    def _forget(self, key: tuple[str, ...], item: Pending) -> None:
        self.dropped += 1
        if item.action is not None:
            slot = report_slot(item.action)
            told = self._told.get(slot)
            if told is not None and told.key == key:
                # The operator never hears of it: the next such action is news again.
                del self._told[slot]

    def head(self) -> Priority | None:
        """The priority of the report :meth:`pop` would return; ``None`` when empty."""
        return next((p for p in Priority if self._queues[p]), None)

    def pop(self) -> tuple[tuple[str, ...], Pending]:
        """Take the next report to send (highest priority, oldest first). ``IndexError`` when empty."""
        head = self.head()
        if head is None:
            raise IndexError("pop from an empty report queue")
        key, item = self._queues[head].popitem(last=False)
        del self._where[key]
        return key, item

    def requeue(self, key: tuple[str, ...], item: Pending) -> bool:
        """Put back a report whose send failed, first of its priority; ``False`` if it had to be dropped.

        A newer report of the same transition queued meanwhile absorbs it (counts add up; it rises to
        the failed one's priority, at the front: the operator has heard of neither)."""
        where = self._where.get(key)
        if where is not None:
            queue = self._queues[where]
            newer = queue[key]
            newer.count += item.count
            newer.first_at = min(newer.first_at, item.first_at)
            if item.priority < where:
                del queue[key]
                newer.priority = item.priority
                self._queues[item.priority][key] = newer
                self._queues[item.priority].move_to_end(key, last=False)
                self._where[key] = item.priority
            return True
        if len(self._where) >= self.capacity:
            # Full while this one was out. It is the oldest of its priority: dropped, unless something
            # the operator misses less (a repeat, the heartbeat) can go instead.
            victim = self._victim()
            if victim is None or _DROP_ORDER.index(victim) >= _DROP_ORDER.index(item.priority):
                self._forget(key, item)
                return False
            self._drop_one()
        self._queues[item.priority][key] = item
        self._queues[item.priority].move_to_end(key, last=False)
        self._where[key] = item.priority
        return True

    def delivered(self, carried: int) -> None:
        """A report got through saying ``carried`` reports were dropped: count only later drops."""
        self.dropped = max(0, self.dropped - carried)

    def items(self) -> list[tuple[tuple[str, ...], Pending]]:
        """Everything queued, in the order :meth:`pop` would return it."""
        return [entry for queue in self._queues for entry in queue.items()]

    def prune(self, now: float) -> None:
        """Forget slots last told more than :data:`DEDUP_WINDOW` ago (the sender calls this; O(n))."""
        if len(self._told) > 4 * self.capacity:
            self._told = {s: t for s, t in self._told.items() if now - t.at < DEDUP_WINDOW}


# --- the operator's side: Events → reports ---------------------------------------------------------


class ReportError(ValueError):
    """An Event labelled as a report that cannot be read as one. The message names no value."""


@dataclass(frozen=True, slots=True)
class Report:
    """One sidecar report, read back from its Event."""

    action: Action | None  # None for a presence report
    pod: str
    at: float
    config_hash: str | None = None


def is_report(event: Mapping[str, Any]) -> bool:
    """Whether an Event is a keyroute sidecar report (the label; a real API server filters by it too)."""
    labels = (event.get("metadata") or {}).get("labels") or {}
    return isinstance(labels, Mapping) and labels.get(REPORT_LABEL) == REPORT_LABEL_VALUE


def parse_report(event: Mapping[str, Any]) -> tuple[str, str, Report]:
    """``(namespace, object name, report)`` from a report Event; :class:`ReportError` if malformed."""
    meta = event.get("metadata") or {}
    ann = meta.get("annotations") or {}
    involved = event.get("involvedObject") or {}
    if not isinstance(ann, Mapping) or not isinstance(involved, Mapping):
        raise ReportError("report without annotations or involvedObject")
    namespace = involved.get("namespace") or meta.get("namespace")
    name = involved.get("name")
    kind = involved.get("kind")
    pod = ann.get(ANN_POD)
    if not (isinstance(namespace, str) and isinstance(name, str) and isinstance(pod, str) and pod):
        raise ReportError("report without object namespace, name or pod")
    if kind not in ("CredentialPool", "ProviderChain"):
        raise ReportError("report about a kind other than CredentialPool or ProviderChain")
    at = _float(ann.get(ANN_AT), "at")
    action_name = ann.get(ANN_ACTION)
    if action_name == PRESENCE_REASON:
        if kind != "ProviderChain":
            raise ReportError("presence report about a pool")
        return namespace, name, Report(None, pod, at, config_hash=_str(ann.get(ANN_CONFIG)))
    try:
        kind_of = ActionKind(str(action_name))
    except ValueError:
        raise ReportError("report with an unknown action") from None
    error_class: ErrorClass | None = None
    if ann.get(ANN_ERROR_CLASS):
        try:
            error_class = ErrorClass(ann[ANN_ERROR_CLASS])
        except ValueError:
            raise ReportError("report with an unknown error class") from None
    scope: RateLimitScope | None = None
    if ann.get(ANN_SCOPE):
        try:
            scope = RateLimitScope(ann[ANN_SCOPE])
        except ValueError:
            raise ReportError("report with an unknown scope") from None
    action = Action(
        kind=kind_of,
        at=at,
        namespace=namespace,
        object_name=name,
        error_class=error_class,
        credential=_str(ann.get(ANN_CREDENTIAL)),
        fingerprint=_str(ann.get(ANN_FINGERPRINT)),
        until=_time(ann.get(ANN_UNTIL)),
        model=_str(ann.get(ANN_MODEL)),
        from_entry=_str(ann.get(ANN_FROM)),
        to_entry=_str(ann.get(ANN_TO)),
        status=int(_float(ann[ANN_STATUS], "status")) if ann.get(ANN_STATUS) else None,
        scope=scope,
    )
    if action.object_kind != kind:
        raise ReportError(f"{kind_of} reported on a {kind}")
    if kind_of in _STATE_OF and not action.credential and scope is not RateLimitScope.POOL:
        raise ReportError("credential report without a credential name")
    return namespace, name, Report(action, pod, at)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _float(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ReportError(f"report with an unreadable {what}") from None
    if not math.isfinite(out):
        raise ReportError(f"report with an unreadable {what}")
    return out


def _time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return parse_rfc3339(str(value))
    except ValueError:
        raise ReportError("report with an unreadable until") from None


def parse_rfc3339(text: str) -> float:
    """``2026-11-25T10:00:00Z`` → epoch seconds (what status and Events carry)."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


# --- the fold ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class CredentialReport:
    """The latest state reported for one credential (and model scope) of a pool."""

    state: CredentialState
    reason: str
    at: float
    until: float | None
    fingerprint: str | None
    status: int | None
    pod: str
    model: str | None
    scope: RateLimitScope | None = None


@dataclass(slots=True)
class PodState:
    """What one sidecar pod reported about its chain."""

    last_seen: float
    # model ("" for requests without one) → the fallback it is on: (from, to, reason, at)
    fallbacks: dict[str, tuple[str, str, str, float]] = field(default_factory=dict)
    # model → time of the latest transition applied: a late delivery of an older one is ignored
    last_order: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LastFallbackFact:
    from_entry: str
    to_entry: str
    reason: str
    at: float
    pod: str


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """The chain's report-derived status: reporting sidecars, those on a fallback, the latest fallback."""

    sidecars: int
    on_fallback: int
    active: str | None  # the entry the most recent fallback still in force went to; None: the primary
    last_fallback: LastFallbackFact | None
    reason: str | None  # why the pods on a fallback left their entry


@dataclass
class ReportBook:
    """The operator's memory of sidecar reports, keyed by (namespace, object name)."""

    presence_ttl: float = PRESENCE_TTL
    pools: dict[tuple[str, str], dict[tuple[str, str], CredentialReport]] = field(default_factory=dict)
    chains: dict[tuple[str, str], dict[str, PodState]] = field(default_factory=dict)
    last_fallbacks: dict[tuple[str, str], LastFallbackFact] = field(default_factory=dict)

    def add(self, namespace: str, name: str, report: Report) -> str | None:
        """Fold one report in. Returns ``"pool"`` or ``"chain"``: whose status may change (``None``: none)."""
        action = report.action
        if action is None:
            pods = self.chains.setdefault((namespace, name), {})
            pod = pods.get(report.pod)
            if pod is None:
                pods[report.pod] = PodState(last_seen=report.at)
                return "chain"
            was_live = pod.last_seen + self.presence_ttl > report.at
            pod.last_seen = max(pod.last_seen, report.at)
            return None if was_live else "chain"  # a heartbeat of a live pod changes nothing
        if action.kind in _STATE_OF:
            return "pool" if self._add_pool(namespace, name, action, report.pod) else None
        return "chain" if self._add_chain(namespace, name, action, report.pod) else None

    def _add_pool(self, namespace: str, name: str, action: Action, pod: str) -> bool:
        pool_wide = action.scope is RateLimitScope.POOL
        credential = POOL_WIDE if pool_wide else action.credential
        assert credential is not None
        creds = self.pools.setdefault((namespace, name), {})
        key = (credential, action.model or "")
        current = creds.get(key)
        if current is not None and current.at > action.at:
            return False  # a late delivery of an older state
        state = _STATE_OF[action.kind]
        reason = str(action.error_class) if action.error_class else str(state)
        creds[key] = CredentialReport(
            state=state,
            reason=reason,
            at=action.at,
            until=None if state is CredentialState.AVAILABLE else action.until,
            fingerprint=action.fingerprint,
            status=action.status,
            pod=pod,
            model=action.model,
            scope=action.scope,
        )
        return True

    def _add_chain(self, namespace: str, name: str, action: Action, pod_name: str) -> bool:
        pods = self.chains.setdefault((namespace, name), {})
        pod = pods.get(pod_name)
        newly_live = pod is None or pod.last_seen + self.presence_ttl <= action.at
        if pod is None:
            pod = pods[pod_name] = PodState(last_seen=action.at)
        pod.last_seen = max(pod.last_seen, action.at)
        model = action.model or ""
        if action.kind is ActionKind.CHAIN_EXHAUSTED:
            return newly_live  # an Event for kubectl describe; only the count of pods may change
        if action.at < pod.last_order.get(model, float("-inf")):
            return newly_live
        pod.last_order[model] = action.at
        if action.kind is ActionKind.PRIMARY_RESTORED:
            pod.fallbacks.pop(model, None)
            return True
        reason = str(action.error_class) if action.error_class else "Unknown"
        origin = pod.fallbacks.get(model)
        # A fallback from a fallback (b → c) is still a fallback from the primary's point of view.
        from_entry = origin[0] if origin else (action.from_entry or "")
        pod.fallbacks[model] = (from_entry, action.to_entry or "", reason, action.at)
        last = self.last_fallbacks.get((namespace, name))
        if last is None or last.at <= action.at:
            self.last_fallbacks[(namespace, name)] = LastFallbackFact(
                action.from_entry or "", action.to_entry or "", reason, action.at, pod_name
            )
        return True

    # --- answers ---------------------------------------------------------------------------------

    def pool_reports(self, namespace: str, name: str, now: float) -> dict[str, CredentialReport]:
        """Per credential, the report status should show now: an all-models block first, else the
        model block that lasts longest. Ended and restored states are left out. A pool-wide rate
        limit is under :data:`POOL_WIDE`: it applies to every credential."""
        out: dict[str, CredentialReport] = {}
        for (cred, _model), rep in (self.pools.get((namespace, name)) or {}).items():
            if rep.state is CredentialState.AVAILABLE or (rep.until is not None and rep.until <= now):
                continue
            best = out.get(cred)
            if best is None or outranks(rep, best):
                out[cred] = rep
        return out

    def chain_summary(self, namespace: str, name: str, now: float) -> ChainSummary | None:
        """The chain's report-derived facts, or ``None`` if no sidecar ever reported on it."""
        pods = self.chains.get((namespace, name))
        last = self.last_fallbacks.get((namespace, name))
        if not pods and last is None:
            return None
        live = {p: s for p, s in (pods or {}).items() if s.last_seen + self.presence_ttl > now}
        on_fallback = [(p, s) for p, s in live.items() if s.fallbacks]
        latest = max(
            ((f, p) for p, s in on_fallback for f in s.fallbacks.values()),
            key=lambda fp: fp[0][3],
            default=None,
        )
        return ChainSummary(
            sidecars=len(live),
            on_fallback=len(on_fallback),
            active=latest[0][1] if latest else None,
            last_fallback=last,
            reason=latest[0][2] if latest else None,
        )

    def deadline(self, kind: str, namespace: str, name: str, now: float) -> float | None:
        """When the object's report-derived status next changes by itself (``None``: not by itself):
        a credential's ``until`` passing, a silent pod ageing out of a chain's counts."""
        if kind == "pool":
            times = [
                r.until
                for r in (self.pools.get((namespace, name)) or {}).values()
                if r.until is not None and r.until > now
            ]
        else:
            times = [
                s.last_seen + self.presence_ttl
                for s in (self.chains.get((namespace, name)) or {}).values()
                if s.last_seen + self.presence_ttl > now
            ]
        return min(times, default=None)

    def prune(self, now: float) -> None:
        """Forget what can no longer matter, so memory stays bounded by what is live."""
        for key in list(self.pools):
            creds = self.pools[key]
            for ck in [
                ck
                for ck, r in creds.items()
                if (r.state is CredentialState.AVAILABLE and r.at + RESTORED_MEMORY < now)
                or (r.until is not None and r.until + RESTORED_MEMORY < now)
            ]:
                del creds[ck]
            if not creds:
                del self.pools[key]
        for key in list(self.chains):
            pods = self.chains[key]
            for p in [p for p, s in pods.items() if s.last_seen + self.presence_ttl < now]:
                del pods[p]
            if not pods:
                del self.chains[key]

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """The object was deleted: its reports go with it."""
        if kind == "pool":
            self.pools.pop((namespace, name), None)
        else:
            self.chains.pop((namespace, name), None)
            self.last_fallbacks.pop((namespace, name), None)

    def seed_pool(self, namespace: str, name: str, status: Mapping[str, Any] | None, now: float) -> None:
        """After a restart: adopt the benched credentials the operator itself wrote into status, so
        a state whose Events already expired is not lost. Reports already known win."""
        if (namespace, name) in self.pools or not status:
            return
        creds: dict[tuple[str, str], CredentialReport] = {}
        for row in status.get("credentials") or []:
            rep = _row_report(row, now)
            if rep is not None:
                creds[(row["name"], rep.model or "")] = rep
        if creds:
            self.pools[(namespace, name)] = creds

    def seed_chain(self, namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
        """After a restart: keep ``lastFallback`` (history) from status."""
        last = (status or {}).get("lastFallback")
        if (namespace, name) in self.last_fallbacks or not isinstance(last, Mapping):
            return
        try:
            self.last_fallbacks[(namespace, name)] = LastFallbackFact(
                str(last["from"]), str(last["to"]), str(last["reason"]), parse_rfc3339(str(last["time"])),
                str(last.get("pod") or ""),
            )
        except (KeyError, ValueError):
            return


def outranks(a: CredentialReport, b: CredentialReport) -> bool:
    """Which of two states of one credential status shows: an all-models block, else the longer."""
    if (a.model is None) != (b.model is None):
        return a.model is None
    return _end(a) > _end(b)


def _end(r: CredentialReport) -> float:
    return math.inf if r.until is None else r.until


_BENCHED = {s.value for s in (CredentialState.COOLING_DOWN, CredentialState.EXHAUSTED, CredentialState.REJECTED)}


def _row_report(row: Any, now: float) -> CredentialReport | None:
    if not isinstance(row, Mapping) or row.get("state") not in _BENCHED or not row.get("name"):
        return None
    try:
        until = parse_rfc3339(row["until"]) if row.get("until") else None
        at = parse_rfc3339(row["lastTransitionTime"]) if row.get("lastTransitionTime") else now
    except (ValueError, TypeError):
        return None
    if until is not None and until <= now:
        return None
    status = row.get("lastErrorCode")
    return CredentialReport(
        state=CredentialState(row["state"]),
        reason=str(row.get("reason") or row["state"]),
        at=at,
        until=until,
        fingerprint=row.get("fingerprint"),
        status=status if isinstance(status, int) else None,
        pod=str(row.get("reportedBy") or ""),
        model=row.get("model") or None,
        scope=RateLimitScope.POOL if row.get("scope") == RateLimitScope.POOL else None,
    )


# --- fleet cooldowns: status → blocks for other pods -----------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedBlock:
    """A credential state another pod reported, as a sidecar adopts it."""

    credential: str
    fingerprint: str
    state: CredentialState
    error_class: ErrorClass
    until: float | None
    model: str | None
    status: int | None
    reported_by: str

    def as_block(self, now: float) -> Block:
        """The pool block a sidecar holds for it (marked as another pod's: it ends without a report)."""
        return Block(
            state=self.state,
            error_class=self.error_class,
            since=now,
            until=self.until,
            status=self.status,
            reported_by=self.reported_by,
        )


_DEFAULT_CLASS = {
    CredentialState.COOLING_DOWN: ErrorClass.RATE_LIMITED,
    CredentialState.EXHAUSTED: ErrorClass.BILLING,
    CredentialState.REJECTED: ErrorClass.REVOKED,
}


def shared_blocks(status: Mapping[str, Any] | None, *, pod: str, now: float) -> list[SharedBlock]:
    """The credential states in a pool's status that a sidecar in ``pod`` should honour.

    Its own reports are skipped (it already holds them), and so are rows without a fingerprint
    (the sidecar adopts a block only for the exact key value it was reported for), ended ones, and
    rows it cannot read. No Secret is involved: fingerprints are compared, never keys.
    """
    out: list[SharedBlock] = []
    for row in (status or {}).get("credentials") or []:
        rep = _row_report(row, now)
        if rep is None or not rep.fingerprint or rep.pod == pod:
            continue
        try:
            cls = ErrorClass(rep.reason)
        except ValueError:
            cls = _DEFAULT_CLASS[rep.state]
        out.append(
            SharedBlock(
                credential=str(row["name"]),
                fingerprint=rep.fingerprint,
                state=rep.state,
                error_class=cls,
                until=rep.until,
                model=rep.model,
                status=rep.status,
                reported_by=rep.pod or "another pod",
            )
        )
    return out
