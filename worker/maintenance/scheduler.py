"""Scheduler: enqueue the jobs of due cron schedules.

Every replica runs it, with no leader and nothing kept in memory. One pass
is one transaction: lock the due schedules with ``SKIP LOCKED``, insert
their jobs, move ``next_run_at`` on. A tick's job and the advance commit
together or not at all, and the unique key on ``(schedule_id,
scheduled_for)`` refuses a second job for a tick whatever happens, so a
replica killed mid-pass leaves the tick to the next pass of any replica.

Catch-up: ticks overdue by at most ``SCHEDULER_MISFIRE_GRACE_SECONDS`` are
on time and each gets its job (a pass may find several ticks of an
every-second schedule). When the oldest due tick is overdue by more, the
schedule missed a window (every replica was down): ``catch_up = 'once'``
enqueues one job, for the first missed tick, and continues from the first
tick after now; ``'all'`` enqueues every missed tick, up to
``_MAX_TICKS_PER_SCHEDULE`` per pass. Every time comes from the database
clock (``now()``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from worker.config import Settings
from worker.metrics import Metrics
from worker.queries import QUERIES
from worker.schedules import InvalidSchedule, ticks_after

log = logging.getLogger(__name__)

_SCHEDULES_PER_PASS = 100
_MAX_TICKS_PER_SCHEDULE = 100
_MAX_PASSES_PER_RUN = 10

# Why a due schedule got fewer jobs than ticks (the label of schedule_skips_total).
MISSED_WINDOW = "missed_window"
ANALYSIS_INACTIVE = "analysis_inactive"
INVALID_SCHEDULE = "invalid_schedule"


@dataclass(frozen=True, slots=True)
class EnqueuedJob:
    """A job a pass inserted for a schedule tick."""

    job_id: str
    schedule_id: str
    scheduled_for: datetime
    lag_seconds: float  # the pass's now - scheduled_for


@dataclass(frozen=True, slots=True)
class SchedulerPass:
    """What one pass did."""

    claimed: int
    enqueued: list[EnqueuedJob]
    skips: list[tuple[str, str]]  # (schedule id, reason)


@dataclass(slots=True)
class _Plan:
    """One claimed schedule's outcome, worked out before anything is written."""

    schedule_id: str
    ticks: list[datetime]
    next_run_at: datetime | None
    is_active: bool = True
    error: str | None = None
    skip: str | None = None


async def run_scheduler_pass(
    conn: psycopg.AsyncConnection,
    *,
    misfire_grace_seconds: float,
    now: datetime | None = None,
    limit: int = _SCHEDULES_PER_PASS,
) -> SchedulerPass:
    """Enqueue the jobs of up to ``limit`` due schedules in one transaction.

    ``now`` replaces the database clock (for tests that drive time); None
    uses ``now()``. Database errors propagate and leave nothing written.
    """
    async with conn.transaction():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(QUERIES["claim_due_schedules"], {"now": now, "limit": limit})
            rows = await cur.fetchall()
        if not rows:
            return SchedulerPass(claimed=0, enqueued=[], skips=[])
        grace = timedelta(seconds=misfire_grace_seconds)
        plans = [_plan(row, row["now"], grace) for row in rows]
        cur = await conn.execute(
            QUERIES["insert_scheduled_jobs"],
            {
                "schedule_ids": [plan.schedule_id for plan in plans for _ in plan.ticks],
                "ticks": [tick for plan in plans for tick in plan.ticks],
            },
        )
        pass_now: datetime = rows[0]["now"]
        enqueued = [
            EnqueuedJob(str(job_id), str(schedule_id), tick, (pass_now - tick).total_seconds())
            for job_id, schedule_id, tick in await cur.fetchall()
        ]
        last_job = {job.schedule_id: job for job in sorted(enqueued, key=lambda job: job.scheduled_for)}
        await conn.execute(
            QUERIES["advance_schedules"],
            {
                "ids": [plan.schedule_id for plan in plans],
                "next_run_at": [plan.next_run_at for plan in plans],
                "is_active": [plan.is_active for plan in plans],
                "last_run_at": [pass_now if plan.schedule_id in last_job else None for plan in plans],
                "last_job_id": [last_job[p.schedule_id].job_id if p.schedule_id in last_job else None for p in plans],
                "last_error": [plan.error for plan in plans],
            },
        )
    _log_changes(rows, plans)
    return SchedulerPass(
        claimed=len(rows),
        enqueued=enqueued,
        skips=[(plan.schedule_id, plan.skip) for plan in plans if plan.skip],
    )


