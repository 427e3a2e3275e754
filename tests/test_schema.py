"""The schema against a real PostgreSQL: the seed's SQL, constraints, triggers, indexes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg
import pytest
from psycopg import errors

from tests.claims import claim_jobs
from worker.queries import JOBS_PENDING_CHANNEL, QUERIES

SEED_TABLES = {
    "analyses",
    "analysis_jobs",
    "analysis_versions",
    "analysis_schedules",
    "analysis_dependencies",
    "analysis_result_storage",
}

SEED_SUBMIT_JOB = """
INSERT INTO analysis_jobs (id, analysis_id, status, parameters, triggered_by)
VALUES (
  gen_random_uuid(),
  %s,
  'pending',
  '{"test": true}',
  'manual_test'
)
"""

SEED_MONITORING_QUERIES = [
    "SELECT * FROM analysis_jobs ORDER BY created_at DESC LIMIT 5;",
    """SELECT status, COUNT(*)
       FROM analysis_jobs
       WHERE created_at > NOW() - INTERVAL '1 hour'
       GROUP BY status;""",
    """SELECT id, analysis_id,
              EXTRACT(EPOCH FROM (NOW() - started_at))/60 as runtime_minutes
       FROM analysis_jobs
       WHERE status = 'running'
       AND started_at < NOW() - INTERVAL '30 minutes';""",
    """SELECT
         COUNT(*) as total_jobs,
         COUNT(*) FILTER (WHERE status = 'completed') as successful,
         COUNT(*) FILTER (WHERE status = 'failed') as failed,
         ROUND(COUNT(*) FILTER (WHERE status = 'completed') * 100.0 / COUNT(*), 2) as success_rate
       FROM analysis_jobs
       WHERE created_at > NOW() - INTERVAL '24 hours';""",
    """SELECT id, error_message, created_at
       FROM analysis_jobs
       WHERE status = 'failed'
       ORDER BY created_at DESC
       LIMIT 10;""",
]


def test_all_six_seed_tables_exist(db: psycopg.Connection) -> None:
    rows = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
    assert {r[0] for r in rows} >= SEED_TABLES


def test_seed_job_insert_fills_every_omitted_column_with_a_default(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute(SEED_SUBMIT_JOB, (analysis_id,))
    job = db.execute(
        "SELECT status, parameters, triggered_by, priority, attempts, max_attempts, run_at <= now(),"
        " created_at IS NOT NULL, result, started_at FROM analysis_jobs"
    ).fetchone()
    assert job == ("pending", {"test": True}, "manual_test", 0, 0, 3, True, True, None, None)


def test_seed_analysis_gets_defaults(db: psycopg.Connection, analysis_id: str) -> None:
    row = db.execute(
        "SELECT runtime, version, is_active, timeout_ms, memory_limit_mb FROM analyses WHERE id = %s",
        (analysis_id,),
    ).fetchone()
    assert row == ("javascript", 1, True, None, None)


def test_minimal_job_insert_needs_only_the_analysis(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
    row = db.execute("SELECT status, parameters, triggered_by FROM analysis_jobs").fetchone()
    assert row == ("pending", {}, "sql")


@pytest.mark.parametrize("query", SEED_MONITORING_QUERIES)
def test_seed_monitoring_queries_run(db: psycopg.Connection, analysis_id: str, query: str) -> None:
    db.execute(SEED_SUBMIT_JOB, (analysis_id,))
    db.execute("UPDATE analysis_jobs SET status = 'failed', error_message = 'boom'")
    db.execute(SEED_SUBMIT_JOB, (analysis_id,))
    db.execute(query).fetchall()


def test_unknown_status_is_rejected(db: psycopg.Connection, analysis_id: str) -> None:
    with pytest.raises(errors.CheckViolation, match="analysis_jobs_status_check"):
        db.execute("INSERT INTO analysis_jobs (analysis_id, status) VALUES (%s, 'done')", (analysis_id,))


def test_job_for_missing_analysis_is_rejected(db: psycopg.Connection) -> None:
    with pytest.raises(errors.ForeignKeyViolation):
        db.execute(SEED_SUBMIT_JOB, ("00000000-0000-0000-0000-000000000000",))


@pytest.mark.parametrize("parameters", ['"text"', "[1, 2]", "42"])
def test_parameters_must_be_a_json_object(db: psycopg.Connection, analysis_id: str, parameters: str) -> None:
    with pytest.raises(errors.CheckViolation, match="analysis_jobs_parameters_is_object"):
        db.execute("INSERT INTO analysis_jobs (analysis_id, parameters) VALUES (%s, %s)", (analysis_id, parameters))


def test_python_analysis_needs_a_script_name(db: psycopg.Connection) -> None:
    with pytest.raises(errors.CheckViolation, match="analyses_script_for_runtime"):
        db.execute("INSERT INTO analyses (title, runtime) VALUES ('py', 'python')")
    db.execute("INSERT INTO analyses (title, runtime, script_name) VALUES ('py', 'python', 'recalibrate_weights')")


def test_unknown_runtime_is_rejected(db: psycopg.Connection) -> None:
    with pytest.raises(errors.CheckViolation, match="analyses_runtime_check"):
        db.execute("INSERT INTO analyses (title, runtime, script_content) VALUES ('x', 'ruby', 'x')")


def test_changing_the_script_bumps_version_and_keeps_the_old_one(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute(
        "UPDATE analyses SET script_content = 'export default function analyze() { return 2; }' WHERE id = %s",
        (analysis_id,),
    )
    db.execute(
        "UPDATE analyses SET script_content = 'export default function analyze() { return 3; }' WHERE id = %s",
        (analysis_id,),
    )
    assert db.execute("SELECT version FROM analyses WHERE id = %s", (analysis_id,)).fetchone() == (3,)
    history = db.execute(
        "SELECT version, script_content FROM analysis_versions WHERE analysis_id = %s ORDER BY version",
        (analysis_id,),
    ).fetchall()
    assert [v for v, _ in history] == [1, 2]
    assert 'result: "success"' in history[0][1]
    assert "return 2" in history[1][1]


def test_updating_other_columns_keeps_the_version(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute("UPDATE analyses SET title = 'Renamed', is_active = false, version = 99 WHERE id = %s", (analysis_id,))
    assert db.execute("SELECT version FROM analyses").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM analysis_versions").fetchone() == (0,)


def test_deleting_an_analysis_removes_its_jobs_and_history(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute(SEED_SUBMIT_JOB, (analysis_id,))
    db.execute("UPDATE analyses SET script_content = 'x' WHERE id = %s", (analysis_id,))
    db.execute("DELETE FROM analyses WHERE id = %s", (analysis_id,))
    assert db.execute(
        "SELECT (SELECT count(*) FROM analysis_jobs) + (SELECT count(*) FROM analysis_versions)"
    ).fetchone() == (0,)


def _listener(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f"LISTEN {JOBS_PENDING_CHANNEL}")
    return conn


def _drain(conn: psycopg.Connection, timeout: float = 0.5) -> list[psycopg.Notify]:
    return list(conn.notifies(timeout=timeout))


def _worker(db: psycopg.Connection, worker_id: str = "w1", *, waiting: bool = True) -> None:
    """A registered worker, idle and waiting for work unless told otherwise."""
    db.execute(
        "INSERT INTO analysis_workers (id, host, pid, version, concurrency, waiting)"
        " VALUES (%s, 'h', 1, 'test', 5, %s)",
        (worker_id, waiting),
    )


def _waiting(db: psycopg.Connection) -> list[str]:
    return [row[0] for row in db.execute("SELECT id FROM analysis_workers WHERE waiting ORDER BY id")]


SUBMITTERS_SETTLED = QUERIES["submitters_settled"]


def test_insert_notifies_once_and_clears_every_waiting_flag(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    _worker(db, "w1")
    _worker(db, "w2")
    _worker(db, "busy", waiting=False)
    with _listener(database_url) as listener:
        db.execute(SEED_SUBMIT_JOB, (analysis_id,))
        received = _drain(listener)
        assert [n.channel for n in received] == [JOBS_PENDING_CHANNEL]
        assert _waiting(db) == []
        db.execute(SEED_SUBMIT_JOB, (analysis_id,))  # nobody is waiting now: no NOTIFY, no commit lock
        assert _drain(listener) == []


def test_insert_with_no_waiting_worker_sends_no_notification(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    _worker(db, waiting=False)
    with _listener(database_url) as listener:
        for _ in range(5):
            db.execute(SEED_SUBMIT_JOB, (analysis_id,))
        assert _drain(listener) == []


def test_bulk_insert_sends_a_single_notification(db: psycopg.Connection, database_url: str, analysis_id: str) -> None:
    _worker(db)
    with _listener(database_url) as listener:
        db.execute(
            "INSERT INTO analysis_jobs (analysis_id, parameters)"
            " SELECT %s, jsonb_build_object('n', n) FROM generate_series(1, 5000) AS n",
            (analysis_id,),
        )
        received = _drain(listener)
    assert db.execute("SELECT count(*) FROM analysis_jobs").fetchone() == (5000,)
    assert len(received) == 1


def test_many_inserts_in_one_transaction_send_a_single_notification(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    _worker(db)
    with _listener(database_url) as listener:
        with db.transaction():
            for _ in range(20):
                db.execute(SEED_SUBMIT_JOB, (analysis_id,))
        received = _drain(listener)
    assert len(received) == 1


def test_inserting_finished_jobs_sends_no_notification(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    _worker(db)
    with _listener(database_url) as listener:
        db.execute("INSERT INTO analysis_jobs (analysis_id, status) VALUES (%s, 'completed')", (analysis_id,))
        received = _drain(listener)
    assert received == []
    assert _waiting(db) == ["w1"]


def test_the_check_runs_at_commit_so_a_long_transaction_sees_a_worker_that_went_idle_meanwhile(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    _worker(db, waiting=False)
    with _listener(database_url) as listener, psycopg.connect(database_url) as submitter:
        submitter.execute(SEED_SUBMIT_JOB, (analysis_id,))  # transaction still open
        db.execute("UPDATE analysis_workers SET waiting = true")
        submitter.commit()
        assert len(_drain(listener)) == 1


def test_submitter_holds_the_settle_lock_from_its_check_to_its_commit(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    with psycopg.connect(database_url) as submitter:
        submitter.execute(SEED_SUBMIT_JOB, (analysis_id,))
        assert db.execute(SUBMITTERS_SETTLED).fetchone() == (True,)  # not checked yet: nothing to wait for
        submitter.execute("SET CONSTRAINTS ALL IMMEDIATE")  # run the commit-time check now
        assert db.execute(SUBMITTERS_SETTLED).fetchone() == (False,)
        submitter.commit()
    assert db.execute(SUBMITTERS_SETTLED).fetchone() == (True,)


def test_a_job_put_back_in_the_queue_notifies_a_waiting_worker(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    job = db.execute(
        "INSERT INTO analysis_jobs (analysis_id, status) VALUES (%s, 'failed') RETURNING id", (analysis_id,)
    ).fetchone()
    _worker(db)
    with _listener(database_url) as listener:
        db.execute("UPDATE analysis_jobs SET error_message = 'x' WHERE id = %s", job)  # still failed: nothing
        assert _drain(listener) == []
        db.execute("UPDATE analysis_jobs SET status = 'pending' WHERE id = %s", job)
        assert len(_drain(listener)) == 1


def test_a_role_that_may_only_insert_jobs_can_submit_while_a_worker_waits(
    db: psycopg.Connection, database_url: str, analysis_id: str
) -> None:
    role = f"submitter_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role}")
    try:
        db.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        db.execute(f"GRANT INSERT ON analysis_jobs TO {role}")
        _worker(db)
        with _listener(database_url) as listener, psycopg.connect(database_url) as submitter:
            submitter.execute(f"SET ROLE {role}")
            submitter.execute("SET search_path = pg_catalog")  # not even the schema on its path
            submitter.execute("INSERT INTO public.analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
            submitter.commit()
            assert len(_drain(listener)) == 1
        assert _waiting(db) == []
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("where", ["own schema", "temporary schema"])
def test_a_submitters_search_path_cannot_redirect_the_check(
    db: psycopg.Connection, database_url: str, analysis_id: str, where: str
) -> None:
    """The check reads the real analysis_workers, whatever lookalike the submitter puts on its path.

    It runs with its owner's rights: a lookalike would be read, and its
    triggers run, with those rights. pg_temp is searched first unless the
    function's search_path names it last.
    """
    schema = f"shadow_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE SCHEMA {schema}")
    try:
        _worker(db, waiting=False)
        with _listener(database_url) as listener, psycopg.connect(database_url) as submitter:
            if where == "own schema":
                submitter.execute(f"CREATE TABLE {schema}.analysis_workers (id text, waiting boolean)")
                submitter.execute(f"INSERT INTO {schema}.analysis_workers VALUES ('decoy', true)")
                submitter.execute(f"SET search_path = {schema}, public")
            else:
                submitter.execute("CREATE TEMPORARY TABLE analysis_workers (id text, waiting boolean)")
                submitter.execute("INSERT INTO analysis_workers VALUES ('decoy', true)")
            submitter.commit()
            submitter.execute("INSERT INTO public.analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
            submitter.commit()
            assert _drain(listener) == []  # the real table has nobody waiting
            db.execute("UPDATE analysis_workers SET waiting = true")
            submitter.execute("INSERT INTO public.analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
            submitter.commit()
            assert len(_drain(listener)) == 1
            assert submitter.execute("SELECT waiting FROM analysis_workers").fetchone() == (True,)  # the decoy
        assert _waiting(db) == []
    finally:
        db.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_insert_above_read_committed_always_notifies(
    db: psycopg.Connection, database_url: str, analysis_id: str, isolation: str
) -> None:
    _worker(db, waiting=False)
    with _listener(database_url) as listener, psycopg.connect(database_url) as submitter:
        submitter.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        submitter.execute(SEED_SUBMIT_JOB, (analysis_id,))
        submitter.commit()
        assert len(_drain(listener)) == 1


def _claim_plan(db: psycopg.Connection, *, generic: bool = False) -> str:
    """The claim's plan for 10 jobs: as planned for these values, or the generic plan the worker uses."""
    db.execute("ANALYZE analysis_jobs")
    with db.transaction():
        if generic:
            statement = QUERIES["claim_jobs"].replace("%(limit)s", "$1")
            db.execute(f"PREPARE claim_plan (int) AS {statement}")
            db.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            plan = db.execute("EXPLAIN (FORMAT TEXT) EXECUTE claim_plan (10)").fetchall()
            db.execute("DEALLOCATE claim_plan")
        else:
            query = "EXPLAIN (FORMAT TEXT) " + QUERIES["claim_jobs"]
            plan = db.execute(query, {"limit": 10}).fetchall()
    return "\n".join(r[0] for r in plan)


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
@pytest.mark.parametrize("pending", [100, 20_000])
def test_claim_reads_only_pending_rows_with_a_large_history(
    db: psycopg.Connection, analysis_id: str, pending: int, generic: bool
) -> None:
    db.execute(
        "INSERT INTO analysis_jobs (analysis_id, status, completed_at)"
        " SELECT %s, 'completed', now() FROM generate_series(1, 50000)",
        (analysis_id,),
    )
    db.execute("INSERT INTO analysis_jobs (analysis_id) SELECT %s FROM generate_series(1, %s)", (analysis_id, pending))
    plan = _claim_plan(db, generic=generic)
    assert "Seq Scan on analysis_jobs" not in plan, plan
    # A small backlog may be read through either pending-only index and sorted;
    # a large one is read in claim order, stopping at the LIMIT.
    expected = "analysis_jobs_claim_idx" if pending > 1000 else "analysis_jobs_"
    scans = [line for line in plan.splitlines() if "Index" in line and "Scan" in line and " on analysis_jobs " in line]
    assert any(expected in line and "pkey" not in line for line in scans), plan


