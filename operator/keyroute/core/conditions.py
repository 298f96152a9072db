"""Kubernetes conditions, built the way the API conventions say, by one pure function.

``type``, ``status`` (``True``/``False``/``Unknown``), a CamelCase ``reason``, a human ``message``,
``observedGeneration``, and a ``lastTransitionTime`` that moves only when ``status`` flips, so
``kubectl describe`` tells how long something has been true. Conditions of other types in the old
list are kept as they are (another controller may own them), in their order; new types are appended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True, slots=True)
class Fact:
    """What is true now about one condition type."""

    type: str
    status: Status
    reason: str
    message: str = ""


def fact(type_: str, value: bool | None, reason: str, message: str = "") -> Fact:
    """A :class:`Fact` from a Python truth value (``None`` → ``Unknown``)."""
    status: Status = "Unknown" if value is None else "True" if value else "False"
    return Fact(type_, status, reason, message)


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None,
    facts: Iterable[Fact],
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """The new ``conditions`` list: ``old`` with every fact upserted by type."""
    out: list[dict[str, Any]] = [dict(c) for c in (old or []) if isinstance(c, Mapping) and "type" in c]
    index = {c["type"]: i for i, c in enumerate(out)}
    for f in facts:
        previous = out[index[f.type]] if f.type in index else None
        flipped = previous is None or previous.get("status") != f.status
        cond: dict[str, Any] = {
            "type": f.type,
            "status": f.status,
            "reason": f.reason,
            "message": f.message,
            "lastTransitionTime": now
            if flipped or previous is None
            else previous.get("lastTransitionTime", now),
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        if previous is None:
            index[f.type] = len(out)
            out.append(cond)
        else:
            out[index[f.type]] = cond
    return out


def condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of ``type_`` in a list, if any."""
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None
