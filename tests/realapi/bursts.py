"""A burst of CredentialPools and ProviderChains for the operator to reconcile at once, and the check
that it wrote every status and config before the burst's Events (its Event lane holds them: issue 11)."""

from __future__ import annotations

from collections.abc import Callable

from tests.realapi.client import Api
from tests.realapi.objects import API, chain, pool, secret


async def create_burst(
    api: Api, namespace: str, pools: int = 24, chains: int = 8
) -> tuple[list[str], list[str]]:
    """``pools`` pools with a one-key Secret each, and ``chains`` chains of three of them; their names."""
    pool_names = [f"burst-{i}" for i in range(pools)]
    for i, name in enumerate(pool_names):
        await api.create(secret(f"burst-keys-{i}", k1=f"sk-test-BURST-{i}"), namespace)
        await api.create(pool(name, "openai", ("k1", f"burst-keys-{i}", "k1")), namespace)
    chain_names = [f"burst-chain-{j}" for j in range(chains)]
    for j, name in enumerate(chain_names):
        members = pool_names[3 * j : 3 * j + 3]
        await api.create(
            chain(name, *[(p, "openai", f"https://{p}.invalid/v1", p) for p in members]), namespace
        )
    return pool_names, chain_names


async def written_then_events(
    api: Api, namespace: str, pools: list[str], chains: list[str], posted: Callable[[], float]
) -> tuple[list[int], list[int]] | None:
    """Once every status is current, every config Secret exists and every Event the operator counts as
    posted (``posted()``, its metric; at least one per object) is listed: the resourceVersions of the
    statuses and configs, and of the Events. None until then."""
    state: list[int] = []
    for plural, names in (("credentialpools", pools), ("providerchains", chains)):
        for name in names:
            obj = await api.get(API, plural, namespace, name)
            if (
                not obj
                or (obj.get("status") or {}).get("observedGeneration") != obj["metadata"]["generation"]
            ):
                return None
            state.append(int(obj["metadata"]["resourceVersion"]))
    for name in chains:
        config = await api.get("v1", "secrets", namespace, f"{name}-keyroute")
        if not config:
            return None
        state.append(int(config["metadata"]["resourceVersion"]))
    events = await api.events(namespace)
    try:
        count = posted()
    except OSError:  # its metrics server is not up yet
        return None
    if len(events) < len(pools) + len(chains) or count < len(events):
        return None
    return state, [int(e["metadata"]["resourceVersion"]) for e in events]


def assert_written_before_events(state: list[int], events: list[int], output: str) -> None:
    """On this etcd-backed server a resourceVersion is the revision of the object's last write, so it
    orders writes (the API contract calls it opaque: this reads the server under test, it is not
    something keyroute relies on)."""
    late = sum(1 for e in events if e < max(state))
    assert max(state) < min(events), (
        f"{late} of {len(events)} Events were posted before the last status or config write\n{output[-3000:]}"
    )
