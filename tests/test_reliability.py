"""Leases, rescue, fencing, retries, cancellation, shutdown, the job API, retention.

Real worker processes on a real PostgreSQL; leases are shortened to a second
so that the tests see a dead worker's jobs come back within seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tests.conftest import WorkerProcess, create_analysis, submit, wait_for_jobs
from tests.messages import claimed_job
from tests.processes import alive, child_pids
from worker.config import load_settings
from worker.lifecycle import ClaimedJob, JobLifecycle
from worker.maintenance.heartbeat import Heartbeat
from worker.maintenance.pruner import Pruner
from worker.metrics import Metrics
from worker.model import Interruption, JobStatus, Outcome
from worker.queries import JOBS_FINISHED_CHANNEL
from worker.recorder import Recorded, Recorder
from worker.result_storage import ResultStore

SHORT_LEASE = {"JOB_LEASE_SECONDS": "1"}
GOOD = 'export default function analyze() { return {result: "success"}; }'


def busy(ms: int) -> str:
    """A JavaScript analysis that keeps a core busy for ``ms`` milliseconds."""
    loop = f"const end = Date.now() + {ms}; while (Date.now() < end) {{}}"
    return f"export default function analyze() {{ {loop} return 'done'; }}"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout}s")
        time.sleep(0.02)


def job_status(db: psycopg.Connection, job_id: str) -> str:
    row = db.execute("SELECT status FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def attempts_history(db: psycopg.Connection, job_id: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT attempt, outcome, error_message FROM analysis_job_attempts WHERE job_id = %s ORDER BY attempt",
        (job_id,),
    ).fetchall()


def http(method: str, url: str, body: bytes | None = None, token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- leases, rescue, fencing -------------------------------------------------


@pytest.mark.faults
def test_job_of_killed_worker_is_completed_by_another_replica(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    victim = start_worker(env=SHORT_LEASE)
    analysis = create_analysis(db, script=busy(2000))
    job_id = submit(db, analysis)
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    children = child_pids(victim.proc.pid)
    assert children
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in children), timeout=10, what="pool children gone")

    rescuer = start_worker(env=SHORT_LEASE)
    job = wait_for_jobs(db, [job_id], timeout=60)[job_id]
    assert (job["status"], job["attempts"], job["result"]) == ("completed", 2, "done")
    history = attempts_history(db, job_id)
    assert [(a, o) for a, o, _ in history] == [(1, "retried"), (2, "completed")]
    assert "worker lost" in history[0][2]
    rescuer_id = json.loads(rescuer.get("/health")[1])["worker_id"]
    assert job["worker_id"] == rescuer_id
    assert 'analysis_executor_jobs_rescued_total{status="pending"} 1.0' in rescuer.get("/metrics")[1]


@pytest.mark.faults
def test_paused_worker_cannot_overwrite_the_newer_attempt(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    paused = start_worker(env=SHORT_LEASE)
    analysis = create_analysis(db, script=busy(1500))
    job_id = submit(db, analysis)
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    paused.proc.send_signal(signal.SIGSTOP)
    for pid in child_pids(paused.proc.pid):
        os.kill(pid, signal.SIGSTOP)
    try:
        start_worker(env=SHORT_LEASE)
        job = wait_for_jobs(db, [job_id], timeout=60)[job_id]
        assert (job["status"], job["attempts"]) == ("completed", 2)
        winner = job["worker_id"]
    finally:
        for pid in child_pids(paused.proc.pid):
            os.kill(pid, signal.SIGCONT)
        paused.proc.send_signal(signal.SIGCONT)
    # The resumed worker finishes its stale attempt; its write is fenced off.
    wait_until(lambda: "no longer held by this worker" in paused.output(), timeout=30, what="stale write refused")
    row = db.execute("SELECT status, attempts, worker_id FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("completed", 2, winner)


@pytest.mark.faults
def test_lost_worker_with_no_attempts_left_fails_the_job(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    victim = start_worker(env=SHORT_LEASE)
    job_id = submit(db, create_analysis(db, script=busy(3000)), max_attempts=1)
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    start_worker(env=SHORT_LEASE)
    job = wait_for_jobs(db, [job_id], timeout=30)[job_id]
    assert job["status"] == "failed"
    assert "worker lost" in job["error_message"]


def test_registry_lists_live_workers_and_forgets_dead_ones(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    doomed = start_worker(env=SHORT_LEASE)
    survivor = start_worker(env=SHORT_LEASE)
    ids = {json.loads(w.get("/health")[1])["worker_id"] for w in (doomed, survivor)}
    rows = db.execute("SELECT id, concurrency, pid FROM analysis_workers").fetchall()
    assert {r[0] for r in rows} == ids
    status = subprocess.run(
        [sys.executable, "-m", "worker", "status", "--database-url", database_url], capture_output=True, text=True
    )
    assert "workers alive: 2" in status.stdout
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait()
    survivor_id = json.loads(survivor.get("/health")[1])["worker_id"]
    wait_until(
        lambda: {r[0] for r in db.execute("SELECT id FROM analysis_workers").fetchall()} == {survivor_id},
        timeout=30,
        what="dead worker aged out",
    )
    survivor.stop()
    assert db.execute("SELECT count(*) FROM analysis_workers").fetchone() == (0,)


class _Holding:
    """The executor as the heartbeat sees it: the jobs it holds, and the ones it was told to stop."""

    def __init__(self, jobs: list[ClaimedJob]) -> None:
        self._jobs = jobs
        self.interrupted: list[tuple[str, str]] = []

    def held(self) -> list[ClaimedJob]:
        return self._jobs

    def interrupt(self, job_id: str, reason: str, attempt: int | None = None) -> bool:
        self.interrupted.append((job_id, reason))
        return True


def test_lease_renewal_never_waits_for_a_locked_row_nor_stops_its_job(
    db: psycopg.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The result writer locks its batch's rows in any order: renewal must not wait for them (no deadlock)."""
    analysis = create_analysis(db, script=GOOD)
    jobs = [
        claimed_job(submit(db, analysis, status="running", worker_id="w1", attempts=1), analysis, 1) for _ in range(4)
    ]
    locked, cancelled, claimed_again, free = (job.id for job in jobs)
    old_beat = "2000-01-01T00:00:00Z"
    db.execute("UPDATE analysis_jobs SET heartbeat_at = %s", (old_beat,))
    db.execute("UPDATE analysis_jobs SET status = 'cancelled' WHERE id = %s", (cancelled,))
    # Rescued and claimed again by this same worker: attempt 1, which it still holds, is lost.
    db.execute("UPDATE analysis_jobs SET attempts = 2 WHERE id = %s", (claimed_again,))
    settings = load_settings({"database_url": database_url, "worker_id": "w1"})
    executor = _Holding(jobs)

    def renewed() -> set[str]:
        rows = db.execute("SELECT id FROM analysis_jobs WHERE heartbeat_at > %s", (old_beat,)).fetchall()
        return {str(row[0]) for row in rows}

    async def beat() -> None:
        async with AsyncConnectionPool(database_url, min_size=1, kwargs={"autocommit": True}) as pool:
            heartbeat = Heartbeat(settings, pool, executor, JobLifecycle(Metrics()), lambda: False)
            await heartbeat.register()
            async with asyncio.timeout(20):  # without SKIP LOCKED it waits as long as the lock is held
                await heartbeat.beat()

    with psycopg.connect(database_url) as holder:  # a transaction writing two jobs' rows, left open
        holder.execute(
            "UPDATE analysis_jobs SET stdout = 'being recorded' WHERE id = ANY(%s::uuid[])", ([locked, claimed_again],)
        )
        asyncio.run(beat())
        assert renewed() == {free}
        # The locked job is still this attempt's: nothing stops it. The others are no longer held.
        assert executor.interrupted == [(cancelled, Interruption.CANCELLED), (claimed_again, Interruption.LEASE_LOST)]
        # Its lease is long past half spent: the log says so.
        assert [r.job_id for r in caplog.records if "locked by another transaction" in r.getMessage()] == [locked]
        holder.rollback()
    executor.interrupted.clear()
    asyncio.run(beat())
    assert renewed() == {free, locked}
    assert executor.interrupted == [(cancelled, Interruption.CANCELLED), (claimed_again, Interruption.LEASE_LOST)]


