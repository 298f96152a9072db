"""Who refers to whom among a namespace's objects: Secrets by CredentialPools, pools by ProviderChains.

Pure bookkeeping fed by the operator's watch handlers, so that a changed Secret or pool reconciles
exactly the objects that use it without listing the cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def referenced(spec: Any, items: str, ref: str) -> list[str]:
    """The names ``spec[items][*][ref].name`` (``credentials``/``secretRef`` of a pool,
    ``providers``/``credentialPoolRef`` of a chain), as given: validating the spec is the
    reconciler's job, so malformed parts are skipped here, never raised on."""
    out: list[str] = []
    for item in (spec if isinstance(spec, dict) else {}).get(items) or []:
        target = item.get(ref) if isinstance(item, dict) else None
        if isinstance(target, dict) and isinstance(target.get("name"), str):
            out.append(target["name"])
    return out


class RefIndex:
    """Who refers to what, by namespace: ``(namespace, target) → {referrers}``, kept with its reverse
    so that a referrer's new spec replaces its old references (names only: a few strings per object)."""

    def __init__(self) -> None:
        self._by_target: dict[tuple[str, str], set[str]] = {}
        self._of: dict[tuple[str, str], frozenset[str]] = {}

    def set(self, namespace: str, referrer: str, targets: Iterable[str]) -> None:
        """``referrer`` refers to ``targets`` now (and to nothing else)."""
        new = frozenset(targets)
        key = (namespace, referrer)
        old = self._of.get(key, frozenset())
        if new == old:
            return
        for target in old - new:
            referrers = self._by_target.get((namespace, target))
            if referrers is not None:
                referrers.discard(referrer)
                if not referrers:
                    del self._by_target[(namespace, target)]
        for target in new - old:
            self._by_target.setdefault((namespace, target), set()).add(referrer)
        if new:
            self._of[key] = new
        else:
            self._of.pop(key, None)

    def drop(self, namespace: str, referrer: str) -> None:
        """``referrer`` is gone."""
        self.set(namespace, referrer, ())

    def referrers(self, namespace: str, target: str) -> list[str]:
        """Who refers to ``target``, sorted."""
        return sorted(self._by_target.get((namespace, target), ()))