def test_a_hand_back_is_fenced_by_its_claim_not_only_by_worker_and_attempt(
    db: psycopg.Connection, analysis_id: str
) -> None:
    """A claim that rolled back spent no attempt: a late hand-back of its jobs must not hit a later claim's."""
    db.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
    (job,) = claim_jobs(db, 1, "w1")
    release = {"ids": [job.id], "attempts": [job.attempt], "worker_id": "w1"}
    stale = job.started_at - timedelta(milliseconds=1)  # the same attempt, from a claim that rolled back
    assert db.execute(QUERIES["release_jobs"], {**release, "started_ats": [stale]}).rowcount == 0
    assert db.execute(QUERIES["release_jobs"], {**release, "started_ats": [job.started_at]}).rowcount == 1
    row = db.execute("SELECT status, attempts, worker_id FROM analysis_jobs WHERE id = %s", (job.id,)).fetchone()
    assert row == ("pending", 0, None)


def _mark_plan(db: psycopg.Connection) -> str:
    """The generic plan of the claim's UPDATE, as the worker runs it."""
    with db.transaction():
        statement = (
            QUERIES["mark_jobs_running"]
            .replace("%(worker_id)s", "$1")
            .replace("%(ids)b", "$2")
            .replace("%(analysis_versions)b", "$3")
        )
        db.execute(f"PREPARE mark_plan (text, text[], int[]) AS {statement}")  # as the worker sends them
        db.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        explain = "EXPLAIN (FORMAT TEXT) EXECUTE mark_plan ('w', ARRAY[gen_random_uuid()::text], ARRAY[1])"
        plan = db.execute(explain).fetchall()
        db.execute("DEALLOCATE mark_plan")
    return "\n".join(r[0] for r in plan)


