"""The status the operator writes on CredentialPools and ProviderChains, folded from facts.

Pure: the resolved pool (which Secrets and keys exist), the render result (which entries route) and,
later, the sidecars' reports go in; the whole ``status`` object comes out. The operator is its only
writer (SPEC §5), and writes it only when it differs from what is there, so an unchanged object costs
no API writes.

Condition reasons, for ``kubectl describe`` and the README:

CredentialPool
- ``Ready``: ``CredentialsAvailable`` | ``NoCredentialAvailable`` | ``InvalidSpec``
- ``Degraded``: ``AllCredentialsAvailable`` | the reason of the first unavailable credential
  (``SecretNotFound``, ``SecretKeyMissing``, or an error class such as ``RateLimited``)
- ``Exhausted``: ``CredentialsAvailable`` | the error class that benched the keys (every credential
  that exists is cooling down, exhausted or rejected)

ProviderChain
- ``Ready``: ``AllProvidersRoutable`` | ``PoolNotFound`` | ``PoolProviderMismatch`` |
  ``NoUsableCredentials`` | ``InvalidSpec``
- ``FallbackActive``: ``NoFallbackReported`` until sidecars report
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keyroute.core.conditions import Fact, condition, fact, merge_conditions
from keyroute.core.render import RenderResult, ResolvedPool
from keyroute.core.resources import CredentialPool, CredentialState, ProviderChain

READY = "Ready"
DEGRADED = "Degraded"
EXHAUSTED = "Exhausted"
FALLBACK_ACTIVE = "FallbackActive"
INVALID_SPEC = "InvalidSpec"


def rfc3339(ts: float) -> str:
    """Kubernetes' time format, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def config_secret_name(chain_name: str) -> str:
    """The Secret holding a chain's rendered sidecar config (SPEC §8)."""
    return f"{chain_name}-keyroute"


@dataclass(frozen=True, slots=True)
class Reported:
    """A credential state reported by a sidecar (cooling down, exhausted, rejected), until ``until``."""

    state: CredentialState
    reason: str
    until: float | None
    fingerprint: str
    last_error_code: int | None = None
    reported_by: str | None = None


def pool_status(
    pool: CredentialPool,
    resolved: ResolvedPool,
    *,
    old: Mapping[str, Any] | None,
    now: float,
    reported: Mapping[str, Reported] | None = None,
) -> dict[str, Any]:
    """The pool's whole status. A report counts only while its ``until`` is ahead and its
    fingerprint matches the key the Secret holds now (a rotated key starts healthy)."""
    old = old or {}
    stamp = rfc3339(now)
    previous = {c.get("name"): c for c in old.get("credentials") or [] if isinstance(c, Mapping)}
    missing = {x.credential: x for x in resolved.missing}
    present = {c.name: c for c in resolved.credentials}
    rows: list[dict[str, Any]] = []
    unavailable: list[tuple[str, str, str]] = []  # (credential, reason, message)
    runtime_reasons: list[str] = []  # credentials benched by sidecar reports
    for spec in pool.spec.credentials:
        row: dict[str, Any] = {"name": spec.name}
        gone = missing.get(spec.name)
        cred = present.get(spec.name)
        if gone is not None or cred is None:
            reason = gone.reason if gone else "SecretNotFound"
            row.update(state=str(CredentialState.MISSING), reason=reason)
            unavailable.append((spec.name, reason, gone.message if gone else ""))
        else:
            row["fingerprint"] = cred.fingerprint
            rep = (reported or {}).get(spec.name)
            if (
                rep is not None
                and rep.fingerprint == cred.fingerprint
                and (rep.until is None or rep.until > now)
            ):
                row.update(state=str(rep.state), reason=rep.reason)
                if rep.until is not None:
                    row["until"] = rfc3339(rep.until)
                if rep.last_error_code is not None:
                    row["lastErrorCode"] = rep.last_error_code
                if rep.reported_by:
                    row["reportedBy"] = rep.reported_by
                unavailable.append((spec.name, rep.reason, f"{rep.state}"))
                runtime_reasons.append(rep.reason)
            else:
                row["state"] = str(CredentialState.AVAILABLE)
        before = previous.get(spec.name)
        same = (
            before is not None
            and before.get("state") == row["state"]
            and before.get("reason") == row.get("reason")
        )
        row["lastTransitionTime"] = before.get("lastTransitionTime", stamp) if same and before else stamp
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
    return {
        "observedGeneration": pool.metadata.generation,
        "conditions": merge_conditions(
            old.get("conditions"), facts, now=stamp, generation=pool.metadata.generation
        ),
        "available": available,
        "total": total,
        "credentials": rows,
    }


def chain_status(
    chain: ProviderChain,
    result: RenderResult,
    *,
    old: Mapping[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    """The chain's status after rendering: readiness, rendered config name and hash."""
    old = old or {}
    stamp = rfc3339(now)
    cfg = result.config
    excluded = result.excluded_entries
    if excluded:
        ready = fact(READY, False, excluded[0].reason, "; ".join(x.message for x in excluded))
    elif not cfg.entries:
        ready = fact(READY, False, "NoRoutableProvider", "no entry of the chain can be routed")
    else:
        ready = fact(
            READY,
            True,
            "AllProvidersRoutable",
            f"{len(cfg.entries)} providers routable: " + ", ".join(e.name for e in cfg.entries),
        )
    facts: list[Fact] = [ready]
    if condition(old.get("conditions"), FALLBACK_ACTIVE) is None:
        facts.append(fact(FALLBACK_ACTIVE, False, "NoFallbackReported", "no sidecar has reported a fallback"))
    status: dict[str, Any] = {
        "observedGeneration": chain.metadata.generation,
        "conditions": merge_conditions(
            old.get("conditions"), facts, now=stamp, generation=chain.metadata.generation
        ),
        "config": {"name": config_secret_name(chain.name), "hash": cfg.content_hash()},
    }
    active = old.get("activeProvider")
    routable = {e.name for e in cfg.entries}
    status["activeProvider"] = (
        active if active in routable else (cfg.entries[0].name if cfg.entries else None)
    )
    for keep in ("sidecars", "sidecarsOnFallback", "lastFallback"):
        if keep in old:
            status[keep] = old[keep]
    return status


def invalid_status(
    old: Mapping[str, Any] | None, message: str, *, now: float, generation: int | None
) -> dict[str, Any]:
    """Status for an object whose spec does not validate: ``Ready=False``, reason ``InvalidSpec``."""
    old = old or {}
    conditions = merge_conditions(
        old.get("conditions"),
        [fact(READY, False, INVALID_SPEC, message)],
        now=rfc3339(now),
        generation=generation,
    )
    return {"observedGeneration": generation, "conditions": conditions}


def _describe(unavailable: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{name}: {msg or reason}" for name, reason, msg in unavailable)


def _dominant(reasons: list[str]) -> str:
    return max(sorted(set(reasons)), key=reasons.count) if reasons else "CredentialsUnavailable"
