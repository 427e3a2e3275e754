"""Submitting, inspecting and cancelling jobs: shared by the CLI and the HTTP API.

Submitting is the same INSERT a user would write in SQL and cancelling the
same UPDATE; these helpers validate input first so that a mistake comes back
as one clear sentence (``InvalidJobRequest``, ``JobNotFound``).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from worker.queries import JOBS_FINISHED_CHANNEL, QUERIES

FINAL_STATUSES = frozenset({"completed", "failed", "timeout", "cancelled"})
_TRIGGERED_BY_MAX = 200


class InvalidJobRequest(ValueError):
    """The job request cannot be accepted; the message says why."""


class JobNotFound(LookupError):
    """No such job (or analysis)."""


class JobDataTooDeep(RuntimeError):
    """The job's parameters or result are nested deeper than Python's json module can load."""


# Python's json module gives up near 1,000 levels of nesting (its recursion limit,
# shared with the call stack, so the exact depth varies); PostgreSQL's jsonb
# accepts far deeper values.
NESTED_TOO_DEEPLY = "nested too deeply to load (over ~1,000 levels)"
# Parameters may nest this deep: well inside what every step of the worker can load and send.
MAX_PARAMETER_DEPTH = 500
PARAMETERS_TOO_DEEP = f"parameters are nested more than {MAX_PARAMETER_DEPTH} levels deep"


def json_depth(value: object) -> int:
    """How deeply a parsed JSON value nests (a scalar: 0), found without recursion."""
    depth = 0
    level = [value]
    while containers := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return depth


class JobAlreadyFinished(RuntimeError):
    """The job cannot be cancelled: it already reached a final status."""


def parse_parameters(text: str | None) -> dict[str, Any]:
    """Parse parameters given as JSON text; they must form an object."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidJobRequest(f"parameters are not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidJobRequest(PARAMETERS_TOO_DEEP) from None
    return validate_parameters(value)


def validate_parameters(value: object) -> dict[str, Any]:
    """Parameters must be a JSON object, nested at most ``MAX_PARAMETER_DEPTH`` deep."""
    if not isinstance(value, dict):
        raise InvalidJobRequest('parameters must be a JSON object, like {"key": 1}')
    if json_depth(value) > MAX_PARAMETER_DEPTH:
        raise InvalidJobRequest(PARAMETERS_TOO_DEEP)
    return value


def validate_job_request(body: object) -> dict[str, Any]:
    """Check an HTTP ``POST /jobs`` body; return the keyword arguments of ``submit_job``."""
    if not isinstance(body, dict):
        raise InvalidJobRequest("the request body must be a JSON object")
    unknown = set(body) - {"analysis_id", "parameters", "priority", "run_at", "triggered_by", "max_attempts"}
    if unknown:
        raise InvalidJobRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    analysis_id = body.get("analysis_id")
    if not isinstance(analysis_id, str) or not analysis_id:
        raise InvalidJobRequest("analysis_id is required and must be a string")
    request: dict[str, Any] = {
        "analysis_id": analysis_id,
        "parameters": validate_parameters(body.get("parameters", {})),
    }
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -(2**31) <= priority < 2**31:
        raise InvalidJobRequest("priority must be a 32-bit integer")
    request["priority"] = priority
    run_at = body.get("run_at")
    if run_at is not None:
        if not isinstance(run_at, str):
            raise InvalidJobRequest("run_at must be an ISO 8601 timestamp string")
        request["run_at"] = parse_timestamp(run_at)
    triggered_by = body.get("triggered_by", "api")
    if not isinstance(triggered_by, str) or not 0 < len(triggered_by) <= _TRIGGERED_BY_MAX:
        raise InvalidJobRequest(f"triggered_by must be a string of 1 to {_TRIGGERED_BY_MAX} characters")
    request["triggered_by"] = triggered_by
    max_attempts = body.get("max_attempts")
    if max_attempts is not None and (
        not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or not 1 <= max_attempts <= 100
    ):
        raise InvalidJobRequest("max_attempts must be an integer from 1 to 100")
    request["max_attempts"] = max_attempts
    return request


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 timestamp; without a zone it is taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidJobRequest(f"{text!r} is not an ISO 8601 timestamp") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