def test_the_claims_update_finds_its_rows_by_primary_key(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute(
        "INSERT INTO analysis_jobs (analysis_id, status) SELECT %s, 'completed' FROM generate_series(1, 20000)",
        (analysis_id,),
    )
    db.execute("ANALYZE analysis_jobs")
    plan = _mark_plan(db)
    assert "analysis_jobs_pkey" in plan and "Seq Scan on analysis_jobs" not in plan, plan


def test_claim_query_claims_in_priority_order_and_respects_the_limit(db: psycopg.Connection, analysis_id: str) -> None:
    db.execute(
        "INSERT INTO analysis_jobs (analysis_id, priority, parameters)"
        " SELECT %s, n %% 3, jsonb_build_object('n', n) FROM generate_series(1, 9) AS n",
        (analysis_id,),
    )
    db.execute(
        "INSERT INTO analysis_jobs (analysis_id, priority, run_at) VALUES (%s, 100, now() + interval '1 hour')",
        (analysis_id,),
    )
    claimed = claim_jobs(db, 4, "w1")
    assert [job.priority for job in claimed] == [2, 2, 2, 1]  # the worker restores claim order
    rows = db.execute(
        "SELECT priority, attempts, worker_id, analysis_version, started_at IS NOT NULL, heartbeat_at IS NOT NULL"
        " FROM analysis_jobs WHERE status = 'running'"
    ).fetchall()
    assert sorted(r[0] for r in rows) == [1, 2, 2, 2]
    assert {r[1:] for r in rows} == {(1, "w1", 1, True, True)}


def test_cancelling_replaces_an_earlier_attempts_error_unless_a_reason_is_given(
    db: psycopg.Connection, analysis_id: str
) -> None:
    db.execute(
        "INSERT INTO analysis_jobs (analysis_id, error_message) VALUES (%s, 'worker lost: w1 ...')", (analysis_id,)
    )
    db.execute("UPDATE analysis_jobs SET status = 'cancelled' WHERE status = 'pending'")
    db.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s)", (analysis_id,))
    db.execute("UPDATE analysis_jobs SET status = 'cancelled', error_message = 'duplicate' WHERE status = 'pending'")
    rows = db.execute(
        "SELECT error_message, completed_at IS NOT NULL FROM analysis_jobs ORDER BY created_at"
    ).fetchall()
    assert sorted(rows) == [("cancelled", True), ("duplicate", True)]


