"""The one closed vocabulary of error classes (docs/errors.md).

The same strings are metric labels, Event reasons, condition reasons and the ``class`` field of the
sidecar's error bodies, so they live in one enum and nowhere else. What each class does to a
credential and to the chain is in :mod:`keyroute.core.pools` and :mod:`keyroute.core.routing`.
"""

from __future__ import annotations

import enum


class ErrorClass(enum.StrEnum):
    """Why an upstream attempt failed."""

    RATE_LIMITED = "RateLimited"
    USAGE_LIMIT = "UsageLimit"
    BILLING = "Billing"
    AUTH_FAILED = "AuthFailed"
    REVOKED = "Revoked"
    OVERLOADED = "Overloaded"
    UPSTREAM_RATE_LIMITED = "UpstreamRateLimited"
    SERVER_ERROR = "ServerError"
    CONNECTION_ERROR = "ConnectionError"
    TIMEOUT = "Timeout"
    MODEL_NOT_FOUND = "ModelNotFound"
    CLIENT_ERROR = "ClientError"


#: Classes that say something about the credential that was sent (the rest are about the provider).
CREDENTIAL_CLASSES = frozenset(
    {
        ErrorClass.RATE_LIMITED,
        ErrorClass.USAGE_LIMIT,
        ErrorClass.BILLING,
        ErrorClass.AUTH_FAILED,
        ErrorClass.REVOKED,
    }
)

#: Classes that may move a request to the next chain entry (``fallback.triggers`` narrows this set).
FALLBACK_CLASSES = frozenset(set(ErrorClass) - {ErrorClass.CLIENT_ERROR})
