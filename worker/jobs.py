"""Job submission and inspection, shared by the CLI (and, later, the HTTP API).

Submitting is the same INSERT a user would write in SQL; these helpers only
validate input first so mistakes come back as one clear sentence.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from worker.queries import QUERIES

FINAL_STATUSES = frozenset({"completed", "failed", "timeout", "cancelled"})


class InvalidJobRequest(ValueError):
    """The job request cannot be accepted; the message says why."""


class JobNotFound(LookupError):
    """No job with that id."""


def parse_parameters(text: str | None) -> dict[str, Any]:
    """Parse ``--params`` JSON; it must be an object."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidJobRequest(f"parameters are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidJobRequest('parameters must be a JSON object, like {"key": 1}')
    return value


def submit_job(
    conn: psycopg.Connection,
    analysis_id: str,
    parameters: dict[str, Any],
    *,
    priority: int = 0,
    run_at: str | datetime | None = None,
    triggered_by: str = "cli",
    max_attempts: int | None = None,
) -> str:
    """Insert a pending job and return its id; raises InvalidJobRequest for bad input."""
    try:
        with conn.transaction():
            row = conn.execute(
                QUERIES["submit_job"],
                {
                    "analysis_id": analysis_id,
                    "parameters": Jsonb(parameters),
                    "priority": priority,
                    "run_at": run_at,
                    "triggered_by": triggered_by,
                    "max_attempts": max_attempts,
                },
            ).fetchone()
    except errors.ForeignKeyViolation:
        raise InvalidJobRequest(f"analysis {analysis_id} does not exist") from None
    except (errors.InvalidTextRepresentation, errors.InvalidDatetimeFormat, errors.DatetimeFieldOverflow) as exc:
        raise InvalidJobRequest(str(exc.diag.message_primary or exc)) from None
    except errors.CheckViolation as exc:
        raise InvalidJobRequest(f"rejected by the database: {exc.diag.message_primary}") from None
    assert row is not None
    return str(row[0])


def get_job(conn: psycopg.Connection, job_id: str) -> dict[str, Any]:
    """Return the job row as a dict; raises JobNotFound (also for a malformed id)."""
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(QUERIES["get_job"], {"id": job_id})
            row = cur.fetchone()
    except errors.InvalidTextRepresentation:
        raise JobNotFound(f"{job_id!r} is not a job id (a UUID)") from None
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return row


def wait_for_job(conn: psycopg.Connection, job_id: str, timeout: float | None = None) -> dict[str, Any]:
    """Poll until the job reaches a final status; return the row (TimeoutError after ``timeout``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while True:
        job = get_job(conn, job_id)
        if job["status"] in FINAL_STATUSES:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def recent_jobs(conn: psycopg.Connection, limit: int = 20, status: str | None = None) -> list[dict[str, Any]]:
    """The most recent jobs, newest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(QUERIES["recent_jobs"], {"limit": limit, "status": status})
        return cur.fetchall()


def queue_summary(conn: psycopg.Connection, hours: int = 24) -> dict[str, Any]:
    """Live queue depth plus counts by status over the last ``hours``."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(QUERIES["queue_stats"])
        live = cur.fetchone() or {}
        cur.execute(QUERIES["queue_counts"], {"hours": hours})
        recent = {row["status"]: row["count"] for row in cur.fetchall()}
        cur.execute(QUERIES["active_workers"])
        workers = cur.fetchall()
    return {"live": live, "recent": recent, "workers": workers}
