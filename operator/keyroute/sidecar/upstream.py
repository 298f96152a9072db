"""The upstream side of an attempt: which headers go out, which come back, and how transport failures
map to the docs/errors.md vocabulary. The aiohttp client session lives in :mod:`keyroute.sidecar.app`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp

from keyroute.core.classes import ErrorClass
from keyroute.core.classify import Classification
from keyroute.core.enums import ApiStyle
from keyroute.core.routing import Attempt

# Hop-by-hop headers (RFC 9110 §7.6.1) and lengths aiohttp recomputes: never forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# Upstream, also the agent's own credentials (replaced by the pool key) and its encodings.
_DROP_REQUEST = _HOP_BY_HOP | {"host", "authorization", "x-api-key", "accept-encoding"}
_DROP_RESPONSE = _HOP_BY_HOP
ANTHROPIC_VERSION = "2023-06-01"
# Read once: a member read through its class costs ~100 ns on Python 3.11, on every attempt.
_ANTHROPIC = ApiStyle.ANTHROPIC
PROVIDER_HEADER = "X-Keyroute-Provider"
CREDENTIAL_HEADER = "X-Keyroute-Credential"
#: An error body is read up to this size for classification and passed on as read (its first MiB).
MAX_ERROR_BODY = 1 << 20


class _Keep(dict[str, bool]):
    """Header name -> forward it? Remembered per spelling, so a request lowercases no header name twice.

    Header names are a small set in practice; past ``_MAX_NAMES`` (an upstream inventing names) the
    answer is computed without being stored.
    """

    def __init__(self, drop: frozenset[str]) -> None:
        super().__init__()
        self._drop = drop

    def __missing__(self, name: str) -> bool:
        keep = name.lower() not in self._drop
        if len(self) < _MAX_NAMES:
            self[name] = keep
        return keep


_MAX_NAMES = 1024
_KEEP_REQUEST = _Keep(_DROP_REQUEST)
# The two names the sidecar sets itself are dropped from the upstream's answer, so that appending them
# replaces any the upstream sent.
_KEEP_RESPONSE = _Keep(_DROP_RESPONSE | {PROVIDER_HEADER.lower(), CREDENTIAL_HEADER.lower()})


#: Headers of every upstream request, set once on the client session (:mod:`keyroute.sidecar.app`).
#: Uncompressed answers: the sidecar inspects error bodies and stream markers, on loopback. (The
#: agent's own Accept-Encoding is dropped.) A session default rather than a header added to every
#: request: aiohttp copies each header of a request twice, in Python.
SESSION_HEADERS = {"Accept-Encoding": "identity"}


def attempt_headers(incoming: Mapping[str, str], attempt: Attempt) -> dict[str, str]:
    """Headers for one attempt: the agent's minus hop-by-hop ones and its own credentials, plus this
    attempt's key in this provider's style.

    Filtered again for each attempt rather than once per request and copied per attempt: most
    requests make one attempt, and the filter costs about what the copy did.
    """
    keep = _KEEP_REQUEST
    headers = {k: v for k, v in incoming.items() if keep[k]}
    key = attempt.lease.credential.key
    if attempt.entry.api is _ANTHROPIC:
        headers["x-api-key"] = key
        if not any(k.lower() == "anthropic-version" for k in headers):
            headers["anthropic-version"] = ANTHROPIC_VERSION
    else:
        headers["Authorization"] = "Bearer " + key
    return headers


def response_headers(upstream: Mapping[str, str], attempt: Attempt) -> list[tuple[str, str]]:
    """The upstream's response headers for the agent, naming the serving entry and credential.

    A list of pairs (repeated names such as Set-Cookie kept): aiohttp builds its own multidict from
    whatever it is given, so building one here would be a second copy on every request.
    """
    keep = _KEEP_RESPONSE
    items = [(k, v) for k, v in upstream.items() if keep[k]]
    items.append((PROVIDER_HEADER, attempt.entry.name))
    items.append((CREDENTIAL_HEADER, attempt.lease.credential.name))
    return items


def transport_failure(exc: BaseException, phase: str) -> Classification:
    """Classify an exception raised while talking to the upstream.

    A timeout is a silent route (``Timeout``: never retried); anything else that broke the
    connection before an answer is a ``ConnectionError``. Messages name the exception type only:
    aiohttp's messages can carry request details.
    """
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Classification(ErrorClass.TIMEOUT, message=f"no answer within the {phase} timeout")
    return Classification(ErrorClass.CONNECTION_ERROR, message=f"{type(exc).__name__} during {phase}")


def now() -> float:
    """Wall-clock seconds: the clock provider reset times and status ``until`` fields use."""
    return time.time()
