"""What ``keyroute operator``'s flags decide, in a module that imports neither kopf nor the API
client: the CLI validates its flags before it resolves credentials and imports kopf."""

from __future__ import annotations

from dataclasses import dataclass

from keyroute.controller.election import ElectionConfig


@dataclass(frozen=True)
class OperatorConfig:
    """What ``keyroute operator``'s flags decide."""

    # The namespaces the operator serves (empty: all), for the report watch.
    namespaces: tuple[str, ...] = ()
    resync: float = 300.0
    # A failed reconcile's first retry; each further failure doubles the wait, up to ``resync`` (the
    # resync tries every object that often anyway).
    retry_delay: float = 5.0
    # None: no election, this replica always leads (a single replica, tests).
    election: ElectionConfig | None = None
