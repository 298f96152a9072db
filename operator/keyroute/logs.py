"""Structured logs: one JSON object per line, and a last line of defence against key material.

Every module logs through the standard library with ``extra={"kr": {...}}`` fields. The formatter
writes them as JSON, which is what log pipelines index and what an SRE can grep at 3 a.m. The
:class:`Redactor` knows the key values the process holds and masks any that would reach a log line,
whatever path it took (an exception message, a third-party library's log).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"


class Redactor(logging.Filter):
    """Replaces known key values in log records. Keys shorter than 8 characters are not tracked."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: frozenset[str] = frozenset()

    def set_keys(self, keys: Iterable[str]) -> None:
        """Track ``keys`` (replacing the ones tracked so far)."""
        self._keys = frozenset(k for k in keys if len(k) >= 8)

    def scrub(self, text: str) -> str:
        for key in self._keys:
            if key in text:
                text = text.replace(key, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._keys:
            return True
        msg = record.getMessage()
        clean = self.scrub(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        fields = getattr(record, "kr", None)
        if isinstance(fields, dict):
            record.kr = {k: self.scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = self.scrub(text)
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "kr", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


REDACTOR = Redactor()


def setup_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure the root logger once for a keyroute process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s %(kr)s", defaults={"kr": ""})
        )
    handler.addFilter(REDACTOR)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is per request: noise at info level, and the sidecar has metrics for that.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