def test_an_earlier_attempt_recorded_in_the_same_batch_as_the_current_one_is_fenced_off(
    db: psycopg.Connection, database_url: str
) -> None:
    """The same worker can hold two attempts of a job (the first rescued, the second claimed again)."""
    analysis = create_analysis(db, script=GOOD)
    job = submit(db, analysis, status="running", worker_id="w1", attempts=2)
    settings = load_settings({"database_url": database_url, "worker_id": "w1"})

    async def record_both() -> tuple[Recorded | None, Recorded | None]:
        recorder = Recorder(database_url, "w1", Metrics(), ResultStore(settings))
        earlier = asyncio.create_task(
            recorder.record(claimed_job(job, analysis, 1), Outcome(JobStatus.COMPLETED, result_json='"earlier"'))
        )
        current = asyncio.create_task(
            recorder.record(claimed_job(job, analysis, 2), Outcome(JobStatus.COMPLETED, result_json='"current"'))
        )
        await asyncio.sleep(0)  # both are queued before the writer starts: one batch
        writer = asyncio.create_task(recorder.run())
        try:
            return await earlier, await current
        finally:
            writer.cancel()
            await recorder.close()

    earlier, current = asyncio.run(record_both())
    assert earlier is None
    assert current is not None and current.status == "completed"
    assert db.execute("SELECT result FROM analysis_jobs WHERE id = %s", (job,)).fetchone() == ("current",)


