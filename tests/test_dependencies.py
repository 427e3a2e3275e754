"""Datasource dependencies: declared read-only queries whose rows reach the script.

Real worker processes on a real database; a second database stands in for a
separately configured datasource.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.conftest import WorkerProcess, create_analysis, free_port, submit, wait_for_jobs
from worker.config import ConfigError, load_datasources

ECHO_DATASETS = "export default function analyze(params, ctx) { return ctx.datasets; }"


def declare(db: psycopg.Connection, analysis_id: str, name: str, query: str, datasource: str = "main") -> None:
    db.execute(
        "INSERT INTO analysis_dependencies (analysis_id, name, datasource, query) VALUES (%s, %s, %s, %s)",
        (analysis_id, name, datasource, query),
    )


@pytest.fixture
def readings(db: psycopg.Connection) -> None:
    """A small table of sensor readings in the executor's own database."""
    db.execute(
        "CREATE TABLE readings (site text, taken_at timestamptz, value numeric, tag uuid, extra jsonb, raw bytea)"
    )
    db.execute(
        """
        INSERT INTO readings VALUES
            ('north', '2026-01-01T10:00:00Z', 1.5, '6f1c1b1e-8a5e-4c49-9d7e-0f6a4bde2c01', '{"ok": true}', '\\x0102'),
            ('north', '2026-01-01T11:00:00Z', 2, NULL, NULL, NULL),
            ('south', '2026-01-01T10:00:00Z', 7.25, NULL, NULL, NULL)
        """
    )


def test_dependency_rows_reach_javascript_with_parameters_bound(
    db: psycopg.Connection, readings: None, start_worker: Callable[..., WorkerProcess]
) -> None:
    analysis = create_analysis(
        db,
        script="""
        export default function analyze(params, ctx) {
            const rows = ctx.datasets.readings;
            return {site: params.site, count: rows.length, total: rows.reduce((a, r) => a + r.value, 0),
                    first: rows[0], limits: ctx.datasets.limits};
        }""",
    )
    declare(db, analysis, "readings", "SELECT * FROM readings WHERE site = %(site)s ORDER BY taken_at")
    declare(db, analysis, "limits", "SELECT %(threshold)s::int AS threshold, 'a%%' AS pattern")
    start_worker()
    job = submit(db, analysis, {"site": "north", "threshold": 5})
    row = wait_for_jobs(db, [job])[job]
    assert row["status"] == "completed", row["error_message"]
    assert row["result"]["count"] == 2
    assert row["result"]["total"] == 3.5
    assert row["result"]["first"] == {
        "site": "north",
        "taken_at": "2026-01-01T10:00:00+00:00",
        "value": 1.5,
        "tag": "6f1c1b1e-8a5e-4c49-9d7e-0f6a4bde2c01",
        "extra": {"ok": True},
        "raw": "AQI=",
    }
    assert row["result"]["limits"] == [{"threshold": 5, "pattern": "a%"}]


def test_dependency_rows_reach_python_on_stdin(
    db: psycopg.Connection, readings: None, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    (scripts_dir / "site_total.py").write_text(
        "import json, sys\n"
        "data = json.load(sys.stdin)\n"
        "rows = data['datasets']['readings']\n"
        "print(json.dumps({'site': data['site'], 'total': sum(r['value'] for r in rows)}))\n"
    )
    analysis = create_analysis(db, script_name="site_total")
    declare(db, analysis, "readings", "SELECT value FROM readings WHERE site = %(site)s")
    start_worker()
    job = submit(db, analysis, {"site": "south"})
    row = wait_for_jobs(db, [job])[job]
    assert row["status"] == "completed", (row["error_message"], row["stderr"])
    assert row["result"] == {"site": "south", "total": 7.25}


def test_analysis_without_dependencies_gets_empty_datasets_and_plain_stdin(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    (scripts_dir / "echo_input.py").write_text("import sys\nprint(sys.stdin.read())\n")
    js = create_analysis(db, script=ECHO_DATASETS)
    py = create_analysis(db, script_name="echo_input")
    start_worker()
    jobs = [submit(db, js), submit(db, py, {"a": 1})]
    rows = wait_for_jobs(db, jobs)
    assert rows[jobs[0]]["result"] == {}
    assert rows[jobs[1]]["result"] == {"a": 1}


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO readings (site) VALUES ('written')",
        "WITH w AS (DELETE FROM readings RETURNING *) SELECT count(*) FROM w",
        "CREATE TABLE sneaky (i int)",
        "SELECT set_config('search_path', 'nowhere', false)",
    ],
)
def test_dependency_that_writes_is_refused_by_the_read_only_transaction(
    db: psycopg.Connection, readings: None, start_worker: Callable[..., WorkerProcess], query: str
) -> None:
    analysis = create_analysis(db, script=ECHO_DATASETS)
    declare(db, analysis, "sneaky", query)
    check = create_analysis(db, script=ECHO_DATASETS)
    declare(
        db, check, "mode", "SELECT current_setting('transaction_read_only') AS ro, current_setting('search_path') AS sp"
    )
    # One connection, so the follow-up runs on the very connection the first query used.
    start_worker("--concurrency", "1", env={"DATASOURCE_POOL_SIZE": "1"})
    job = submit(db, analysis)
    row = wait_for_jobs(db, [job])[job]
    if "set_config" in query:
        # Allowed to run, but the transaction is rolled back: nothing sticks to the pooled connection.
        assert row["status"] == "completed"
    else:
        assert row["status"] == "failed"
        assert row["error_message"].startswith("dependency 'sneaky' (datasource 'main') failed: cannot execute")
        assert "read-only transaction" in row["error_message"]
        assert row["attempts"] == 1  # the query's fault: not retried
    follow_up = submit(db, check)
    assert wait_for_jobs(db, [follow_up])[follow_up]["result"] == {"mode": [{"ro": "on", "sp": '"$user", public'}]}
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (3,)
    assert db.execute("SELECT to_regclass('sneaky')").fetchone() == (None,)


