"""Which request paths the sidecar forwards: a request must not be able to leave its entry's base path.

The sidecar forwards ``/v1/<rest>`` to ``baseURL + "/<rest>"`` with the entry's key. Where a baseURL is
a path prefix on a shared host (a gateway routing ``/openai/v1`` and ``/anthropic/v1`` to different
backends), ``<rest>`` climbing out of the prefix would send one pool's key to another backend. The
rules, checked on the raw path (before anything decodes it) and before routing:

- **No dot-segments**: a segment that is ``.`` or ``..``, raw or percent-encoded in any case
  (``%2e``, ``%2E``, ``.%2e``, …), is refused. Upstreams and gateways normalise them per RFC 3986
  §5.2.4, and that is exactly the escape. No API an agent calls has such a segment.
- **No encoded separators**: ``%2F`` and ``%5C`` (any case) and a raw backslash are refused. A
  gateway that decodes ``%2F`` before normalising (or treats ``\\`` as a separator, as some do)
  would turn ``..%2F..%2Fx`` into a climb. Model and file ids never contain them.
- **``//`` is one ``/``**: runs of slashes are merged (nginx's default, ``merge_slashes on``). An
  empty segment cannot climb, but a path starting ``//`` is a network-path reference to anybody who
  resolves it against a base URL (``urljoin``), and a trailing slash on an agent's base URL makes
  ``/v1//chat/completions`` in practice; merged, upstream sees the canonical path.
- Double encoding (``%252e``) is forwarded as it is: it decodes to ``%2e``, a literal, to any
  upstream that decodes once, as HTTP servers do.

The query string is not a path and is not checked.
"""

from __future__ import annotations

import re

#: The rule a refused path broke, as the sidecar's 400 answer states it.
PATH_RULE = (
    "the request path must not contain '.' or '..' segments (also percent-encoded, e.g. %2e%2e) "
    "or encoded separators (%2F, %5C) or backslashes: it could leave the provider's base path"
)

# One search over the raw path: a dot-segment (raw or %2e, any case) or an encoded separator.
_UNSAFE = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?=/|$)|%2f|%5c|\\", re.IGNORECASE)
_SLASHES = re.compile(r"//+")


def safe_path(raw_path: str) -> str | None:
    """``raw_path`` with runs of ``/`` merged, or ``None`` if it breaks :data:`PATH_RULE`."""
    # Every refused form has a '.', a '%' or a backslash; most paths have none (no regex search then).
    if ("." in raw_path or "%" in raw_path or "\\" in raw_path) and _UNSAFE.search(raw_path) is not None:
        return None
    if "//" in raw_path:
        return _SLASHES.sub("/", raw_path)
    return raw_path
