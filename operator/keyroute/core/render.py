"""Render a ProviderChain, its CredentialPools and their Secrets into a :class:`SidecarConfig`.

The one function both the operator and the sidecar's local mode call, so a chain behaves the same
whether it came from the API server or from files. Pure: objects in, config and reasons out.

The binding rule (the invariant (docs/README.md) and docs/resources.md) is applied here: an entry whose pool is missing, bound to another
provider, or has no usable key is left out of the config with a machine-readable reason, so it is
never routed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from keyroute.core.config import (
    CooldownConfig,
    CredentialConfig,
    EntryConfig,
    Exclusion,
    FallbackConfig,
    ObjectRef,
    PoolConfig,
    SidecarConfig,
    TimeoutConfig,
    fingerprint,
)
from keyroute.core.durations import parse_duration
from keyroute.core.resources import DEFAULT_TIMEOUTS, CredentialPool, ProviderChain, Secret, Timeouts

# Machine-readable reasons, also used as condition reasons by the operator.
POOL_NOT_FOUND = "PoolNotFound"
POOL_PROVIDER_MISMATCH = "PoolProviderMismatch"
NO_USABLE_CREDENTIALS = "NoUsableCredentials"
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_KEY_MISSING = "SecretKeyMissing"


@dataclass(frozen=True)
class ResolvedPool:
    """A pool's credentials with their key values, and the credentials that could not be resolved."""

    pool: CredentialPool
    credentials: list[CredentialConfig]
    missing: list[Exclusion] = field(default_factory=list)


@dataclass(frozen=True)
class RenderResult:
    config: SidecarConfig
    pools: dict[str, ResolvedPool]

    @property
    def excluded_entries(self) -> list[Exclusion]:
        return [x for x in self.config.excluded if x.entry is not None]


def resolve_pool(pool: CredentialPool, secrets: Mapping[str, Secret]) -> ResolvedPool:
    """Look up every credential's key in ``secrets`` (by Secret name, same namespace as the pool)."""
    found: list[tuple[int, int, CredentialConfig]] = []
    missing: list[Exclusion] = []
    for index, cred in enumerate(pool.spec.credentials):
        ref = cred.secret_ref
        secret = secrets.get(ref.name)
        if secret is None or secret.namespace != pool.namespace:
            missing.append(
                Exclusion(
                    pool=pool.name,
                    credential=cred.name,
                    reason=SECRET_NOT_FOUND,
                    message=f"Secret {pool.namespace}/{ref.name} not found",
                )
            )
            continue
        values = secret.values()
        if ref.key not in values:
            missing.append(
                Exclusion(
                    pool=pool.name,
                    credential=cred.name,
                    reason=SECRET_KEY_MISSING,
                    message=f"Secret {ref.name} has no key {ref.key!r}",
                )
            )
            continue
        key = values[ref.key].strip()
        if not key:
            missing.append(
                Exclusion(
                    pool=pool.name,
                    credential=cred.name,
                    reason=SECRET_KEY_MISSING,
                    message=f"key {ref.key!r} in Secret {ref.name} is empty or whitespace",
                )
            )
            continue
        priority = cred.priority if cred.priority is not None else index
        found.append(
            (
                priority,
                index,
                CredentialConfig(
                    name=cred.name,
                    key=key,
                    fingerprint=fingerprint(key),
                    priority=priority,
                    base_url=cred.base_url,
                ),
            )
        )
    found.sort(key=lambda t: (t[0], t[1]))
    return ResolvedPool(pool=pool, credentials=[c for _, _, c in found], missing=missing)


def _pool_config(resolved: ResolvedPool) -> PoolConfig:
    spec = resolved.pool.spec
    cd = spec.cooldowns
    return PoolConfig(
        name=resolved.pool.name,
        namespace=resolved.pool.namespace,
        uid=resolved.pool.metadata.uid,
        provider=spec.provider,
        strategy=spec.strategy,
        cooldowns=CooldownConfig(
            rate_limited=parse_duration(cd.rate_limited),
            billing=parse_duration(cd.billing),
            auth_failed=parse_duration(cd.auth_failed),
            max=parse_duration(cd.max),
        ),
        share_cooldowns=spec.share_cooldowns,
        rate_limit_scope=spec.rate_limit_scope,
        credentials=resolved.credentials,
    )


