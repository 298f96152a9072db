"""How the operator finds the API server, shared by kopf and keyroute's own client.

In a cluster: the pod's ServiceAccount; outside: the kubeconfig. Tests (and anyone embedding the
operator) set :data:`OVERRIDE` to point it elsewhere, e.g. at a kmock emulator. Whatever kopf logs in
with is kept in :data:`CURRENT`, so :mod:`keyroute.kube` uses the very same credentials.
"""

from __future__ import annotations

from typing import Any

import kopf

OVERRIDE: kopf.ConnectionInfo | None = None
CURRENT: list[kopf.ConnectionInfo] = []


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf login handler: the override, else the service account, else the kubeconfig."""
    info = OVERRIDE
    if info is None:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        CURRENT[:] = [info]
    return info