def _plan(row: dict[str, Any], now: datetime, grace: timedelta) -> _Plan:
    """What to do with one due schedule; a schedule that cannot be evaluated is paused, alone."""
    try:
        return _plan_ticks(row, now, grace)
    except Exception as exc:  # one odd row must not stop every schedule's pass
        log.exception("Schedule %s could not be evaluated", row["id"], extra={"schedule_id": str(row["id"])})
        error = f"could not be evaluated ({type(exc).__name__}: {exc}); schedule paused"
        return _Plan(str(row["id"]), [], None, is_active=False, error=error, skip=INVALID_SCHEDULE)


def _plan_ticks(row: dict[str, Any], now: datetime, grace: timedelta) -> _Plan:
    schedule_id = str(row["id"])
    expression, zone = row["cron_expression"], row["timezone"]
    # A timestamp Python cannot hold arrives as text (worker.db): treat it as not computed.
    next_run_at = row["next_run_at"] if isinstance(row["next_run_at"], datetime) else None
    armed_at = row["armed_at"] if isinstance(row["armed_at"], datetime) else now
    try:
        # Not computed yet: the first tick after the schedule was armed, which
        # may already be due (a worker saw the new schedule late).
        due = next_run_at or next(ticks_after(expression, zone, armed_at))
        if due > now:
            return _Plan(schedule_id, [], due)
        if not row["analysis_is_active"]:
            error = "analysis is inactive: its ticks get no job until it is active again"
            return _Plan(schedule_id, [], next(ticks_after(expression, zone, now)), error=error, skip=ANALYSIS_INACTIVE)
        later = ticks_after(expression, zone, due)
        tick = next(later)
        if row["catch_up"] == "once" and now - due > grace:
            if tick > now:  # one late tick, nothing missed
                return _Plan(schedule_id, [due], tick)
            return _Plan(schedule_id, [due], next(ticks_after(expression, zone, now)), skip=MISSED_WINDOW)
        ticks = [due]
        while tick <= now and len(ticks) < _MAX_TICKS_PER_SCHEDULE:
            ticks.append(tick)
            tick = next(later)
        return _Plan(schedule_id, ticks, tick)
    except InvalidSchedule as exc:
        return _Plan(schedule_id, [], None, is_active=False, error=f"{exc}; schedule paused", skip=INVALID_SCHEDULE)


def _log_changes(rows: list[dict[str, Any]], plans: list[_Plan]) -> None:
    for row, plan in zip(rows, plans, strict=True):
        extra = {"schedule_id": plan.schedule_id}
        if plan.skip == INVALID_SCHEDULE:
            log.warning("Schedule %s cannot be evaluated and was paused: %s", plan.schedule_id, plan.error, extra=extra)
        elif plan.skip == MISSED_WINDOW:
            log.info(
                "Schedule %s missed ticks from %s on; one job stands for them (catch_up once)",
                plan.schedule_id,
                plan.ticks[0].isoformat(),
                extra=extra,
            )
        elif plan.error and plan.error != row["last_error"]:
            log.info("Schedule %s: %s", plan.schedule_id, plan.error, extra=extra)


class Scheduler:
    """Runs scheduler passes on this replica's pool and counts what they did."""

    def __init__(self, settings: Settings, db_pool: AsyncConnectionPool, metrics: Metrics) -> None:
        self._settings = settings
        self._db_pool = db_pool
        self._metrics = metrics

    @property
    def interval_seconds(self) -> float:
        """How often a replica looks for due schedules (``SCHEDULER_INTERVAL_SECONDS``)."""
        return self._settings.scheduler_interval_seconds

    async def enqueue_due_jobs(self) -> None:
        """Run passes until the due schedules are handled (a bounded number of passes)."""
        for _ in range(_MAX_PASSES_PER_RUN):
            async with self._db_pool.connection() as conn:
                result = await run_scheduler_pass(
                    conn, misfire_grace_seconds=self._settings.scheduler_misfire_grace_seconds
                )
            for job in result.enqueued:
                self._metrics.schedule_lag.observe(max(job.lag_seconds, 0.0))
                log.debug(
                    "Schedule %s enqueued job %s for %s",
                    job.schedule_id,
                    job.job_id,
                    job.scheduled_for.isoformat(),
                    extra={"job_id": job.job_id, "schedule_id": job.schedule_id},
                )
            self._metrics.scheduled_jobs.inc(len(result.enqueued))
            for _, reason in result.skips:
                self._metrics.schedule_skips.labels(reason).inc()
            if result.claimed < _SCHEDULES_PER_PASS:
                return
