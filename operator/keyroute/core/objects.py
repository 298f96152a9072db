"""Kubernetes objects the operator writes, and the Events it posts, built purely from core results."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from keyroute.core.config import CONFIG_FILENAME, SidecarConfig, content_hash
from keyroute.core.names import CHAIN_LABEL as CHAIN_LABEL
from keyroute.core.resources import API_VERSION, ProviderChain
from keyroute.core.status import config_secret_name

MANAGED_BY = {"app.kubernetes.io/managed-by": "keyroute"}
HASH_ANNOTATION = "keyroute.dev/config-hash"


def config_secret_chain(meta: Mapping[str, Any]) -> str | None:
    """The chain whose rendered config Secret this is (from a Secret's metadata: the labels
    :func:`config_secret` sets and the name it gives), or None for any other Secret."""
    labels = meta.get("labels") or {}
    chain = labels.get(CHAIN_LABEL)
    if not isinstance(chain, str) or any(labels.get(k) != v for k, v in MANAGED_BY.items()):
        return None
    return chain if meta.get("name") == config_secret_name(chain) else None


def config_secret(chain: ProviderChain, config: SidecarConfig) -> dict[str, Any]:
    """The ``<chain>-keyroute`` Secret: the rendered config, owned by its chain (garbage-collected with it)."""
    owner: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ProviderChain",
        "name": chain.name,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    if chain.metadata.uid:
        owner["uid"] = chain.metadata.uid
    text = config.to_json()  # once: the JSON and its hash (a config's dump is a render's largest cost)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": config_secret_name(chain.name),
            "namespace": chain.namespace,
            "labels": {**MANAGED_BY, CHAIN_LABEL: chain.name},
            "annotations": {HASH_ANNOTATION: content_hash(text)},
            "ownerReferences": [owner],
        },
        "data": {CONFIG_FILENAME: base64.b64encode(text.encode()).decode()},
    }


def secret_hash(secret: Mapping[str, Any] | None) -> str | None:
    """The config hash a rendered Secret holds: its annotation, if the data it carries has that
    hash. None when it has no annotation, or when its data was edited by hand (a ``kubectl edit``
    leaves the annotation as it was): the operator then puts the rendered config back, as it
    promises, instead of trusting the annotation."""
    if not secret:
        return None
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(HASH_ANNOTATION)
    if not isinstance(value, str):
        return None
    data = (secret.get("data") or {}).get(CONFIG_FILENAME)
    try:
        text = base64.b64decode(data, validate=True).decode() if isinstance(data, str) else None
    except (ValueError, UnicodeDecodeError):
        text = None
    return value if text is not None and content_hash(text) == value else None


@dataclass(frozen=True, slots=True)
class Note:
    """An Event to post on the object whose status changed."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


OPERATOR_COMPONENT = "keyroute.dev/operator"


def note_event(obj: Mapping[str, Any], note: Note, *, now: str, name: str) -> dict[str, Any]:
    """The core v1 Event for ``note`` on ``obj`` (a pool or chain body), as the operator posts it."""
    meta = obj.get("metadata") or {}
    involved = {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    if meta.get("uid"):
        involved["uid"] = meta["uid"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": meta.get("namespace")},
        "involvedObject": involved,
        "reason": note.reason,
        "message": note.message[:1024],
        "type": note.type,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": OPERATOR_COMPONENT},
        "reportingComponent": OPERATOR_COMPONENT,
        "reportingInstance": "keyroute-operator",
    }


# Conditions whose True is bad news.
_BAD_WHEN_TRUE = {"Degraded", "Exhausted", "FallbackActive"}


def transitions(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Note]:
    """User-visible changes between two statuses: conditions that flipped, credentials whose state
    changed, a new rendered config. Nothing when nothing changed (a resync posts no Events)."""
    old = old or {}
    notes: list[Note] = []
    before = {c.get("type"): c for c in old.get("conditions") or []}
    for cond in new.get("conditions") or []:
        prev = before.get(cond["type"])
        if prev is not None and prev.get("status") == cond["status"] and prev.get("reason") == cond["reason"]:
            continue
        if prev is None and cond["status"] == "False" and cond["type"] in _BAD_WHEN_TRUE:
            continue  # a new object that is fine: no news
        bad = (cond["status"] == "True") == (cond["type"] in _BAD_WHEN_TRUE)
        notes.append(
            Note(
                "Warning" if bad else "Normal",
                cond["reason"],
                f"{cond['type']}={cond['status']}: {cond.get('message', '')}".rstrip(": "),
            )
        )
    old_creds = {c.get("name"): c for c in old.get("credentials") or []}
    for cred in new.get("credentials") or []:
        prev = old_creds.get(cred["name"])
        if (
            prev is not None
            and prev.get("state") == cred["state"]
            and prev.get("fingerprint") == cred.get("fingerprint")
        ):
            continue
        if cred["state"] == "Available":
            if prev is not None:
                notes.append(Note("Normal", "CredentialAvailable", f"credential {cred['name']} is available"))
            continue
        until = f" until {cred['until']}" if cred.get("until") else ""
        shared = (
            " (pool-wide rate limit: the pool's keys share one limit)" if cred.get("scope") == "Pool" else ""
        )
        notes.append(
            Note(
                "Warning",
                cred.get("reason") or cred["state"],
                f"credential {cred['name']}: {cred['state']}{until}{shared}",
            )
        )
    old_cfg = (old.get("config") or {}).get("hash")
    new_cfg = (new.get("config") or {}).get("hash")
    if new_cfg and new_cfg != old_cfg:
        notes.append(
            Note(
                "Normal",
                "ConfigRendered",
                f"sidecar config {new['config']['name']} rendered (hash {new_cfg})",
            )
        )
    return notes
