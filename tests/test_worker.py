"""The worker end to end: real worker processes, a real PostgreSQL, real HTTP."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.conftest import WorkerProcess, create_analysis, submit, wait_for_jobs
from tests.test_schema import SEED_MONITORING_QUERIES, SEED_SUBMIT_JOB

SEED_SCRIPT = 'export default function analyze(data) { return {result: "success"}; }'


def test_seed_flow_runs_the_seed_job_and_reports_it(
    db: psycopg.Connection, analysis_id: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    row = db.execute(SEED_SUBMIT_JOB + " RETURNING id", (analysis_id,)).fetchone()
    assert row is not None
    job_id = str(row[0])
    job = wait_for_jobs(db, [job_id])[job_id]
    assert job["status"] == "completed"
    assert job["result"] == {"result": "success"}
    assert job["attempts"] == 1
    assert job["analysis_version"] == 1
    assert job["worker_id"]
    assert job["started_at"] <= job["completed_at"]
    assert job["duration_ms"] is not None and job["duration_ms"] >= 0
    assert job["error_message"] is None
    for query in SEED_MONITORING_QUERIES:
        db.execute(query).fetchall()
    success = db.execute(SEED_MONITORING_QUERIES[3]).fetchone()
    assert success is not None and success[:2] == (1, 1)

    status, body = worker.get("/health")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "healthy"
    assert health["jobs_processed"] == 1
    assert health["listener"] == "connected"
    assert {"version", "jobs_in_flight", "uptime_seconds"} <= health.keys()
    assert worker.stop() == 0
    output = worker.output()
    for message in ("Analysis Executor starting...", "Job poller started", f"Job {job_id} completed successfully"):
        assert message in output


def test_failed_job_is_logged_with_its_error(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    analysis = create_analysis(db, script='export default function analyze() { throw new Error("no data"); }')
    job_id = submit(db, analysis)
    job = wait_for_jobs(db, [job_id])[job_id]
    assert job["status"] == "failed"
    assert job["error_message"].startswith("Error: no data")
    worker.stop()
    assert f"Job {job_id} failed: Error: no data" in worker.output()


def test_notification_wakes_an_idle_worker_long_before_its_poll(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker("--poll-interval-ms", "600000")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    job_id = submit(db, analysis)
    assert wait_for_jobs(db, [job_id], timeout=20)[job_id]["status"] == "completed"


def test_no_job_waits_for_the_poll_while_submitters_race_a_worker_going_idle(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Submitters notify only a waiting worker; whatever the interleaving, none is left for the poll."""
    start_worker("--poll-interval-ms", "600000", "--concurrency", "4")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    committed: list[tuple[str, float]] = []
    lock = threading.Lock()

    def submitter(seed: int) -> None:
        chance = random.Random(seed)
        with psycopg.connect(database_url) as conn:
            for _ in range(60):
                row = conn.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s) RETURNING id", (analysis,))
                job_id = str(row.fetchone()[0])  # type: ignore[index]
                time.sleep(chance.choice([0, 0, 0.001, 0.02]))  # some transactions stay open a while
                conn.commit()
                with lock:
                    committed.append((job_id, time.time()))
                time.sleep(chance.choice([0, 0.002, 0.01, 0.05]))  # bursts and idle gaps

    threads = [threading.Thread(target=submitter, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    rows = wait_for_jobs(db, [job_id for job_id, _ in committed], timeout=30)
    assert {row["status"] for row in rows.values()} == {"completed"}
    slowest = max(rows[job_id]["started_at"].timestamp() - at for job_id, at in committed)
    assert slowest < 5, f"a job waited {slowest:.1f}s after its commit"


def test_a_worker_whose_last_full_claim_emptied_the_queue_still_picks_up_new_jobs_at_once(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    """A full claim reads as "more may be waiting"; the queue may just as well be empty now."""
    (scripts_dir / "sleepy.py").write_text("import time\ntime.sleep(6)\nprint(1)\n")
    sleepy = create_analysis(db, script_name="sleepy")
    quick = create_analysis(db, script=SEED_SCRIPT)
    with db.transaction():
        first = [submit(db, quick)] + [submit(db, sleepy) for _ in range(7)]
    start_worker("--poll-interval-ms", "600000", "--concurrency", "8")  # claims all eight at start-up
    wait_for_jobs(db, first[:1], timeout=20)
    late = submit(db, quick)
    row = wait_for_jobs(db, [late], timeout=20)[late]
    waited = (row["started_at"] - row["created_at"]).total_seconds()
    assert waited < 2, f"the new job waited {waited:.1f}s for a worker with 1 of 8 slots free"


def test_poll_path_finds_jobs_without_a_listener(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--no-listen", "--poll-interval-ms", "100")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    job_ids = [submit(db, analysis) for _ in range(3)]
    assert {j["status"] for j in wait_for_jobs(db, job_ids).values()} == {"completed"}
    assert json.loads(worker.get("/health")[1])["listener"] == "disabled"
    assert 'analysis_executor_wakeups_total{source="poll"}' in worker.get("/metrics")[1]


def test_jobs_inserted_before_start_are_claimed_at_start_up(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    analysis = create_analysis(db, script=SEED_SCRIPT)
    job_ids = [submit(db, analysis) for _ in range(4)]
    start_worker("--poll-interval-ms", "600000")
    assert {j["status"] for j in wait_for_jobs(db, job_ids, timeout=20).values()} == {"completed"}


def test_future_job_runs_when_due_by_timer(db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker("--poll-interval-ms", "600000")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    row = db.execute("SELECT now() + interval '1.5 seconds'").fetchone()
    assert row is not None
    run_at = row[0]
    job_id = submit(db, analysis, run_at=run_at)
    job = wait_for_jobs(db, [job_id], timeout=20)[job_id]
    assert job["status"] == "completed"
    assert job["started_at"] >= run_at


def test_priority_orders_the_backlog(db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]) -> None:
    analysis = create_analysis(db, script=SEED_SCRIPT)
    low = [submit(db, analysis, priority=0) for _ in range(3)]
    high = [submit(db, analysis, priority=10) for _ in range(3)]
    start_worker("--concurrency", "1")
    rows = wait_for_jobs(db, low + high)
    assert max(rows[j]["started_at"] for j in high) < min(rows[j]["started_at"] for j in low)


def test_never_more_than_max_concurrent_jobs_at_once(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    busy = "export default function analyze() { const end = Date.now() + 150; while (Date.now() < end) {} return 1; }"
    analysis = create_analysis(db, script=busy)
    job_ids = [submit(db, analysis) for _ in range(10)]
    start_worker("--concurrency", "2")
    rows = list(wait_for_jobs(db, job_ids).values())
    assert {r["status"] for r in rows} == {"completed"}
    events = sorted([(r["started_at"], 1) for r in rows] + [(r["completed_at"], -1) for r in rows])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak <= 2
    assert peak == 2  # the cap is also used, not just respected


def test_inactive_analysis_fails_its_jobs_clearly(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    analysis = create_analysis(db, script=SEED_SCRIPT, is_active=False)
    job_id = submit(db, analysis)
    job = wait_for_jobs(db, [job_id])[job_id]
    assert job["status"] == "failed"
    assert "inactive" in job["error_message"]


def test_new_script_version_is_what_runs_and_is_recorded(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    db.execute(
        "UPDATE analyses SET script_content = 'export default function analyze() { return 2; }' WHERE id = %s",
        (analysis,),
    )
    job_id = submit(db, analysis)
    job = wait_for_jobs(db, [job_id])[job_id]
    assert (job["result"], job["analysis_version"]) == (2, 2)


def test_json_log_format_gives_one_object_per_line(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--log-format", "json")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    job_id = submit(db, analysis)
    wait_for_jobs(db, [job_id])
    worker.stop()
    entries = [json.loads(line) for line in worker.output().splitlines() if line.strip()]
    finished = [e for e in entries if e.get("job_id") == job_id and "completed successfully" in e["message"]]
    assert finished and finished[0]["analysis_id"] == analysis and finished[0]["worker_id"]
    assert any(e["message"].startswith("Analysis Executor starting...") for e in entries)


def test_metrics_expose_the_documented_families(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--concurrency", "3")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    wait_for_jobs(db, [submit(db, analysis)])
    status, text = worker.get("/metrics")
    assert status == 200
    for name in (
        'analysis_executor_jobs_claimed_total{runtime="javascript"} 1.0',
        'analysis_executor_jobs_finished_total{runtime="javascript",status="completed"} 1.0',
        "analysis_executor_job_duration_seconds_bucket",
        "analysis_executor_job_queue_wait_seconds_bucket",
        "analysis_executor_jobs_in_flight 0.0",
        "analysis_executor_pool_size 3.0",
        'analysis_executor_queue_depth{status="pending"}',
        "analysis_executor_oldest_pending_job_age_seconds",
        'analysis_executor_wakeups_total{source="notify"}',
        "analysis_executor_database_errors_total",
        "analysis_executor_listener_connected 1.0",
    ):
        assert name in text, name


def test_metrics_show_the_worker_and_each_pool_child_and_how_fresh_the_queue_gauges_are(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("--concurrency", "3", "--pool-processes", "3")
    deadline = time.monotonic() + 10
    while "analysis_executor_queue_stats_last_refresh_timestamp_seconds 0.0" in worker.get("/metrics")[1]:
        assert time.monotonic() < deadline, "the queue gauges were never refreshed"
        time.sleep(0.1)
    samples = {}
    for line in worker.get("/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["process_resident_memory_bytes"] > 10 * 2**20
    assert "process_cpu_seconds_total" in samples and "process_start_time_seconds" in samples
    slots = [f'{{slot="{n}"}}' for n in range(3)]
    assert all(samples[f"analysis_executor_pool_child_resident_memory_bytes{s}"] > 2**20 for s in slots)
    assert all(f"analysis_executor_pool_child_cpu_seconds_total{s}" in samples for s in slots)
    assert abs(time.time() - samples["analysis_executor_queue_stats_last_refresh_timestamp_seconds"]) < 60


def test_readiness_and_liveness_endpoints(start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker()
    assert worker.get("/health/live")[0] == 200
    status, body = worker.get("/health/ready")
    assert (status, json.loads(body)["status"]) == (200, "ready")


def test_sigterm_stops_the_worker_with_exit_0(start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker()
    assert worker.stop() == 0
    assert "Analysis Executor stopped" in worker.output()


def test_stored_text_survives_nul_characters(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    analysis = create_analysis(
        db, script='export default function analyze() { console.log("a\\u0000b"); return {s: "x\\u0000y"}; }'
    )
    job = wait_for_jobs(db, [submit(db, analysis)])
    (row,) = job.values()
    assert row["status"] == "completed"
    assert row["result"] == {"s": "x\ufffdy"}
    assert row["stdout"] == "a\ufffdb\n"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_finds_nothing_to_complain_about_in_metrics(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    (scripts_dir / "ok.py").write_text("print(1)\n")
    worker = start_worker()
    jobs = [
        submit(db, create_analysis(db, script=SEED_SCRIPT)),
        submit(db, create_analysis(db, script="export default function analyze() { throw 1; }")),
        submit(db, create_analysis(db, script_name="ok")),
    ]
    wait_for_jobs(db, jobs)
    _, text = worker.get("/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (check.stdout + check.stderr).strip() == ""


def test_worker_reconnects_and_claims_after_its_connections_are_terminated(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker("--poll-interval-ms", "600000")
    analysis = create_analysis(db, script=SEED_SCRIPT)
    wait_for_jobs(db, [submit(db, analysis)])
    killed = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name LIKE 'analysis-executor%%' AND datname = current_database()"
    ).fetchone()
    assert killed is not None and killed[0] >= 2
    job_id = submit(db, analysis)
    assert wait_for_jobs(db, [job_id], timeout=30)[job_id]["status"] == "completed"
    later = submit(db, analysis)
    assert wait_for_jobs(db, [later], timeout=30)[later]["status"] == "completed"
    assert json.loads(worker.get("/health")[1])["listener"] == "connected"
