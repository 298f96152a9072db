"""The operator's own in-memory stores (issue 11): the reference indexes that replaced kopf's indexes,
and the watch-fed cache of pools and Secrets the reconciles read."""

from __future__ import annotations

from typing import Any

from keyroute.controller.reconcile import ObjectCache
from keyroute.core.references import RefIndex, referenced


def test_a_referrers_new_spec_replaces_its_old_references() -> None:
    index = RefIndex()
    index.set("ns", "pool-a", ["keys-1", "keys-2"])
    index.set("ns", "pool-b", ["keys-2"])
    index.set("other", "pool-a", ["keys-1"])
    assert index.referrers("ns", "keys-2") == ["pool-a", "pool-b"]
    assert index.referrers("ns", "keys-1") == ["pool-a"]

    index.set("ns", "pool-a", ["keys-3"])  # a spec change: keys-1 and keys-2 no longer referenced by it
    assert index.referrers("ns", "keys-1") == []
    assert index.referrers("ns", "keys-2") == ["pool-b"]
    assert index.referrers("ns", "keys-3") == ["pool-a"]
    assert index.referrers("other", "keys-1") == ["pool-a"]  # namespaces apart

    index.drop("ns", "pool-b")
    assert index.referrers("ns", "keys-2") == []


class CountingKube:
    """Answers GETs from a dict, counting them."""

    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects
        self.gets: list[str] = []

    async def get(self, url: str) -> dict[str, Any] | None:
        self.gets.append(url)
        return self.objects.get(url)


def secret(name: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": version,
            "managedFields": [{"x": 1}],
        },
        "data": {"k": "dg=="},
    }


async def test_the_cache_reads_a_miss_once_and_an_event_wins_over_a_get() -> None:
    kube = CountingKube({"/s/keys": secret("keys", "1")})
    cache = ObjectCache()
    first = await cache.read(kube, "secret", "/s/keys", "ns", "keys")  # type: ignore[arg-type]
    again = await cache.read(kube, "secret", "/s/keys", "ns", "keys")  # type: ignore[arg-type]
    assert first == again and kube.gets == ["/s/keys"]
    assert "managedFields" not in first["metadata"]  # type: ignore[index]

    cache.put("secret", secret("keys", "2"))  # a watch event: the newer object
    got = await cache.read(kube, "secret", "/s/keys", "ns", "keys")  # type: ignore[arg-type]
    assert got["metadata"]["resourceVersion"] == "2"  # type: ignore[index]

    cache.drop("secret", "ns", "keys")  # deleted, or no pool references it any more
    kube.objects.clear()
    assert await cache.read(kube, "secret", "/s/keys", "ns", "keys") is None  # type: ignore[arg-type]


def test_referenced_names_skip_what_is_malformed() -> None:
    spec = {
        "credentials": [
            {"name": "a", "secretRef": {"name": "keys-a", "key": "k"}},
            {"name": "b", "secretRef": {"key": "k"}},  # no name
            {"name": "c", "secretRef": "keys-c"},  # not an object
            "garbage",
            {"name": "d", "secretRef": {"name": "keys-d"}},
        ]
    }
    assert referenced(spec, "credentials", "secretRef") == ["keys-a", "keys-d"]
    assert referenced(
        {"providers": [{"credentialPoolRef": {"name": "p"}}]}, "providers", "credentialPoolRef"
    ) == ["p"]
    assert referenced(None, "providers", "credentialPoolRef") == []
    assert referenced({"providers": None}, "providers", "credentialPoolRef") == []
