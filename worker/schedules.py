"""Cron schedules: evaluating them, and managing them for the CLI.

A schedule's ticks come from ``cronsim`` in the schedule's IANA time zone, so
they follow daylight saving time the way cron does: a tick that falls in the
spring-forward gap runs at the first valid time after it, a tick in the
repeated fall-back hour runs once. Expressions whose minute or hour field
starts with ``*`` (``*/15 * * * *``) count real time instead, so they keep
their spacing across a change. Six fields put seconds first; the
``@hourly``-style aliases are spelled out here, as cronsim has none.

The database validates every expression and time zone on write (migration
0004); the errors here cover rows written before that, or a time zone the
worker's tz database lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from cronsim import CronSim, CronSimError
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from worker.queries import QUERIES

CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
CATCH_UP_POLICIES = ("once", "all")


class InvalidSchedule(ValueError):
    """The schedule cannot be accepted or evaluated; the message says why."""


class ScheduleNotFound(LookupError):
    """No such schedule."""


def expand_alias(cron_expression: str) -> str:
    """The expression with an ``@alias`` replaced by its five fields; other expressions unchanged."""
    return CRON_ALIASES.get(cron_expression.strip().lower(), cron_expression)


def time_zone(name: str) -> tzinfo:
    """The IANA zone called ``name``; raises InvalidSchedule for an unknown one."""
    if name == "UTC":
        return UTC  # cronsim skips its time-zone arithmetic for this exact object
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidSchedule(f'unknown time zone "{name}": use an IANA name such as Europe/Berlin') from None


def ticks_after(cron_expression: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """The schedule's ticks strictly after ``after`` (aware), in order, as UTC datetimes.

    Raises InvalidSchedule for an expression or zone that cannot be
    evaluated: at once, or from ``next()`` when no tick exists within 50 years.
    """
    zone = time_zone(timezone)
    try:
        cron = CronSim(expand_alias(cron_expression), after.astimezone(zone))
    except CronSimError as exc:
        raise InvalidSchedule(f'invalid cron expression "{cron_expression}": {exc}') from None
    return _utc_ticks(cron, after, cron_expression)


def _utc_ticks(cron: CronSim, after: datetime, cron_expression: str) -> Iterator[datetime]:
    for tick in cron:
        utc = tick.astimezone(UTC)
        # Wall-clock expressions walk local time, which repeats in the fall-back
        # hour; a tick that already passed in real time is not a next tick.
        if utc > after:
            yield utc
    raise InvalidSchedule(f'cron expression "{cron_expression}" has no tick within 50 years')


async def list_schedules(conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
    """Every schedule with its analysis title, oldest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["list_schedules"])
        return await cur.fetchall()


async def add_schedule(
    conn: psycopg.AsyncConnection,
    analysis_id: str,
    cron_expression: str,
    *,
    timezone: str = "UTC",
    parameters: dict[str, Any] | None = None,
    catch_up: str = "once",
) -> str:
    """Insert an active schedule and return its id.

    The database validates expression and zone; the worker's own evaluation
    of the first tick is checked too, in the same transaction. Raises
    InvalidSchedule naming the problem (also for an unknown analysis).
    """
    if catch_up not in CATCH_UP_POLICIES:
        raise InvalidSchedule(f"catch-up must be one of {', '.join(CATCH_UP_POLICIES)}")
    try:
        async with conn.transaction():
            cur = await conn.execute(
                QUERIES["add_schedule"],
                {
                    "analysis_id": analysis_id,
                    "cron_expression": cron_expression,
                    "timezone": timezone,
                    "parameters": Jsonb(parameters or {}),
                    "catch_up": catch_up,
                },
            )
            row = await cur.fetchone()
            assert row is not None
            schedule_id, armed_at = row
            next(ticks_after(cron_expression, timezone, armed_at))
    except errors.ForeignKeyViolation:
        raise InvalidSchedule(f"analysis {analysis_id} does not exist") from None
    except errors.InvalidTextRepresentation:
        raise InvalidSchedule(f"analysis {analysis_id!r} does not exist (not a UUID)") from None
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        raise InvalidSchedule(exc.diag.message_primary or str(exc)) from None
    return str(schedule_id)


async def set_schedule_active(conn: psycopg.AsyncConnection, schedule_id: str, active: bool) -> None:
    """Pause (``active=False``) or resume a schedule; a resumed one runs from its next tick.

    Raises ScheduleNotFound.
    """
    await _change_schedule(conn, QUERIES["set_schedule_active"], {"id": schedule_id, "active": active})


async def remove_schedule(conn: psycopg.AsyncConnection, schedule_id: str) -> None:
    """Delete a schedule (its jobs stay, with ``schedule_id`` cleared). Raises ScheduleNotFound."""
    await _change_schedule(conn, QUERIES["remove_schedule"], {"id": schedule_id})


async def _change_schedule(conn: psycopg.AsyncConnection, query: str, params: dict[str, Any]) -> None:
    try:
        cur = await conn.execute(query, params)
    except errors.InvalidTextRepresentation:
        raise ScheduleNotFound(f"{params['id']!r} is not a schedule id (a UUID)") from None
    if await cur.fetchone() is None:
        raise ScheduleNotFound(f"schedule {params['id']} does not exist")
