"""One agent request's way through the chain: which attempt next, and what an outcome means.

The sidecar's HTTP shell asks :meth:`Route.next` for an attempt, performs it, and tells
:meth:`Route.report` what happened; the route answers whether to hand the response to the agent or to
go on. Everything the docs/errors.md table says about "then" is decided here, in one place:

- credential classes (RateLimited, UsageLimit, Billing, AuthFailed, Revoked): next key of the same pool
  at once; with none left, wait out a short reset (≤ ``maxWait``, once per entry) or fall back;
- Overloaded: next key once, then fall back;
- ServerError, ConnectionError: retry once on the same provider (another key if there is one);
- Timeout, ModelNotFound, UpstreamRateLimited: fall back at once;
- ClientError: the agent gets the answer, unless it says the prompt is too long and the chain names
  ``contextLength`` entries, which are tried next, in order.

``fallback.triggers`` narrows which classes may leave an entry: any other class hands the provider's answer
to the agent. Every request is bounded by ``maxAttempts`` upstream attempts and the request deadline.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from keyroute.core.actions import Action, ActionKind
from keyroute.core.chains import Chain, Entry
from keyroute.core.classes import CREDENTIAL_CLASSES, ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.pools import Lease

#: Jitter added to a short wait, so sidecars that saw the same reset do not return in lockstep.
WAIT_JITTER = 0.1


# Not frozen, though never changed once made: a frozen dataclass sets each field through
# object.__setattr__, which made this 2.0 µs to construct instead of 0.8 µs, on every request.
@dataclass(slots=True)
class Attempt:
    """One upstream call: this entry, this leased credential, this base URL. Never changed once made."""

    entry: Entry
    lease: Lease
    base_url: str
    model: str  # the model id sent upstream
    connect: float
    first_byte: float
    idle: float
    probe: bool = False
    # For a streamed answer, the bound from response headers to the first data event (None: off, and
    # ``first_byte`` bounds that wait as it always did).
    first_token: float | None = None

    @property
    def credential_name(self) -> str:
        return self.lease.credential.name


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep until ``until`` (same clock as ``now``), then ask again."""

    until: float


@dataclass(frozen=True, slots=True)
class Exhausted:
    """Nothing more to try. ``retry_after`` is in seconds from ``now``."""

    retry_after: float


class Verdict(enum.Enum):
    RETURN = "return"  # give this upstream answer to the agent
    CONTINUE = "continue"  # ask next() again


# For the success path, run by every request: a member read through its class costs ~100 ns on
# Python 3.11, a module global a few.
_RETURN = Verdict.RETURN


@dataclass(slots=True)
class AttemptRecord:
    """What one attempt (or a skipped entry) came to; the ``attempts`` of a chain_exhausted body."""

    provider: str
    error_class: ErrorClass | None
    credential: str | None = None
    status: int | None = None
    skipped: bool = False
    message: str = ""

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "provider": self.provider,
            "class": str(self.error_class) if self.error_class else None,
        }
        if self.credential:
            out["credential"] = self.credential
        if self.status is not None:
            out["status"] = self.status
        if self.skipped:
            out["skipped"] = True
        if self.message:
            out["message"] = self.message
        return out


@dataclass(slots=True)
class _EntryProgress:
    tried: set[str] = field(default_factory=set)
    retried: bool = False
    waited: bool = False
    allow_tried: bool = False
    last: ErrorClass | None = None


