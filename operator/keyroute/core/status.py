"""The status the operator writes on CredentialPools and ProviderChains, folded from facts.

Pure: the resolved pool (which Secrets and keys exist), the render result (which entries route) and,
later, the sidecars' reports go in; the whole ``status`` object comes out. The operator is its only
writer (docs/reporting.md), and writes it only when it differs from what is there, so an unchanged object costs
no API writes.

Condition reasons, for ``kubectl describe`` and the README:

CredentialPool
- ``Ready``: ``CredentialsAvailable`` | ``NoCredentialAvailable`` | ``InvalidSpec`` | ``InvalidName``
- ``Degraded``: ``AllCredentialsAvailable`` | the reason of the first unavailable credential
  (``SecretNotFound``, ``SecretKeyMissing``, or an error class such as ``RateLimited``)
- ``Exhausted``: ``CredentialsAvailable`` | the error class that benched the keys (every credential
  that exists is cooling down, exhausted or rejected)

ProviderChain
- ``Ready``: ``AllProvidersRoutable`` | ``PoolNotFound`` | ``PoolProviderMismatch`` |
  ``NoUsableCredentials`` | ``NoRoutableProvider`` (no entry routes; before the others) |
  ``InvalidSpec`` | ``InvalidName`` (a name that cannot work,
  :mod:`keyroute.core.names`: nothing is rendered)
- ``FallbackActive``: ``True`` with the error class that moved the latest pod off its entry
  (``ServerError``, ``RateLimited``, ...) while any reporting sidecar serves a model from a
  fallback; ``False`` with ``PrimaryServing`` (sidecars report, none on a fallback) or
  ``NoFallbackReported`` (no sidecar is reporting)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keyroute.core.actions import rfc3339
from keyroute.core.conditions import Fact, condition, fact, merge_conditions
from keyroute.core.names import INVALID_NAME as INVALID_NAME
from keyroute.core.render import RenderResult, ResolvedPool
from keyroute.core.reports import POOL_WIDE, ChainSummary, CredentialReport, outranks
from keyroute.core.resources import CredentialPool, CredentialState, ProviderChain, RateLimitScope

READY = "Ready"
DEGRADED = "Degraded"
EXHAUSTED = "Exhausted"
FALLBACK_ACTIVE = "FallbackActive"
INVALID_SPEC = "InvalidSpec"


def config_secret_name(chain_name: str) -> str:
    """The Secret holding a chain's rendered sidecar config (docs/injection.md)."""
    return f"{chain_name}-keyroute"


