"""Fault-injection suite: replicas, kills, restarts, notification storms, data changing underfoot.

Marked ``faults`` so it can be run on its own (``pytest -m faults``); it runs
in CI with everything else. Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import WorkerProcess, create_analysis, submit, wait_for_jobs
from tests.test_reliability import busy, job_status, wait_until
from worker.embedded import EmbeddedPostgres
from worker.migrate import apply_migrations

pytestmark = pytest.mark.faults

GOOD = "export default function analyze(p) { return {n: p.n}; }"


def test_three_replicas_complete_3000_jobs_exactly_once_and_share_the_work(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    workers = [start_worker("--concurrency", "4") for _ in range(3)]
    analysis = create_analysis(db, script=GOOD)
    for batch in range(30):
        db.execute(
            "INSERT INTO analysis_jobs (analysis_id, parameters)"
            " SELECT %s, jsonb_build_object('n', n) FROM generate_series(%s::int, %s::int) AS n",
            (analysis, batch * 100 + 1, batch * 100 + 100),
        )
    wait_until(
        lambda: db.execute("SELECT count(*) FROM analysis_jobs WHERE status = 'completed'").fetchone() == (3000,),
        timeout=180,
        what="3000 jobs completed",
    )
    rows = db.execute("SELECT attempts, worker_id, (result->>'n')::int, parameters->>'n' FROM analysis_jobs").fetchall()
    assert {r[0] for r in rows} == {1}
    assert sorted(r[2] for r in rows) == list(range(1, 3001))
    assert all(str(r[2]) == r[3] for r in rows)
    assert db.execute("SELECT count(*) FROM analysis_job_attempts").fetchone() == (0,)
    per_worker = Counter(r[1] for r in rows)
    worker_ids = {json.loads(w.get("/health")[1])["worker_id"] for w in workers}
    assert set(per_worker) == worker_ids, per_worker
    assert sum(json.loads(w.get("/health")[1])["jobs_processed"] for w in workers) == 3000


def test_notify_storm_of_20000_single_row_inserts_is_processed_without_queue_overflow(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--concurrency", "6")
    analysis = create_analysis(db, script=GOOD)
    usage: list[float] = []
    stop = threading.Event()

    def submitter(offset: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for n in range(offset, offset + 5_000):
                conn.execute(
                    "INSERT INTO analysis_jobs (analysis_id, parameters) VALUES (%s, jsonb_build_object('n', %s::int))",
                    (analysis, n),
                )

    def sample_queue_usage() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
                assert row is not None
                usage.append(float(row[0]))
                stop.wait(0.2)

    sampler = threading.Thread(target=sample_queue_usage)
    sampler.start()
    threads = [threading.Thread(target=submitter, args=(i * 5_000,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    try:
        wait_until(
            lambda: db.execute("SELECT count(*) FROM analysis_jobs WHERE status = 'completed'").fetchone() == (20_000,),
            timeout=300,
            what="20,000 jobs completed",
        )
    finally:
        stop.set()
        sampler.join()
    assert db.execute("SELECT count(*), max(attempts) FROM analysis_jobs").fetchone() == (20_000, 1)
    assert max(usage) < 0.5, f"notification queue reached {max(usage):.0%}"
    assert json.loads(worker.get("/health")[1])["status"] == "healthy"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL server of this test's own, which it may stop and restart."""
    server = EmbeddedPostgres(tmp_path / "pgdata", settings={"fsync": "off"})
    server.start()
    try:
        url = server.create_database("restart_test")
        apply_migrations(url)
        yield server, url
    finally:
        server.stop()


def test_worker_survives_a_postgresql_restart_and_writes_results_held_meanwhile(
    own_server: tuple[EmbeddedPostgres, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    server, url = own_server
    worker = start_worker("--database-url", url, "--poll-interval-ms", "60000")
    with psycopg.connect(url, autocommit=True) as conn:
        analysis = create_analysis(conn, script=busy(2000))
        held = submit(conn, analysis)
        wait_until(lambda: job_status(conn, held) == "running", what="job running")
    server.stop()  # the job finishes while the database is away
    wait_until(lambda: worker.get("/health")[0] == 503, timeout=30, what="/health unhealthy")
    time.sleep(2.5)
    server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        assert wait_for_jobs(conn, [held], timeout=60)[held]["status"] == "completed"
        after = submit(conn, create_analysis(conn, script=GOOD), {"n": 1})
        assert wait_for_jobs(conn, [after], timeout=30)[after]["result"] == {"n": 1}
    wait_until(lambda: worker.get("/health")[0] == 200, timeout=30, what="/health healthy again")


def test_terminated_connections_do_not_delay_the_next_job_until_the_poll(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker("--poll-interval-ms", "60000")
    analysis = create_analysis(db, script=GOOD)
    for _ in range(3):
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'analysis-executor%%' AND datname = current_database()"
        )
        job_id = submit(db, analysis, {"n": 2})
        assert wait_for_jobs(db, [job_id], timeout=20)[job_id]["status"] == "completed"


def test_data_changing_underfoot_never_takes_the_worker_down(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--concurrency", "2", "--poll-interval-ms", "200")
    blocker = create_analysis(db, script=busy(1500))
    blockers = [submit(db, blocker) for _ in range(2)]  # fill both slots so the next jobs wait
    wait_until(lambda: all(job_status(db, j) == "running" for j in blockers), what="slots busy")

    deleted_analysis = create_analysis(db, script=GOOD)
    waiting_for_deleted = submit(db, deleted_analysis, {"n": 1})
    deactivated = create_analysis(db, script=GOOD)
    waiting_for_deactivated = submit(db, deactivated, {"n": 2})
    db.execute("DELETE FROM analyses WHERE id = %s", (deleted_analysis,))
    db.execute("UPDATE analyses SET is_active = false WHERE id = %s", (deactivated,))
    # A job row deleted while it runs: the worker's write finds nothing and moves on.
    db.execute("DELETE FROM analysis_jobs WHERE id = %s", (blockers[0],))
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO analysis_jobs (analysis_id, parameters) VALUES (%s, '\"not an object\"')", (deactivated,)
        )
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        db.execute("INSERT INTO analysis_jobs (analysis_id, parameters) VALUES (%s, '{broken')", (deactivated,))

    rows = wait_for_jobs(db, [blockers[1], waiting_for_deactivated], timeout=30)
    assert rows[blockers[1]]["status"] == "completed"
    assert rows[waiting_for_deactivated]["status"] == "failed"
    assert "inactive" in rows[waiting_for_deactivated]["error_message"]
    assert db.execute("SELECT count(*) FROM analysis_jobs WHERE id = %s", (waiting_for_deleted,)).fetchone() == (0,)
    wait_until(lambda: "no longer held by this worker" in worker.output(), timeout=10, what="deleted row noticed")
    after = submit(db, create_analysis(db, script=GOOD), {"n": 3})
    assert wait_for_jobs(db, [after])[after]["result"] == {"n": 3}
    assert json.loads(worker.get("/health")[1])["status"] == "healthy"