# --- claims: jobs start while the claim commits ---------------------------------


def _at_claim_commit(db: psycopg.Connection, body: str) -> None:
    """Run ``body`` (plpgsql) inside every claim's COMMIT, once per claimed row."""
    db.execute(f"CREATE FUNCTION test_at_claim_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$")
    db.execute(
        "CREATE CONSTRAINT TRIGGER test_at_claim_commit AFTER UPDATE ON analysis_jobs"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
        " WHEN (OLD.status = 'pending' AND NEW.status = 'running')"
        " EXECUTE FUNCTION test_at_claim_commit()"
    )


def _slow_claim_statement(db: psycopg.Connection, seconds: int) -> None:
    """Make every claim statement (not its COMMIT) take ``seconds`` per claimed row."""
    db.execute("CREATE FUNCTION test_slow_claim() RETURNS trigger LANGUAGE plpgsql AS"
               f" $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$")  # fmt: skip
    db.execute(
        "CREATE TRIGGER test_slow_claim AFTER UPDATE ON analysis_jobs FOR EACH ROW"
        " WHEN (OLD.status = 'pending' AND NEW.status = 'running') EXECUTE FUNCTION test_slow_claim()"
    )


_CLAIM_SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'analysis-executor claims'"


def _sigterm_while_claiming(db: psycopg.Connection, worker: WorkerProcess) -> None:
    """SIGTERM the worker while its claim sleeps in a test trigger; it must exit cleanly."""
    in_trigger = _CLAIM_SESSIONS + " AND wait_event = 'PgSleep'"
    wait_until(lambda: db.execute(in_trigger).fetchone() == (1,), timeout=10, what="claim under way")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0


def _timed(ms: int) -> str:
    """A JavaScript analysis that returns when it started ({t: epoch ms}) after ``ms`` of work."""
    body = f"const t = Date.now(); while (Date.now() < t + {ms}) {{}} return {{t}};"
    return f"export default function analyze() {{ {body} }}"


def _epoch(value: Any) -> float:
    return float(value.timestamp())


