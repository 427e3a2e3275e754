"""Logging: one line per event, text for people or JSON for collectors.

Context travels as ``extra={"job_id": ..., "analysis_id": ..., "schedule_id": ...}``; the worker id
is attached to every record. Neither format ever prints a DSN password: URLs
are redacted by ``worker.db.redact_database_url`` before they are logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

CONTEXT_FIELDS = ("job_id", "analysis_id", "schedule_id", "worker_id", "status", "runtime", "attempt", "duration_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, plus context fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _WorkerIdFilter(logging.Filter):
    def __init__(self, worker_id: str | None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        if self.worker_id is not None and not hasattr(record, "worker_id"):
            record.worker_id = self.worker_id
        return True


def configure_logging(level: str, log_format: str = "text", worker_id: str | None = None) -> None:
    """Send the package's logs to stderr in the chosen format (replaces earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_WorkerIdFilter(worker_id))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("yoyo", "psycopg.pool", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