def pool_status(
    pool: CredentialPool,
    resolved: ResolvedPool,
    *,
    old: Mapping[str, Any] | None,
    now: float,
    reported: Mapping[str, CredentialReport] | None = None,
) -> dict[str, Any]:
    """The pool's whole status. ``reported`` is what sidecars reported, per credential
    (:meth:`~keyroute.core.reports.ReportBook.pool_reports`). A report counts only while its
    ``until`` is ahead and its fingerprint matches the key the Secret holds now (a rotated key
    starts healthy)."""
    old = old or {}
    stamp = rfc3339(now)
    previous = {c.get("name"): c for c in old.get("credentials") or [] if isinstance(c, Mapping)}
    missing = {x.credential: x for x in resolved.missing}
    present = {c.name: c for c in resolved.credentials}
    reported = reported or {}
    pool_wide = reported.get(POOL_WIDE)
    if pool_wide is not None and pool_wide.until is not None and pool_wide.until <= now:
        pool_wide = None
    rows: list[dict[str, Any]] = []
    unavailable: list[tuple[str, str, str]] = []  # (credential, reason, message)
    back_at: list[float] = []  # the ``until`` of each benched credential
    runtime_reasons: list[str] = []  # credentials benched by sidecar reports
    for spec in pool.spec.credentials:
        row: dict[str, Any] = {"name": spec.name}
        gone = missing.get(spec.name)
        cred = present.get(spec.name)
        rep = None
        if gone is not None or cred is None:
            reason = gone.reason if gone else "SecretNotFound"
            row.update(state=str(CredentialState.MISSING), reason=reason)
            unavailable.append((spec.name, reason, gone.message if gone else ""))
        else:
            row["fingerprint"] = cred.fingerprint
            rep = reported.get(spec.name)
            if rep is not None and (
                rep.fingerprint != cred.fingerprint or (rep.until is not None and rep.until <= now)
            ):
                rep = None
            # A pool-wide limit holds whatever the key value: it is the organization's, not the key's.
            if pool_wide is not None and (rep is None or outranks(pool_wide, rep)):
                rep = pool_wide
            if rep is not None:
                row.update(state=str(rep.state), reason=rep.reason)
                if rep.until is not None:
                    row["until"] = rfc3339(rep.until)
                    back_at.append(rep.until)
                if rep.status is not None:
                    row["lastErrorCode"] = rep.status
                if rep.pod:
                    row["reportedBy"] = rep.pod
                if rep.model:
                    row["model"] = rep.model
                shared = rep.scope is RateLimitScope.POOL
                if shared:
                    row["scope"] = str(RateLimitScope.POOL)
                unavailable.append(
                    (
                        spec.name,
                        rep.reason,
                        f"{rep.state} (pool-wide rate limit)" if shared else f"{rep.state}",
                    )
                )
                runtime_reasons.append(rep.reason)
            else:
                row["state"] = str(CredentialState.AVAILABLE)
                rep = None
        before = previous.get(spec.name)
        same = (
            before is not None
            and before.get("state") == row["state"]
            and before.get("reason") == row.get("reason")
        )
        if same and before:
            row["lastTransitionTime"] = before.get("lastTransitionTime", stamp)
        else:
            # A reported state changed when the sidecar saw it, not when the operator wrote it.
            row["lastTransitionTime"] = rfc3339(min(rep.at, now)) if rep is not None else stamp
        rows.append(row)
    total = len(rows)
    available = sum(1 for r in rows if r["state"] == CredentialState.AVAILABLE)
    facts = [
        fact(READY, True, "CredentialsAvailable", f"{available} of {total} credentials available")
        if available
        else fact(READY, False, "NoCredentialAvailable", _describe(unavailable) or "no credentials"),
        fact(DEGRADED, True, unavailable[0][1], _describe(unavailable))
        if unavailable
        else fact(DEGRADED, False, "AllCredentialsAvailable", f"all {total} credentials available"),
        fact(
            EXHAUSTED,
            True,
            _dominant(runtime_reasons),
            "every credential is cooling down, exhausted or rejected",
        )
        if available == 0 and runtime_reasons and len(runtime_reasons) == len(present)
        else fact(EXHAUSTED, False, "CredentialsAvailable", ""),
    ]
    status: dict[str, Any] = {
        "observedGeneration": pool.metadata.generation,
        "conditions": merge_conditions(
            old.get("conditions"), facts, now=stamp, generation=pool.metadata.generation
        ),
        "available": available,
        "total": total,
        "credentials": rows,
    }
    if back_at:
        status["nextAvailableAt"] = rfc3339(min(back_at))
    return status