def test_parameters_are_bound_never_formatted_into_the_query(
    db: psycopg.Connection, readings: None, start_worker: Callable[..., WorkerProcess]
) -> None:
    analysis = create_analysis(db, script=ECHO_DATASETS)
    declare(db, analysis, "readings", "SELECT site FROM readings WHERE site = %(site)s")
    start_worker()
    job = submit(db, analysis, {"site": "north'; DELETE FROM readings; --"})
    row = wait_for_jobs(db, [job])[job]
    assert row["status"] == "completed"
    assert row["result"] == {"readings": []}
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (3,)


def test_failing_dependencies_fail_the_job_naming_the_dependency(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    cases = {
        "slow": ("SELECT pg_sleep(5)", "main", "dependency 'slow' (datasource 'main') exceeded its 300 ms"),
        "broken": ("SELECT * FROM no_such_table", "main", 'failed: relation "no_such_table" does not exist'),
        "huge": ("SELECT g FROM generate_series(1, 1000000) AS g", "main", "returned more than 1000 rows"),
        "wide": (
            "SELECT repeat('x', 10000) AS blob FROM generate_series(1, 200)",
            "main",
            "brought the job's datasets over 1.0 MiB (DEPENDENCY_MAX_BYTES)",
        ),
        "needs": ("SELECT %(missing)s AS x", "main", "the query uses %(missing)s but the job has no parameter"),
        "two": ("SELECT 1; DELETE FROM analysis_jobs", "main", "cannot insert multiple commands"),
        "elsewhere": ("SELECT 1", "warehouse", "uses datasource 'warehouse', which this worker does not have"),
    }
    jobs = {}
    for name, (query, datasource, _) in cases.items():
        analysis = create_analysis(db, script=ECHO_DATASETS)
        declare(db, analysis, name, query, datasource)
        jobs[name] = submit(db, analysis)
    ok = create_analysis(db, script="export default () => 'still fine'")
    limits = {"DEPENDENCY_TIMEOUT_MS": "300", "DEPENDENCY_MAX_ROWS": "1000", "DEPENDENCY_MAX_BYTES": "1048576"}
    start_worker("--concurrency", "2", env=limits)
    rows = wait_for_jobs(db, list(jobs.values()))
    for name, (_, _, message) in cases.items():
        row = rows[jobs[name]]
        assert row["status"] == "failed", name
        assert f"dependency '{name}'" in row["error_message"]
        assert message in row["error_message"], row["error_message"]
    after = submit(db, ok)
    assert wait_for_jobs(db, [after])[after]["result"] == "still fine"


def test_json_nested_too_deeply_for_the_worker_fails_the_job_at_once(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    # PostgreSQL accepts JSON nested 5,000 deep; Python's json module does not.
    nested = "(repeat('[', 5000) || repeat(']', 5000))"
    from_rows = create_analysis(db, script=ECHO_DATASETS)
    declare(db, from_rows, "nested", f"SELECT {nested}::jsonb AS value")
    from_parameters = create_analysis(db, script=ECHO_DATASETS)
    declare(db, from_parameters, "plain", "SELECT 1 AS one")
    jobs = {"rows": submit(db, from_rows)}
    row = db.execute(
        f"INSERT INTO analysis_jobs (analysis_id, parameters) VALUES (%s, jsonb_build_object('a', {nested}::jsonb))"
        " RETURNING id",
        (from_parameters,),
    ).fetchone()
    assert row is not None
    jobs["parameters"] = str(row[0])
    ok = create_analysis(db, script="export default () => 'still fine'")
    start_worker()
    # Well before the lease (30 s) would return a job whose task died. Not the
    # parameters: this test's own client cannot load them either.
    rows = wait_for_jobs(db, list(jobs.values()), timeout=20, columns="attempts, error_message")
    assert rows[jobs["rows"]]["error_message"] == (
        "dependency 'nested' (datasource 'main') returned a JSON value nested too deeply to load (over ~1,000 levels)"
    )
    assert rows[jobs["parameters"]]["error_message"] == (
        "the job's parameters are nested more than 500 levels deep: too deep to bind into its dependencies' queries"
    )
    for job in jobs.values():
        assert (rows[job]["status"], rows[job]["attempts"]) == ("failed", 1)
    after = submit(db, ok)
    assert wait_for_jobs(db, [after])[after]["result"] == "still fine"


def test_second_datasource_from_the_environment_and_pools_are_reused(
    db: psycopg.Connection,
    empty_database_url: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as warehouse:
        warehouse.execute("CREATE TABLE sales AS SELECT g AS id, g * 10 AS amount FROM generate_series(1, 5) AS g")
    analysis = create_analysis(
        db, script="export default (p, ctx) => ctx.datasets.sales.reduce((a, r) => a + r.amount, 0)"
    )
    declare(db, analysis, "sales", "SELECT amount FROM sales WHERE id <= %(upto)s", datasource="warehouse")
    start_worker(
        "--concurrency", "4", env={"DATASOURCE_WAREHOUSE_URL": empty_database_url, "DATASOURCE_POOL_SIZE": "2"}
    )
    jobs = [submit(db, analysis, {"upto": n}) for n in range(1, 6) for _ in range(8)]
    rows = wait_for_jobs(db, jobs)
    assert sorted({row["result"] for row in rows.values()}) == [10, 30, 60, 100, 150]
    with psycopg.connect(empty_database_url, autocommit=True) as warehouse:
        connections = warehouse.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'analysis-executor datasource warehouse'"
        ).fetchone()
    assert connections is not None and 1 <= connections[0] <= 2


def test_unreachable_datasource_is_retried_then_fails_with_its_name(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    # A 2 s job time limit bounds the wait for a connection too.
    analysis = create_analysis(db, script=ECHO_DATASETS, timeout_ms=2000)
    declare(db, analysis, "remote", "SELECT 1", datasource="offline")
    start_worker(env={"DATASOURCE_OFFLINE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none?connect_timeout=1"})
    job = submit(db, analysis, max_attempts=2)
    row = wait_for_jobs(db, [job])[job]
    assert row["status"] == "failed"
    assert row["attempts"] == 2  # not the query's fault: retried once
    assert row["error_message"].startswith("dependency 'remote' (datasource 'offline')")
    assert "no connection to the datasource within 2 s" in row["error_message"]


def test_datasources_from_file_and_environment(tmp_path: Path) -> None:
    main = "postgresql://app@127.0.0.1/app"
    file = tmp_path / "datasources.json"
    file.write_text(json.dumps({"Warehouse": "postgresql://r@10.0.0.5/dw", "crm": {"url": "postgresql://c@crm/crm"}}))
    found = load_datasources(main, {"DATASOURCE_CRM_URL": "postgresql://env@crm/crm"}, str(file))
    assert dict(found) == {
        "main": main,
        "warehouse": "postgresql://r@10.0.0.5/dw",
        "crm": "postgresql://env@crm/crm",
    }
    assert dict(load_datasources(main, {}, None)) == {"main": main}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[1]", "must hold a JSON object"),
        ('{"x": 5}', "datasource 'x' needs a URL string"),
        ('{"x": "mysql://u@h/d"}', "datasource 'x':"),
        ('{"bad-name": "postgresql://u@h/d"}', "names are letters, digits and underscores"),
    ],
)
def test_bad_datasources_file_is_a_clear_config_error(tmp_path: Path, content: str, message: str) -> None:
    file = tmp_path / "datasources.json"
    file.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_datasources("postgresql://app@127.0.0.1/app", {}, str(file))


def test_session_state_a_dependency_leaves_behind_is_discarded(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    analysis = create_analysis(db, script=ECHO_DATASETS)
    declare(db, analysis, "lock", "SELECT pg_advisory_lock(7310598114230005006) IS NULL AS taken")
    start_worker(env={"DATASOURCE_POOL_SIZE": "1"})
    job = submit(db, analysis)
    assert wait_for_jobs(db, [job])[job]["status"] == "completed"
    # The executor's own submitters need that lock: a query must never keep it.
    held = db.execute(
        "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
        " WHERE locktype = 'advisory' AND application_name LIKE 'analysis-executor datasource%'"
    ).fetchone()
    assert held == (0,)
    follow_up = submit(db, create_analysis(db, script="export default () => 1"))
    assert wait_for_jobs(db, [follow_up], timeout=10)[follow_up]["status"] == "completed"


def test_python_job_with_a_datasets_parameter_is_told_to_rename_it(
    db: psycopg.Connection, readings: None, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    (scripts_dir / "noop.py").write_text("print(1)\n")
    analysis = create_analysis(db, script_name="noop")
    declare(db, analysis, "readings", "SELECT 1")
    start_worker()
    job = submit(db, analysis, {"datasets": [1]})
    row = wait_for_jobs(db, [job])[job]
    assert row["status"] == "failed"
    assert "parameter named 'datasets'" in row["error_message"]
