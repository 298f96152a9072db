"""A provider chain at run time: its entries (each owning its provider's pool) and, per requested model,
which entry serves and when a failed entry may be probed again.

Structure carries the invariant (docs/README.md): an :class:`Entry` is built with its pool and refuses a pool
of another provider; a request attempt is (entry, lease, base URL) and the base URL comes from that
entry or from the leased credential's own override. There is no "current pool" or "current base URL"
anywhere, so nothing one provider does can change another provider's host or keys.

Restore (docs/resources.md ``fallback.restoreAfter``): an entry a request had to leave is skipped until its
restore time; the first request after that probes it with the real call (one probe at a time per
model and entry); a success clears it. The same rule serves every entry, the primary included, so a
chain of three degrades and recovers one step at a time. Entries still waiting are tried last, as a
last resort, except after a ``Timeout``: a silent route is never retried.

Restore cadence (decision; the spec's "doubled on each failed restore, capped at 4 h" kept traffic on
a fallback, often the dearer provider, for up to hours after the primary had recovered). After a
failed probe the next one comes after ``outage so far / 8``, never less than ``restoreAfter`` and never
more than ``restoreMax`` (default 90 s), then ±10 % jitter. So:

- the time spent on the fallback after the primary recovers is at most an eighth of the outage's
  length, bounded by ``restoreMax`` + 10 % + the gap to the next request: within 15 s for
  ``restoreAfter: 10s`` after a 60 s outage with a request every 4 s, within 2 min with the defaults
  after an outage of any length (``tests/unit/test_restore.py`` measures both);
- the share of requests that pay for a failing probe (one extra round trip, or ``firstByte`` for a
  silent entry) still falls as an outage drags on, which is what the doubling was for;
- the jitter is symmetric and bounded, so sidecars that lost the primary together do not probe it in
  lockstep, and the average wait is the nominal one.

Probes ride on agent requests; there are no synthetic ones. A probe must exercise what failed (this
model, this endpoint), which only the agent's own request does: a ``GET /models`` answered 200 by a
provider whose completions answer 503 would bring traffic back to a broken primary, and a synthetic
completion spends tokens and needs a body for every endpoint and dialect. A sidecar with no traffic
has nothing to restore.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from keyroute.core.actions import Action, ActionKind
from keyroute.core.classes import ErrorClass
from keyroute.core.config import SidecarConfig
from keyroute.core.enums import ApiStyle
from keyroute.core.pools import Credential, Pool


@dataclass(frozen=True, slots=True)
class Entry:
    """One provider of the chain, bound to its own pool."""

    index: int
    name: str
    provider: str
    api: ApiStyle
    base_url: str
    pool: Pool
    models: Mapping[str, str]
    connect: float
    first_byte: float
    idle: float
    first_token: float | None = None  # off unless set: see keyroute.core.resources.Timeouts

    def __post_init__(self) -> None:
        if self.pool.provider != self.provider:
            raise ValueError(
                f"entry {self.name} is provider {self.provider}; pool {self.pool.name} belongs to {self.pool.provider}"
            )

    def upstream_model(self, model: str) -> str:
        """The model id to send to this provider for the model the agent asked for (none: none)."""
        if not self.models or not model:
            return model
        return self.models.get(model) or self.models.get("*") or model

    def base_url_for(self, cred: Credential) -> str:
        """The base URL of an attempt: the credential's override (same provider) or the entry's."""
        return cred.base_url or self.base_url


#: Per-model states one chain keeps at most. Model names are the agent's strings; a chain really serves
#: a few dozen. Past this, the oldest state that is not on a fallback is forgotten for a new one; if
#: every state is on a fallback (reported, so only the primary serving the model again may end it),
#: a new model gets none (docs/errors.md, "Scope").
MAX_MODEL_STATES = 1024

#: After a failed probe, the next one waits this share of the outage so far (within restoreAfter..restoreMax).
RESTORE_GROWTH = 1 / 8
#: Every restore wait is scaled by a uniform factor in [1 - RESTORE_JITTER, 1 + RESTORE_JITTER].
RESTORE_JITTER = 0.1


@dataclass(slots=True)
class Restore:
    """An entry a request had to leave: since when, how long the current wait is, and when to probe."""

    since: float  # the first failure of this outage
    wait: float  # the nominal wait before ``restore_at`` (jitter excluded)
    restore_at: float
    reason: ErrorClass | None
    probing: bool = False


@dataclass(slots=True)
class ModelState:
    """Chain state for one requested model: docs/errors.md keeps fallback and restore per model."""

    serving: str | None = None
    restores: dict[str, Restore] = field(default_factory=dict)


class Chain:
    """The chain's entries and per-model routing state."""

    def __init__(
        self, config: SidecarConfig, *, rng: random.Random | None = None, previous: Chain | None = None
    ):
        self.config = config
        # One generator per chain: seeding one per request costs an os.urandom call on the hot path.
        self.rng = rng or random.Random()
        self.name = config.chain.name
        self.namespace = config.chain.namespace
        self.fallback = config.fallback
        self.request_timeout = config.request_timeout
        old_pools = previous.pools if previous is not None else {}
        self.pools: dict[str, Pool] = {
            p.name: Pool(p, rng=self.rng, previous=old_pools.get(p.name)) for p in config.pools
        }
        self.entries: tuple[Entry, ...] = tuple(
            Entry(
                index=i,
                name=e.name,
                provider=e.provider,
                api=e.api,
                base_url=e.base_url.rstrip("/"),
                pool=self.pools[e.pool],
                models=dict(e.models),
                connect=e.timeouts.connect,
                first_byte=e.timeouts.first_byte,
                idle=e.timeouts.idle,
                first_token=e.timeouts.first_token,
            )
            for i, e in enumerate(config.entries)
        )
        self.by_name = {e.name: e for e in self.entries}
        triggers = config.fallback.triggers
        self.fallback_triggers = frozenset(triggers) if triggers is not None else None
        self.models: dict[str, ModelState] = {}
        self.state_refusals = 0  # failures and fallbacks not remembered: every state on a fallback
        if previous is not None:
            self.state_refusals = previous.state_refusals
            # Keep routing state for entries that still exist; a removed entry's state goes with it.
            for model, st in previous.models.items():
                kept = {n: r for n, r in st.restores.items() if n in self.by_name}
                for r in kept.values():
                    r.probing = False
                serving = st.serving if st.serving in self.by_name else None
                self.models[model] = ModelState(serving=serving, restores=kept)

    @property
    def primary(self) -> Entry | None:
        return self.entries[0] if self.entries else None

    def state(self, model: str) -> ModelState | None:
        """``model``'s state, made if it has none. Only a failure or a fallback makes one: the model
        is the agent's string, so a state per model ever asked for would grow without bound. None when
        :data:`MAX_MODEL_STATES` are kept and all of them are on a fallback."""
        st = self.models.get(model)
        if st is None:
            if len(self.models) >= MAX_MODEL_STATES and not self._forget_one():
                self.state_refusals += 1
                return None
            st = self.models[model] = ModelState()
        return st

    def _forget_one(self) -> bool:
        """Forget the oldest state that is not on a fallback (nothing reported depends on it)."""
        primary = self.primary.name if self.primary else None
        for model, st in self.models.items():
            if st.serving is None or st.serving == primary:
                del self.models[model]  # and stop iterating: the dict just changed
                return True
        return False

    def plan(self, model: str, now: float) -> tuple[Sequence[Entry], list[Entry]]:
        """Entries to try for a new request, in order, and the probes this request claimed.

        Entries waiting for their restore time come last (never those that went silent); an entry
        whose restore time has passed is probed by this request unless another already is.
        """
        st = self.models.get(model)
        if st is None or not st.restores:
            # Nothing waiting to be restored (the usual case): the chain's order as it is, no copy.
            return self.entries, []
        ready: list[Entry] = []
        waiting: list[Entry] = []
        probes: list[Entry] = []
        for e in self.entries:
            r = st.restores.get(e.name)
            if r is None:
                ready.append(e)
            elif r.restore_at <= now and not r.probing:
                r.probing = True
                probes.append(e)
                ready.append(e)
            elif r.reason is not ErrorClass.TIMEOUT:
                waiting.append(e)
        return ready + waiting, probes

    def release_probe(self, model: str, entry: Entry) -> None:
        """A claimed probe that never reached its entry: let the next request probe it."""
        st = self.models.get(model)
        r = st.restores.get(entry.name) if st is not None else None
        if r is not None:
            r.probing = False

    def entry_failed(self, model: str, entry: Entry, cls: ErrorClass, now: float) -> None:
        """A request left ``entry`` because of ``cls``: start (or lengthen) its restore wait."""
        st = self.state(model)
        if st is None:
            return  # no room: the entry is tried first again (docs/errors.md, "Scope")
        r = st.restores.get(entry.name)
        if r is None:
            wait = self.fallback.restore_after
            st.restores[entry.name] = Restore(
                since=now, wait=wait, restore_at=now + self._jittered(wait), reason=cls
            )
            return
        if r.restore_at > now and not r.probing:
            return  # already waiting; a request that was in flight does not extend the wait
        r.wait = self.restore_wait(now - r.since)
        r.restore_at = now + self._jittered(r.wait)
        r.reason = cls
        r.probing = False

    def restore_wait(self, outage: float) -> float:
        """The nominal wait before the next probe of an entry that has been failing for ``outage`` s."""
        fb = self.fallback
        # restoreAfter is the floor even if restoreMax was set below it.
        return max(fb.restore_after, min(outage * RESTORE_GROWTH, fb.restore_max))

    def _jittered(self, wait: float) -> float:
        return wait * self.rng.uniform(1 - RESTORE_JITTER, 1 + RESTORE_JITTER)

    def served(self, model: str, entry: Entry, now: float, reason: ErrorClass | None) -> list[Action]:
        """``entry`` answered a request for ``model``: clear its wait, and report a change of serving entry."""
        primary = self.primary
        st = self.models.get(model)
        if st is None:
            if primary is not None and entry.name == primary.name:
                return []  # the usual case: served where it always was, nothing to keep
            st = self.state(model)
            if st is None:
                return []  # no room: served, but not remembered or reported (counted in state_refusals)
        st.restores.pop(entry.name, None)
        previous = st.serving or (primary.name if primary else None)
        st.serving = entry.name
        if not st.restores and primary is not None and entry.name == primary.name:
            # Back on the primary with nothing waiting: the same as no state at all.
            del self.models[model]
        if previous == entry.name:
            return []
        if primary is not None and entry.name == primary.name:
            return [
                Action(
                    kind=ActionKind.PRIMARY_RESTORED,
                    at=now,
                    namespace=self.namespace,
                    object_name=self.name,
                    model=model or None,
                    from_entry=previous,
                    to_entry=entry.name,
                )
            ]
        return [
            Action(
                kind=ActionKind.FALLBACK_ACTIVATED,
                at=now,
                namespace=self.namespace,
                object_name=self.name,
                error_class=reason,
                model=model or None,
                from_entry=previous,
                to_entry=entry.name,
            )
        ]

    def on_fallback(self, model: str) -> bool:
        """Whether ``model`` is served by an entry other than the primary."""
        st = self.models.get(model)
        primary = self.primary
        return bool(st and st.serving and primary and st.serving != primary.name)

    def earliest_usable(self, model: str, now: float) -> float | None:
        """When any entry of the chain could next serve ``model``: the soonest key or restore time."""
        best: float | None = None
        st = self.models.get(model)
        for e in self.entries:
            t = e.pool.earliest_available(e.upstream_model(model), now)
            if t is None:
                continue
            r = st.restores.get(e.name) if st else None
            if r is not None and r.reason is ErrorClass.TIMEOUT:
                # Other waiting entries are still tried as a last resort; a silent one is not.
                t = max(t, r.restore_at)
            if best is None or t < best:
                best = t
        return best

    def expire(self, now: float) -> list[Action]:
        """Time-driven transitions of every pool (cooldowns that ended)."""
        out: list[Action] = []
        for pool in self.pools.values():
            out.extend(pool.expire(now))
        return out