class Route:
    """The state of one request's walk along the chain."""

    def __init__(self, chain: Chain, model: str, now: float, *, rng: random.Random | None = None):
        self.chain = chain
        self.model = model
        self.deadline = now + chain.request_timeout
        self.max_attempts = chain.fallback.max_attempts
        self.order, self._probes = chain.plan(model, now)
        self.pos = 0
        self.count = 0
        self.records: list[AttemptRecord] = []
        self.actions: list[Action] = []
        self.reason: ErrorClass | None = None  # why the last entry was left
        self._progress: dict[str, _EntryProgress] = {}
        self._context_mode = False
        self._rng = rng or chain.rng
        self._finished = False

    # --- asking --------------------------------------------------------------------------------

    def next(self, now: float) -> Attempt | Wait | Exhausted:
        """The next thing to do."""
        while True:
            if self.count >= self.max_attempts or now >= self.deadline or self.pos >= len(self.order):
                return self._exhausted(now)
            entry = self.order[self.pos]
            upstream = entry.upstream_model(self.model)
            # An entry's progress is made when something happens on it (a failure, a wait): a request
            # that is served at the first try allocates none.
            prog = self._progress.get(entry.name)
            if prog is None:
                lease = entry.pool.acquire(upstream, now)
            else:
                exclude = () if prog.allow_tried else prog.tried
                lease = entry.pool.acquire(upstream, now, exclude)
                if lease is None and prog.tried and prog.retried and not prog.allow_tried:
                    # A same-provider retry may reuse the key that failed if it is the only one.
                    lease = entry.pool.acquire(upstream, now)
            if lease is not None:
                self.count += 1
                # Every bound within what is left of the request. Conditional expressions rather than
                # min() and max(), and the fields in order rather than by keyword: each builtin call
                # and the keywords cost more than the comparisons, on every request (valgrind).
                remaining = self.deadline - now
                if remaining < 0.001:
                    remaining = 0.001
                first_token = entry.first_token
                if first_token:
                    first_token = remaining if remaining < first_token else first_token
                return Attempt(
                    entry,
                    lease,
                    entry.base_url_for(lease.credential),  # base_url: the invariant's URL rule, in one place
                    upstream,  # model
                    remaining if remaining < entry.connect else entry.connect,  # connect
                    remaining if remaining < entry.first_byte else entry.first_byte,  # first_byte
                    entry.idle,
                    entry in self._probes,  # probe
                    first_token or None,
                )
            # No usable key here. Wait out a short reset rather than leave the entry (docs/sidecar.md).
            if prog is None:
                prog = self._progress[entry.name] = _EntryProgress()
            soonest = entry.pool.earliest_available(upstream, now)
            if soonest is not None and self._short_reset(soonest, prog, now):
                until = soonest + self._rng.uniform(0, WAIT_JITTER)
                if until < self.deadline:
                    prog.waited = True
                    prog.allow_tried = True
                    return Wait(until=until)
            cls = prog.last or entry.pool.blocking_class(upstream, now) or ErrorClass.RATE_LIMITED
            if not prog.tried:
                self.records.append(
                    AttemptRecord(
                        provider=entry.name, error_class=cls, skipped=True, message="no usable credential"
                    )
                )
            triggers = self.chain.fallback_triggers
            if triggers is not None and cls not in triggers:
                # The entry may not be left for this class (fallback.triggers) and has no key to send:
                # the request ends here, told when a key of this entry is back (restoreAfter if none
                # ever will be: its keys are rejected until their Secret changes).
                self.reason = cls
                return self._exhausted(
                    now, soonest if soonest is not None else now + self.chain.fallback.restore_after
                )
            self._leave(entry, cls, now)

    # --- telling -------------------------------------------------------------------------------

    def report(self, attempt: Attempt, verdict: Classification | None, now: float) -> Verdict:
        """Record the outcome of ``attempt`` (``None``: success) and say what to do with the answer."""
        lease = attempt.lease
        pool = lease.pool
        pool.release(lease)
        entry = attempt.entry
        if verdict is None:
            pool.record_success(lease, now)
            if not self._context_mode:
                self.actions.extend(self.chain.served(self.model, entry, now, self.reason))
            self._finish()
            return _RETURN
        self.actions.extend(pool.record_failure(lease, verdict, now))
        cls = verdict.error_class
        self.records.append(
            AttemptRecord(
                provider=entry.name,
                error_class=cls,
                credential=lease.credential.name,
                status=verdict.status,
                message=verdict.message,
            )
        )
        prog = self._progress.setdefault(entry.name, _EntryProgress())
        prog.tried.add(lease.credential.name)
        prog.last = cls
        if cls is ErrorClass.CLIENT_ERROR:
            if verdict.context_length and self._switch_to_context_entries(entry):
                return Verdict.CONTINUE
            self._finish()
            return Verdict.RETURN
        if cls in CREDENTIAL_CLASSES:
            prog.allow_tried = False
            triggers = self.chain.fallback_triggers
            if triggers is not None and cls not in triggers and not self._can_stay(entry, prog, now):
                # Not a class that may leave the entry, and nothing is left on it: the agent gets
                # this answer rather than a fallback's (docs/errors.md, fallback.triggers).
                self._finish()
                return Verdict.RETURN
            return Verdict.CONTINUE  # next() rotates, waits or leaves
        if (
            cls in (ErrorClass.OVERLOADED, ErrorClass.SERVER_ERROR, ErrorClass.CONNECTION_ERROR)
            and not prog.retried
        ):
            prog.retried = True
            prog.allow_tried = False
            if cls is ErrorClass.OVERLOADED and not self._has_other_key(entry, prog, now):
                return self._leave_or_return(entry, cls, now)
            return Verdict.CONTINUE
        return self._leave_or_return(entry, cls, now)

    def abandon(self) -> None:
        """The request ended without a verdict (the agent went away): release what it holds."""
        self._finish()

    # --- internals -----------------------------------------------------------------------------

    def _has_other_key(self, entry: Entry, prog: _EntryProgress, now: float) -> bool:
        upstream = entry.upstream_model(self.model)
        return any(
            c.name not in prog.tried and entry.pool.usable(c, upstream, now) for c in entry.pool.credentials
        )

    def _can_stay(self, entry: Entry, prog: _EntryProgress, now: float) -> bool:
        """Whether :meth:`next` would make another attempt on ``entry`` after a key class failure:
        another usable key, or a short reset not yet waited out, within the request's budget."""
        if self.count >= self.max_attempts or now >= self.deadline:
            return False
        if self._has_other_key(entry, prog, now):
            return True
        soonest = entry.pool.earliest_available(entry.upstream_model(self.model), now)
        # As next() would wait, with its jitter at its most: staying must not be promised otherwise.
        return (
            soonest is not None
            and self._short_reset(soonest, prog, now)
            and soonest + WAIT_JITTER < self.deadline
        )

    def _short_reset(self, soonest: float, prog: _EntryProgress, now: float) -> bool:
        """Whether the entry's soonest key (``soonest``) is back within ``fallback.maxWait`` and the
        request has not waited on this entry yet: the one wait it may make there."""
        return not prog.waited and soonest - now <= self.chain.fallback.max_wait

    def _leave_or_return(self, entry: Entry, cls: ErrorClass, now: float) -> Verdict:
        if self.chain.fallback_triggers is not None and cls not in self.chain.fallback_triggers:
            self._finish()
            return Verdict.RETURN
        self._leave(entry, cls, now)
        return Verdict.CONTINUE

    def _leave(self, entry: Entry, cls: ErrorClass, now: float) -> None:
        self.reason = cls
        if not self._context_mode:
            self.chain.entry_failed(self.model, entry, cls, now)
        if entry in self._probes:
            self._probes.remove(entry)
        self.pos += 1

    def _switch_to_context_entries(self, current: Entry) -> bool:
        names = self.chain.fallback.context_length
        if not names:
            return False
        done = {current.name, *(r.provider for r in self.records)}
        if self._context_mode:
            rest = [self.chain.by_name[n] for n in names if n not in done]
        else:
            rest = [self.chain.by_name[n] for n in names if n != current.name]
        if not rest:
            return False
        self._context_mode = True
        self.order = [*self.order[: self.pos + 1], *rest]
        self.pos += 1
        return True

    def _exhausted(self, now: float, soonest: float | None = None) -> Exhausted:
        """Nothing more to try. ``soonest``: when what this request may use is usable again, if known
        (else the soonest key or entry of the chain)."""
        if soonest is None:
            soonest = self.chain.earliest_usable(self.model, now)
        retry_after = max(1.0, (soonest - now) if soonest is not None else self.chain.fallback.restore_after)
        self.actions.append(
            Action(
                kind=ActionKind.CHAIN_EXHAUSTED,
                at=now,
                namespace=self.chain.namespace,
                object_name=self.chain.name,
                error_class=self.reason,
                model=self.model or None,
                until=now + retry_after,
                message=f"{self.count} attempts",
            )
        )
        self._finish()
        return Exhausted(retry_after=retry_after)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for entry in self._probes:
            self.chain.release_probe(self.model, entry)
        self._probes.clear()
