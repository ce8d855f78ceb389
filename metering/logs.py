"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            doc.update(extra)
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return _encode(doc).decode()


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.Formatter.converter = __import__("time").gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


class RepeatFilter(logging.Filter):
    """One line of each kind per `window_s` (lines differing only in numbers are one kind); the
    next one let through says how many were held back. librdkafka logs every failed connection
    attempt of every client: hundreds of lines per minute while a broker is away."""

    _NUMBERS = re.compile(r"\d+")

    def __init__(self, window_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (when let through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        kind = self._NUMBERS.sub("#", text)
        now = self._clock()
        shown_at, held = self._seen.get(kind, (-self.window_s, 0))
        if now - shown_at < self.window_s:
            self._seen[kind] = (shown_at, held + 1)
            return False
        if len(self._seen) > 10_000:  # bounded, whatever the broker says
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if held:
            record.msg, record.args = f"{text} (and {held} more like it held back)", None
        return True