def test_attempt_history_records_every_spent_attempt_but_a_first_one_that_completed(
    db: psycopg.Connection, analysis_id: str
) -> None:
    def job() -> str:
        row = db.execute(
            "INSERT INTO analysis_jobs (analysis_id, status, attempts, worker_id, started_at)"
            " VALUES (%s, 'running', 1, 'w1', now()) RETURNING id",
            (analysis_id,),
        ).fetchone()
        assert row is not None
        return str(row[0])

    def end(job_id: str, status: str, attempts_delta: int = 0) -> None:
        db.execute(
            "UPDATE analysis_jobs SET status = %s, attempts = attempts + %s WHERE id = %s",
            (status, attempts_delta, job_id),
        )

    completed, retried, handed_back, failed, cancelled = job(), job(), job(), job(), job()
    end(completed, "completed")
    end(retried, "pending")
    db.execute("UPDATE analysis_jobs SET status = 'running', attempts = 2 WHERE id = %s", (retried,))
    end(retried, "completed")
    end(handed_back, "pending", -1)  # a graceful hand-back at shutdown gives the attempt back
    end(failed, "failed")
    end(cancelled, "cancelled")
    rows = db.execute("SELECT job_id::text, attempt, outcome FROM analysis_job_attempts").fetchall()
    assert sorted(rows) == sorted(
        [(retried, 1, "retried"), (retried, 2, "completed"), (failed, 1, "failed"), (cancelled, 1, "cancelled")]
    )
    # The common case costs no trigger call at all: the WHEN clause filters it out.
    (when,) = db.execute(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'analysis_jobs_record_attempt'"
    ).fetchone()  # type: ignore[misc]
    assert "NOT ((new.status = 'completed'::text) AND (old.attempts = 1))" in when
