"""A provider's credential pool: which key to send next, and what a failure does to the key that was sent.

This is where "what happens on a 429" lives for credentials. Every failure is attributed through the
:class:`Lease` the request was given, i.e. to the exact credential that was sent, never to "the pool's
current key" (the invariant (docs/README.md)). A pool belongs to one provider; the chain refuses to give it to another.

Time is a parameter (``now``, wall-clock epoch seconds, the clock providers' reset times use).

Decisions where the spec is silent:

- Leases are soft: a key may be leased to several requests at once (providers meter per key, not per
  connection), but ``LeastUsed`` counts leases in flight, and a failure reported through a lease taken
  *before* the key's current cooldown started does not escalate that cooldown. Twenty concurrent
  requests that all get the same 429 are one rate limit, not twenty consecutive ones.
- ``UsageLimit`` without a reset time cools down for ``max``.
- The sole-key cap (60 s) applies to every cooldown but ``Billing`` and ``Revoked``, provider resets
  included: a pool's only key is retried at least once a minute.
- ``Billing`` takes the longer of ``billing`` and the provider's reset: it is never shortened.
- ``rateLimitScope: Pool`` (keys of one organization share one limit): a ``RateLimited`` answer blocks
  the limited model on every key of the pool, with one cooldown (the provider's reset, else
  ``rateLimited`` doubling per consecutive pool-wide hit) and one action naming the key that got the
  429. Rotating to another key of the same organization would only buy another 429 and bench a
  second key for nothing. The block is a copy per credential, so selection costs nothing more than
  in ``Credential`` scope. Only ``RateLimited`` is shared: usage, billing and auth states belong to
  the key.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.config import CooldownConfig, PoolConfig
from keyroute.core.enums import CredentialState, RateLimitScope, Strategy

SOLE_KEY_CAP = 60.0
#: Model scope key for blocks that apply to every model.
ALL_MODELS = "*"

_PER_MODEL = frozenset({ErrorClass.RATE_LIMITED})
# A member read through its class costs ~100 ns on Python 3.11 (the enum machinery in Python), a
# module global a few: read once here for the per-request selection.
_FILL_FIRST = Strategy.FILL_FIRST
_STATE_FOR = {
    ErrorClass.RATE_LIMITED: CredentialState.COOLING_DOWN,
    ErrorClass.USAGE_LIMIT: CredentialState.COOLING_DOWN,
    ErrorClass.AUTH_FAILED: CredentialState.COOLING_DOWN,
    ErrorClass.BILLING: CredentialState.EXHAUSTED,
    ErrorClass.REVOKED: CredentialState.REJECTED,
}
_ACTION_FOR = {
    CredentialState.COOLING_DOWN: ActionKind.COOLED_DOWN,
    CredentialState.EXHAUSTED: ActionKind.EXHAUSTED,
    CredentialState.REJECTED: ActionKind.REJECTED,
}


@dataclass(frozen=True, slots=True)
class Credential:
    """A key and its identity. ``key`` is excluded from repr so it cannot reach a log by accident."""

    name: str
    key: str = field(repr=False)
    fingerprint: str
    priority: int
    base_url: str | None = None


@dataclass(slots=True)
class Block:
    """Why a credential is not usable, and until when (``None``: until its Secret value changes)."""

    state: CredentialState
    error_class: ErrorClass
    since: float
    until: float | None
    status: int | None = None
    # Set for blocks learned from another pod's report (fleet cooldowns).
    reported_by: str | None = None
    # Part of a pool-wide rate limit (rateLimitScope: Pool): every credential holds a copy.
    pool_wide: bool = False

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now


@dataclass(slots=True)
class Health:
    """Mutable per-credential state, owned by exactly one pool."""

    blocks: dict[str, Block] = field(default_factory=dict)  # scope (model or ALL_MODELS) → block
    strikes: dict[str, int] = field(default_factory=dict)  # consecutive rate limits per model
    epoch: int = 0  # bumped whenever a block is set; leases remember it
    in_flight: int = 0
    uses: int = 0
    last_status: int | None = None


@dataclass(slots=True)  # not frozen: see Attempt
class Lease:
    """One credential handed to one attempt. Outcomes are recorded through it, so they reach that key.
    Never changed once made."""

    pool: Pool
    credential: Credential
    model: str
    epoch: int


def _free(blocks: dict[str, Block], model: str, now: float) -> bool:
    """No active block for ``model`` (or for every model) among ``blocks``."""
    if not blocks:
        return True
    b = blocks.get(ALL_MODELS)
    if b is not None and (b.until is None or b.until > now):
        return False
    b = blocks.get(model)
    return b is None or not (b.until is None or b.until > now)


def _eligible(cred: Credential, health: Health, model: str, now: float, exclude: Collection[str]) -> bool:
    return (not exclude or cred.name not in exclude) and _free(health.blocks, model, now)


class Pool:
    """The credentials of one provider, with their health and the pool's selection strategy."""

    def __init__(self, config: PoolConfig, *, rng: random.Random | None = None, previous: Pool | None = None):
        self.name = config.name
        self.namespace = config.namespace
        self.provider = config.provider
        self.strategy = config.strategy
        self.cooldowns: CooldownConfig = config.cooldowns
        self.share_cooldowns = config.share_cooldowns
        self.rate_limit_scope = config.rate_limit_scope
        self._pool_wide = config.rate_limit_scope is RateLimitScope.POOL
        # Consecutive pool-wide rate limits per model (Pool scope; per-credential strikes otherwise).
        self._pool_strikes: dict[str, int] = {}
        self.credentials: tuple[Credential, ...] = tuple(
            Credential(
                name=c.name, key=c.key, fingerprint=c.fingerprint, priority=c.priority, base_url=c.base_url
            )
            for c in config.credentials
        )
        self._rng = rng or random.Random()
        self._cursor = 0
        self.health: dict[str, Health] = {}
        for cred in self.credentials:
            old = previous.carry_over(cred) if previous is not None else None
            self.health[cred.name] = old if old is not None else Health()
        # Per-credential health in credential order, for selection without dict lookups. The mapping
        # above is never rebound after this (state changes mutate the Health objects).
        self._healths: tuple[Health, ...] = tuple(self.health[c.name] for c in self.credentials)

    def carry_over(self, cred: Credential) -> Health | None:
        """This pool's state for ``cred`` if the same credential (name and key value) is here."""
        for mine in self.credentials:
            if mine.name == cred.name and mine.fingerprint == cred.fingerprint:
                health = self.health[mine.name]
                health.in_flight = 0  # leases of the old pool are released on the old pool
                return health
        return None

    # --- selection ------------------------------------------------------------------------------

    def usable(self, cred: Credential, model: str, now: float) -> bool:
        """Whether ``cred`` may be sent for ``model`` at ``now``."""
        return _free(self.health[cred.name].blocks, model, now)

    def acquire(self, model: str, now: float, exclude: Collection[str] = ()) -> Lease | None:
        """Lease the next credential for ``model`` by the pool's strategy, or ``None`` if none is usable.

        One pass over the credentials and no allocation but the lease: this runs on every request.
        """
        creds = self.credentials
        healths = self._healths
        n = len(creds)
        chosen = -1
        strategy = self.strategy
        if strategy is _FILL_FIRST:  # the default: the first usable key in priority order
            for i in range(n):
                h = healths[i]
                # A key with no block when nothing is excluded (the usual case) needs no call.
                if (not h.blocks and not exclude) or _eligible(creds[i], h, model, now, exclude):
                    chosen = i
                    break
        elif strategy is Strategy.ROUND_ROBIN:
            # The first usable key at or after the cursor, circularly.
            start = self._cursor
            for step in range(n):
                i = (start + step) % n
                if _eligible(creds[i], healths[i], model, now, exclude):
                    chosen = i
                    self._cursor = (i + 1) % n
                    break
        elif strategy is Strategy.LEAST_USED:
            best: tuple[int, int] | None = None
            for i in range(n):
                h = healths[i]
                if _eligible(creds[i], h, model, now, exclude) and (
                    best is None or (h.in_flight, h.uses) < best
                ):
                    chosen, best = i, (h.in_flight, h.uses)
        else:  # Random
            count = 0
            for i in range(n):
                if _eligible(creds[i], healths[i], model, now, exclude):
                    count += 1
                    chosen = i
            if count > 1:
                # As ``rng.choice`` over the usable keys would pick (same draw), without the list.
                k = self._rng.randrange(count)
                for i in range(n):
                    if _eligible(creds[i], healths[i], model, now, exclude):
                        if k == 0:
                            chosen = i
                            break
                        k -= 1
        if chosen < 0:
            return None
        health = healths[chosen]
        health.in_flight += 1
        health.uses += 1
        return Lease(self, creds[chosen], model, health.epoch)  # by position: see Attempt

    def release(self, lease: Lease) -> None:
        """End a lease (the attempt is over, whatever its outcome)."""
        health = self.health.get(lease.credential.name)
        if health is not None and health.in_flight > 0 and lease.pool is self:
            health.in_flight -= 1

    def earliest_available(self, model: str, now: float) -> float | None:
        """When some credential becomes usable for ``model`` (``now`` if one is); ``None`` if none ever will."""
        best: float | None = None
        for cred in self.credentials:
            blocks = self.health[cred.name].blocks
            until = now
            for scope in (ALL_MODELS, model):
                b = blocks.get(scope)
                if b is not None and b.active(now):
                    if b.until is None:
                        until = float("inf")
                        break
                    until = max(until, b.until)
            if until != float("inf") and (best is None or until < best):
                best = until
        return best

    def blocking_class(self, model: str, now: float) -> ErrorClass | None:
        """The class of the block that ends soonest for ``model``: why this pool has nothing to offer."""
        found: tuple[float, ErrorClass] | None = None
        for cred in self.credentials:
            for scope in (ALL_MODELS, model):
                b = self.health[cred.name].blocks.get(scope)
                if b is not None and b.active(now):
                    key = b.until if b.until is not None else float("inf")
                    if found is None or key < found[0]:
                        found = (key, b.error_class)
        return found[1] if found else None

    # --- outcomes -------------------------------------------------------------------------------

    def record_success(self, lease: Lease, now: float) -> None:
        """The credential answered: its rate-limit streak for this model ends. (No action: a key is
        restored by time, :meth:`expire`, not by a success.)"""
        health = self._own(lease)
        if health is None:
            return
        health.strikes.pop(lease.model, None)
        if self._pool_strikes:
            self._pool_strikes.pop(lease.model, None)
        health.last_status = 200

    def record_failure(self, lease: Lease, verdict: Classification, now: float) -> list[Action]:
        """Apply a failure to the credential that was sent. Provider-level classes leave it alone."""
        health = self._own(lease)
        cls = verdict.error_class
        state = _STATE_FOR.get(cls)
        if health is None or state is None:
            return []
        cred = lease.credential
        health.last_status = verdict.status
        if self._pool_wide and cls is ErrorClass.RATE_LIMITED:
            return self._record_pool_limit(lease, health, verdict, now)
        scope = lease.model if cls in _PER_MODEL else ALL_MODELS
        current = health.blocks.get(scope)
        if current is not None and current.active(now) and lease.epoch != health.epoch:
            # Reported through a lease taken before the current block: same incident, not a new one.
            # A later provider reset may still extend it.
            if (
                verdict.reset_at is not None
                and current.until is not None
                and verdict.reset_at > current.until
            ):
                current.until = self._cap(verdict.reset_at, now, cls)
            return []
        if cls is ErrorClass.RATE_LIMITED:
            health.strikes[scope] = health.strikes.get(scope, 0) + 1
        until = self._until(cls, verdict.reset_at, health.strikes.get(scope, 1), now)
        health.blocks[scope] = Block(
            state=state, error_class=cls, since=now, until=until, status=verdict.status
        )
        health.epoch += 1
        return [
            Action(
                kind=_ACTION_FOR[state],
                at=now,
                namespace=self.namespace,
                object_name=self.name,
                error_class=cls,
                credential=cred.name,
                fingerprint=cred.fingerprint,
                until=until,
                model=lease.model if scope != ALL_MODELS else None,
                status=verdict.status,
                message=verdict.message,
            )
        ]

    def _record_pool_limit(
        self, lease: Lease, health: Health, verdict: Classification, now: float
    ) -> list[Action]:
        """A rate limit the pool's keys share: block ``lease.model`` on every credential at once."""
        model = lease.model
        cls = ErrorClass.RATE_LIMITED
        current = health.blocks.get(model)
        if current is not None and current.active(now) and lease.epoch != health.epoch:
            # A lease taken before the current block: the same incident. A later reset extends it,
            # on every key that holds it.
            reset = verdict.reset_at
            if reset is not None and current.until is not None and reset > current.until:
                extended = self._cap(reset, now, cls)
                for h in self.health.values():
                    b = h.blocks.get(model)
                    if b is not None and b.pool_wide and b.until is not None:
                        b.until = max(b.until, extended)
            return []
        strikes = self._pool_strikes[model] = self._pool_strikes.get(model, 0) + 1
        until = self._until(cls, verdict.reset_at, strikes, now)
        assert until is not None  # a rate limit always ends
        for c in self.credentials:
            h = self.health[c.name]
            existing = h.blocks.get(model)
            if existing is not None and existing.active(now) and (existing.until or float("inf")) >= until:
                continue  # a longer block this key already holds stays
            h.blocks[model] = Block(
                state=CredentialState.COOLING_DOWN,
                error_class=cls,
                since=now,
                until=until,
                status=verdict.status,
                pool_wide=True,
            )
            h.epoch += 1
        cred = lease.credential
        return [
            Action(
                kind=ActionKind.COOLED_DOWN,
                at=now,
                namespace=self.namespace,
                object_name=self.name,
                error_class=cls,
                credential=cred.name,
                fingerprint=cred.fingerprint,
                until=until,
                model=model,
                status=verdict.status,
                message=verdict.message,
                scope=RateLimitScope.POOL,
            )
        ]

    def _own(self, lease: Lease) -> Health | None:
        # A lease from a pool replaced by a reload must not touch this pool's state.
        if lease.pool is not self:
            return None
        return self.health.get(lease.credential.name)

    def _until(self, cls: ErrorClass, reset_at: float | None, strikes: int, now: float) -> float | None:
        cd = self.cooldowns
        if cls is ErrorClass.REVOKED:
            return None
        if cls is ErrorClass.BILLING:
            return max(now + cd.billing, reset_at or 0.0)
        if reset_at is not None and reset_at > now:
            until = reset_at
        elif cls is ErrorClass.RATE_LIMITED:
            until = now + min(cd.rate_limited * 2 ** max(strikes - 1, 0), cd.max)
        elif cls is ErrorClass.USAGE_LIMIT:
            until = now + cd.max
        else:  # AUTH_FAILED
            until = now + cd.auth_failed
        return self._cap(until, now, cls)

    def _cap(self, until: float, now: float, cls: ErrorClass) -> float:
        if cls is not ErrorClass.BILLING and self.usable_count() <= 1:
            return min(until, now + SOLE_KEY_CAP)
        return until

    def usable_count(self) -> int:
        """Credentials that are not rejected or exhausted: what the sole-key cap counts."""
        n = 0
        for cred in self.credentials:
            b = self.health[cred.name].blocks.get(ALL_MODELS)
            if b is None or b.state is CredentialState.COOLING_DOWN:
                n += 1
        return n

    # --- time and state -------------------------------------------------------------------------

    def expire(self, now: float) -> list[Action]:
        """Drop blocks whose time has passed, returning a restoration action for each credential freed
        by this sidecar's own block (blocks adopted from other pods end silently)."""
        actions: list[Action] = []
        pool_wide_ended: dict[str, Block] = {}
        for cred in self.credentials:
            blocks = self.health[cred.name].blocks
            ended = [s for s, b in blocks.items() if not b.active(now)]
            for scope in ended:
                b = blocks.pop(scope)
                if b.reported_by is not None:
                    continue  # another pod's block: restoring it is that pod's report to make
                if b.pool_wide:
                    pool_wide_ended.setdefault(scope, b)  # one action for the pool, not one per key
                    continue
                actions.append(
                    Action(
                        kind=ActionKind.RESTORED,
                        at=now,
                        namespace=self.namespace,
                        object_name=self.name,
                        error_class=b.error_class,
                        credential=cred.name,
                        fingerprint=cred.fingerprint,
                        model=scope if scope != ALL_MODELS else None,
                        message=f"was {b.state}",
                    )
                )
        for scope, b in pool_wide_ended.items():
            actions.append(
                Action(
                    kind=ActionKind.RESTORED,
                    at=now,
                    namespace=self.namespace,
                    object_name=self.name,
                    error_class=b.error_class,
                    model=scope if scope != ALL_MODELS else None,
                    message=f"was {b.state}",
                    scope=RateLimitScope.POOL,
                )
            )
        return actions

    def state(self, name: str, now: float) -> tuple[CredentialState, Block | None]:
        """The credential's state as status reports it: the all-model block first, else any model's."""
        blocks = self.health[name].blocks
        b = blocks.get(ALL_MODELS)
        if b is not None and b.active(now):
            return b.state, b
        for scope, b in blocks.items():
            if scope != ALL_MODELS and b.active(now):
                return b.state, b
        return CredentialState.AVAILABLE, None

    def apply_block(self, name: str, fingerprint: str, block: Block, model: str | None = None) -> bool:
        """Adopt a block another pod reported (fleet cooldowns). Ignored if the key value differs."""
        cred = next((c for c in self.credentials if c.name == name), None)
        if cred is None or cred.fingerprint != fingerprint:
            return False
        health = self.health[name]
        scope = model or ALL_MODELS
        current = health.blocks.get(scope)
        if current is not None and current.active(block.since):
            # Never shorten what this pod knows (a rejection has no end), and adopt the same block once.
            ends = float("inf") if current.until is None else current.until
            if ends >= (float("inf") if block.until is None else block.until):
                return False
        health.blocks[scope] = block
        health.epoch += 1
        return True

    def snapshot(self, now: float) -> Iterable[tuple[Credential, CredentialState, Block | None]]:
        """Every credential with its current state, in priority order."""
        for cred in self.credentials:
            st, block = self.state(cred.name, now)
            yield cred, st, block
