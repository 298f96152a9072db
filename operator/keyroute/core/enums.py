"""The enumerations and API names shared by the resources (``keyroute.core.resources``), the rendered
config (``keyroute.core.config``) and the sidecar.

Kept apart from the pydantic resource models so that the sidecar, which only reads a rendered config,
imports none of pydantic (issue 13: its idle memory).
"""

from __future__ import annotations

import enum

GROUP = "keyroute.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class Strategy(enum.StrEnum):
    """How a pool picks among its healthy credentials."""

    FILL_FIRST = "FillFirst"
    ROUND_ROBIN = "RoundRobin"
    LEAST_USED = "LeastUsed"
    RANDOM = "Random"


class ApiStyle(enum.StrEnum):
    """How the key is presented upstream: ``openai`` = ``Authorization: Bearer``, ``anthropic`` = ``x-api-key``."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class RateLimitScope(enum.StrEnum):
    """What one rate limit covers: one key (``Credential``), or every key of the pool (``Pool``: keys of
    one organization or project, which OpenAI and Anthropic meter together)."""

    CREDENTIAL = "Credential"
    POOL = "Pool"


class CredentialState(enum.StrEnum):
    AVAILABLE = "Available"
    COOLING_DOWN = "CoolingDown"
    EXHAUSTED = "Exhausted"
    REJECTED = "Rejected"
    MISSING = "Missing"
