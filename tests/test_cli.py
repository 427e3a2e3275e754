"""The command line against a real database: submit, status, jobs, show, scripts, schedules, run's errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.conftest import WorkerProcess, create_analysis, free_port, wait_for_jobs
from worker.migrate import shipped_migration_ids


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ANALYTICS_SCRIPTS_DIR")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def test_submit_wait_prints_the_result(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    analysis = create_analysis(db, script="export default function analyze(p) { return {double: p.n * 2}; }")
    result = cli("submit", analysis, "--params", '{"n": 21}', "--wait", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["status"], printed["result"]) == ("completed", {"double": 42})
    row = db.execute("SELECT triggered_by FROM analysis_jobs WHERE id = %s", (printed["id"],)).fetchone()
    assert row == ("cli",)


def test_submit_without_wait_prints_the_job_id_and_show_prints_the_row(
    db: psycopg.Connection, database_url: str
) -> None:
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    env = {"DATABASE_URL": database_url}
    submitted = cli("submit", analysis, "--priority", "5", "--run-at", "2030-01-01T00:00:00+00:00", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    shown = cli("show", job_id, env=env)
    assert shown.returncode == 0
    job = json.loads(shown.stdout)
    assert (job["status"], job["priority"], job["run_at"][:4]) == ("pending", 5, "2030")
    listed = cli("jobs", "--status", "pending", env=env)
    assert job_id in listed.stdout
    status = cli("status", env=env)
    assert status.returncode == 0
    assert "scheduled (future)   1" in status.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--params", "{not json"], "not valid JSON"),
        (["--params", "[1, 2]"], "must be a JSON object"),
        (["--params", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"], "parameters are nested more than 500 levels deep"),
        (["--run-at", "tomorrow"], "not an ISO 8601 timestamp"),
        (["--max-attempts", "0"], "at least 1"),
        (["--priority", "99999999999"], "integer out of range"),
    ],
)
def test_submit_bad_input_exits_2_with_one_line(
    db: psycopg.Connection, database_url: str, args: list[str], message: str
) -> None:
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    result = cli("submit", analysis, *args, "--database-url", database_url)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert db.execute("SELECT count(*) FROM analysis_jobs").fetchone() == (0,)


def test_submit_for_an_unknown_analysis_exits_2(database_url: str) -> None:
    result = cli("submit", "00000000-0000-0000-0000-000000000000", "--database-url", database_url)
    assert result.returncode == 2
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("job_id", ["00000000-0000-0000-0000-000000000000", "not-a-uuid"])
def test_show_of_an_unknown_job_exits_2(database_url: str, job_id: str) -> None:
    result = cli("show", job_id, "--database-url", database_url)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0


def test_show_of_a_job_nested_too_deeply_to_load_exits_1_saying_so(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    row = db.execute(
        "INSERT INTO analysis_jobs (analysis_id, run_at, parameters) VALUES"
        " (%s, now() + interval '1 day', jsonb_build_object('a', (repeat('[', 5000) || repeat(']', 5000))::jsonb))"
        " RETURNING id::text",
        (analysis,),
    ).fetchone()
    assert row is not None
    result = cli("show", row[0], "--database-url", database_url)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"analysis-executor: error: job {row[0]}: its parameters or result are nested too deeply to load "
        "(over ~1,000 levels); read them with SQL"
    )


def test_scripts_lists_the_whitelist(tmp_path: Path) -> None:
    (tmp_path / "recalibrate_weights.py").write_text("")
    (tmp_path / "agreement.py").write_text("")
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    result = cli("scripts", env={"ANALYTICS_SCRIPTS_DIR": str(tmp_path)})
    assert result.stdout.split() == ["agreement", "recalibrate_weights"]
    missing = cli("scripts", "--scripts-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2


def test_unknown_command_and_bad_flag_exit_2() -> None:
    assert cli("frobnicate").returncode == 2
    assert cli("run", "--concurrency", "many").returncode == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_CONCURRENT_JOBS": "0"}, "MAX_CONCURRENT_JOBS"),
        ({"POLL_INTERVAL_MS": "soon"}, "POLL_INTERVAL_MS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ],
)
def test_run_with_a_bad_setting_exits_2_naming_it(database_url: str, env: dict[str, str], message: str) -> None:
    result = cli("run", "--database-url", database_url, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_run_without_a_database_exits_1(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = cli("run", "--database-url", f"postgresql://u:pw@127.0.0.1:{port}/x", "--port", str(free_port()))
    assert result.returncode == 1
    assert "cannot connect to the database" in result.stderr
    assert "pw@" not in result.stderr


def test_run_on_an_unmigrated_database_exits_1(empty_database_url: str) -> None:
    result = cli("run", "--database-url", empty_database_url, "--port", str(free_port()))
    assert result.returncode == 1
    assert "analysis-executor migrate" in result.stderr


def test_run_on_a_database_missing_the_latest_migration_exits_1_naming_it(database_url: str) -> None:
    latest = shipped_migration_ids()[-1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM _yoyo_migration WHERE migration_id = %s", (latest,))
    result = cli("run", "--database-url", database_url, "--port", str(free_port()))
    assert result.returncode == 1
    assert f"not applied: {latest}" in result.stderr


def test_run_with_the_seed_flags(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    port = str(free_port())
    worker = start_worker(
        "--port", port, "--database-url", database_url, "--log-level", "info", test_defaults=False
    )  # fmt: skip
    analysis = create_analysis(db, script="export default function analyze() { return 'ok'; }")
    row = db.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s) RETURNING id", (analysis,)).fetchone()
    assert row is not None
    assert wait_for_jobs(db, [str(row[0])])[str(row[0])]["result"] == "ok"
    assert worker.stop() == 0


def test_schedules_add_list_pause_resume_remove(db: psycopg.Connection, database_url: str) -> None:
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    env = {"DATABASE_URL": database_url}
    added = cli(
        "schedules", "add", analysis, "30 2 * * MON-FRI", "--timezone", "Europe/Berlin",
        "--parameters", '{"region": "eu"}', "--catch-up", "all", env=env,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    schedule = added.stdout.strip()
    row = db.execute(
        "SELECT cron_expression, timezone, parameters, catch_up, is_active FROM analysis_schedules WHERE id = %s",
        (schedule,),
    ).fetchone()
    assert row == ("30 2 * * MON-FRI", "Europe/Berlin", {"region": "eu"}, "all", True)
    db.execute("UPDATE analysis_schedules SET last_error = 'analysis is inactive' WHERE id = %s", (schedule,))

    listed = cli("schedules", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    header, line = listed.stdout.splitlines()
    assert header.split()[:4] == ["id", "analysis", "cron", "timezone"]
    assert line.startswith(schedule) and "30 2 * * MON-FRI" in line and "Europe/Berlin" in line
    assert line.endswith("analysis is inactive")

    assert cli("schedules", "pause", schedule, env=env).stdout.strip() == f"schedule {schedule} paused"
    assert db.execute("SELECT is_active FROM analysis_schedules WHERE id = %s", (schedule,)).fetchone() == (False,)
    assert "  no  " in cli("schedules", "list", env=env).stdout
    assert cli("schedules", "resume", schedule, env=env).stdout.strip() == f"schedule {schedule} resumed"
    assert db.execute("SELECT is_active FROM analysis_schedules WHERE id = %s", (schedule,)).fetchone() == (True,)
    removed = cli("schedules", "remove", schedule, "--database-url", database_url)
    assert removed.returncode == 0 and removed.stdout.strip() == f"schedule {schedule} removed"
    assert db.execute("SELECT count(*) FROM analysis_schedules").fetchone() == (0,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["61 * * * *"], 'invalid cron expression "61 * * * *": minute 61 is out of range 0-59'),
        (["@daily", "--timezone", "Mars/Base"], 'unknown time zone "Mars/Base": use an IANA name such as'),
        (["@daily", "--parameters", "[1]"], "must be a JSON object"),
        (["@daily", "--catch-up", "never"], "invalid choice: 'never'"),
    ],
)
def test_schedules_add_with_bad_input_exits_2_with_one_line(
    db: psycopg.Connection, database_url: str, args: list[str], message: str
) -> None:
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    result = cli("schedules", "add", analysis, *args, "--database-url", database_url)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert db.execute("SELECT count(*) FROM analysis_schedules").fetchone() == (0,)


@pytest.mark.parametrize("action", ["pause", "resume", "remove"])
@pytest.mark.parametrize("schedule_id", ["00000000-0000-0000-0000-000000000000", "not-a-uuid"])
def test_schedules_change_of_an_unknown_schedule_exits_2(database_url: str, action: str, schedule_id: str) -> None:
    result = cli("schedules", action, schedule_id, "--database-url", database_url)
    assert result.returncode == 2
    assert "does not exist" in result.stderr or "is not a schedule id" in result.stderr


def test_schedules_add_for_an_unknown_analysis_exits_2(database_url: str) -> None:
    result = cli("schedules", "add", "00000000-0000-0000-0000-000000000000", "@daily", "--database-url", database_url)
    assert result.returncode == 2
    assert "analysis 00000000-0000-0000-0000-000000000000 does not exist" in result.stderr