def _optional_timeout(field_name: str, *layers: Timeouts | None) -> float | None:
    """A timeout that is off unless set; the first layer that sets it wins, and ``0s`` means off."""
    for layer in layers:
        value = getattr(layer, field_name) if layer is not None else None
        if value is not None:
            return parse_duration(value) or None
    return None


def _timeout(field_name: str, *layers: Timeouts | None) -> float:
    for layer in layers:
        value = getattr(layer, field_name) if layer is not None else None
        if value is not None:
            return parse_duration(value)
    return parse_duration(DEFAULT_TIMEOUTS[field_name])


def render(
    chain: ProviderChain,
    pools: Mapping[str, CredentialPool],
    secrets: Mapping[str, Secret],
) -> RenderResult:
    """Render ``chain`` with ``pools`` and ``secrets`` (both keyed by name, in the chain's namespace)."""
    spec = chain.spec
    entries: list[EntryConfig] = []
    excluded: list[Exclusion] = []
    resolved: dict[str, ResolvedPool] = {}
    for entry in spec.providers:
        name = entry.entry_name
        ref = entry.credential_pool_ref.name
        pool = pools.get(ref)
        if pool is None or pool.namespace != chain.namespace:
            excluded.append(
                Exclusion(
                    entry=name,
                    pool=ref,
                    reason=POOL_NOT_FOUND,
                    message=f"entry {name}: CredentialPool {chain.namespace}/{ref} not found",
                )
            )
            continue
        if pool.spec.provider != entry.provider:
            excluded.append(
                Exclusion(
                    entry=name,
                    pool=ref,
                    reason=POOL_PROVIDER_MISMATCH,
                    message=(
                        f"entry {name} is provider {entry.provider} but CredentialPool {ref} "
                        f"is bound to provider {pool.spec.provider}"
                    ),
                )
            )
            continue
        if ref not in resolved:
            resolved[ref] = resolve_pool(pool, secrets)
        if not resolved[ref].credentials:
            excluded.append(
                Exclusion(
                    entry=name,
                    pool=ref,
                    reason=NO_USABLE_CREDENTIALS,
                    message=f"entry {name}: CredentialPool {ref} has no credential with a usable key",
                )
            )
            continue
        entries.append(
            EntryConfig(
                name=name,
                provider=entry.provider,
                api=entry.api,
                base_url=entry.base_url,
                pool=ref,
                models=dict(entry.models),
                timeouts=TimeoutConfig(
                    connect=_timeout("connect", entry.timeouts, spec.timeouts),
                    first_byte=_timeout("first_byte", entry.timeouts, spec.timeouts),
                    idle=_timeout("idle", entry.timeouts, spec.timeouts),
                    first_token=_optional_timeout("first_token", entry.timeouts, spec.timeouts),
                ),
            )
        )
    used = {e.pool for e in entries}
    for r in resolved.values():
        excluded.extend(r.missing)
    included = {e.name for e in entries}
    fb = spec.fallback
    config = SidecarConfig(
        chain=ObjectRef(name=chain.name, namespace=chain.namespace, uid=chain.metadata.uid),
        entries=entries,
        pools=[_pool_config(resolved[name]) for name in sorted(used)],
        fallback=FallbackConfig(
            restore_after=parse_duration(fb.restore_after),
            restore_max=parse_duration(fb.restore_max),
            triggers=list(fb.triggers) if fb.triggers is not None else None,
            max_wait=parse_duration(fb.max_wait),
            # An excluded entry cannot serve a long prompt either.
            context_length=[n for n in fb.context_length if n in included],
            max_attempts=fb.max_attempts,
        ),
        request_timeout=_timeout("request", spec.timeouts),
        excluded=excluded,
    )
    return RenderResult(config=config, pools=resolved)
