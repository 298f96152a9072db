"""Classify an upstream answer into the SPEC §3 vocabulary: what happened, and when it may be tried again.

A pure function of (status, headers, body, now): the sidecar calls it for every non-2xx answer and
for the first event of a stream; tests call it with tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyroute.core.classes import ErrorClass


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one failed attempt.

    ``reset_at`` is an absolute time (same clock as ``now``) given by the provider, if any: it always
    wins over configured cooldowns. ``context_length`` marks a ``ClientError`` that says the prompt is
    too long, which a chain with ``fallback.contextLength`` answers with a bigger-context entry.
    ``code`` is the provider's machine code (``rate_limit_exceeded``, ``invalid_api_key`` ...) when one
    was found; ``message`` is short and never contains request or key material.
    """

    error_class: ErrorClass
    status: int | None = None
    reset_at: float | None = None
    code: str | None = None
    context_length: bool = False
    message: str = ""