async def submit_job(
    conn: psycopg.AsyncConnection,
    analysis_id: str,
    parameters: dict[str, Any],
    *,
    priority: int = 0,
    run_at: datetime | None = None,
    triggered_by: str = "cli",
    max_attempts: int | None = None,
) -> str:
    """Insert a pending job and return its id.

    Raises JobNotFound for an unknown analysis, InvalidJobRequest for input the database refuses.
    """
    try:
        async with conn.transaction():
            cur = await conn.execute(
                QUERIES["submit_job"],
                {
                    "analysis_id": analysis_id,
                    "parameters": Jsonb(parameters),
                    "priority": priority,
                    "run_at": run_at,
                    "triggered_by": triggered_by,
                    "max_attempts": max_attempts,
                },
            )
            row = await cur.fetchone()
    except errors.ForeignKeyViolation:
        raise JobNotFound(f"analysis {analysis_id} does not exist") from None
    except errors.InvalidTextRepresentation:
        raise JobNotFound(f"analysis {analysis_id!r} does not exist (not a UUID)") from None
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        raise InvalidJobRequest(f"rejected by the database: {exc.diag.message_primary}") from None
    assert row is not None
    return str(row[0])


async def get_job(conn: psycopg.AsyncConnection, job_id: str) -> dict[str, Any]:
    """The job row as a dict; raises JobNotFound (also for a malformed id) or JobDataTooDeep."""
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(QUERIES["get_job"], {"id": job_id})
            row = await cur.fetchone()
    except errors.InvalidTextRepresentation:
        raise JobNotFound(f"{job_id!r} is not a job id (a UUID)") from None
    except RecursionError:
        raise JobDataTooDeep(
            f"job {job_id}: its parameters or result are {NESTED_TOO_DEEPLY}; read them with SQL"
        ) from None
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return row


async def get_attempts(conn: psycopg.AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    """The job's earlier attempts (see analysis_job_attempts), oldest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["job_attempts"], {"id": job_id})
        return await cur.fetchall()


async def cancel_job(conn: psycopg.AsyncConnection, job_id: str) -> dict[str, Any]:
    """Cancel a pending or running job; return the row (only ``id`` and ``status``
    when the rest cannot be loaded, see JobDataTooDeep).

    Raises JobNotFound, or JobAlreadyFinished naming the final status.
    """
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(QUERIES["cancel_job"], {"id": job_id})
            cancelled = await cur.fetchone()
            if cancelled is None:
                await cur.execute(QUERIES["job_status"], {"id": job_id})
                found = await cur.fetchone()
    except errors.InvalidTextRepresentation:
        raise JobNotFound(f"{job_id!r} is not a job id (a UUID)") from None
    if cancelled is None:
        if found is None:
            raise JobNotFound(f"job {job_id} does not exist")
        raise JobAlreadyFinished(f"job {job_id} is already {found['status']}")
    try:
        return await get_job(conn, job_id)
    except JobDataTooDeep:
        return cancelled


async def wait_for_job(conn: psycopg.AsyncConnection, job_id: str, timeout: float | None = None) -> dict[str, Any]:
    """Wait for the job's final status (LISTEN on the finished channel, re-checking now and then).

    ``conn`` must be in autocommit mode. Raises TimeoutError after ``timeout`` seconds.
    """
    await conn.execute(f"LISTEN {JOBS_FINISHED_CHANNEL}")
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        job = await get_job(conn, job_id)
        if job["status"] in FINAL_STATUSES:
            return job
        remaining = 1.0 if deadline is None else min(1.0, deadline - loop.time())
        if remaining <= 0:
            raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:.0f}s")
        async for notification in conn.notifies(timeout=remaining):
            if _finished_job_id(notification.payload) == str(job_id):
                break


def _finished_job_id(payload: str) -> str | None:
    try:
        return str(json.loads(payload)["id"])
    except (ValueError, KeyError, TypeError):
        return None


async def recent_jobs(
    conn: psycopg.AsyncConnection, limit: int = 20, status: str | None = None
) -> list[dict[str, Any]]:
    """The most recent jobs, newest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["recent_jobs"], {"limit": limit, "status": status})
        return await cur.fetchall()


async def queue_summary(conn: psycopg.AsyncConnection, hours: int = 24) -> dict[str, Any]:
    """Live queue depth, counts by status over the last ``hours``, and the live workers."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["queue_stats"])
        live = await cur.fetchone() or {}
        await cur.execute(QUERIES["queue_counts"], {"hours": hours})
        recent = {row["status"]: row["count"] for row in await cur.fetchall()}
        await cur.execute(QUERIES["live_workers"])
        workers = await cur.fetchall()
    return {"live": live, "recent": recent, "workers": workers}