def chain_status(
    chain: ProviderChain,
    result: RenderResult,
    *,
    old: Mapping[str, Any] | None,
    now: float,
    summary: ChainSummary | None = None,
    config_hash: str | None = None,
) -> dict[str, Any]:
    """The chain's status: readiness and rendered config from the render, and what sidecars
    reported (``summary``, :meth:`~keyroute.core.reports.ReportBook.chain_summary`): how many report,
    how many run on a fallback, the entry serving, the latest fallback. ``config_hash``: the
    rendered config's :meth:`~keyroute.core.config.SidecarConfig.content_hash`, if the caller has it."""
    old = old or {}
    stamp = rfc3339(now)
    cfg = result.config
    excluded = result.excluded_entries
    if not cfg.entries:
        # Before the first exclusion's reason: a chain that routes nothing fails every request of its
        # pods, which an SRE (and an alert on the reason) must tell from one entry left out.
        why = "; ".join(x.message for x in excluded)
        ready = fact(
            READY,
            False,
            "NoRoutableProvider",
            "no entry of the chain can be routed" + (f": {why}" if why else ""),
        )
    elif excluded:
        ready = fact(READY, False, excluded[0].reason, "; ".join(x.message for x in excluded))
    else:
        ready = fact(
            READY,
            True,
            "AllProvidersRoutable",
            f"{len(cfg.entries)} providers routable: " + ", ".join(e.name for e in cfg.entries),
        )
    primary = cfg.entries[0].name if cfg.entries else None
    status: dict[str, Any] = {
        "observedGeneration": chain.metadata.generation,
        "config": {"name": config_secret_name(chain.name), "hash": config_hash or cfg.content_hash()},
        "activeProvider": primary,
    }
    facts: list[Fact] = [ready]
    if summary is None:
        # No report since the operator started: keep what earlier reports left.
        for keep in ("sidecars", "sidecarsOnFallback", "lastFallback"):
            if keep in old:
                status[keep] = old[keep]
        if old.get("activeProvider") in {e.name for e in cfg.entries}:
            status["activeProvider"] = old["activeProvider"]
        if condition(old.get("conditions"), FALLBACK_ACTIVE) is None:
            facts.append(
                fact(FALLBACK_ACTIVE, False, "NoFallbackReported", "no sidecar has reported a fallback")
            )
    else:
        status.update(_reported_chain_fields(summary, primary, {e.name for e in cfg.entries}))
        facts.append(_fallback_fact(summary, primary))
    status["conditions"] = merge_conditions(
        old.get("conditions"), facts, now=stamp, generation=chain.metadata.generation
    )
    return status


def _reported_chain_fields(summary: ChainSummary, primary: str | None, routable: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"sidecars": summary.sidecars, "sidecarsOnFallback": summary.on_fallback}
    if summary.active and summary.active in routable:
        out["activeProvider"] = summary.active
    last = summary.last_fallback
    if last is not None:
        out["lastFallback"] = {
            "from": last.from_entry,
            "to": last.to_entry,
            "reason": last.reason,
            "time": rfc3339(last.at),
            "pod": last.pod,
        }
    return out


def _fallback_fact(summary: ChainSummary, primary: str | None) -> Fact:
    if summary.on_fallback:
        return fact(
            FALLBACK_ACTIVE,
            True,
            summary.reason or "FallbackReported",
            f"{summary.on_fallback} of {summary.sidecars} reporting sidecars serve from a fallback "
            f"(latest: {summary.active}, primary {primary})",
        )
    if summary.sidecars:
        return fact(
            FALLBACK_ACTIVE,
            False,
            "PrimaryServing",
            f"all {summary.sidecars} reporting sidecars serve from the primary ({primary})",
        )
    return fact(FALLBACK_ACTIVE, False, "NoFallbackReported", "no sidecar is reporting on this chain")


def invalid_status(
    old: Mapping[str, Any] | None,
    message: str,
    *,
    now: float,
    generation: int | None,
    reason: str = INVALID_SPEC,
) -> dict[str, Any]:
    """Status for an object the operator cannot use: ``Ready=False``, reason ``InvalidSpec`` (the spec
    does not validate) or ``InvalidName`` (:data:`~keyroute.core.names.INVALID_NAME`)."""
    old = old or {}
    conditions = merge_conditions(
        old.get("conditions"),
        [fact(READY, False, reason, message)],
        now=rfc3339(now),
        generation=generation,
    )
    return {"observedGeneration": generation, "conditions": conditions}


def _describe(unavailable: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{name}: {msg or reason}" for name, reason, msg in unavailable)


def _dominant(reasons: list[str]) -> str:
    return max(sorted(set(reasons)), key=reasons.count) if reasons else "CredentialsUnavailable"
