"""Schedules: validation on write, ticks across DST, catch-up, exactly one job per tick.

The scheduler core runs against a real PostgreSQL with a clock the test
drives (``now=``), several schedulers at once on their own connections; the
end-to-end tests run real worker processes on the database clock.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cronsim import CronSim, CronSimError
from psycopg.types.json import Jsonb

from tests.conftest import WorkerProcess, create_analysis, wait_for_jobs
from tests.test_reliability import wait_until
from worker.maintenance.scheduler import SchedulerPass, run_scheduler_pass
from worker.schedules import ticks_after

GOOD = "export default function analyze(params) { return {echo: params}; }"
T0 = datetime(2030, 6, 3, 12, 0, tzinfo=UTC)
GRACE = 60.0


def create_schedule(
    db: psycopg.Connection,
    analysis_id: str,
    cron: str,
    *,
    timezone: str = "UTC",
    catch_up: str = "once",
    armed_at: datetime | None = None,
    parameters: dict[str, Any] | None = None,
) -> str:
    """Insert a schedule in plain SQL; ``armed_at`` pretends it was created then."""
    row = db.execute(
        "INSERT INTO analysis_schedules (analysis_id, cron_expression, timezone, catch_up, parameters, updated_at)"
        " VALUES (%s, %s, %s, %s, %s, COALESCE(%s, now())) RETURNING id",
        (analysis_id, cron, timezone, catch_up, Jsonb(parameters or {}), armed_at),
    ).fetchone()
    assert row is not None
    return str(row[0])


def run_pass(database_url: str, now: datetime, **kwargs: Any) -> SchedulerPass:
    """One scheduler pass on its own connection, at the given clock."""

    async def one() -> SchedulerPass:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            return await run_scheduler_pass(conn, misfire_grace_seconds=GRACE, now=now, **kwargs)

    return asyncio.run(one())


def scheduled_ticks(db: psycopg.Connection, schedule_id: str) -> list[datetime]:
    rows = db.execute(
        "SELECT scheduled_for FROM analysis_jobs WHERE schedule_id = %s ORDER BY scheduled_for", (schedule_id,)
    ).fetchall()
    return [row[0] for row in rows]


def schedule_row(db: psycopg.Connection, schedule_id: str) -> dict[str, Any]:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute("SELECT * FROM analysis_schedules WHERE id = %s", (schedule_id,)).fetchone()
    assert row is not None
    return row


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- validation on write ------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "reason"),
    [
        ("61 * * * *", "minute 61 is out of range 0-59"),
        ("0 24 * * *", "hour 24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month 0 is out of range 1-31"),
        ("* * *", "expected 5 or 6 fields, found 3"),
        ("", "expected 5 or 6 fields, found 0"),
        ("@often", "unknown alias @often"),
        ("*/0 * * * *", 'minute step "0" in "*/0" must be a positive number'),
        ("5-3 * * * *", "minute range 5-3 is backwards"),
        ("0 0 * FOO *", 'month "FOO" is not a number or a month name (JAN-DEC)'),
        ("0 0 * * MON#6", 'day-of-week "MON#6" is not valid: in N#K, K is the week of the month, 1 to 5'),
        ("0 0 31 2 *", "day-of-month 31 never occurs in month 2"),
        ("0 0 ? * *", 'day-of-month "?" is not a number'),
    ],
)
def test_invalid_cron_expression_is_rejected_on_insert_with_the_reason(
    db: psycopg.Connection, cron: str, reason: str
) -> None:
    analysis = create_analysis(db, script=GOOD)
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        create_schedule(db, analysis, cron)
    assert raised.value.diag.message_primary == f'invalid cron expression "{cron}": {reason}'
    assert db.execute("SELECT count(*) FROM analysis_schedules").fetchone() == (0,)


def test_unknown_time_zone_is_rejected_on_insert_and_update(db: psycopg.Connection) -> None:
    analysis = create_analysis(db, script=GOOD)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        create_schedule(db, analysis, "@daily", timezone="Mars/Base")
    assert raised.value.diag.message_primary == 'unknown time zone "Mars/Base": use an IANA name such as Europe/Berlin'
    schedule = create_schedule(db, analysis, "@daily", timezone="Europe/Berlin")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("UPDATE analysis_schedules SET timezone = 'europe/berlin' WHERE id = %s", (schedule,))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE analysis_schedules SET cron_expression = '0 0 * * 8' WHERE id = %s", (schedule,))


@pytest.mark.parametrize(
    "cron",
    [
        "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@HOURLY", " @hourly ",
        "* * * * * *", "*/15 * * * * *", "30 0 9 * * MON-FRI", "0 9 * * 1-5", "0 0 1,15 * *",
        "0 */6 * * *", "5/10 * * * *", "0 0 L * *", "0 0 LW * *", "0 0 * * 5L", "0 0 * * MON#2",
        "0 0 29 2 *", "0 12 * jan-mar sun", "0 0 * * 7",
    ],
)  # fmt: skip
def test_aliases_six_fields_names_and_special_days_are_accepted_and_evaluate(db: psycopg.Connection, cron: str) -> None:
    analysis = create_analysis(db, script=GOOD)
    create_schedule(db, analysis, cron, timezone="Europe/Berlin")
    assert next(ticks_after(cron, "Europe/Berlin", T0)) > T0


def test_the_database_accepts_exactly_the_expressions_the_scheduler_can_evaluate(db: psycopg.Connection) -> None:
    tokens = [
        "*", "0", "7", "59", "60", "1-5", "5-1", "*/5", "*/0", "5/15", "1-10/3", "L", "LW", "5L", "L5", "MON",
        "MON-FRI", "JAN", "1#2", "MON#5", "1#6", "x", "1,2", "1,,2", "3,L", "31", "32", "24", "13", "*/100",
        "1-2-3", "1/2/3", "L/2", "FRIL", "#1", "01", "5L/2", "1-*",
    ]  # fmt: skip
    generator = random.Random(20300603)
    disagreements = []
    for _ in range(1500):
        cron = " ".join(generator.choice(tokens) for _ in range(generator.choice((5, 5, 6))))
        try:
            CronSim(cron, T0)
            evaluates = True
        except CronSimError:
            evaluates = False
        try:
            db.execute("SELECT analysis_schedules_validate_cron(%s)", (cron,))
            accepted = True
        except psycopg.errors.CheckViolation:
            accepted = False
        if accepted != evaluates:
            disagreements.append(cron)
    assert disagreements == []


def test_new_timing_or_resuming_rearms_the_schedule(db: psycopg.Connection) -> None:
    analysis = create_analysis(db, script=GOOD)
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    schedule = create_schedule(db, analysis, "0 * * * *", armed_at=long_ago)

    def arm(next_run_at: datetime | None = T0) -> None:
        db.execute("UPDATE analysis_schedules SET next_run_at = %s WHERE id = %s", (next_run_at, schedule))

    def next_run_at() -> datetime | None:
        return schedule_row(db, schedule)["next_run_at"]

    arm()
    assert schedule_row(db, schedule)["updated_at"] > long_ago
    db.execute("UPDATE analysis_schedules SET parameters = '{\"a\": 1}' WHERE id = %s", (schedule,))
    assert next_run_at() == T0
    db.execute("UPDATE analysis_schedules SET cron_expression = '15 * * * *' WHERE id = %s", (schedule,))
    assert next_run_at() is None
    arm()
    db.execute("UPDATE analysis_schedules SET timezone = 'Asia/Kolkata' WHERE id = %s", (schedule,))
    assert next_run_at() is None
    arm()
    db.execute("UPDATE analysis_schedules SET is_active = false WHERE id = %s", (schedule,))
    assert next_run_at() == T0
    db.execute("UPDATE analysis_schedules SET is_active = true WHERE id = %s", (schedule,))
    assert next_run_at() is None
    # A statement that sets next_run_at itself keeps it.
    db.execute(
        "UPDATE analysis_schedules SET cron_expression = '@daily', next_run_at = %s WHERE id = %s", (T0, schedule)
    )
    assert next_run_at() == T0


# --- ticks, time zones, catch-up ---------------------------------------------


@pytest.mark.parametrize(
    ("timezone", "cron", "armed_at", "now", "expected"),
    [
        # New York springs forward on 2030-03-10 at 02:00: 02:30 never happens and runs at 03:00 EDT.
        ("America/New_York", "30 2 * * *", "2030-03-09 00:00", "2030-03-11 12:00",
         ["2030-03-09 07:30", "2030-03-10 07:00", "2030-03-11 06:30"]),
        # ... and falls back on 2030-11-03 at 02:00: 01:30 happens twice and runs once, at the first.
        ("America/New_York", "30 1 * * *", "2030-11-02 00:00", "2030-11-04 12:00",
         ["2030-11-02 05:30", "2030-11-03 05:30", "2030-11-04 06:30"]),
        # An interval counts real time: every 30 minutes through the repeated hour.
        ("America/New_York", "*/30 * * * *", "2030-11-03 04:50", "2030-11-03 07:10",
         ["2030-11-03 05:00", "2030-11-03 05:30", "2030-11-03 06:00", "2030-11-03 06:30", "2030-11-03 07:00"]),
        # Berlin springs forward on 2030-03-31 and falls back on 2030-10-27.
        ("Europe/Berlin", "30 2 * * *", "2030-03-30 00:00", "2030-04-01 12:00",
         ["2030-03-30 01:30", "2030-03-31 01:00", "2030-04-01 00:30"]),
        ("Europe/Berlin", "30 2 * * *", "2030-10-26 00:00", "2030-10-28 12:00",
         ["2030-10-26 00:30", "2030-10-27 00:30", "2030-10-28 01:30"]),
        ("Europe/Berlin", "0 9 * * MON-FRI", "2030-10-25 00:00", "2030-10-29 00:00",
         ["2030-10-25 07:00", "2030-10-28 08:00"]),
    ],
)  # fmt: skip
def test_ticks_follow_daylight_saving_time_in_the_schedules_zone(
    db: psycopg.Connection, database_url: str, timezone: str, cron: str, armed_at: str, now: str, expected: list[str]
) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, cron, timezone=timezone, catch_up="all", armed_at=utc(armed_at))
    run_pass(database_url, utc(now))
    assert scheduled_ticks(db, schedule) == [utc(tick) for tick in expected]
    assert schedule_row(db, schedule)["next_run_at"] > utc(now)


def test_first_tick_is_the_first_after_the_schedule_was_armed(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "*/5 * * * *", armed_at=T0 + timedelta(seconds=1))
    result = run_pass(database_url, T0 + timedelta(minutes=1))
    assert (result.claimed, result.enqueued) == (1, [])
    assert schedule_row(db, schedule)["next_run_at"] == T0 + timedelta(minutes=5)
    assert run_pass(database_url, T0 + timedelta(minutes=4)).claimed == 0
    result = run_pass(database_url, T0 + timedelta(minutes=5, seconds=2))
    assert [(job.scheduled_for, job.lag_seconds) for job in result.enqueued] == [(T0 + timedelta(minutes=5), 2.0)]


@pytest.mark.parametrize(("catch_up", "jobs"), [("once", 1), ("all", 10)])
def test_catch_up_after_a_ten_minute_outage(
    db: psycopg.Connection, database_url: str, catch_up: str, jobs: int
) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * *", catch_up=catch_up, armed_at=T0)
    run_pass(database_url, T0 + timedelta(minutes=1))
    assert scheduled_ticks(db, schedule) == [T0 + timedelta(minutes=1)]
    # Every replica was down from T0+1:30 to T0+11:30: ticks T0+2 ... T0+11 were missed.
    result = run_pass(database_url, T0 + timedelta(minutes=11, seconds=30))
    missed = [T0 + timedelta(minutes=minute) for minute in range(2, 12)]
    assert scheduled_ticks(db, schedule)[1:] == missed[:jobs]
    assert result.skips == ([(schedule, "missed_window")] if catch_up == "once" else [])
    assert schedule_row(db, schedule)["next_run_at"] == T0 + timedelta(minutes=12)


def test_ticks_overdue_within_the_grace_each_get_their_job(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * * *", armed_at=T0)
    run_pass(database_url, T0 + timedelta(seconds=3.5))
    assert scheduled_ticks(db, schedule) == [T0 + timedelta(seconds=s) for s in (1, 2, 3)]
    assert schedule_row(db, schedule)["next_run_at"] == T0 + timedelta(seconds=4)


def test_catch_up_all_is_bounded_per_pass_and_continues(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * * *", catch_up="all", armed_at=T0)
    now = T0 + timedelta(minutes=5)
    assert len(run_pass(database_url, now).enqueued) == 100
    assert schedule_row(db, schedule)["next_run_at"] == T0 + timedelta(seconds=101)
    for _ in range(2):
        run_pass(database_url, now)
    assert scheduled_ticks(db, schedule) == [T0 + timedelta(seconds=s) for s in range(1, 301)]


def test_three_concurrent_schedulers_enqueue_exactly_one_job_per_tick(
    db: psycopg.Connection, database_url: str
) -> None:
    analysis = create_analysis(db, script=GOOD)
    predicates: dict[str, Callable[[datetime], bool]] = {
        create_schedule(db, analysis, "* * * * *", armed_at=T0): lambda t: t.second == 0,
        create_schedule(db, analysis, "*/2 * * * *", armed_at=T0): lambda t: t.second == 0 and t.minute % 2 == 0,
        create_schedule(db, analysis, "*/7 * * * * *", armed_at=T0): lambda t: t.second % 7 == 0,
        create_schedule(db, analysis, "@hourly", armed_at=T0): lambda t: t.second == 0 and t.minute == 0,
        create_schedule(db, analysis, "* * * * * *", armed_at=T0, catch_up="all"): lambda t: True,
    }
    end = T0 + timedelta(minutes=6)

    async def drive() -> list[list[SchedulerPass]]:
        """Each scheduler's passes: all three run at every step of the clock, on their own connections."""
        connections = [await psycopg.AsyncConnection.connect(database_url, autocommit=True) for _ in range(3)]
        passes: list[list[SchedulerPass]] = [[] for _ in connections]
        try:
            now = T0
            while now < end:
                now += timedelta(seconds=2.5)
                step = await asyncio.gather(
                    *(run_scheduler_pass(conn, misfire_grace_seconds=GRACE, now=now, limit=2) for conn in connections)
                )
                for mine, result in zip(passes, step, strict=True):
                    mine.append(result)
        finally:
            for conn in connections:
                await conn.close()
        return passes

    passes = asyncio.run(drive())
    seconds = [T0 + timedelta(seconds=s) for s in range(1, int((end - T0).total_seconds()) + 1)]
    for schedule, wanted in predicates.items():
        assert scheduled_ticks(db, schedule) == [t for t in seconds if wanted(t)], schedule
    enqueued = [job for mine in passes for one in mine for job in one.enqueued]
    assert len(enqueued) == db.execute("SELECT count(*) FROM analysis_jobs").fetchone()[0]  # no tick twice
    assert all(job.lag_seconds <= 5 for job in enqueued)
    # The schedulers really ran side by side (how the work splits between them depends on timing).
    assert sum(1 for mine in passes if any(one.enqueued for one in mine)) >= 2


