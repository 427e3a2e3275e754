"""Rows and notifications written by anyone: the database refuses what a worker cannot read, and the
worker survives what it finds anyway (one odd row fails or runs alone, never stopping the others)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import WorkerProcess, create_analysis, submit, wait_for_jobs
from tests.messages import claimed_job
from worker.config import load_settings
from worker.datasources import Dependency, DependencyError, placeholders, unrepresentable_value
from worker.lifecycle import JobLifecycle
from worker.maintenance.scheduler import run_scheduler_pass
from worker.metrics import Metrics
from worker.model import JobStatus, Outcome
from worker.queries import JOBS_PENDING_CHANNEL
from worker.recorder import Recorder
from worker.result_storage import ResultStore

GOOD = "export default function analyze(p) { return {n: p.n}; }"
RANGE_CONSTRAINTS = ("run_at", "created_at", "started_at", "completed_at", "heartbeat_at", "scheduled_for")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("run_at", "-infinity"),
        ("run_at", "infinity"),
        ("run_at", "12000-01-01"),
        ("run_at", "0001-01-01 00:00:00+14"),
        ("created_at", "-infinity"),
        ("created_at", "0044-03-15 BC"),
    ],
)
def test_the_database_refuses_timestamps_a_worker_cannot_load(
    db: psycopg.Connection, analysis_id: str, column: str, value: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=f"analysis_jobs_{column}_in_range"):
        db.execute(f"INSERT INTO analysis_jobs (analysis_id, {column}) VALUES (%s, %s)", (analysis_id, value))


def test_the_database_refuses_schedule_timestamps_a_worker_cannot_load(
    db: psycopg.Connection, analysis_id: str
) -> None:
    schedule = db.execute(
        "INSERT INTO analysis_schedules (analysis_id, cron_expression) VALUES (%s, '* * * * *') RETURNING id",
        (analysis_id,),
    ).fetchone()
    assert schedule is not None
    with pytest.raises(psycopg.errors.CheckViolation, match="analysis_schedules_next_run_at_in_range"):
        db.execute("UPDATE analysis_schedules SET next_run_at = '-infinity' WHERE id = %s", schedule)


def _drop_range_constraints(db: psycopg.Connection) -> None:
    """As if the rows below were written before migration 0010 (or by someone who dropped its checks)."""
    for column in RANGE_CONSTRAINTS:
        db.execute(f"ALTER TABLE analysis_jobs DROP CONSTRAINT analysis_jobs_{column}_in_range")
    for column in ("next_run_at", "last_run_at", "created_at", "updated_at"):
        db.execute(f"ALTER TABLE analysis_schedules DROP CONSTRAINT analysis_schedules_{column}_in_range")


@pytest.mark.faults
def test_poison_rows_beside_100_good_jobs_stop_nothing(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    _drop_range_constraints(db)
    analysis = create_analysis(db, script=GOOD)
    poison = {
        "run_at at -infinity": submit(db, analysis, {"n": -1}, run_at="-infinity"),
        "created_at at -infinity": submit(db, analysis, {"n": -2}, created_at="-infinity"),
        "created_at after year 9999": submit(db, analysis, {"n": -3}, created_at="12000-01-01"),
        "created_at before year 1": submit(db, analysis, {"n": -4}, created_at="0001-01-01 00:00:00+14"),
        "attempts spent": submit(db, analysis, {"n": -5}, attempts=7, max_attempts=3),
        "attempts at the integer limit": submit(
            db, analysis, {"n": -6}, attempts=2_147_483_647, max_attempts=2_147_483_647
        ),
    }
    never_due = submit(db, analysis, {"n": -7}, run_at="infinity")
    far_future = submit(db, analysis, {"n": -8}, run_at="12000-01-01")
    good = [submit(db, analysis, {"n": n}) for n in range(100)]
    worker = start_worker("--concurrency", "8")

    rows = wait_for_jobs(db, good + list(poison.values()), timeout=90, columns="result, attempts, error_message")
    assert [rows[job]["result"] for job in good] == [{"n": n} for n in range(100)]
    assert {rows[job]["status"] for job in good} == {"completed"}
    for name in ("run_at at -infinity", "created_at at -infinity", "created_at after year 9999"):
        assert rows[poison[name]]["status"] == "completed", name
    for name in ("attempts spent", "attempts at the integer limit"):
        row = rows[poison[name]]
        assert row["status"] == "failed", name
        assert row["error_message"].startswith("no attempts left"), row["error_message"]
    assert db.execute(
        "SELECT count(*) FROM analysis_jobs WHERE id = ANY(%s::uuid[]) AND status = 'pending'",
        ([never_due, far_future],),
    ).fetchone() == (2,)

    health = json.loads(worker.get("/health")[1])
    assert (health["status"], health["database"]) == ("healthy", "ok"), health
    status, body = worker.get(f"/jobs/{poison['created_at at -infinity']}")
    assert status == 200 and json.loads(body)["created_at"] == "-infinity"
    assert "claim failed" not in worker.output()
    assert "analysis_executor_oldest_pending_job_age_seconds" in worker.get("/metrics")[1]


def test_reads_of_rows_python_cannot_hold_answer_the_database_text(db: psycopg.Connection, analysis_id: str) -> None:
    _drop_range_constraints(db)
    job = submit(db, analysis_id, run_at="infinity", created_at="12000-01-01 00:00:00+00")
    row = db.execute("SELECT run_at, created_at FROM analysis_jobs WHERE id = %s", (job,)).fetchone()
    assert row == ("infinity", "12000-01-01 00:00:00+00")
    assert isinstance(db.execute("SELECT now()").fetchone()[0], datetime)  # type: ignore[index]


def test_migration_clamps_rows_written_before_it(db: psycopg.Connection, analysis_id: str) -> None:
    """Rolling migration 0010 back, writing poison, and applying it again: the rows are brought into range."""
    from yoyo import get_backend, read_migrations

    from worker.db import yoyo_database_uri
    from worker.migrate import apply_migrations, migrations_dir

    url = _url(db)
    backend = get_backend(yoyo_database_uri(url))
    try:
        migrations = read_migrations(str(migrations_dir()))
        with backend.lock():
            backend.rollback_migrations(backend.to_rollback(migrations.filter(lambda m: m.id >= "0010")))
    finally:
        backend.connection.close()
    early = submit(db, analysis_id, run_at="-infinity")
    late = submit(db, analysis_id, run_at="infinity", created_at="12000-01-01")
    apply_migrations(url)
    rows = dict(db.execute("SELECT id::text, run_at FROM analysis_jobs").fetchall())
    assert rows[early] == datetime(1, 1, 2, tzinfo=UTC)
    assert rows[late].year == 9999
    with pytest.raises(psycopg.errors.CheckViolation):
        submit(db, analysis_id, run_at="-infinity")


def _url(db: psycopg.Connection) -> str:
    info = db.info
    return make_conninfo(host=info.host, port=info.port, user=info.user, password=info.password, dbname=info.dbname)


def test_rescuer_survives_a_lost_job_at_the_integer_limit(db: psycopg.Connection, analysis_id: str) -> None:
    lost = submit(
        db,
        analysis_id,
        status="running",
        worker_id="gone",
        attempts=2_147_483_646,
        max_attempts=2_147_483_647,
        started_at="2020-01-01",
        heartbeat_at="2020-01-01",
    )
    other = submit(db, analysis_id, status="running", worker_id="gone", started_at="2020-01-01")
    from worker.queries import QUERIES

    rescued = db.execute(QUERIES["rescue_orphaned_jobs"], {"lease_seconds": 30}).fetchall()
    assert {str(row[0]) for row in rescued} == {lost, other}


def test_a_schedule_with_an_unreadable_next_run_does_not_stop_the_others(
    db: psycopg.Connection, database_url: str
) -> None:
    _drop_range_constraints(db)
    analysis = create_analysis(db, script=GOOD)
    insert = "INSERT INTO analysis_schedules (analysis_id, cron_expression) VALUES (%s, '* * * * * *') RETURNING id"
    odd = db.execute(insert, (analysis,)).fetchone()
    fine = db.execute(insert, (analysis,)).fetchone()
    assert odd is not None and fine is not None
    db.execute("UPDATE analysis_schedules SET next_run_at = '-infinity' WHERE id = %s", odd)
    db.execute("UPDATE analysis_schedules SET next_run_at = now() - interval '1 second' WHERE id = %s", fine)

    async def one_pass() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await run_scheduler_pass(conn, misfire_grace_seconds=60)

    asyncio.run(one_pass())
    jobs = db.execute("SELECT schedule_id::text FROM analysis_jobs").fetchall()
    assert (str(fine[0]),) in jobs
    assert db.execute("SELECT is_active FROM analysis_schedules WHERE id = %s", fine).fetchone() == (True,)


# --- notifications are hints ------------------------------------------------------


@pytest.fixture
def mallory(db: psycopg.Connection, database_url: str) -> Iterator[str]:
    """The URL of a role that may only connect (roles are cluster-wide: a fresh name per test)."""
    name = f"mallory_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {name} LOGIN")
    yield make_conninfo(**{**conninfo_to_dict(database_url), "user": name})
    db.execute(f"DROP ROLE {name}")


@pytest.mark.faults
def test_a_forged_cancel_notification_stops_nothing(
    db: psycopg.Connection, mallory: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """A role that may only connect sends the cancel notification of a running job: it runs to completion."""
    start_worker("--concurrency", "2")
    slow = create_analysis(
        db,
        script="export default function analyze() { const end = Date.now() + 1500; while (Date.now() < end) {}"
        " return 1; }",
    )
    job = submit(db, slow)
    _wait_for_status(db, job, "running")
    with psycopg.connect(mallory, autocommit=True) as conn:
        for _ in range(20):
            conn.execute("SELECT pg_notify('analysis_jobs_cancel', %s)", (job,))
            conn.execute("SELECT pg_notify('analysis_jobs_cancel', 'not a uuid at all')")
    row = wait_for_jobs(db, [job], columns="result, attempts")[job]
    assert (row["status"], row["result"], row["attempts"]) == ("completed", 1, 1)

    # A real cancel (the row says so) still stops a running job at once.
    job = submit(db, slow)
    _wait_for_status(db, job, "running")
    db.execute("UPDATE analysis_jobs SET status = 'cancelled' WHERE id = %s", (job,))
    started = time.monotonic()
    assert wait_for_jobs(db, [job])[job]["status"] == "cancelled"
    _wait_until(lambda: _running_here(db) == 0, timeout=5)
    assert time.monotonic() - started < 5


def _wait_for_status(db: psycopg.Connection, job: str, status: str, timeout: float = 30) -> None:
    _wait_until(
        lambda: db.execute("SELECT status FROM analysis_jobs WHERE id = %s", (job,)).fetchone() == (status,),
        timeout,
    )


def _running_here(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM analysis_jobs WHERE status = 'running'").fetchone()
    assert row is not None
    return int(row[0])


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- submitters never wait on a lock anyone can hold ------------------------------


def test_a_session_holding_the_settle_lock_does_not_stall_submitters(
    database_url: str, analysis_id: str, mallory: str
) -> None:
    with psycopg.connect(mallory) as holder, psycopg.connect(database_url, autocommit=True) as listener:
        holder.execute("SELECT pg_advisory_xact_lock(7310598114230005006)")  # held until holder's transaction ends
        listener.execute(f"LISTEN {JOBS_PENDING_CHANNEL}")
        with psycopg.connect(database_url, autocommit=True) as submitter:
            submitter.execute("SET lock_timeout = '3s'")  # without the fix, the commit waits and fails here
            submitter.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
        # It could not take part in the idle-worker handshake, so it notified.
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [JOBS_PENDING_CHANNEL]
        holder.rollback()


# --- the recorder writes the rows it can --------------------------------------------


def test_an_outcome_the_database_refuses_fails_alone_and_is_logged_as_stored(
    db: psycopg.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    analysis = create_analysis(db, script=GOOD)
    good = submit(db, analysis, status="running", worker_id="w1", attempts=1)
    bad = submit(db, analysis, status="running", worker_id="w1", attempts=1)
    settings = load_settings({"database_url": database_url, "worker_id": "w1"})
    lifecycle = JobLifecycle(Metrics())

    async def record_both() -> None:
        recorder = Recorder(database_url, "w1", Metrics(), ResultStore(settings))
        outcomes = {
            good: Outcome(JobStatus.COMPLETED, result_json='{"ok": 1}'),
            bad: Outcome(JobStatus.COMPLETED, result_json="{not json"),
        }
        tasks = {
            job: asyncio.create_task(recorder.record(claimed_job(job, analysis, 1), outcome))
            for job, outcome in outcomes.items()
        }
        await asyncio.sleep(0)  # both queued before the writer starts: one batch
        writer = asyncio.create_task(recorder.run())
        try:
            for job, task in tasks.items():
                lifecycle.finished(claimed_job(job, analysis, 1), await task, seconds=0.1)
        finally:
            writer.cancel()
            await recorder.close()

    with caplog.at_level(logging.INFO, logger="worker.jobs"):
        asyncio.run(record_both())
    rows = dict(db.execute("SELECT id::text, status FROM analysis_jobs").fetchall())
    assert rows == {good: "completed", bad: "failed"}
    message = db.execute("SELECT error_message FROM analysis_jobs WHERE id = %s", (bad,)).fetchone()
    assert message is not None and message[0].startswith("the database refused the job's outcome")
    assert f"Job {bad} failed: the database refused the job's outcome" in caplog.text


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"status": "completed", "result_json": "1", "stdout": 5, "stderr": []}, "malformed stdout, stderr"),
        ({"status": "completed", "result_json": {"a": 1}}, "malformed result"),
        ({"status": "completed", "exit_code": "0"}, "malformed exit code"),
        ({"status": "cancelled"}, "unreadable outcome"),
        ({"status": ["completed"]}, "unreadable outcome"),
        ({}, "unreadable outcome"),
    ],
)
def test_a_malformed_outcome_message_fails_its_own_job(message: dict[str, object], error: str) -> None:
    outcome = Outcome.from_message(message, output_max_chars=1024)
    assert outcome.status is JobStatus.FAILED
    assert outcome.error_message is not None and error in outcome.error_message
    assert isinstance(outcome.stdout, str) and isinstance(outcome.stderr, str)


def test_outcome_output_is_bounded_whatever_the_child_sent() -> None:
    outcome = Outcome.from_message({"status": "completed", "stdout": "x" * 10_000_000}, output_max_chars=1 << 20)
    assert outcome.status is JobStatus.COMPLETED
    assert len(outcome.stdout) < (1 << 20) + 200
    assert outcome.stdout.endswith("(JOB_OUTPUT_MAX_BYTES)]\n")


# --- dependency queries -----------------------------------------------------------


@pytest.mark.parametrize("query", ["SELECT 'a%b'", "SELECT %s", "SELECT %(x)b", "SELECT '100%'"])
def test_a_lone_percent_in_a_dependency_query_is_an_error_not_a_placeholder(query: str) -> None:
    with pytest.raises(DependencyError, match=r"write %\(name\)s for a job parameter and %% for a literal %"):
        placeholders(Dependency("readings", "main", query))


def test_dependency_placeholders_and_literal_percents() -> None:
    query = "SELECT 'a%%b' AS ratio WHERE site = %(site)s AND kind = %(kind)s"
    assert placeholders(Dependency("readings", "main", query)) == ["site", "kind"]


def test_a_nan_in_a_dependency_is_reported_with_its_name_column_and_row() -> None:
    datasets = {"ok": [{"v": 1.0}], "readings": [{"v": 2.0}, {"v": float("nan")}]}
    assert unrepresentable_value(datasets).startswith("dependency 'readings' returned nan in column 'v' (row 2)")
