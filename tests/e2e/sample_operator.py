"""A throwaway kopf handlers module that proves the e2e harness works; not part of keyroute.

It touches every surface the real ``keyroute.controller.handlers`` will: a custom resource with a
status subresource, core ``v1`` Secrets and core ``v1`` Events. Its login handler is the pattern the
real module copies: return :data:`keyroute.controller.login.OVERRIDE`, read at call time.
"""

from __future__ import annotations

from typing import Any

import kopf

import keyroute.controller.login

GROUP = "keyroute.dev"
VERSION = "v1alpha1"


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo | None:
    """Connect wherever the harness says (the harness's fresh registry has no fallback logins)."""
    return keyroute.controller.login.OVERRIDE


@kopf.on.create(GROUP, VERSION, "credentialpools")
def pool_created(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    """Record the generation seen and say so with a core v1 Event."""
    patch.status["observedGeneration"] = meta.get("generation")
    logger.info("sample operator saw pool %s", meta.get("name"))
    kopf.info(body, reason="Observed", message=f"generation {meta.get('generation')}")


@kopf.on.event("", "v1", "secrets")
def secret_event(type: str | None, body: kopf.Body, **_: Any) -> None:
    """Answer every modification of a Secret with an Event naming its keys (never the values)."""
    if type == "MODIFIED":
        keys = ",".join(sorted(body.get("data") or {}))
        kopf.info(body, reason="SecretModified", message=f"keys={keys}")
