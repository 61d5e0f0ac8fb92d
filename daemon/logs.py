"""Structured logs: one JSON object per line, ``event`` plus fields."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = logging.getLogger("nanoseg.daemon")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("nanoseg")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields: ``log("frame_done", run=..., seconds=...)``."""
    LOGGER.log(level, event, extra={"fields": fields})


def now() -> float:
    return time.time()