def test_no_second_job_for_a_tick_even_when_the_schedule_is_rewound(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * *", armed_at=T0)
    run_pass(database_url, T0 + timedelta(minutes=1))
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(
            "INSERT INTO analysis_jobs (analysis_id, schedule_id, scheduled_for) VALUES (%s, %s, %s)",
            (analysis, schedule, T0 + timedelta(minutes=1)),
        )
    db.execute("UPDATE analysis_schedules SET next_run_at = %s WHERE id = %s", (T0 + timedelta(minutes=1), schedule))
    result = run_pass(database_url, T0 + timedelta(minutes=1, seconds=10))
    assert (result.claimed, result.enqueued) == (1, [])
    assert scheduled_ticks(db, schedule) == [T0 + timedelta(minutes=1)]
    assert schedule_row(db, schedule)["next_run_at"] == T0 + timedelta(minutes=2)


def test_inactive_analysis_advances_without_a_job_and_says_why(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script=GOOD, is_active=False)
    schedule = create_schedule(db, analysis, "* * * * *", armed_at=T0)
    result = run_pass(database_url, T0 + timedelta(minutes=1))
    assert (result.enqueued, result.skips) == ([], [(schedule, "analysis_inactive")])
    row = schedule_row(db, schedule)
    assert row["next_run_at"] == T0 + timedelta(minutes=2)
    assert "analysis is inactive" in row["last_error"]
    db.execute("UPDATE analyses SET is_active = true WHERE id = %s", (analysis,))
    run_pass(database_url, T0 + timedelta(minutes=2))
    assert scheduled_ticks(db, schedule) == [T0 + timedelta(minutes=2)]
    assert schedule_row(db, schedule)["last_error"] is None


def test_schedule_the_worker_cannot_evaluate_is_paused_and_others_still_run(
    db: psycopg.Connection, database_url: str
) -> None:
    analysis = create_analysis(db, script=GOOD)
    # Rows written before the database validated schedules.
    db.execute("ALTER TABLE analysis_schedules DISABLE TRIGGER analysis_schedules_check")
    broken_cron = create_schedule(db, analysis, "0 0 31 2 *", armed_at=T0)
    broken_zone = create_schedule(db, analysis, "* * * * *", timezone="Mars/Base", armed_at=T0)
    db.execute("ALTER TABLE analysis_schedules ENABLE TRIGGER analysis_schedules_check")
    healthy = create_schedule(db, analysis, "* * * * *", armed_at=T0)
    run_pass(database_url, T0 + timedelta(minutes=1), limit=2)
    result = run_pass(database_url, T0 + timedelta(minutes=1), limit=2)
    assert scheduled_ticks(db, healthy) == [T0 + timedelta(minutes=1)]
    assert result.claimed == 1
    for schedule, reason in ((broken_cron, "Bad day-of-month"), (broken_zone, 'unknown time zone "Mars/Base"')):
        row = schedule_row(db, schedule)
        assert row["is_active"] is False and row["next_run_at"] is None
        assert reason in row["last_error"] and row["last_error"].endswith("schedule paused")


def test_deleting_schedule_or_analysis_keeps_or_removes_the_jobs(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * *", armed_at=T0)
    run_pass(database_url, T0 + timedelta(minutes=1))
    db.execute("DELETE FROM analysis_schedules WHERE id = %s", (schedule,))
    assert db.execute("SELECT schedule_id, triggered_by FROM analysis_jobs").fetchall() == [
        (None, f"schedule:{schedule}")
    ]
    schedule = create_schedule(db, analysis, "* * * * *", armed_at=T0)
    run_pass(database_url, T0 + timedelta(minutes=1))
    db.execute("DELETE FROM analyses WHERE id = %s", (analysis,))
    assert db.execute("SELECT count(*) FROM analysis_jobs").fetchone() == (0,)


# --- real workers ---------------------------------------------------------------


def job_count(db: psycopg.Connection, schedule_id: str) -> int:
    row = db.execute("SELECT count(*) FROM analysis_jobs WHERE schedule_id = %s", (schedule_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_scheduled_jobs_run_on_a_real_worker_and_are_counted(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(env={"SCHEDULER_INTERVAL_SECONDS": "0.2"})
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * * *", parameters={"city": "Berlin"})
    wait_until(lambda: job_count(db, schedule) >= 3, timeout=15, what="three scheduled jobs")
    db.execute("UPDATE analysis_schedules SET is_active = false WHERE id = %s", (schedule,))
    ids = [str(row[0]) for row in db.execute("SELECT id FROM analysis_jobs WHERE schedule_id = %s", (schedule,))]
    jobs = wait_for_jobs(db, ids, timeout=30).values()
    assert {(job["status"], job["triggered_by"]) for job in jobs} == {("completed", f"schedule:{schedule}")}
    assert all(job["result"] == {"echo": {"city": "Berlin"}} for job in jobs)
    assert all(job["scheduled_for"].microsecond == 0 for job in jobs)
    row = schedule_row(db, schedule)
    assert str(row["last_job_id"]) in ids and row["last_run_at"] is not None
    metrics = worker.get("/metrics")[1]
    assert f"analysis_executor_scheduled_jobs_enqueued_total {len(ids)}.0" in metrics
    assert f"analysis_executor_schedule_lag_seconds_count {len(ids)}.0" in metrics


@pytest.mark.slow
def test_three_replicas_enqueue_every_second_exactly_once_across_a_replica_kill(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    workers = [start_worker() for _ in range(3)]  # the default SCHEDULER_INTERVAL_SECONDS
    analysis = create_analysis(db, script=GOOD)
    schedule = create_schedule(db, analysis, "* * * * * *")
    wait_until(lambda: job_count(db, schedule) >= 4, timeout=20, what="four ticks before the kill")
    workers[0].proc.send_signal(signal.SIGKILL)
    workers[0].proc.wait(10)
    at_kill = job_count(db, schedule)
    wait_until(lambda: job_count(db, schedule) >= at_kill + 6, timeout=30, what="six ticks after the kill")
    db.execute("UPDATE analysis_schedules SET is_active = false WHERE id = %s", (schedule,))

    rows = db.execute(
        "SELECT id, scheduled_for, created_at FROM analysis_jobs WHERE schedule_id = %s ORDER BY scheduled_for",
        (schedule,),
    ).fetchall()
    ticks = [row[1] for row in rows]
    assert ticks == [ticks[0] + timedelta(seconds=i) for i in range(len(ticks))], "a tick was missed or doubled"
    created = db.execute("SELECT created_at FROM analysis_schedules WHERE id = %s", (schedule,)).fetchone()
    assert created is not None
    assert ticks[0] == created[0].replace(microsecond=0) + timedelta(seconds=1), "the first tick was missed"
    assert max((row[2] - row[1]).total_seconds() for row in rows) < 10  # enqueued promptly, kill or not
    finals = wait_for_jobs(db, [str(row[0]) for row in rows], timeout=60)
    assert {job["status"] for job in finals.values()} == {"completed"}
