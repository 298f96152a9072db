"""How the operator finds the API server, shared by kopf and keyroute's own client.

``keyroute operator`` resolves its :class:`~keyroute.kube.Credentials` before kopf starts
(:func:`configure`: ``--kubeconfig``, else ``$KUBECONFIG``, else the pod's ServiceAccount, else
``~/.kube/config``), so a bad kubeconfig stops it at once with a message naming the problem. kopf's
login handler (:func:`login`) and :func:`kube` (keyroute's client) then use the very same
credentials: a kubeconfig is loaded by the official kubernetes client (exec plugins included), and
an expiring token is renewed for both (kopf re-logs in at ``expiration`` or after a 401, keyroute's
client renews by itself).

Tests (and anyone embedding the operator) set :data:`OVERRIDE` to point it elsewhere, e.g. at a
kmock emulator. Whatever kopf logs in with is kept in :data:`CURRENT`.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, TypeVar

import kopf

from keyroute.kube import MIN_RENEW_INTERVAL, OPERATOR_AGENT, Connection, Credentials, Kube, _pem

K = TypeVar("K", bound=Kube)

OVERRIDE: kopf.ConnectionInfo | None = None
CURRENT: list[kopf.ConnectionInfo] = []
CREDENTIALS: list[Credentials] = []


def configure(kubeconfig: str | Path | None = None, context: str | None = None) -> Credentials:
    """Resolve the operator's credentials now (raises :class:`~keyroute.kube.KubeconfigError`)."""
    creds = Credentials.resolve(kubeconfig, context)
    CREDENTIALS[:] = [creds]
    return creds


def credentials() -> Credentials:
    """The configured credentials (resolved from the environment if :func:`configure` was not called)."""
    return CREDENTIALS[0] if CREDENTIALS else configure()


def connection_info(conn: Connection, renew_after: datetime.datetime | None = None) -> kopf.ConnectionInfo:
    """kopf's view of a :class:`Connection`: PEM data in memory, the renewal time as expiration (so
    kopf logs in again before the token expires)."""
    expiration = renew_after or conn.expiration
    if expiration is not None:
        # A plugin handing out tokens already (nearly) expired must not make kopf log in in a loop.
        soonest = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=MIN_RENEW_INTERVAL)
        aware = expiration if expiration.tzinfo else expiration.replace(tzinfo=datetime.UTC)
        expiration = max(aware, soonest)
    return kopf.ConnectionInfo(
        server=conn.server,
        ca_path=conn.ca_path,
        ca_data=_pem(conn.ca_data) if conn.ca_data else None,
        insecure=conn.insecure or None,
        username=conn.username,
        password=conn.password,
        scheme=conn.scheme if conn.token else None,
        token=conn.token,
        certificate_path=conn.certificate_path,
        certificate_data=_pem(conn.certificate_data) if conn.certificate_data else None,
        private_key_path=conn.private_key_path,
        private_key_data=_pem(conn.private_key_data) if conn.private_key_data else None,
        default_namespace=conn.namespace,
        expiration=expiration,
    )


def login(**_: Any) -> kopf.ConnectionInfo | None:
    """kopf login handler: the override, else the configured credentials. kopf calls it again only
    when its credentials expired or were refused, so a second call renews them (runs a plugin anew)."""
    info = OVERRIDE
    if info is None:
        creds = credentials()
        conn = creds.connection(renew=bool(CURRENT))
        info = connection_info(conn, creds.renew_after)
    CURRENT[:] = [info]
    return info


def kube() -> Kube:
    """keyroute's API client on the operator's credentials (renewing them by itself)."""
    return client(Kube)


def client(cls: type[K]) -> K:
    """An API client of class ``cls`` (Kube or a subclass) on the operator's credentials."""
    if OVERRIDE is not None:
        client = cls.from_connection(OVERRIDE, user_agent=OPERATOR_AGENT)
        assert isinstance(client, cls)  # from_connection builds the class it is called on
        return client
    return cls(credentials(), user_agent=OPERATOR_AGENT)