def test_javascript_starts_before_its_claim_commits_and_is_recorded_only_after(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    """A slow claim COMMIT (2 s): the script already runs; its result, a Python script and leases wait for it."""
    _at_claim_commit(db, "PERFORM pg_sleep(2); RETURN NULL;")
    # Runs 1.4 s while the claim commits, across at least one heartbeat (every 1 s with a
    # 3 s lease, which the 2 s commit does not outlast): it must not be taken for a lost job.
    js = create_analysis(db, script=_timed(1400))
    (scripts_dir / "clock.py").write_text("import json, time\nprint(json.dumps({'t': time.time() * 1000}))\n")
    py = create_analysis(db, script_name="clock.py")
    start_worker(env={"JOB_LEASE_SECONDS": "3"})
    rows = wait_for_jobs(db, [submit(db, js), submit(db, py)], timeout=60)
    for row in rows.values():
        assert row["status"] == "completed", row["error_message"]
        assert row["attempts"] == 1
        started = _epoch(row["started_at"])  # when the claim's transaction began
        assert _epoch(row["completed_at"]) >= started + 2  # nothing is recorded before the claim commits
        script_ran_at = row["result"]["t"] / 1000
        if str(row["analysis_id"]) == js:
            assert script_ran_at < started + 1.0, "the JavaScript job waited for the claim's commit"
        else:
            assert script_ran_at >= started + 2, "a Python script started before its claim committed"


def test_a_claim_whose_commit_fails_stops_its_started_job_which_runs_again(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    db.execute("CREATE SEQUENCE test_claim_commits")
    _at_claim_commit(
        db,
        "IF nextval('test_claim_commits') = 1 THEN RAISE EXCEPTION 'injected: the claim cannot commit'; END IF;"
        " RETURN NULL;",
    )
    js = create_analysis(db, script=_timed(2000))
    worker = start_worker()
    job_id = submit(db, js)
    row = wait_for_jobs(db, [job_id], timeout=60)[job_id]
    assert row["status"] == "completed", row["error_message"]
    assert row["attempts"] == 1  # the failed claim never happened, as far as the row knows
    # The recorded run is the one of the claim that committed, not the first one.
    assert row["result"]["t"] / 1000 >= _epoch(row["started_at"])
    assert attempts_history(db, job_id) == []
    assert f"Job {job_id} stopped: claim not committed" in worker.output()
    assert "injected: the claim cannot commit" in worker.output()
    metrics = worker.get("/metrics")[1]
    assert 'analysis_executor_jobs_claimed_total{runtime="javascript"} 1.0' in metrics  # not the failed claim
    assert "analysis_executor_jobs_in_flight 0.0" in metrics


# --- retries -----------------------------------------------------------------


@pytest.mark.faults
def test_pool_process_killed_from_outside_is_retried(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--concurrency", "1")
    job_id = submit(db, create_analysis(db, script=busy(1500)))
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    (child,) = child_pids(worker.proc.pid)
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    job = wait_for_jobs(db, [job_id], timeout=30)[job_id]
    assert (job["status"], job["attempts"]) == ("completed", 2)
    history = attempts_history(db, job_id)
    assert history[0][:2] == (1, "retried")
    assert "pool process died (killed by SIGKILL)" in history[0][2]


def test_script_errors_are_final_by_default_and_retried_when_the_analysis_says_so(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    failing = "export default function analyze() { throw new Error('flaky'); }"
    final = submit(db, create_analysis(db, script=failing))
    retried_analysis = create_analysis(db, script=failing)
    db.execute("UPDATE analyses SET retry_script_errors = true WHERE id = %s", (retried_analysis,))
    retried = submit(db, retried_analysis, max_attempts=2)
    rows = wait_for_jobs(db, [final, retried], timeout=30)
    assert (rows[final]["status"], rows[final]["attempts"]) == ("failed", 1)
    wait_until(lambda: job_status(db, retried) == "failed" and len(attempts_history(db, retried)) == 2, timeout=30)
    assert [o for _, o, _ in attempts_history(db, retried)] == ["retried", "failed"]


# --- cancellation --------------------------------------------------------------


@pytest.mark.faults
def test_cancel_pending_job_at_once_and_refuse_duplicate_or_finished_cancels(
    db: psycopg.Connection, database_url: str
) -> None:
    analysis = create_analysis(db, script=GOOD)
    job_id = submit(db, analysis)
    cli = [sys.executable, "-m", "worker", "cancel", job_id, "--database-url", database_url]
    first = subprocess.run(cli, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    row = db.execute("SELECT status, completed_at IS NOT NULL FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("cancelled", True)
    again = subprocess.run(cli, capture_output=True, text=True)
    assert again.returncode == 2
    assert "already cancelled" in again.stderr
    unknown = subprocess.run(
        [*cli[:4], "00000000-0000-0000-0000-000000000000", *cli[5:]], capture_output=True, text=True
    )
    assert unknown.returncode == 2


@pytest.mark.faults
@pytest.mark.parametrize("how", ["http", "sql"])
def test_cancelling_a_running_job_kills_its_process(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], how: str
) -> None:
    worker = start_worker("--concurrency", "1", "--poll-interval-ms", "600000")
    job_id = submit(db, create_analysis(db, script=busy(60_000)))
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    (child,) = child_pids(worker.proc.pid)
    if how == "http":
        status, body = http("POST", f"{worker.base_url}/jobs/{job_id}/cancel")
        assert (status, body["status"]) == (200, "cancelled")
    else:
        db.execute(
            "UPDATE analysis_jobs SET status = 'cancelled' WHERE id = %s AND status IN ('pending', 'running')",
            (job_id,),
        )
    wait_until(lambda: not alive(child), timeout=5, what="the job's process killed")
    wait_until(lambda: json.loads(worker.get("/health")[1])["jobs_in_flight"] == 0, timeout=5, what="slot freed")
    assert job_status(db, job_id) == "cancelled"
    assert attempts_history(db, job_id)[0][1] == "cancelled"
    status, body = http("POST", f"{worker.base_url}/jobs/{job_id}/cancel")
    assert status == 409 and "already cancelled" in body["error"]
    after = submit(db, create_analysis(db, script=GOOD))
    assert wait_for_jobs(db, [after])[after]["status"] == "completed"


# --- graceful shutdown -----------------------------------------------------------


@pytest.mark.faults
def test_sigterm_lets_a_running_job_finish_within_grace(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    job_id = submit(db, create_analysis(db, script=busy(1500)))
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: worker.get("/health/ready")[0] == 503, timeout=5, what="readiness 503 while draining")
    assert json.loads(worker.get("/health/ready")[1])["reason"] == "draining"
    assert worker.proc.wait(30) == 0
    row = db.execute("SELECT status, attempts FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("completed", 1)


@pytest.mark.faults
def test_sigterm_during_a_claim_lets_the_claimed_job_finish_within_grace(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Jobs of a claim still on its way when SIGTERM arrives get the grace period too, not a kill."""
    _slow_claim_statement(db, 1)
    worker = start_worker()
    job_id = submit(db, create_analysis(db, script=GOOD))
    _sigterm_while_claiming(db, worker)
    row = db.execute("SELECT status, attempts FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("completed", 1), worker.output()
    assert "released at shutdown" not in worker.output()


@pytest.mark.faults
def test_a_claim_still_running_when_the_grace_period_ends_is_rolled_back(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Given up at shutdown, a claim must not commit on its way out (a pipeline's exit sends a Sync)."""
    _slow_claim_statement(db, 4)
    worker = start_worker(env={"SHUTDOWN_GRACE_SECONDS": "1"})
    job_id = submit(db, create_analysis(db, script=GOOD))
    _sigterm_while_claiming(db, worker)
    wait_until(lambda: db.execute(_CLAIM_SESSIONS).fetchone() == (0,), timeout=15, what="claim connection gone")
    row = db.execute("SELECT status, attempts, worker_id FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("pending", 0, None), worker.output()
    assert "claiming did not finish within the grace period" in worker.output()


@pytest.mark.faults
@pytest.mark.parametrize(
    "commit_body",
    [
        "PERFORM pg_sleep(4); RETURN NULL;",
        # The cancel is swallowed: the claim commits after all, and must be handed back.
        "BEGIN PERFORM pg_sleep(4); EXCEPTION WHEN query_canceled THEN NULL; END; RETURN NULL;",
    ],
    ids=["rolled back", "committed after all"],
)
def test_a_claim_whose_commit_outlasts_the_shutdown_is_handed_back(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], commit_body: str
) -> None:
    """Its COMMIT still running when the grace period ends, the claim is given up: cancelled and
    rolled back, or handed back if it committed after all, never left 'running' for the lease."""
    _at_claim_commit(db, commit_body)
    worker = start_worker(env={"SHUTDOWN_GRACE_SECONDS": "1"})
    job_id = submit(db, create_analysis(db, script=GOOD))
    _sigterm_while_claiming(db, worker)
    row = db.execute("SELECT status, attempts, worker_id FROM analysis_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("pending", 0, None), worker.output()
    assert "stopped: claim not committed" in worker.output()
    if "EXCEPTION" in commit_body:
        assert "handed 1 unfinished job(s) back to the queue" in worker.output()


@pytest.mark.faults
def test_sigterm_hands_back_a_job_that_outlives_the_grace_period(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(env={"SHUTDOWN_GRACE_SECONDS": "1"})
    job_id = submit(db, create_analysis(db, script=busy(30_000)))
    wait_until(lambda: job_status(db, job_id) == "running", what="job running")
    children = child_pids(worker.proc.pid)
    assert worker.stop() == 0
    row = db.execute(
        "SELECT status, attempts, worker_id, started_at FROM analysis_jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row == ("pending", 0, None, None)
    assert not any(alive(pid) for pid in children)
    assert "handed 1 unfinished job(s) back to the queue" in worker.output()


# --- HTTP job API -----------------------------------------------------------------


def test_job_api_submits_shows_and_cancels(db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker()
    analysis = create_analysis(db, script="export default function analyze(p) { return p.n + 1; }")
    body = json.dumps({"analysis_id": analysis, "parameters": {"n": 41}, "priority": 3, "triggered_by": "tests"})
    status, job = http("POST", f"{worker.base_url}/jobs", body.encode())
    assert status == 201
    assert (job["status"], job["priority"], job["triggered_by"], job["parameters"]) == (
        "pending",
        3,
        "tests",
        {"n": 41},
    )
    wait_for_jobs(db, [job["id"]])
    status, shown = http("GET", f"{worker.base_url}/jobs/{job['id']}")
    assert (status, shown["status"], shown["result"], shown["attempts_history"]) == (200, "completed", 42, [])


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"parameters": {}}', 400, "analysis_id is required"),
        (b'{"analysis_id": "00000000-0000-0000-0000-000000000000"}', 404, "does not exist"),
        (b'{"analysis_id": "nope"}', 404, "does not exist"),
        (b'{"analysis_id": "ANALYSIS", "parameters": [1]}', 400, "parameters must be a JSON object"),
        (b'{"analysis_id": "ANALYSIS", "priority": "high"}', 400, "priority must be"),
        (b'{"analysis_id": "ANALYSIS", "run_at": "soon"}', 400, "ISO 8601"),
        (b'{"analysis_id": "ANALYSIS", "max_attempts": 0}', 400, "max_attempts"),
        (b'{"analysis_id": "ANALYSIS", "colour": "red"}', 400, "unknown field"),
        (
            b'{"analysis_id": "ANALYSIS", "parameters": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            400,
            "nested too deeply",
        ),
        (
            b'{"analysis_id": "ANALYSIS", "parameters": {"a": ' + b"[" * 600 + b"]" * 600 + b"}}",
            400,
            "more than 500 levels",
        ),
    ],
)
def test_job_api_rejects_bad_requests_with_a_json_error(
    db: psycopg.Connection,
    start_worker: Callable[..., WorkerProcess],
    body: bytes,
    status: int,
    message: str,
) -> None:
    worker = start_worker()
    analysis = create_analysis(db, script=GOOD)
    got, answer = http("POST", f"{worker.base_url}/jobs", body.replace(b"ANALYSIS", analysis.encode()))
    assert got == status
    assert message in answer["error"]
    assert db.execute("SELECT count(*) FROM analysis_jobs").fetchone() == (0,)


def test_job_api_errors_are_json_for_unknown_jobs_and_oversized_bodies(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(env={"HTTP_MAX_BODY_BYTES": "2048"})
    # Parameters PostgreSQL accepts but Python's json module cannot load (5,000 deep).
    deep = db.execute(
        "INSERT INTO analysis_jobs (analysis_id, run_at, parameters) VALUES"
        " (%s, now() + interval '1 day', jsonb_build_object('a', (repeat('[', 5000) || repeat(']', 5000))::jsonb))"
        " RETURNING id::text",
        (create_analysis(db, script=GOOD),),
    ).fetchone()
    assert deep is not None
    status, answer = http("GET", f"{worker.base_url}/jobs/{deep[0]}")
    assert (status, answer["error"]) == (
        500,
        f"job {deep[0]}: its parameters or result are nested too deeply to load "
        "(over ~1,000 levels); read them with SQL",
    )
    # Such a job can still be cancelled; the answer then shows only its id and status.
    status, answer = http("POST", f"{worker.base_url}/jobs/{deep[0]}/cancel")
    assert (status, answer) == (200, {"id": deep[0], "status": "cancelled"})
    assert http("GET", f"{worker.base_url}/jobs/00000000-0000-0000-0000-000000000000")[0] == 404
    assert http("GET", f"{worker.base_url}/jobs/not-a-uuid")[0] == 404
    assert http("POST", f"{worker.base_url}/jobs/not-a-uuid/cancel")[0] == 404
    status, answer = http("POST", f"{worker.base_url}/jobs", b'{"parameters": "' + b"x" * 5000 + b'"}')
    assert status == 413 and "too large" in answer["error"]


def test_job_api_needs_the_bearer_token_when_one_is_set(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(env={"ANALYSIS_EXECUTOR_API_TOKEN": "s3cret"})
    body = json.dumps({"analysis_id": create_analysis(db, script=GOOD)}).encode()
    assert http("POST", f"{worker.base_url}/jobs", body)[0] == 401
    assert http("POST", f"{worker.base_url}/jobs", body, token="wrong")[0] == 401
    assert http("POST", f"{worker.base_url}/jobs", body, token="s3cret")[0] == 201
    assert worker.get("/health")[0] == 200  # health and metrics stay open


def test_job_api_is_refused_on_a_public_bind_without_a_token(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--host", "0.0.0.0")
    body = json.dumps({"analysis_id": create_analysis(db, script=GOOD)}).encode()
    status, answer = http("POST", f"{worker.base_url}/jobs", body)
    assert status == 403
    assert "ANALYSIS_EXECUTOR_API_TOKEN" in answer["error"]


# --- completion notification, retention ----------------------------------------------------


def test_final_status_is_announced_on_the_finished_channel(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {JOBS_FINISHED_CHANNEL}")
        job_id = submit(db, create_analysis(db, script=GOOD))
        received = [json.loads(n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
    assert received == [{"id": job_id, "status": "completed"}]


def test_retention_deletes_only_old_finished_jobs_one_replica_at_a_time(
    db: psycopg.Connection, database_url: str
) -> None:
    analysis = create_analysis(db, script=GOOD)
    for status, age_days in [("completed", 40), ("failed", 31), ("pending", 40), ("running", 40), ("completed", 5)]:
        db.execute(
            "INSERT INTO analysis_jobs (analysis_id, status, created_at)"
            " VALUES (%s, %s, now() - make_interval(days => %s))",
            (analysis, status, age_days),
        )
    db.execute(
        "INSERT INTO analysis_jobs (analysis_id, status, created_at)"
        " SELECT %s, 'completed', now() - interval '60 days' FROM generate_series(1, 2500)",
        (analysis,),
    )

    async def prune_twice_at_once() -> list[int]:
        settings = load_settings({"database_url": database_url})
        async with AsyncConnectionPool(database_url, min_size=2, kwargs={"autocommit": True}) as pool:
            return list(
                await asyncio.gather(
                    Pruner(settings, pool, ResultStore(settings)).prune_finished_jobs(),
                    Pruner(settings, pool, ResultStore(settings)).prune_finished_jobs(),
                )
            )

    deleted = asyncio.run(prune_twice_at_once())
    assert sorted(deleted) == [0, 2502]
    left = db.execute(
        "SELECT status, extract(day from now() - created_at)::int FROM analysis_jobs ORDER BY 2"
    ).fetchall()
    assert left == [("completed", 5), ("pending", 40), ("running", 40)]
